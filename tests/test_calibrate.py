"""distq.calibrate: bracketing and bisection on beta against closed forms, and an end-to-end calibration on
Gaussian data with a linear reward, where the tilt (E7) gives the answer."""
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from distq.calibrate import Probe, calibrate, next_beta, search_beta
from distq.cli import main
from distq.config import config_from_dict
from distq.configfile import load_config
from distq.data import load_dataset
from distq.errors import DistqError


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
    code = "import sys, distq.calibrate, distq.cli; print('ray' in sys.modules)"
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
