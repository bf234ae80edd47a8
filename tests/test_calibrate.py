"""distq.edges.calibrate: bracketing and bisection on beta against closed forms, and an end-to-end calibration on
Gaussian data with a linear reward, where the tilt (E7) gives the answer."""
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from distq.edges.calibrate import Probe, calibrate, chosen_probe, next_beta, search_beta
from distq.edges.cli import main
from distq.errors import DistqError
from distq.problems.data import load_dataset
from distq.setup.config import config_from_dict
from distq.setup.configfile import load_config


def _measure(curve):
    return lambda beta: Probe(beta, curve(beta))


def test_overshooting_start_probes_zero_then_bisects():
    probes, reached = search_beta(_measure(lambda b: 1.25 * b), target=0.8, tolerance=0.01, max_probes=20, start=1.0)
    assert reached
    assert [p.beta for p in probes[:5]] == [1.0, 0.0, 0.5, 0.75, 0.625]
    assert probes[-1].beta == pytest.approx(0.64, abs=0.01 / 1.25)


def test_low_start_doubles_until_the_target_is_bracketed():
    probes, reached = search_beta(_measure(lambda b: b), target=3.0, tolerance=0.05, max_probes=20, start=0.1)
    assert reached and [p.beta for p in probes[:6]] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    assert probes[-1].beta == pytest.approx(3.0, abs=0.05)


def test_bisection_halves_the_bracket_each_probe():
    # After bracketing [0, 1], n bisection probes leave a bracket of width 2^-n around the root.
    probes, reached = search_beta(_measure(lambda b: math.tanh(3 * b)), target=0.5, tolerance=1e-4, max_probes=40,
                                  start=1.0)
    assert reached and abs(probes[-1].beta - math.atanh(0.5) / 3) < 1e-3
    assert len(probes) <= 2 + math.ceil(math.log2(1 / 1e-4)) + 2


def test_target_below_the_beta_zero_reward_is_refused():
    with pytest.raises(DistqError, match="below the beta = 0 model's reward"):
        search_beta(_measure(lambda b: 0.5 + b), target=0.2, tolerance=0.01, max_probes=10, start=1.0)


def test_max_probes_stops_the_search():
    probes, reached = search_beta(_measure(lambda b: b), target=0.3, tolerance=1e-6, max_probes=3, start=1.0)
    assert not reached and len(probes) == 3


def test_noise_inverted_probes_fall_back_to_zero():
    probes = [Probe(1.0, 0.9), Probe(2.0, 0.7)]  # r(2) < r(1): noise
    assert next_beta(probes, target=0.8, start=1.0) == 0.0


@pytest.mark.parametrize("flags, field", [(["--tolerance", "0"], "--tolerance"),
                                          (["--max-probes", "0"], "--max-probes"),
                                          (["--beta-start", "-1"], "--beta-start")])
def test_bad_flags_fail_with_one_line(tmp_path, capsys, flags, field):
    config = tmp_path / "c.yaml"
    config.write_text("train: {episodes: 10}\n")
    assert main(["calibrate", str(config), "--target-reward", "0.8", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err
    assert not (tmp_path / "out").exists()


def test_calibrate_does_not_import_ray():
    code = "import sys, distq.edges.calibrate, distq.edges.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def _euler_tilt_gain(T: float, dt: float, s: float) -> float:
    """Mean shift per unit beta |c|^2 of the optimal control on the Euler-discretised ou reverse process (E5) for
    N(m, s^2) data: the open-loop deviation from the score at step k is beta c B_k, B_k = prod_{j > k} (1 + f dt -
    g^2 dt / v(t_j)), v(t) = mu_t^2 s^2 + sigma_t^2, so the shift is beta |c|^2 sum_k g^2 dt B_k^2 (-> s^2 as
    dt -> 0, the tilt (E7))."""
    K = round(T / dt)
    t = T - dt * np.arange(K)
    v = np.exp(-2 * t) * s ** 2 + 1 - np.exp(-2 * t)
    factor = 1 + dt - 2 * dt / v
    B = np.array([np.prod(factor[k + 1:]) for k in range(K)])
    return float(np.sum(2 * dt * B ** 2))


def test_euler_tilt_gain_tends_to_the_continuous_tilt():
    assert _euler_tilt_gain(5.0, 0.5, 1.0) == pytest.approx(4 / 3, rel=1e-6)  # B_k = 0.5^(K-1-k)
    assert _euler_tilt_gain(5.0, 0.001, 1.0) == pytest.approx(1.0, abs=2e-3)
    assert _euler_tilt_gain(5.0, 0.001, 2.0) == pytest.approx(4.0, abs=2e-2)


@pytest.mark.slow
def test_calibration_reaches_the_target_on_gaussian_data_with_a_linear_reward(tmp_path):
    config = config_from_dict({
        "data": {"source": "gaussian", "n_samples": 256, "mean": [0.0], "std": 1.0},
        "reward": {"fn": "linear", "coef": [1.0]}, "sde": {"T": 5.0, "dt": 0.5},
        "train": {"beta": 1.0, "episodes": 300, "batch_size": 64, "chunk_size": 64, "log_every": 100},
        "eval": {"n_samples": 500, "batches": 4}})
    target, tolerance = 0.8, 0.08
    # Tolerance: the reward CI95 of 2000 evaluation samples of a unit-variance law is 1.96 / sqrt(2000) = 0.044;
    # 0.08 leaves as much again for the learner's error after 300 episodes.
    result = calibrate(config, target, tmp_path / "cal", tolerance=tolerance, max_probes=6, echo=lambda line: None)
    assert abs(result["reward_mean"] - target) <= tolerance

    # (E7) on the discretised process: reward(beta) = c.m_hat + beta |c|^2 gain, gain = 4/3 at dt = 0.5.
    data_mean = float(load_dataset(config.data, config.seed).points.mean())
    oracle = (target - data_mean) / _euler_tilt_gain(5.0, 0.5, 1.0)
    # |beta error| <= tolerance / gain (0.06) + ~10% learner error on the slope (0.06) + eval noise.
    assert abs(result["beta"] - oracle) <= 0.15, (result["beta"], oracle)

    table = pq.read_table(tmp_path / "cal" / "calibration.parquet").to_pylist()
    assert len(table) == len(result["probes"]) and {"beta", "reward_mean", "kl_mean", "run_dir"} <= set(table[0])
    rewards = [r["reward_mean"] for r in sorted(table, key=lambda r: r["beta"])]
    assert rewards == sorted(rewards)  # the tilt's mean reward grows with beta
    assert load_config(tmp_path / "cal" / "calibrated.yaml").train.beta == result["beta"]
    assert "calibrated beta" in (tmp_path / "cal" / "calibration.md").read_text()


@pytest.mark.slow
def test_calibration_bisects_beta_of_weighted_dsm(tmp_path):
    """dsm at beta > 0 learns the tilt of the empirical law, N(m'(beta), ~1) with m'(beta) = sum_i softmax(beta x)_i
    x_i (E7 on the data points), and Euler (E5) with the exact score of a unit-variance Gaussian ends at mean
    G m'(beta), G = sum_k 2 dt mu_{t_k} (1 - dt)^(K-1-k) (the mean's recursion E_{k+1} = (1 - dt) E_k + 2 dt mu_k m'),
    so the calibrated beta solves G m'(beta) = target. Seeds 0-1 found 0.875 / 0.75 against 0.92 / 0.85 (5 / 4 probes
    of 300 updates, about 5-9 s)."""
    import torch

    config = config_from_dict({
        "data": {"source": "gaussian", "n_samples": 256, "mean": [0.0], "std": 1.0},
        "reward": {"fn": "linear", "coef": [1.0]}, "sde": {"T": 5.0, "dt": 0.5},
        "train": {"algorithm": "dsm", "beta": 1.0, "episodes": 300, "batch_size": 64, "chunk_size": 64,
                  "log_every": 100},
        "eval": {"n_samples": 500, "batches": 4}})
    target, tolerance = 0.8, 0.08
    result = calibrate(config, target, tmp_path / "cal", tolerance=tolerance, max_probes=6, echo=lambda line: None)
    assert abs(result["reward_mean"] - target) <= tolerance

    x = load_dataset(config.data, config.seed).points[:, 0].double()
    steps, dt = 10, 0.5
    gain = sum(2 * dt * math.exp(-(5.0 - dt * k)) * (1 - dt) ** (steps - 1 - k) for k in range(steps))
    low, high = 0.0, 5.0
    for _ in range(50):  # G m'(beta) grows with beta (its derivative is G Var_beta(x))
        middle = (low + high) / 2
        low, high = (middle, high) if gain * float((torch.softmax(middle * x, 0) * x).sum()) < target else (low, middle)
    # tolerance / (G dm'/dbeta ~ 0.87) = 0.09 of beta, plus the learner's error after 300 updates
    assert abs(result["beta"] - low) <= 0.15, (result["beta"], low)
    assert load_config(tmp_path / "cal" / "calibrated.yaml").train.algorithm == "dsm"


# ---- a KL budget (--target-kl) ----------------------------------------------------------------------------------

def test_kl_budget_bisects_on_the_kl_and_keeps_the_most_reward_within_it():
    # KL(beta) = beta^2 / 2 and reward = beta (the Gaussian tilt with s = |c| = 1): budget 0.5 -> beta 1
    measure = lambda beta: Probe(beta, beta, kl_mean=beta ** 2 / 2)  # noqa: E731
    probes, reached = search_beta(measure, target=0.5, tolerance=0.01, max_probes=30, start=0.1, metric="kl_mean")
    assert reached and 0.49 <= probes[-1].kl_mean <= 0.5
    assert [p.beta for p in probes[:5]] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    over = Probe(1.01, 1.01, kl_mean=0.51)  # more reward, over the budget: not chosen
    assert chosen_probe([*probes, over], 0.5, "kl_mean") == probes[-1]


def test_a_kl_budget_below_the_beta_zero_kl_is_refused():
    with pytest.raises(DistqError, match="KL budget 0.01 is below the beta = 0 model's KL"):
        search_beta(lambda b: Probe(b, b, kl_mean=0.05 + b), target=0.01, tolerance=0.005, max_probes=5, start=1.0,
                    metric="kl_mean")


def test_reward_and_kl_targets_are_exclusive(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {episodes: 10}\n")
    with pytest.raises(SystemExit):
        main(["calibrate", str(config), "--target-reward", "0.8", "--target-kl", "0.3"])
    assert main(["calibrate", str(config), "--target-kl", "-1", "--out", str(tmp_path / "out")]) == 2
    assert "--target-kl must be a positive number" in capsys.readouterr().err


M, S, C = (1.0, -1.0), 1.5, (1.0, 0.5)


def _tilted_gaussian_model(monkeypatch):
    """distq.training.trainer.train replaced by the exact optimum (E7) for N(M, S^2 I) data and h(x) = C . x: samples of
    N(M + beta S^2 C, S^2 I), evaluated by distq's evaluation (the kNN KL against fresh data): what the search
    sees from a perfect learner, so the answer can be held against the closed form."""
    import torch

    from distq.problems.rewards import load_reward
    from distq.training.evaluation import evaluate_given

    def perfect(config, run_dir, overwrite=False, echo=print):
        dataset = load_dataset(config.data, config.seed)
        n = config.eval.n_samples * config.eval.batches
        shift = config.train.beta * S ** 2 * torch.tensor(C)
        samples = torch.tensor(M) + shift + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
        return evaluate_given(samples, dataset, load_reward(config.reward, dataset.points), config)

    monkeypatch.setattr("distq.training.trainer.train", perfect)


def test_calibrating_to_a_kl_budget_finds_the_closed_form_beta(tmp_path, monkeypatch, capsys):
    _tilted_gaussian_model(monkeypatch)
    budget, tolerance = 0.5, 0.05
    path = tmp_path / "gauss.yaml"
    path.write_text(f"data: {{source: gaussian, n_samples: 300, mean: {list(M)}, std: {S}}}\n"
                    f"reward: {{fn: linear, coef: {list(C)}}}\neval: {{n_samples: 500, batches: 8}}\n")
    out = tmp_path / "cal"
    assert main(["calibrate", str(path), "--target-kl", str(budget), "--tolerance", str(tolerance),
                 "--max-probes", "12", "--out", str(out)]) == 0
    table = pq.read_table(out / "calibration.parquet").to_pylist()
    beta = load_config(out / "calibrated.yaml").train.beta
    (found,) = [r for r in table if r["beta"] == beta]
    assert budget - tolerance <= found["kl_mean"] <= budget
    # KL(N(m + beta S^2 c, S^2 I) || N(m, S^2 I)) = beta^2 S^2 |c|^2 / 2, so the exact answer is
    # beta* = sqrt(2 K) / (S |c|) = 0.596. The estimate's error e: its CI, and the estimator's bias, of the order of
    # its floor (data against data; twice it, for the floor's own noise); the true KL at the found beta lies in
    # [K - tol - e, K + e], and so do the found beta and beta* in the interval that maps to.
    norm = S * math.hypot(*C)
    exact = math.sqrt(2 * budget) / norm
    e = found["kl_ci95"] + 2 * abs(found["kl_floor"])
    low, high = math.sqrt(2 * max(budget - tolerance - e, 0)) / norm, math.sqrt(2 * (budget + e)) / norm
    assert low <= beta <= high and low <= exact <= high, (beta, exact, low, high)
    assert "calibrated beta" in (out / "calibration.md").read_text() and "KL budget 0.5" in capsys.readouterr().out
