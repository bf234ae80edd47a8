"""scripts/bench.py at the smallest sizes: every benchmark the README quotes still runs and reports what it claims
(the speed figures themselves are measured by the script, never asserted here)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_core_reports_every_variant_and_the_time_split(bench):
    threads = torch.get_num_threads()
    try:
        result = bench.bench_core(rounds=1, episodes=2)
    finally:  # it times 1 and 2 threads
        torch.set_num_threads(threads)
    rates = result["episodes_per_s_median"]
    assert set(rates) == {"distq_threads1", "plain_torch_threads1", "distq_processes2", "distq_threads2",
                          "plain_torch_threads2"}
    assert all(rate > 0 and math.isfinite(rate) for rate in rates.values())
    assert result["speedup_vs_plain_threads1"] == rates["distq_threads1"] / rates["plain_torch_threads1"]
    split = result["split_threads1_ms"]
    parts = ("ratio_estimator_ms", "rollout_networks_ms", "learner_forward_backward_ms", "optimizer_ms", "other_ms")
    assert sum(split[p] for p in parts) == pytest.approx(split["episode_ms"])
    json.dumps(result)  # what the script writes


def test_ratio_errors_shrink_with_the_minibatch_and_the_neighbours(bench):
    """The running reward's error against the all-points estimator falls as m and k grow (bias <= 0: r_hat is
    minus a squared error)."""
    for row in bench.bench_ratio(repeats=3)["rows"]:
        minibatch = [-row[f"minibatch_m{m}"]["bias"] for m in (64, 256, 1024, 4096)]
        knn = [-row[f"knn_k{k}"]["bias"] for k in (16, 64, 256, 1024)]
        assert all(error >= 0 for error in minibatch + knn), row
        assert minibatch[-1] < minibatch[0] and knn[-1] <= knn[0], row


def test_a_scale_cell_reports_rate_and_memory(bench):
    cell = bench._scale_cell({"data": "gmm", "n": 200, "d": 2, "b": 50, "method": "exact", "seconds": 0.1})
    assert cell["episodes_per_s"] > 0 and cell["peak_rss_mb"] > cell["data_mb"] > 0
