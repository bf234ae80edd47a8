"""distq.training.budget: evaluations during training (eval.every) and the KL budget (train.kl_budget), on tiny runs.

Oracles: an evaluation does not change training (the weights equal a run without evaluations); the kept
checkpoint_best.pt re-evaluates (evaluate_policy, run here independently of the run) to the numbers recorded for
it, which are the most reward among the recorded evaluations within the budget; a budget no model meets stops the
run after exactly eval.every x train.kl_patience episodes."""
import pyarrow.parquet as pq
import pytest
import torch

from distq.algorithms.learner import deployed_policy
from distq.backends.build import build_rollout
from distq.edges.cli import main
from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.runs.checkpoint import load_checkpoint
from distq.setup.config import Config, config_from_dict
from distq.training.evaluation import evaluate_policy
from distq.training.trainer import train

pytestmark = pytest.mark.slow


def tiny(every: int = 2, **train_extra) -> Config:
    return config_from_dict({
        "data": {"source": "gaussian", "mean": [0.0], "std": 1.0, "n_samples": 64},
        "reward": {"fn": "linear", "coef": [1.0]}, "sde": {"T": 5.0, "dt": 0.5},
        "train": {"beta": 1.0, "episodes": 8, "batch_size": 16, "chunk_size": 16, "log_every": 4, **train_extra},
        "eval": {"n_samples": 32, "batches": 2, "every": every}})


def _quiet(_: str) -> None:
    """Progress goes nowhere."""


def test_evaluations_are_rows_and_do_not_change_training(tmp_path):
    summary = train(tiny(), tmp_path / "eval", echo=_quiet)
    plain = train(tiny(every=0), tmp_path / "plain", echo=_quiet)
    rows = pq.read_table(tmp_path / "eval" / "metrics.parquet").to_pylist()
    assert [r["episode"] for r in rows] == [2, 4, 6, 8]
    assert all(r["eval/kl_ci95"] is not None and r["eval/time_s"] > 0 for r in rows)
    # the last evaluation is of the final weights with the final evaluation's draws
    assert rows[-1]["eval/reward_mean"] == summary["reward_mean"] and rows[-1]["eval/kl_mean"] == summary["kl_mean"]
    assert summary["eval_evaluations"] == 4 and 0 < summary["eval_share"] < 1
    assert "eval_every" not in plain
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoint.pt")["learner"] for run in ("eval", "plain"))
    for name, tensor in theirs["policy"].items():
        assert torch.equal(ours["policy"][name], tensor), name


def _re_evaluated(config: Config, path) -> dict:
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points)
    rollout = build_rollout(config, dataset.points, reward)
    rollout.set_weights(deployed_policy(load_checkpoint(path)["learner"]))
    return evaluate_policy(rollout, dataset, reward, config)[0]


def test_the_best_checkpoint_within_the_budget_is_kept(tmp_path):
    config = tiny(kl_budget=100.0)
    summary = train(config, tmp_path / "run", echo=_quiet)
    rows = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    best = summary["best_within_budget"]
    assert best["reward_mean"] == max(r["eval/reward_mean"] for r in rows if r["eval/kl_mean"] <= 100.0)
    assert load_checkpoint(tmp_path / "run" / "checkpoint_best.pt")["episode"] == best["episode"]
    again = _re_evaluated(config, tmp_path / "run" / "checkpoint_best.pt")
    assert (again["reward_mean"], again["kl_mean"]) == pytest.approx((best["reward_mean"], best["kl_mean"]))


def test_a_run_above_the_budget_stops_after_its_patience(tmp_path):
    # A budget of 1e-9 is almost never met (the kNN KL estimate can dip below 0, which meets it)
    summary = train(tiny(kl_budget=1e-9, kl_patience=2, episodes=100), tmp_path / "run", echo=_quiet)
    rows = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    above = [r["eval/kl_mean"] > 1e-9 for r in rows if r.get("eval/kl_mean") is not None]
    first = next(i for i in range(1, len(above)) if above[i - 1] and above[i])  # two in a row
    assert summary["episodes"] == 2 * (first + 1) < 100 and "train.kl_patience = 2" in summary["stopped"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["episode"] == summary["episodes"]
    assert (tmp_path / "run" / "checkpoint_best.pt").exists() == (summary["best_within_budget"] is not None)


def test_a_budget_needs_evaluations(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {episodes: 2, kl_budget: 0.3}\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.kl_budget" in err and "eval.every" in err
