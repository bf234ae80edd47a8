"""Benchmarks, written as JSON under benchmarks/ and quoted by the README.

    python scripts/bench.py core      # paper-scale speed, side by side: distq vs a plain torch loop, 1 vs 2 threads,
                                      # and distq with train.processes = 2
    python scripts/bench.py quality   # paper-scale Swiss roll runs (beta = 0 and reward-directed): KL and reward
    python scripts/bench.py parallel  # paper-scale speed, side by side: in-process vs Ray rollout actors (W = 1, 2)
    python scripts/bench.py rllib     # env steps/s: distq's batched rollout vs RLlib's env runner on the same MDP
    python scripts/bench.py ratio     # bias and variance of the running reward for each ratio.method, m and k
    python scripts/bench.py scale     # episodes/s and peak memory as N, d and B grow, per ratio method (+ scale.png)

Speed figures are measured in one process, alternating the variants in rounds so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distq.components import build_learner, build_rollout  # noqa: E402
from distq.config import config_from_dict  # noqa: E402
from distq.configfile import load_config  # noqa: E402
from distq.data import load_dataset  # noqa: E402
from distq.policy import StepMeans  # noqa: E402
from distq.rewards import load_reward  # noqa: E402
from distq.rollout import episode_chunks  # noqa: E402
from distq.runtime import keep_freed_memory, machine  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "benchmarks"
PAPER_SCALE = {"data": {"source": "swiss_roll", "n_samples": 300}, "reward": {"fn": "swiss_roll_rectangle"},
               "sde": {"T": 5.0, "dt": 0.25}, "train": {"batch_size": 300, "beta": 1.0}}


def _setup(overrides: dict | None = None):
    config = config_from_dict({**PAPER_SCALE, **(overrides or {})})
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    learner = build_learner(config, dataset.points, reward)
    rollout = build_rollout(config, dataset.points, reward, policy=learner.policy)
    return config, dataset, reward, learner, rollout


def distq_episode(config, learner, rollout):
    """One full episode of distq: rollout, then the learner update."""
    def run(episode: int) -> None:
        learner.update(rollout.run(episode_chunks(config.seed, episode, config.train.batch_size,
                                                  config.train.chunk_size)))
    return run


def plain_episode(config, dataset, reward):
    """The same Algorithm 1 written plainly (nn.Tanh, default Adam, cdist + softmax per step): the reference."""
    d, K, dt, theta, beta = dataset.dim, config.sde.num_steps, config.sde.dt, config.train.temperature, config.train.beta
    net = lambda out: torch.nn.Sequential(torch.nn.Linear(d + 1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                          torch.nn.ReLU(), torch.nn.Linear(64, out))
    policy, value = net(d), net(1)
    opt_p, opt_v = torch.optim.Adam(policy.parameters(), 1e-3), torch.optim.Adam(value.parameters(), 1e-3)
    data, B, T = dataset.points, config.train.batch_size, config.sde.T

    def run(episode: int) -> None:
        y = torch.randn(B, d)
        taus, states, actions, rewards = [], [], [], []
        with torch.no_grad():
            for k in range(K):
                tau = k * dt
                t = T - tau
                mu, s2 = math.exp(-t), 1 - math.exp(-2 * t)
                inp = torch.cat([y, torch.full((B, 1), tau / T)], 1)
                a = policy(inp) + math.sqrt(theta / 2) * torch.randn(B, d)
                w = torch.softmax(-torch.cdist(y, mu * data).pow(2) / (2 * s2), 1)
                score = (-y + mu * w @ data) / s2
                taus.append(inp), states.append(y), actions.append(a)
                rewards.append(-(score - a).pow(2).sum(1))
                y = y + (y + 2 * a) * dt + math.sqrt(2 * dt) * torch.randn(B, d)
        inp, a, r = torch.stack(taus), torch.stack(actions), torch.stack(rewards)
        J = value(inp).squeeze(-1)
        q = -(a - policy(inp)).pow(2).sum(-1) - theta * d / 2 * math.log(2 * math.pi * theta / 2)
        nxt = torch.cat([J[1:].detach(), beta * reward(y)[None]])
        loss = 0.5 * (nxt - J + (r - q) * dt).pow(2).sum(0).mean()
        opt_p.zero_grad(), opt_v.zero_grad()
        loss.backward()
        opt_p.step(), opt_v.step()
    return run


def _rate(run, start: int, episodes: int) -> float:
    began = time.perf_counter()
    for e in range(start, start + episodes):
        run(e)
    return episodes / (time.perf_counter() - began)


def _split(config, learner, rollout) -> dict[str, float]:
    """Milliseconds per episode spent in the ratio estimator, the rollout's network calls, the learner's
    forward/backward and the optimiser step."""
    batch = rollout.run(episode_chunks(0, 0, config.train.batch_size, config.train.chunk_size))
    grid, reps = rollout.grid, 30
    def timed(fn) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - began) / reps * 1e3
    with torch.inference_mode():
        ratio = timed(lambda: [rollout.ratio.score(batch.states[k], float(grid.mu[k]), float(grid.sigma2[k]))
                               for k in range(grid.num_steps)])
        def policy_means():
            means = StepMeans(rollout.policy, rollout._coefficients)
            return [means(k, batch.states[k]) for k in range(grid.num_steps)]
        policy = timed(policy_means)
    def backward():
        for opt in learner.optimizers.values():
            opt.zero_grad()
        learner.loss(batch)[0].backward()
    networks = timed(backward)
    optimizer = timed(lambda: [opt.step() for opt in learner.optimizers.values()])
    total = 1e3 / _rate(distq_episode(config, learner, rollout), 0, reps)
    return {"ratio_estimator_ms": ratio, "rollout_networks_ms": policy, "learner_forward_backward_ms": networks,
            "optimizer_ms": optimizer, "episode_ms": total,
            "other_ms": total - ratio - policy - networks - optimizer}


def bench_core(rounds: int, episodes: int) -> dict:
    """Episodes/s at paper scale (N = 300, d = 2, B = 300, K = 20, sde) of distq (one process with 1 or 2 torch
    threads, or train.processes = 2 with 1 thread each) and of the plain loop (1 or 2 threads)."""
    from distq.split import TwoProcessBackend

    config, dataset, reward, learner, rollout = _setup()
    keep_freed_memory()  # as distq.train does; the plain loop gets the same allocator
    two = TwoProcessBackend(config_from_dict({**PAPER_SCALE, "train": {**PAPER_SCALE["train"], "processes": 2}}),
                            dataset, reward)
    distq, plain = distq_episode(config, learner, rollout), plain_episode(config, dataset, reward)
    variants = {"distq_threads1": (distq, 1), "plain_torch_threads1": (plain, 1), "distq_processes2": (two.step, 1),
                "distq_threads2": (distq, 2), "plain_torch_threads2": (plain, 2)}
    rates = {name: [] for name in variants}
    try:
        for r in range(rounds):
            for name, (run, threads) in variants.items():
                torch.set_num_threads(threads)
                run(1)
                rates[name].append(_rate(run, r * episodes + 2, episodes))
    finally:
        two.close()
    torch.set_num_threads(1)
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "setting": "swiss_roll N=300 d=2 B=300 K=20 sde, paper Table 1 networks",
        "episodes_per_s_median": median, "episodes_per_s_rounds": rates,
        "speedup_vs_plain_threads1": median["distq_threads1"] / median["plain_torch_threads1"],
        "speedup_vs_plain_threads2": median["distq_threads2"] / median["plain_torch_threads2"],
        "speedup_processes2_vs_plain_threads2": median["distq_processes2"] / median["plain_torch_threads2"],
        **{f"minutes_for_50000_episodes_{name}": 50000 / median[f"distq_{name}"] / 60
           for name in ("threads1", "threads2", "processes2")},
        "split_threads1_ms": _split(config, learner, rollout),
    }


def bench_quality(episodes: int, betas: list[float], overrides: list[str]) -> dict:
    """Paper-scale Swiss roll runs from configs/swiss_roll.yaml (plus `overrides`) at several beta; summary of each."""
    from distq.train import train
    results = {}
    suffix = "".join(f"_{o}" for o in overrides).replace("/", "-")
    for beta in betas:
        config = load_config("configs/swiss_roll.yaml", [*overrides, f"train.beta={beta}", f"train.episodes={episodes}",
                                                         "train.progress_seconds=60"])
        summary = train(config, f"runs/bench_quality_beta{beta:g}{suffix}", overwrite=True)
        print(f"beta={beta:g}: {summary}", flush=True)
        results[f"beta={beta:g}"] = {k: summary[k] for k in ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95",
                                                            "kl_floor", "episodes", "episodes_per_s", "wall_s")}
    return {"setting": f"configs/swiss_roll.yaml {' '.join(overrides)}, {episodes} episodes, eval 20 batches of 300 "
                       "vs fresh data",
            "runs": results}


def _backend_rate(backend, episodes: int) -> tuple[float, list[dict]]:
    """Episodes/s of a backend over episodes 2..episodes+1 (episode 1 warms up: actor start-up is not timed)."""
    try:
        backend.step(1)
        began = time.perf_counter()
        metrics = [backend.step(e) for e in range(2, episodes + 2)]
        return episodes / (time.perf_counter() - began), metrics
    finally:
        backend.close()


def _ray_floor(repeats: int = 200) -> dict[str, float]:
    """Ray's own cost on this machine, with no work: an empty actor call's round trip, and the update's chain
    (a worker returns a trajectory-sized tensor, the learner takes it by reference and returns weights-sized
    tensors) as plain actor tasks and as a compiled graph (ray.dag); milliseconds, medians over `repeats`."""
    import ray
    from ray.dag import InputNode

    @ray.remote(num_cpus=0.5)
    class Worker:
        def run(self, weights: torch.Tensor) -> torch.Tensor:
            return torch.zeros(30900)  # 123,600 bytes: a paper-scale batch

        def noop(self) -> int:
            return 0

    @ray.remote(num_cpus=0.5)
    class Learner:
        def update(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.zeros(4549)  # 18,196 bytes: the policy weights

    def timed(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return 1e3 * statistics.median(times)

    worker, learner = Worker.remote(), Learner.remote()
    weights = torch.zeros(4549)
    result = {"empty_call_round_trip_ms": timed(lambda: ray.get(worker.noop.remote())),
              "update_chain_tasks_ms": timed(lambda: ray.get(learner.update.remote(worker.run.remote(weights))))}
    with InputNode() as given:
        graph = learner.update.bind(worker.run.bind(given)).experimental_compile()
    try:
        result["update_chain_compiled_graph_ms"] = timed(lambda: ray.get(graph.execute(weights)))
    finally:
        graph.teardown()
        for actor in (worker, learner):
            ray.kill(actor)
    return result


def bench_parallel(rounds: int, episodes: int) -> dict:
    """Episodes/s at paper scale (N = 300, d = 2, B = 300, K = 20, sde) of the in-process loop and of Ray backends
    (W = 1, 2 rollout actors; sync and async), the same episodes each, alternated in rounds in one local Ray
    instance; the time split per episode and the bytes an update moves (computed from tensor sizes)."""
    import logging

    import ray

    from distq.parallel import RayBackend
    from distq.train import InProcessBackend

    variants = {"in_process": (0, "sync"), "w1_sync": (1, "sync"), "w2_sync": (2, "sync"),
                "w1_async": (1, "async"), "w2_async": (2, "async")}
    # chunks of 150: with W = 2 each worker generates half of the B = 300 batch
    train = {**PAPER_SCALE["train"], "chunk_size": 150, "episodes": episodes + 1}
    configs = {name: config_from_dict({**PAPER_SCALE, "train": train, "parallel": {
        "workers": workers, "mode": mode, "num_cpus_per_worker": 0.5, "learner_num_cpus": 0.5}})
        for name, (workers, mode) in variants.items()}
    config = configs["in_process"]
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    rates, metrics = {name: [] for name in variants}, {name: [] for name in variants}
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    keep_freed_memory()  # as distq.train does; the actors do the same
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        for _ in range(rounds):
            for name, cfg in configs.items():
                backend = (InProcessBackend(cfg, dataset, reward) if cfg.parallel.workers == 0
                           else RayBackend(cfg, dataset, reward, None))
                rate, steps = _backend_rate(backend, episodes)
                rates[name].append(rate)
                metrics[name] += steps
                print(f"{name}: {rate:.1f} episodes/s", flush=True)
        floor = _ray_floor()
    finally:
        ray.shutdown()
    median = {name: statistics.median(r) for name, r in rates.items()}
    K, B, d = config.sde.num_steps, config.train.batch_size, dataset.dim
    weights = sum(t.numel() * t.element_size() for t in build_learner(config, dataset.points, reward)
                  .policy_weights().values())
    trajectories = 4 * (2 * K * B * d + K * B + B * d + B)  # float32 states, actions, r_hat, Y_K, h(Y_K)
    def mean(name: str, key: str) -> float:
        return statistics.fmean(m[key] for m in metrics[name] if key in m) if key in metrics[name][0] else 0.0
    return {
        "setting": "swiss_roll N=300 d=2 B=300 K=20 sde, chunk_size 150, paper Table 1 networks; Ray actors with "
                   "0.5 CPU each on one 2-core machine, one local Ray instance",
        "episodes_per_variant_per_round": episodes, "rounds": rounds,
        "episodes_per_s_median": median, "episodes_per_s_rounds": rates,
        "ratio_vs_in_process": {name: median[name] / median["in_process"] for name in variants},
        "time_split_ms_mean": {name: {key: 1e3 * mean(name, f"time/{key}_s") for key in ("rollout", "transfer", "update")}
                               for name in variants},
        "policy_lag_mean": {name: mean(name, "parallel/policy_lag") for name in variants},
        "bytes_per_update": {
            "weights_one_copy": weights, "trajectories": trajectories,
            **{name: workers * weights + (trajectories if workers else 0) for name, (workers, _) in variants.items()},
            "measured_by_backend": {name: mean(name, "parallel/bytes_per_update") for name in variants if name != "in_process"}},
        "ray_floor_ms": floor,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
    }


def bench_rllib(rounds: int, timesteps: int) -> dict:
    """Environment steps per second at paper scale: distq's batched rollout (B = 300 trajectories of K = 20 steps,
    policy forward, exploration noise and ratio rewards included) against the same MDP (distq.rllib_env) stepped
    by RLlib's SingleAgentEnvRunner with random actions (no policy at all), 1 and 8 env copies per runner."""
    import logging

    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from distq.rllib_env import register

    config, _, _, _, rollout = _setup()
    name = register()
    rates: dict[str, list[float]] = {"distq_rollout": [], "rllib_env_runner_1_env": [], "rllib_env_runner_8_envs": []}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        runners = {key: SingleAgentEnvRunner(config=PPOConfig().environment(name, env_config=PAPER_SCALE)
                                             .env_runners(num_envs_per_env_runner=envs))
                   for key, envs in (("rllib_env_runner_1_env", 1), ("rllib_env_runner_8_envs", 8))}
        batch_steps = config.train.batch_size * config.sde.num_steps
        for r in range(rounds):
            began, episodes = time.perf_counter(), max(1, timesteps // batch_steps)
            for e in range(episodes):
                rollout.run(episode_chunks(config.seed, r * episodes + e, config.train.batch_size,
                                           config.train.chunk_size))
            rates["distq_rollout"].append(episodes * batch_steps / (time.perf_counter() - began))
            for key, runner in runners.items():
                began = time.perf_counter()
                runner.sample(num_timesteps=timesteps, random_actions=True)
                rates[key].append(timesteps / (time.perf_counter() - began))
        for runner in runners.values():
            runner.stop()
    finally:
        ray.shutdown()
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {"setting": "swiss_roll N=300 d=2, K=20 sde steps per episode; distq B=300 per batch, one thread",
            "env_steps_per_s_median": median, "env_steps_per_s_rounds": rates,
            "distq_vs_rllib": {k: median["distq_rollout"] / v for k, v in median.items() if k.startswith("rllib")}}


def bench_ratio(repeats: int) -> dict:
    """Bias and variance of the running reward (E14) under each ratio.method, against the all-points estimator:
    Gaussian data N(0.5, I) of N = 10,000 points in d = 2 and 16, 300 queries from the noised law at t = 0.1, 0.5,
    1 (ou); the action is the all-points score, so the exact estimator's reward is 0 and the method's is
    -(g^2 / 2)|s_method - s_all|^2. Bias: its mean; variance: its variance over `repeats` minibatch draws (knn is
    deterministic), averaged over the queries; both relative to g^2/2 |s_all|^2. Also ms per call for B = 300."""
    from distq.ratio import RatioEstimator, knn_ratio_score, ratio_score

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

    from distq.train import InProcessBackend

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


def bench_scale() -> dict:
    """Episodes/s and peak memory as N (10^2..10^5, d = 2, B = 300), d (2..64, N = 2000, B = 300) and B (100..3000,
    N = 300, d = 2) grow, for each ratio method, each cell in a fresh process; the log-log slope of the time per
    episode against the grown quantity (the growth exponent); and the digits case (N = 1797, d = 64, B = 256)."""
    import subprocess

    def run(cell: dict) -> dict:
        out = subprocess.run([sys.executable, __file__, "_scale_cell", json.dumps(cell)], capture_output=True,
                             text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        return result

    methods = ("exact", "minibatch", "knn")
    sweeps = {"n": [dict(data="gmm", n=n, d=2, b=300) for n in (100, 1000, 10_000, 100_000)],
              "d": [dict(data="gmm", n=2000, d=d, b=300) for d in (2, 8, 16, 64)],
              "b": [dict(data="gmm", n=300, d=2, b=b) for b in (100, 300, 1000, 3000)]}
    results: dict[str, Any] = {"cells": {}, "growth_exponent": {}}
    for name, cells in sweeps.items():
        for method in methods:
            rows = [run({**cell, "method": method}) for cell in cells]
            results["cells"][f"{name}_{method}"] = rows
            x = np.log([row[name] for row in rows])
            y = np.log([1.0 / row["episodes_per_s"] for row in rows])
            results["growth_exponent"][f"{name}_{method}"] = float(np.polyfit(x, y, 1)[0])
    results["digits_auto"] = run(dict(data="digits", n=1797, d=64, b=256, method="auto", hidden=128))
    small, large = (run(dict(data="gmm", n=n, d=2, b=300, method="auto")) for n in (300, 100_000))
    results["auto_n300_vs_n1e5"] = {"n300": small, "n1e5": large,
                                    "time_ratio": small["episodes_per_s"] / large["episodes_per_s"]}
    results["setting"] = ("gmm data (8 components), brightness reward, K = 20 sde steps, paper networks (digits: "
                          "hidden 128), in-process, 1 thread; each cell >= 3 s after a warm-up episode")
    return results


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) == 3 and sys.argv[1] == "_scale_cell":  # one cell of `scale`, in its own process
        print(json.dumps(_scale_cell(json.loads(sys.argv[2]))))
        return
    parser.add_argument("what", choices=("core", "quality", "parallel", "rllib", "ratio", "scale", "scale-plot"), nargs="?",
                        default="core")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=None, help="episodes per round (rllib: env steps per round)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.5])
    parser.add_argument("--name", help="output file name under benchmarks/ (default: WHAT.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for quality runs, e.g. --set sde.dt=0.1 (repeatable)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.what == "core":
        result = bench_core(args.rounds, args.episodes or 100)
    elif args.what == "parallel":
        result = bench_parallel(args.rounds, args.episodes or 100)
    elif args.what == "rllib":
        result = bench_rllib(args.rounds, args.episodes or 4000)
    elif args.what == "ratio":
        result = bench_ratio(args.rounds)
    elif args.what == "scale-plot":  # re-plot benchmarks/scale.json
        plot_scale(json.loads((OUT / "scale.json").read_text()), OUT / "scale.png")
        print(f"wrote {OUT / 'scale.png'}")
        return
    elif args.what == "scale":
        result = bench_scale()
        plot_scale(result, OUT / "scale.png")
    else:
        result = bench_quality(args.episodes or 50000, args.betas, args.overrides)
    result["machine"] = {**machine(), "command": "python scripts/bench.py " + " ".join(sys.argv[1:])}
    path = OUT / (args.name or f"{args.what}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
