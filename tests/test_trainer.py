"""distq.training.trainer end to end (slow): the learned law against the exponential tilt (E7), and training lowers the KL.

Oracle (E7): data N(m, s^2 I) tilted by exp(beta c . x) is N(m + beta s^2 c, s^2 I). The sampler's own
discretisation bias (a few per cent of the mean at K = 20) is common to both runs, so we compare the shift
between a beta = 1 and a beta = 0 run trained with the same seed, not the raw means.
"""
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distq.backends.build import build_rollout
from distq.problems.data import load_dataset
from distq.runs.checkpoint import load_checkpoint
from distq.setup.config import Config, config_from_dict
from distq.training.trainer import train

pytestmark = pytest.mark.slow

MEAN, STD, COEF = (1.0, -1.0), 1.0, (1.0, 0.0)
N_GENERATED = 8000


def _quiet(_: str) -> None:
    """Training progress goes nowhere."""


def gaussian_config(beta: float) -> Config:
    return config_from_dict({
        "seed": 0,
        "data": {"source": "gaussian", "mean": list(MEAN), "std": STD, "n_samples": 500},
        "reward": {"fn": "linear", "coef": list(COEF)},
        "train": {"beta": beta, "episodes": 500, "batch_size": 200, "chunk_size": 100, "threads": 1,
                  "log_every": 50, "checkpoint_every": 10_000},
        "eval": {"n_samples": 300, "batches": 4},
    })


def generate(config: Config, run_dir, n: int = N_GENERATED) -> torch.Tensor:
    """n mean-action samples (n, d) from a run's checkpoint, with a fixed generator (common random numbers)."""
    rollout = build_rollout(config, load_dataset(config.data, config.seed).points, terminal_reward=None)
    rollout.set_weights(load_checkpoint(run_dir / "checkpoint.pt")["learner"]["policy"])
    return rollout.generate(n, torch.Generator().manual_seed(2024)).double()


@pytest.fixture(scope="module")
def gaussian_samples(tmp_path_factory) -> dict[float, torch.Tensor]:
    """Generated samples of the beta = 0 and beta = 1 runs (500 episodes each, about 10 s each on 2 cores)."""
    samples = {}
    for beta in (0.0, 1.0):
        config, run_dir = gaussian_config(beta), tmp_path_factory.mktemp(f"gaussian_beta{beta:g}")
        train(config, run_dir, echo=_quiet)
        samples[beta] = generate(config, run_dir)
    return samples


def test_linear_reward_shifts_the_gaussian_by_beta_s2_c(gaussian_samples):
    shift = gaussian_samples[1.0].mean(0) - gaussian_samples[0.0].mean(0)
    expected = torch.tensor(COEF, dtype=torch.float64) * (1.0 * STD**2)
    # Tolerance, per coordinate (x0 along c, x1 orthogonal):
    # - finite data: the learner sees the tilt of the 500-point empirical law; its self-normalised shift has
    #   sd sqrt((2e - 1) / 500) = 0.094 along c and sqrt((e - 1) / 500) = 0.059 across (checked by simulation),
    #   3 sd: 0.28 / 0.18;
    # - Monte Carlo: 8000 samples of sd ~1.1 per run, se of a difference <= 0.017;
    # - sampler and learning: the K = 20 sampler scales means by ~0.95 (so the shift by up to ~0.06), and runs of
    #   300-1000 episodes moved the shift by ~0.05 along c and ~0.07 across.
    # Still sharp: the other tilt convention exp(beta h / 2) would shift x0 by 0.5, a doubled one by 2.
    tolerance = torch.tensor([0.35, 0.25], dtype=torch.float64)
    assert ((shift - expected).abs() < tolerance).all(), f"shift {shift.tolist()}, expected {expected.tolist()}"


def test_tilt_keeps_the_spread(gaussian_samples):
    # (E7) keeps the covariance s^2 I: the per-coordinate sd of both runs agree (sampler inflation is common;
    # the sd of a sample sd of 8000 points is ~0.01, learning moved it by <= 0.05).
    sd0, sd1 = gaussian_samples[0.0].std(0), gaussian_samples[1.0].std(0)
    assert ((sd1 - sd0).abs() < 0.15).all(), f"sd beta=0 {sd0.tolist()}, beta=1 {sd1.tolist()}"
    assert ((sd0 - STD).abs() < 0.25).all(), sd0.tolist()


def test_beta0_mean_is_near_the_data_mean(gaussian_samples):
    data_mean = load_dataset(gaussian_config(0.0).data, seed=0).points.double().mean(0)
    generated = gaussian_samples[0.0].mean(0)
    # Sampler scaling (~5% of |m| = 1), learning drift (<= 0.1 seen up to 1000 episodes), Monte Carlo (0.012).
    assert ((generated - data_mean).abs() < 0.2).all(), f"generated {generated.tolist()}, data {data_mean.tolist()}"
    assert ((data_mean - torch.tensor(MEAN, dtype=torch.float64)).abs() < 4 / math.sqrt(500)).all()


def swiss_roll_config(episodes: int) -> Config:
    return config_from_dict({
        "seed": 0,
        "data": {"source": "swiss_roll", "n_samples": 300},
        "reward": {"fn": "swiss_roll_rectangle"},
        # lr 3e-3: at the default 1e-3 the KL falls only ~0.15 in 600 episodes, too close to its CI.
        "train": {"beta": 0.0, "episodes": episodes, "batch_size": 200, "chunk_size": 100, "threads": 1,
                  "lr_policy": 3e-3, "lr_value": 3e-3, "log_every": 50, "checkpoint_every": 10_000},
        "eval": {"n_samples": 300, "batches": 10},
    })


def test_training_lowers_the_swiss_roll_kl(tmp_path):
    """600 episodes at beta = 0 beat the (preconditioned, Gaussian-score) policy after a single episode."""
    untrained = train(swiss_roll_config(1), tmp_path / "one", echo=_quiet)
    trained = train(swiss_roll_config(600), tmp_path / "trained", echo=_quiet)
    # Both evaluations draw the same reference batches (the eval stream depends on the seed only).
    assert trained["kl_mean"] + trained["kl_ci95"] < untrained["kl_mean"] - untrained["kl_ci95"], (trained, untrained)
    assert untrained["kl_floor"] == pytest.approx(trained["kl_floor"])


def test_conditional_gmm1d_generates_each_component(tmp_path):
    """Algorithm 2 at beta = 0 on the paper's 1D mixture conditioned on its component: each condition's samples sit
    at its own mode (-2 or +2, unit variance), and `distq sample --condition` picks one."""
    from distq.edges.cli import main

    config = config_from_dict({"seed": 0, "data": {"source": "gmm1d", "n_samples": 400, "condition": "label"},
                               "reward": {"fn": "gmm1d_right"}, "sde": {"dt": 0.25},
                               "train": {"episodes": 400, "batch_size": 100, "lr_policy": 3e-3, "lr_value": 3e-3,
                                         "log_every": 100, "checkpoint_every": 10_000},
                               "eval": {"n_samples": 200, "batches": 3}})
    summary = train(config, tmp_path / "run", echo=_quiet)
    per = summary["per_condition"]
    assert set(per) == {"0", "1"} and max(per["0"]["kl_mean"], per["1"]["kl_mean"]) < 0.5, per
    assert per["0"]["reward_mean"] < per["1"]["reward_mean"]
    out = tmp_path / "right.parquet"
    main(["sample", str(tmp_path / "run"), "-n", "2000", "--out", str(out), "--condition", "1"])
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert set(table.column("label").to_pylist()) == {1}
    assert abs(float(torch.tensor(table.column("x0").to_numpy()).mean()) - 2.0) < 0.3
    assert main(["sample", str(tmp_path / "run"), "-n", "5", "--out", str(tmp_path / "x.parquet"),
                 "--condition", "7"]) == 2
    assert not (tmp_path / "x.parquet").exists()


# Ray actors, Ray Train, joining Ray, Tune sweeps, their W&B callback, a single run's W&B run
EDGE_MODULES = {"parallel", "ddp", "ray_cluster", "tuning", "tracking", "run_tracking"}

NO_RAY_SCRIPT = """
import importlib, pkgutil, sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "wandb"):
            raise ImportError("blocked " + name)

sys.meta_path.insert(0, NoRay())
import distq
from distq.setup.config import config_from_dict
from distq.training.trainer import train

for module in pkgutil.iter_modules(distq.__path__):
    if module.name not in {edges!r}:
        importlib.import_module("distq." + module.name)
config = config_from_dict({{
    "seed": 0, "data": {{"source": "gaussian", "mean": [0.0, 0.0], "std": 1.0, "n_samples": 100}},
    "reward": {{"fn": "linear", "coef": [1.0, 0.0]}},
    "train": {{"beta": 1.0, "episodes": 10, "batch_size": 20, "chunk_size": 10, "threads": 1,
               "log_every": 5, "checkpoint_every": 10_000}},
    "eval": {{"n_samples": 50, "batches": 2}},
}})
summary = train(config, sys.argv[1], echo=lambda _: None)
print("episodes", summary["episodes"])
"""


def test_the_core_trains_without_ray_or_wandb(tmp_path):
    """Every module but the edges imports, and an in-process run (parallel.workers = 0) trains, with ray and
    wandb made unimportable: Ray and W&B stay at the edges."""
    script = NO_RAY_SCRIPT.format(edges=sorted(EDGE_MODULES))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "episodes 10" in done.stdout
    assert (tmp_path / "run" / "summary.json").is_file()


# ---- SIGINT and SIGTERM --------------------------------------------------------------------------------------

def _interrupted_run(tmp_path, signum: int, *extra: str) -> tuple[Path, int]:
    """`distq train` in a subprocess, stopped by `signum` once its first progress line is out (no sleeping: the line
    is the event); checks the exit code and the one line, -> (run directory, the episode it says is kept)."""
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "swiss_roll", "n_samples": 64}, "sde": {"T": 5.0, "dt": 0.5},
        "train": {"episodes": 100_000, "batch_size": 32, "chunk_size": 16, "log_every": 1,
                  "checkpoint_every": 100_000, "progress_seconds": 0},
        "eval": {"n_samples": 50, "batches": 2}}))
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "distq.edges.cli", "train", str(config), "--out", str(run), *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert any(line.startswith("episode ") for line in process.stdout), process.stderr.read()
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    name = signal.Signals(signum).name
    lines = err.strip().splitlines()
    assert process.returncode == 128 + signum, err
    assert len(lines) == 1, err
    kept = re.fullmatch(f"distq: interrupted by {name}; kept {run / 'checkpoint.pt'} at episode (\\d+) "
                        f"\\(continue with --resume {run}\\)", lines[0])
    assert kept, err
    return run, int(kept.group(1))


def _resumes_from(run: Path, episode: int, *extra: str) -> None:
    from distq.edges.cli import main

    assert load_checkpoint(run / "checkpoint.pt")["episode"] == episode
    assert main(["train", "--resume", str(run), "--set", f"train.episodes={episode + 2}", *extra]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["episode"] == episode + 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_current_episode_and_the_run_resumes(tmp_path, signum):
    """Long before the first scheduled checkpoint (checkpoint_every 100,000): the signal writes one."""
    run, episode = _interrupted_run(tmp_path, signum)
    assert episode >= 1
    _resumes_from(run, episode)


@pytest.mark.ray
def test_a_signal_stops_a_ray_run_between_episodes(tmp_path, ray_session):
    """The learner's state comes from the Learner actor after the loop stops, not from the signal handler. SIGTERM,
    the signal ray.init installs a handler of its own for (SIGINT takes the same path, tested in process above)."""
    address = ray_session.get_runtime_context().gcs_address
    run, episode = _interrupted_run(tmp_path, signal.SIGTERM, "--set", "parallel.workers=1", "--address", address)
    assert episode >= 1
    _resumes_from(run, episode)


def test_two_processes_a_run_cannot_use_are_taken_as_one_with_one_notice(tmp_path):
    """train.processes = 2 with a target network (the critic process has none) runs in one process: the weights of
    a processes = 1 run, and one notice naming why."""
    def config(processes: int) -> Config:
        return config_from_dict({
            "data": {"source": "swiss_roll", "n_samples": 64}, "sde": {"dt": 0.5},
            "train": {"episodes": 3, "batch_size": 16, "chunk_size": 8, "processes": processes, "target_rate": 0.01},
            "eval": {"n_samples": 16, "batches": 2}})

    lines = []
    train(config(2), tmp_path / "two", echo=lines.append)
    train(config(1), tmp_path / "one", echo=_quiet)
    notes = [line for line in lines if line.startswith("distq: note:")]
    assert len(notes) == 1 and "train.target_rate=0.01" in notes[0] and "taken as 1" in notes[0], lines
    two, one = (load_checkpoint(tmp_path / run / "checkpoint.pt")["learner"] for run in ("two", "one"))
    for net in ("policy", "value"):
        for name, tensor in one[net].items():
            assert torch.equal(two[net][name], tensor), f"{net}.{name}"


# ---- affine equivariance of file data (data.standardize, issue 22) -------------------------------------------------

HW_MEAN, HW_STD = np.array([170.0, 70.0]), np.array([10.0, 15.0])
HW_COEF = np.array([0.1, -1.0 / 30.0])  # beta s^2 c = (10, -7.5): one sd up in x0, half an sd down in x1


def _file_run(tmp_path, name: str, values: np.ndarray, coef: np.ndarray) -> tuple[dict, np.ndarray]:
    """Train on `values` (a .npy file) with h(x) = coef . x, beta = 1; -> (summary, samples in the file's coordinates)."""
    path = tmp_path / f"{name}.npy"
    np.save(path, values)
    config = config_from_dict({
        "seed": 0, "data": {"source": "file", "path": str(path)}, "reward": {"fn": "linear", "coef": coef.tolist()},
        "train": {"beta": 1.0, "episodes": 500, "batch_size": 200, "chunk_size": 100, "threads": 1,
                  "log_every": 50, "checkpoint_every": 10_000},
        "eval": {"n_samples": 300, "batches": 10}})
    summary = train(config, tmp_path / name, echo=_quiet)
    return summary, pq.read_table(tmp_path / name / "samples.parquet").to_pandas().to_numpy()


@pytest.fixture(scope="module")
def far_off_runs(tmp_path_factory):
    """The same Gaussian points trained as given (mean (170, 70), sd (10, 15)) and standardised, with the reward
    written in each run's coordinates (h(x) = c . x, and c . (s z + m) = (s c) . z + const for z)."""
    tmp_path = tmp_path_factory.mktemp("far_off")
    x = np.random.default_rng(5).normal(HW_MEAN, HW_STD, size=(500, 2))
    m, s = x.mean(0), x.std(0)
    return x, _file_run(tmp_path, "far", x, HW_COEF), _file_run(tmp_path, "standard", (x - m) / s, s * HW_COEF)


def test_far_off_data_reach_the_tilt(far_off_runs):
    x, (summary, samples), _ = far_off_runs
    # (E7) closed form for Gaussian data and a linear reward: N(m + beta diag(s^2) c, diag(s^2)), with the 500
    # points' own mean and sd (the law the learner sees). Before standardisation the samples ended ~3 sd low.
    m, s = x.mean(0), x.std(0)
    ci = 1.96 * samples.std(0) / np.sqrt(samples.shape[0])  # the evaluation's 95% CI of the mean (3,000 samples)
    assert (np.abs(samples.mean(0) - (m + s**2 * HW_COEF)) < ci).all(), (samples.mean(0), m + s**2 * HW_COEF, ci)
    assert (np.abs(samples.std(0) / s - 1) < 0.10).all(), (samples.std(0), s)
    assert summary["standardized"] and summary["kl_reliable"]


def test_far_off_run_equals_the_standardised_run(far_off_runs):
    x, (far, far_samples), (standard, standard_samples) = far_off_runs
    # training on a x + b gives a times the samples of training on x, plus b: here x = a z + b exactly
    # (float32 rounding of the two files aside: 500 episodes moved samples by < 0.02 sd)
    mapped = standard_samples * x.std(0) + x.mean(0)
    assert (np.abs(far_samples - mapped).max(0) < 0.05 * x.std(0)).all()
    assert abs(far["kl_mean"] - standard["kl_mean"]) < far["kl_ci95"] + standard["kl_ci95"]


@pytest.mark.ray
def test_a_signal_stops_a_ddp_run_with_a_checkpoint_of_the_same_episode_on_every_worker(tmp_path, ray_session):
    """parallel.mode = ddp: the driver asks rank 0 to stop, every worker stops after one episode, the checkpoint
    reported for it is copied into the run directory, and the run resumes from it (in process: a ddp checkpoint
    continues in any mode)."""
    address = ray_session.get_runtime_context().gcs_address
    run, episode = _interrupted_run(tmp_path, signal.SIGTERM, "--set", "parallel.workers=2", "--set",
                                    "parallel.mode=ddp", "--set", "parallel.num_cpus_per_worker=1", "--address", address)
    assert episode >= 1
    _resumes_from(run, episode, "--set", "parallel.mode=sync", "--set", "parallel.workers=0")


def test_a_reward_list_weighted_1_0_trains_as_its_first_reward_alone(tmp_path):
    """reward.fn [swiss_roll_rectangle, linear] with weights (1, 0): h = 1 h_1 + 0 h_2 is h_1 to the bit, so the
    run's weights and metrics equal the single-reward run's; it also reports each reward's evaluation and, per episode
    row and in the progress line, each reward's batch mean."""
    lines = []

    def run(name: str, reward: dict) -> tuple[dict, list[dict], dict]:
        config = config_from_dict({
            "seed": 0, "data": {"source": "swiss_roll", "n_samples": 64}, "reward": reward, "sde": {"dt": 0.5},
            "train": {"beta": 1.0, "episodes": 4, "batch_size": 32, "chunk_size": 32, "threads": 1, "log_every": 2,
                      "processes": 1},
            "eval": {"n_samples": 50, "batches": 2, "every": 4}})
        summary = train(config, tmp_path / name, echo=lines.append)
        rows = pq.read_table(tmp_path / name / "metrics.parquet").to_pylist()
        return summary, rows, load_checkpoint(tmp_path / name / "checkpoint.pt")["learner"]["policy"]

    one, one_rows, one_policy = run("one", {"fn": "swiss_roll_rectangle"})
    two, two_rows, two_policy = run("two", {"fn": ["swiss_roll_rectangle", "linear"], "coef": [1.0, 0.0],
                                            "weights": [1.0, 0.0]})
    assert all(torch.equal(one_policy[k], two_policy[k]) for k in one_policy)
    timeless = lambda row: {k: v for k, v in row.items() if "time" not in k and not k.endswith("_s")}  # noqa: E731
    assert len(one_rows) == len(two_rows) > 0
    assert all(timeless(o) == {k: t[k] for k in timeless(o)} for o, t in zip(one_rows, two_rows))
    for key in ("reward_mean", "reward_ci95", "kl_mean"):
        assert two[key] == one[key]
    assert two["reward_mean/swiss_roll_rectangle"] == pytest.approx(one["reward_mean"])
    assert two_rows[-1]["eval/reward_mean/swiss_roll_rectangle"] == pytest.approx(one_rows[-1]["eval/reward_mean"])
    assert "reward_mean/linear" in two and "eval/reward_ci95/linear" in two_rows[-1]
    for one_row, two_row in zip(one_rows, two_rows):
        assert two_row["reward/terminal_mean/swiss_roll_rectangle"] == one_row["reward/terminal_mean"]
        assert "reward/terminal_mean/linear" in two_row and "reward/terminal_mean/linear" not in one_row
    last = two_rows[-1]
    assert (f"| reward {last['reward/terminal_mean']:.4g} (swiss_roll_rectangle "
            f"{last['reward/terminal_mean/swiss_roll_rectangle']:.3g}, linear {last['reward/terminal_mean/linear']:.3g})"
            " |") in [line for line in lines if line.startswith("episode 4/4")][-1]


@pytest.mark.parametrize("condition", [None, "label"])
def test_weighted_dsm_reports_its_effective_sample_size(tmp_path, condition):
    """dsm at beta = 2 on the 1D mixture (h = -|x - 6|): ESS = 1 / sum w_i^2 with w = softmax(beta h) over the data
    (per condition in conditional runs), here below 10% of N: one warning line before training, the ESS on every
    progress line, and in summary.json."""
    config = config_from_dict({"seed": 0, "data": {"source": "gmm1d", "n_samples": 300, "condition": condition},
                               "reward": {"fn": "gmm1d_right"},
                               "train": {"algorithm": "dsm", "beta": 2.0, "episodes": 3, "batch_size": 50,
                                         "progress_seconds": 0, "log_every": 1, "checkpoint_every": 10_000},
                               "eval": {"n_samples": 50, "batches": 2}})
    dataset = load_dataset(config.data, config.seed)
    h = -(dataset.points[:, 0].double() - 6).abs()
    groups = dataset.labels if condition else torch.zeros(300, dtype=torch.long)
    ess = [1 / torch.softmax(2 * h[groups == c], 0).square().sum().item() for c in range(int(groups.max()) + 1)]
    lines = []
    summary = train(config, tmp_path / "run", echo=lines.append)
    assert summary["ess"] == pytest.approx(sum(ess)) and summary["ess_fraction"] == pytest.approx(sum(ess) / 300)
    assert (summary.get("ess_per_condition") == pytest.approx({"0": ess[0], "1": ess[1]}) if condition
            else "ess_per_condition" not in summary)
    warnings = [line for line in lines if line.startswith("warning: weighted dsm")]
    assert len(warnings) == 1 and lines[0] == warnings[0] and "below 10%" in warnings[0], lines
    progress = [line for line in lines if line.startswith("episode ")]
    assert progress and all(f"| ESS {sum(ess):.1f}/300 |" in line or line.endswith(f"| ESS {sum(ess):.1f}/300")
                            for line in progress), progress


def test_the_first_progress_line_has_no_speed_or_eta_from_the_start_up_episode():
    """Episode 1 of a run carries its start-up (worker processes, first allocations): the line after it shows no
    rate and no ETA; the next lines measure from the end of episode 1."""
    from distq.runs.progress import MetricsLog

    lines: list[str] = []
    config = config_from_dict({"train": {"episodes": 10, "progress_seconds": 0, "log_every": 100}})
    log = MetricsLog(config, [], start_episode=0, echo=lines.append)
    metrics = {"loss/td": 1.0, "reward/terminal_mean": 0.5}
    for episode in (1, 2, 3):
        log.add(episode, metrics, {})
    first, *later = lines
    assert "episodes/s" not in first and "ETA" not in first, first
    assert len(later) == 2 and all(re.search(r"\| [\d.]+ episodes/s \| ETA \d", line) for line in later), later


def test_a_stepped_trainer_saves_and_evaluates_one_run_that_equals_a_straight_run(tmp_path):
    """Trainer stepped as a Tune trial steps it: saved and evaluated every 2 episodes of 6, the checkpoint, the
    metrics row and the evaluation are at that episode; the run ends with the weights and evaluation of the same run
    trained straight (train()). state()/load_state() restore a run: a third run, rewound to episode 2's state after
    4 episodes, ends identical too."""
    from distq.training.trainer import Trainer

    config = config_from_dict({"seed": 0, "data": {"source": "swiss_roll", "n_samples": 64}, "sde": {"dt": 0.5},
                               "train": {"beta": 1.0, "episodes": 6, "batch_size": 32, "chunk_size": 32,
                                         "log_every": 100, "processes": 1},
                               "eval": {"n_samples": 50, "batches": 2}})
    seen = []
    with Trainer(config, tmp_path / "reported", echo=_quiet, report_every=2) as trainer:
        while not trainer.done:
            trainer.step()
            if trainer.episode % 2 == 0 and not trainer.done:
                trainer.save()
                summary = trainer.evaluate()
                run = tmp_path / "reported"
                seen.append((summary["episodes"], load_checkpoint(run / "checkpoint.pt")["episode"],
                             pq.read_table(run / "metrics.parquet").to_pylist()[-1]["episode"],
                             summary["kl_mean"] >= 0, 0 <= summary["reward_mean"] <= 1))
        reported = trainer.finish()
    with Trainer(config, tmp_path / "rewound", echo=_quiet) as trainer:
        trainer.step(), trainer.step()
        at_two = trainer.state()
        trainer.step(), trainer.step()
        trainer.load_state(at_two)
        assert trainer.episode == 2 and not trainer.done
        rewound = trainer.run()
    straight = train(config, tmp_path / "straight", echo=_quiet)
    assert seen == [(2, 2, 2, True, True), (4, 4, 4, True, True)]
    policies = [load_checkpoint(tmp_path / name / "checkpoint.pt")["learner"]["policy"]
                for name in ("reported", "rewound", "straight")]
    assert all(torch.equal(policies[i][k], policies[2][k]) for i in (0, 1) for k in policies[2])
    assert reported["kl_mean"] == rewound["kl_mean"] == straight["kl_mean"] and reported["episodes"] == 6
