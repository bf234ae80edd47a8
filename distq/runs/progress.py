"""A run's progress: the metrics table's rows (window means of the learner's metrics) and the progress line.

Shared by the training loop in this process and by data-parallel replica 0 (distq.backends.data_parallel), which
runs the same loop in a Ray Train worker.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

from distq.algorithms.dsm import DataTilt
from distq.algorithms.learner import TERMINAL_MEAN
from distq.problems.data import Dataset
from distq.setup.config import Config

Echo = Callable[[str], None]


class MetricsLog:
    """Window means of the learner's metrics, one row per `log_every` episodes, and the progress line."""

    def __init__(self, config: Config, rows: list[dict[str, Any]], start_episode: int, echo: Echo,
                 on_row: Optional[Callable[[dict[str, Any]], None]] = None, tilt: Optional[DataTilt] = None,
                 report_every: int = 0):
        """tilt: weighted dsm's data tilt, whose effective sample size every progress line shows. report_every: a
        row also ends at each report (a Tune trial's), whose metrics read the last row."""
        self.config, self.rows, self.echo, self.on_row, self.tilt = config, rows, echo, on_row, tilt
        self.report_every = report_every
        self.window: dict[str, list[float]] = {}
        self.start_episode, self.start_time = start_episode, time.perf_counter()
        self.last_print = -math.inf
        self.last_eval: dict[str, float] = {}
        self.warm: Optional[tuple[int, float]] = None  # (episode, time) at the end of this run's first episode

    def add(self, episode: int, metrics: dict[str, float], evals: dict[str, float]) -> None:
        """The episode's learner metrics (into the window) and its evaluation's eval/* numbers, if it had one (a row
        of their own)."""
        for key, value in metrics.items():
            self.window.setdefault(key, []).append(value)
        if self.warm is None:
            self.warm = (episode, time.perf_counter())
        self.last_eval = evals or self.last_eval
        reported = self.report_every > 0 and episode % self.report_every == 0
        if episode % self.config.train.log_every == 0 or episode == self.config.train.episodes or evals or reported:
            row = {"episode": episode, **{k: sum(v) / len(v) for k, v in self.window.items()},
                   "episodes_per_s": self.rate(episode), **evals}
            self.rows.append(row)
            self.window = {}
            if self.on_row is not None:
                self.on_row(row)
        if time.perf_counter() - self.last_print >= self.config.train.progress_seconds:
            self.progress(episode, metrics)

    def rate(self, episode: int) -> float:
        return (episode - self.start_episode) / max(time.perf_counter() - self.start_time, 1e-9)

    def progress(self, episode: int, metrics: dict[str, float]) -> None:
        """The progress line. Its speed and ETA leave out this run's first episode (start-up: worker processes,
        first allocations), so the first line has none."""
        self.last_print = time.perf_counter()
        total = self.config.train.episodes
        speed = ""
        if self.warm is not None and episode > self.warm[0]:
            warm_episode, warm_time = self.warm
            rate = (episode - warm_episode) / max(self.last_print - warm_time, 1e-9)
            speed = f" | {rate:.1f} episodes/s | ETA {_duration((total - episode) / rate)}"
        loss = next(key for key in metrics if key.startswith("loss/"))
        self.echo(f"episode {episode}/{total} | {_reward_part(metrics)} | "
                  f"{_LOSS_NAMES.get(loss, loss)} {metrics[loss]:.4g}{speed}"
                  + _ess_part(self.tilt) + _time_split(metrics) + _eval_part(self.last_eval))


def _reward_part(metrics: dict[str, float]) -> str:
    """'reward r' of the batch and, with a list reward.fn, each reward's: 'reward r (name_1 r_1, name_2 r_2)'."""
    listed = [f"{key[len(TERMINAL_MEAN) + 1:]} {value:.3g}" for key, value in metrics.items()
              if key.startswith(TERMINAL_MEAN + "/")]
    return f"reward {metrics[TERMINAL_MEAN]:.4g}" + (f" ({', '.join(listed)})" if listed else "")


def _eval_part(evals: dict[str, float]) -> str:
    """' | eval reward r ± ci, KL k ± ci' of the last evaluation during training, if there was one."""
    if not evals:
        return ""
    return (f" | eval reward {evals['eval/reward_mean']:.4g} ± {evals['eval/reward_ci95']:.2g}, "
            f"KL {evals['eval/kl_mean']:.4g} ± {evals['eval/kl_ci95']:.2g}")


def _ess_part(tilt: Optional[DataTilt]) -> str:
    """' | ESS e/N' of weighted dsm (summed over conditions), else ''."""
    return "" if tilt is None else f" | ESS {float(tilt.ess.sum()):.1f}/{int(tilt.sizes.sum())}"


def ess_summary(tilt: Optional[DataTilt], dataset: Dataset) -> dict[str, Any]:
    """summary.json's effective sample size of weighted dsm (none for other runs): `ess`, summed over conditions,
    its share of the N training points `ess_fraction`, and in conditional runs `ess_per_condition`."""
    if tilt is None:
        return {}
    summary = {"ess": float(tilt.ess.sum()), "ess_fraction": float(tilt.ess.sum() / tilt.sizes.sum())}
    if dataset.classes:
        summary["ess_per_condition"] = {str(v): float(e) for v, e in zip(dataset.condition_values, tilt.ess)}
    return summary


ESS_WARNING_FRACTION = 0.1
"""Weighted dsm warns when an effective sample size falls below this share of its rows."""


def ess_warning(tilt: Optional[DataTilt], config: Config, dataset: Dataset) -> Optional[str]:
    """One line when weighted dsm's effective sample size (of any condition, in conditional runs) is below
    ESS_WARNING_FRACTION of its rows: the model then learns little more than those few points."""
    if tilt is None:
        return None
    low = [i for i in range(len(tilt.ess)) if tilt.ess[i] < ESS_WARNING_FRACTION * tilt.sizes[i]]
    if not low:
        return None
    where = ", ".join(f"{float(tilt.ess[i]):.1f} of {int(tilt.sizes[i])}" +
                      (f" in condition {dataset.condition_values[i]}" if dataset.classes else "") for i in low)
    return (f"warning: weighted dsm at train.beta={config.train.beta:g}: effective sample size {where} training "
            f"points, below {ESS_WARNING_FRACTION:.0%}; the weights exp(beta h) sit on a few points, which the model "
            "will copy (lower train.beta, or use train.algorithm qlearning)")


_LOSS_NAMES = {"loss/td": "td loss", "loss/policy_gradient": "pg loss", "loss/dsm": "dsm loss"}


def _time_split(metrics: dict[str, float]) -> str:
    """' | rollout/transfer/update ms | worker trajectories/s' from whatever of those the backend reported (ddp:
    rollout/gradient/allreduce/step)."""
    names = ("rollout", "gradient", "allreduce", "step") if "time/allreduce_s" in metrics else (
        "rollout", "transfer", "update")
    parts = [f"{name} {metrics[f'time/{name}_s'] * 1e3:.1f}" for name in names
             if f"time/{name}_s" in metrics]
    workers = [f"{value:.0f}" for key, value in sorted(metrics.items()) if key.startswith("parallel/worker")]
    split = f" | ms: {', '.join(parts)}" if parts else ""
    return split + (f" | worker trajectories/s: {' '.join(workers)}" if workers else "")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def final_progress(log: MetricsLog, start: int, episode: int) -> None:
    """The last progress line, from the last row, once training reached its last episode."""
    if log.rows and log.rows[-1]["episode"] == episode and episode > start:
        log.progress(episode, {k: v for k, v in log.rows[-1].items()
                               if k.startswith((TERMINAL_MEAN, "loss/"))})
