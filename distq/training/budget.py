"""Evaluation during training (eval.every) and the KL budget (train.kl_budget).

Every eval.every episodes the deployed policy is evaluated as at the end (evaluate_policy: eval.batches batches,
the same evaluation draws each time, so the reward-KL path is not blurred by fresh noise). With a KL budget K, the
evaluation with the most reward among those whose kl_mean <= K is kept as checkpoint_best.pt, and a run whose
kl_mean has stayed above K for train.kl_patience evaluations in a row stops.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from distq.backends.build import build_rollout
from distq.problems.data import Dataset
from distq.runs import rundir
from distq.setup.config import Config
from distq.training.evaluation import evaluate_policy

EVAL_KEYS = ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95")
"""The evaluation's numbers in metrics rows, as eval/<key>."""
PER_REWARD_PREFIXES = ("reward_mean/", "reward_ci95/")
"""With a list reward.fn, each reward's evaluation numbers (distq.training.evaluation.per_reward), also in metrics rows."""


class Monitor:
    """The evaluations during a run and its budget state (kept in the checkpoint, so --resume continues it)."""

    def __init__(self, config: Config, dataset: Dataset, reward):
        self.config, self.dataset, self.reward = config, dataset, reward
        self.rollout = build_rollout(config, dataset.points, reward, labels=dataset.labels) if config.eval.every \
            else None
        self.seconds, self.evaluations = 0.0, 0
        self.load_state({})

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from state() (a checkpoint's "monitor"; {}: a fresh run)."""
        self.best: Optional[dict[str, float]] = state.get("best")
        self.above: int = state.get("above", 0)
        self.stop_reason: Optional[str] = None

    def due(self, episode: int) -> bool:
        return self.rollout is not None and episode % self.config.eval.every == 0

    def evaluate(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """eval/* numbers of the policy with `weights`, and eval/time_s, the evaluation's cost."""
        began = time.perf_counter()
        self.rollout.set_weights(weights)
        metrics = evaluate_policy(self.rollout, self.dataset, self.reward, self.config)[0]
        seconds = time.perf_counter() - began
        self.seconds, self.evaluations = self.seconds + seconds, self.evaluations + 1
        return {**{f"eval/{key}": metrics[key] for key in EVAL_KEYS},
                **{f"eval/{key}": value for key, value in metrics.items() if key.startswith(PER_REWARD_PREFIXES)},
                "eval/time_s": seconds}

    def is_best(self, episode: int, row: dict[str, float]) -> bool:
        """Update the budget state with the evaluation `row` at `episode`; whether it is the best within the budget
        so far (its checkpoint to be kept). Sets stop_reason after train.kl_patience evaluations above it."""
        budget, patience = self.config.train.kl_budget, self.config.train.kl_patience
        if budget is None:
            return False
        if row["eval/kl_mean"] > budget:
            self.above += 1
            if self.above >= patience:
                self.stop_reason = (f"the evaluation's KL stayed above train.kl_budget = {budget:g} for "
                                    f"{self.above} evaluations (train.kl_patience = {patience})")
            return False
        self.above = 0
        if self.best is not None and row["eval/reward_mean"] <= self.best["reward_mean"]:
            return False
        self.best = {"episode": episode, **{key: row[f"eval/{key}"] for key in EVAL_KEYS}}
        return True

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "above": self.above}

    def summary(self, run_dir: Path, wall: float) -> dict[str, Any]:
        """summary.json's part: the evaluations' cost and, with a budget, the best checkpoint within it."""
        if self.rollout is None:
            return {}
        out: dict[str, Any] = {"eval_every": self.config.eval.every, "eval_evaluations": self.evaluations,
                               "eval_s": self.seconds, "eval_share": self.seconds / wall if wall > 0 else 0.0}
        if self.config.train.kl_budget is not None:
            out["kl_budget"] = self.config.train.kl_budget
            out["best_within_budget"] = None if self.best is None else {
                **self.best, "checkpoint": str(run_dir / rundir.BEST_CHECKPOINT)}
        if self.stop_reason:
            out["stopped"] = self.stop_reason
        return out
