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
    # the parts and the whole episode are timed in separate loops, so on a busy machine the parts can add up to more
    # than the episode (other_ms < 0): only that each was timed is checked
    split = result["split_threads1_ms"]
    timed = ("ratio_estimator_ms", "rollout_networks_ms", "learner_forward_backward_ms", "optimizer_ms", "episode_ms")
    assert all(split[p] > 0 and math.isfinite(split[p]) for p in timed), split
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


def test_the_scaling_model_predicts_from_the_measured_parts():
    """(R + U) / W + A(W, bytes) + O with hand numbers: R + U = 20 ms, O = 2 ms, 1 MB of gradients."""
    from scripts.benchmarking.parallel import allreduce_seconds, scaling_model

    assert allreduce_seconds(4, 1e6, 1e-4, 1e-9) == pytest.approx(6e-4 + 1.5e-3)  # 2 (W-1) messages, 2 (W-1)/W bytes
    result = {"episodes_per_s_median": {"in_process": 50.0, "ddp_w1": 1 / 0.022}, "bytes_per_update": {"ddp_w2": 1e6}}
    model = scaling_model(result, {"latency_s": 2e-4, "seconds_per_byte": 1e-9}, largest=256)
    assert model["R_plus_U_ms"] == pytest.approx(20.0) and model["O_ms"] == pytest.approx(2.0)
    # one node, W = 4: per message latency 1e-4 s -> A = 0.6 + 1.5 ms; 20 / (5 + 2.1 + 2) = 2.198
    assert model["one_node"]["speedup"]["4"] == pytest.approx(20 / (5 + 2.1 + 2))
    # the peak of 20 / (20 / W + 2 (W - 1) 0.1 + 2 (W - 1) / W + 2) (ms) is at W = sqrt((20 - 2) / 0.2) ~ 9.5
    assert model["one_node"]["stops_paying_at_W"] in (9, 10)
    assert model["across_nodes_assumed_10gbit"]["speedup"]["2"] < 20 / 12


def test_tunes_sweep_file_validates_and_its_plain_run_command_trains(tmp_path):
    """bench.py tune's two commands without the sweep's minutes: its sweep file passes the sweep validation (the
    grid of BETAS, report_every), and a plain `distq train` as it runs them finishes in a checkout's own process."""
    from distq.edges.sweep import load_sweep
    from scripts.benchmarking import tuning

    sweep = load_sweep(tuning._sweep_file(tmp_path, 3))
    assert sweep.search_space[0].values == tuning.BETAS and sweep.report_every == tuning.REPORT_EVERY
    assert sweep.base["train.episodes"] == 3 and sweep.base["train.processes"] == 1
    run = tmp_path / "run"
    command = ["train", str(ROOT / "configs" / "swiss_roll.yaml"), "--out", str(run), "--set", "train.episodes=2",
               "--set", "train.processes=1", "--set", "eval.n_samples=32", "--set", "eval.batches=2"]
    assert tuning._run([command], ROOT) > 0
    assert json.loads((run / "summary.json").read_text())["episodes"] == 2
