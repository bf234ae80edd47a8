"""The training driver: Algorithm 1 over episodes, then evaluation and the run directory's outputs.

Rollouts come from a collector (in-process here; Ray actors in distq.parallel) so the loop is the same for both.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from distq import rundir
from distq.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from distq.components import build_learner, build_rollout
from distq.config import Config, save_config
from distq.data import Dataset, load_dataset
from distq.evaluation import evaluate_policy
from distq.learner import Learner, TrainingDiverged
from distq.plots import plot_samples, plot_training_curves
from distq.rewards import load_reward
from distq.rollout import Rollout, Trajectories, episode_chunks

Echo = Callable[[str], None]


class InProcessCollector:
    """Rollouts in the training process, sharing the learner's policy network (no weight copies)."""

    def __init__(self, rollout: Rollout, config: Config):
        self.rollout, self.config = rollout, config

    def collect(self, episode: int) -> Trajectories:
        train = self.config.train
        return self.rollout.run(episode_chunks(self.config.seed, episode, train.batch_size, train.chunk_size))

    def broadcast(self, weights: dict[str, torch.Tensor]) -> None:
        """Nothing to send: the rollout holds the learner's own policy module."""

    def close(self) -> None:
        """Nothing to stop."""


class MetricsLog:
    """Window means of the learner's metrics, one row per `log_every` episodes, and the progress line."""

    def __init__(self, config: Config, rows: list[dict[str, Any]], start_episode: int, echo: Echo):
        self.config, self.rows, self.echo = config, rows, echo
        self.window: dict[str, list[float]] = {}
        self.start_episode, self.start_time = start_episode, time.perf_counter()
        self.last_print = -math.inf

    def add(self, episode: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.window.setdefault(key, []).append(value)
        if episode % self.config.train.log_every == 0 or episode == self.config.train.episodes:
            row = {"episode": episode, **{k: sum(v) / len(v) for k, v in self.window.items()},
                   "episodes_per_s": self.rate(episode)}
            self.rows.append(row)
            self.window = {}
        if time.perf_counter() - self.last_print >= self.config.train.progress_seconds:
            self.progress(episode, metrics)

    def rate(self, episode: int) -> float:
        return (episode - self.start_episode) / max(time.perf_counter() - self.start_time, 1e-9)

    def progress(self, episode: int, metrics: dict[str, float]) -> None:
        self.last_print = time.perf_counter()
        total, rate = self.config.train.episodes, self.rate(episode)
        eta = (total - episode) / rate if rate > 0 else math.inf
        self.echo(f"episode {episode}/{total} | reward {metrics['reward/terminal_mean']:.4g} | "
                  f"td loss {metrics['loss/td']:.4g} | {rate:.1f} episodes/s | ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _save(run_dir: Path, config: Config, learner: Learner, dataset: Dataset, episode: int, rows: list) -> None:
    save_checkpoint(run_dir / rundir.CHECKPOINT, {"config": config.to_dict(), "episode": episode,
                                                  "learner": learner.state_dict(), "columns": list(dataset.columns)})
    rundir.write_table(run_dir / rundir.METRICS, rows)


def prepare(config: Config, run_dir: Path, resume: bool, overwrite: bool):
    """Check every input before anything is written: data, reward, run directory, checkpoint."""
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    rundir.check_run_dir(run_dir, resume, overwrite)
    payload = None
    if resume:
        payload = load_checkpoint(run_dir / rundir.CHECKPOINT)
        check_compatible(payload, config, run_dir / rundir.CHECKPOINT)
    return dataset, reward, payload


def train(config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, echo: Echo = print,
          collector_factory: Optional[Callable] = None) -> dict[str, Any]:
    """Train (or continue) a run in `run_dir`, evaluate it, write all outputs; returns summary.json's contents."""
    run_dir = Path(run_dir)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    dataset, reward, payload = prepare(config, run_dir, resume, overwrite)
    learner = build_learner(config, dataset.points, reward)
    rollout = build_rollout(config, dataset.points, reward, policy=learner.policy)
    start, rows = 0, []
    if payload is not None:
        learner.load_state_dict(payload["learner"])
        start = payload["episode"]
        rows = [r for r in rundir.read_table_rows(run_dir / rundir.METRICS) if r["episode"] <= start]
    elif overwrite:
        rundir.clear_outputs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / rundir.CONFIG)
    collector = (collector_factory or InProcessCollector)(rollout, config)
    log = MetricsLog(config, rows, start, echo)
    began = time.perf_counter()
    try:
        _loop(config, run_dir, learner, collector, dataset, log, start)
    finally:
        collector.close()
    wall = time.perf_counter() - began
    return finish(config, run_dir, rollout, dataset, reward, log, start, wall, echo)


def _loop(config: Config, run_dir: Path, learner: Learner, collector, dataset: Dataset, log: MetricsLog,
          start: int) -> None:
    for episode in range(start + 1, config.train.episodes + 1):
        began = time.perf_counter()
        batch = collector.collect(episode)
        collected = time.perf_counter()
        try:
            metrics = learner.update(batch)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err}. Training stopped at episode {episode}; the last good checkpoint "
                                   f"{run_dir / rundir.CHECKPOINT} is kept (if one was written)") from None
        collector.broadcast(learner.policy_weights())
        metrics["time/rollout_s"] = collected - began
        metrics["time/episode_s"] = time.perf_counter() - began
        log.add(episode, metrics)
        if episode % config.train.checkpoint_every == 0:
            _save(run_dir, config, learner, dataset, episode, log.rows)
    if log.rows and log.rows[-1]["episode"] == config.train.episodes and config.train.episodes > start:
        log.progress(config.train.episodes, {k: log.rows[-1][k] for k in ("reward/terminal_mean", "loss/td")})
    _save(run_dir, config, learner, dataset, config.train.episodes, log.rows)


def finish(config: Config, run_dir: Path, rollout: Rollout, dataset: Dataset, reward, log: MetricsLog, start: int,
           wall: float, echo: Echo) -> dict[str, Any]:
    """Evaluate, write samples, plots and summary.json, and print the headline metrics."""
    metrics, samples = evaluate_policy(rollout, dataset, reward, config)
    rundir.write_samples(run_dir / rundir.SAMPLES, samples, dataset.columns)
    plot_samples(samples, dataset.points, dataset.columns, run_dir / rundir.PLOT,
                 title=f"{dataset.name}: beta={config.train.beta:g}, {config.sde.sampler}, K={config.sde.num_steps}")
    if log.rows:
        plot_training_curves({k: [r.get(k) for r in log.rows] for k in log.rows[0]}, run_dir / "training.png")
    done = config.train.episodes - start
    summary = {**metrics, "episodes": config.train.episodes, "wall_s": wall,
               "episodes_per_s": done / wall if wall > 0 else 0.0, "dim": dataset.dim, "n_data": dataset.n,
               "beta": config.train.beta, "temperature": config.train.temperature, "sampler": config.sde.sampler,
               "steps": config.sde.num_steps, "schedule": config.sde.schedule, "workers": 0}
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    echo(f"reward {metrics['reward_mean']:.4f} ± {metrics['reward_ci95']:.4f} | "
         f"KL {metrics['kl_mean']:.4f} ± {metrics['kl_ci95']:.4f} (estimator floor {metrics['kl_floor']:.4f}) | "
         f"{summary['episodes_per_s']:.1f} episodes/s")
    echo(f"plot: {run_dir / rundir.PLOT}\nsummary: {run_dir / rundir.SUMMARY}")
    return summary
