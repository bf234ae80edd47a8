"""The ratio estimator: each ratio.method's accuracy and cost, and how an episode's cost grows with N, d and B."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.setup.config import config_from_dict
from distq.setup.machine import keep_freed_memory

BENCH = Path(__file__).resolve().parents[1] / "bench.py"  # its hidden `_scale_cell` command runs one scale cell


def bench_ratio(repeats: int) -> dict:
    """Bias and variance of the running reward (E14) under each ratio.method, against the all-points estimator:
    Gaussian data N(0.5, I) of N = 10,000 points in d = 2 and 16, 300 queries from the noised law at t = 0.1, 0.5,
    1 (ou); the action is the all-points score, so the exact estimator's reward is 0 and the method's is
    -(g^2 / 2)|s_method - s_all|^2. Bias: its mean; variance: its variance over `repeats` minibatch draws (knn is
    deterministic), averaged over the queries; both relative to g^2/2 |s_all|^2. Also ms per call for B = 300."""
    from distq.maths.ratio import RatioEstimator, knn_ratio_score, ratio_score

    n, batch, results = 10_000, 300, []
    for dim in (2, 16):
        gen = torch.Generator().manual_seed(dim)
        data = 0.5 + torch.randn(n, dim, generator=gen)
        for t in (0.1, 0.5, 1.0):
            mu, sigma2 = math.exp(-t), 1 - math.exp(-2 * t)
            x = mu * 0.5 + math.sqrt(mu**2 + sigma2) * torch.randn(batch, dim, generator=gen)
            exact = ratio_score(x, data, mu, sigma2)
            scale = float(exact.pow(2).sum(-1).mean())
            began = time.perf_counter()
            ratio_score(x, data, mu, sigma2)
            row = {"dim": dim, "t": t, "exact_ms": 1e3 * (time.perf_counter() - began)}
            for m in (64, 256, 1024, 4096):
                estimator = RatioEstimator(data, minibatch=m)
                began = time.perf_counter()
                draws = torch.stack([-(estimator.score(x, mu, sigma2, estimator.subset(gen)) - exact).pow(2).sum(-1)
                                     for _ in range(repeats)])
                row[f"minibatch_m{m}"] = {"bias": float(draws.mean()) / scale, "variance": float(draws.var(0).mean())
                                          / scale**2, "ms": 1e3 * (time.perf_counter() - began) / repeats}
            for k in (16, 64, 256, 1024):
                began = time.perf_counter()
                error = -(knn_ratio_score(x, data, mu, sigma2, k) - exact).pow(2).sum(-1)
                row[f"knn_k{k}"] = {"bias": float(error.mean()) / scale, "variance": 0.0,
                                    "ms": 1e3 * (time.perf_counter() - began)}
            results.append(row)
            print(json.dumps(row), flush=True)
    return {"setting": f"N(0.5, I) data, N={n}, {batch} queries from the noised law (ou), {repeats} minibatch draws; "
                       "bias and variance of r_hat relative to g^2/2 |s_all|^2 (the factor g^2/2 cancels)",
            "rows": results}


def _scale_cell(cell: dict) -> dict:
    """One scale measurement, run in its own process so that its peak resident memory is its own: episodes/s of
    the in-process loop (after one warm-up episode) and the process's peak RSS (MB), for data of N points in d."""
    import resource

    from distq.backends.backend import InProcessBackend

    config = config_from_dict({
        "data": ({"source": "digits"} if cell["data"] == "digits" else
                 {"source": "gmm", "n_samples": cell["n"], "dim": cell["d"], "components": 8}),
        "reward": {"fn": "brightness"}, "ratio": {"method": cell["method"]},
        "model": {"hidden": cell.get("hidden", 64)}, "sde": {"T": 5.0, "dt": 0.25},
        "train": {"batch_size": cell["b"], "chunk_size": cell["b"], "beta": 1.0, "episodes": 10**6}})
    torch.set_num_threads(1)
    keep_freed_memory()
    dataset = load_dataset(config.data, config.seed)
    backend = InProcessBackend(config, dataset, load_reward(config.reward, dataset.points[:8]))
    backend.step(1)
    began, episodes = time.perf_counter(), 0
    while episodes < 3 or time.perf_counter() - began < cell.get("seconds", 3.0):
        episodes += 1
        backend.step(episodes + 1)
    rate = episodes / (time.perf_counter() - began)
    return {**cell, "episodes_per_s": rate, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "data_mb": dataset.points.numel() * 4 / 2**20}


def run_cell(cell: dict) -> dict:
    """_scale_cell in a fresh process (its own peak memory); printed as it finishes."""
    import subprocess

    out = subprocess.run([sys.executable, str(BENCH), "_scale_cell", json.dumps(cell)], capture_output=True,
                         text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def bench_scale() -> dict:
    """Episodes/s and peak memory as N (10^2..10^5, d = 2, B = 300), d (2..64, N = 2000, B = 300) and B (100..3000,
    N = 300, d = 2) grow, for each ratio method, each cell in a fresh process; the log-log slope of the time per
    episode against the grown quantity (the growth exponent); and the digits case (N = 1797, d = 64, B = 256)."""
    methods = ("exact", "minibatch", "knn")
    sweeps = {"n": [dict(data="gmm", n=n, d=2, b=300) for n in (100, 1000, 10_000, 100_000)],
              "d": [dict(data="gmm", n=2000, d=d, b=300) for d in (2, 8, 16, 64)],
              "b": [dict(data="gmm", n=300, d=2, b=b) for b in (100, 300, 1000, 3000)]}
    results: dict[str, Any] = {"cells": {}, "growth_exponent": {}}
    for name, cells in sweeps.items():
        for method in methods:
            rows = [run_cell({**cell, "method": method}) for cell in cells]
            results["cells"][f"{name}_{method}"] = rows
            x = np.log([row[name] for row in rows])
            y = np.log([1.0 / row["episodes_per_s"] for row in rows])
            results["growth_exponent"][f"{name}_{method}"] = float(np.polyfit(x, y, 1)[0])
    results["digits_auto"] = run_cell(dict(data="digits", n=1797, d=64, b=256, method="auto", hidden=128))
    small, large = (run_cell(dict(data="gmm", n=n, d=2, b=300, method="auto")) for n in (300, 100_000))
    results["auto_n300_vs_n1e5"] = {"n300": small, "n1e5": large,
                                    "time_ratio": small["episodes_per_s"] / large["episodes_per_s"]}
    results["minibatch_n1e5_vs_n1e6"] = bench_large_minibatch()
    results["setting"] = ("gmm data (8 components), brightness reward, K = 20 sde steps, paper networks (digits: "
                          "hidden 128), in-process, 1 thread; each cell >= 3 s after a warm-up episode")
    return results


def bench_large_minibatch() -> dict:
    """ratio.method minibatch (m = 1024) at N = 10^5 and 10^6 (d = 2, B = 300), side by side in one run: the time
    per episode's ratio (target <= 1.5: drawing a minibatch costs O(m), not O(N)) and the memory above an N = 300
    run's, against the data array's size."""
    base, small, large = (run_cell(dict(data="gmm", n=n, d=2, b=300, method="minibatch")) for n in (300, 10**5, 10**6))
    return {"n300": base, "n1e5": small, "n1e6": large,
            "time_per_episode_ratio_1e6_over_1e5": small["episodes_per_s"] / large["episodes_per_s"],
            "extra_memory_over_data_1e6": (large["peak_rss_mb"] - base["peak_rss_mb"]) / large["data_mb"]}


def plot_scale(result: dict, path: Path) -> None:
    """benchmarks/scale.png: time per episode against N, d and B (log-log), one line per ratio method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    for panel, (name, label) in enumerate((("n", "data points N"), ("d", "dimension d"), ("b", "batch B"))):
        ax = fig.add_subplot(1, 3, panel + 1)
        for method in ("exact", "minibatch", "knn"):
            rows = result["cells"][f"{name}_{method}"]
            slope = result["growth_exponent"][f"{name}_{method}"]
            ax.loglog([r[name] for r in rows], [1e3 / r["episodes_per_s"] for r in rows], marker="o",
                      label=f"{method} (slope {slope:.2f})")
        values = [r[name] for r in result["cells"][f"{name}_exact"]]
        ax.set_xticks(values, [f"{v:,}" for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("ms per episode")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    FigureCanvasAgg(fig).print_png(str(path))
