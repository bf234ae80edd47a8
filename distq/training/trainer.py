"""The training driver: Algorithm 1 over episodes, then evaluation and the run directory's outputs.

Episodes run on a backend (distq.backends.backend: in this process, a critic process, Ray actors), so the loop is
the same for all of them; the data-parallel backend runs this loop in its replicas.

Over 300 lines: a run from its checks to its outputs (check inputs, start or resume, the loop with its reports
and checkpoints, evaluation, samples, figures, summary), kept in one place so one file shows a run's whole order.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from distq.algorithms.dsm import DataTilt
from distq.algorithms.learner import TrainingDiverged, deployed_policy, with_initial_policy
from distq.backends.backend import make_backend
from distq.backends.build import build_rollout, build_tilt, learner_device, rollout_device
from distq.backends.rollout import Rollout
from distq.errors import DistqError
from distq.problems.data import Dataset, check_distinct, load_dataset
from distq.problems.rewards import load_reward, rewarded_region
from distq.problems.standardize import Standardization, stored
from distq.runs import rundir
from distq.runs.checkpoint import check_compatible, load_checkpoint, run_header, save_run
from distq.runs.interrupt import Interrupted, StopRequest
from distq.runs.interrupt import name as signal_name
from distq.runs.plots import GRID_ROWS, grid_rows, is_image, plot_samples, plot_training_curves
from distq.runs.progress import Echo, MetricsLog, ess_summary, ess_warning, final_progress
from distq.runs.rundir import save_config
from distq.setup.config import Config
from distq.setup.machine import configure_cpu
from distq.setup.schema import flatten
from distq.training.budget import Monitor
from distq.training.evaluation import evaluate_policy, kl_reliability


def _condition_column(config: Config, dataset: Dataset, conditions) -> Optional[tuple[str, list]]:
    """(name, values) of the samples' condition column in conditional runs, else None."""
    if conditions is None:
        return None
    return config.data.condition, [dataset.condition_values[int(c)] for c in conditions]


def _save(run_dir: Path, config: Config, backend, dataset: Dataset, episode: int, rows: list, monitor: Monitor,
          name: str = rundir.CHECKPOINT) -> None:
    save_run(run_dir, {**run_header(config, dataset), "monitor": monitor.state()}, episode, backend.learner_state(),
             rows, name)


def initial_policy(config: Config, dataset: Dataset) -> dict[str, torch.Tensor]:
    """The policy-mean weights of the run in train.init, checked to fit this run's networks."""
    path = Path(config.train.init) / rundir.CHECKPOINT
    if not path.is_file():
        raise DistqError(f"train.init: no checkpoint at {path}; name the directory of a finished distq run")
    payload = load_checkpoint(path)
    theirs = flatten(payload["config"])
    for key, ours in (("model.hidden", config.model.hidden), ("model.precondition", config.model.precondition),
                      ("model.time_frequencies", config.model.time_frequencies), ("data dimension", dataset.dim)):
        # runs from before model.time_frequencies existed had its default, 0
        other = len(payload["columns"]) if key == "data dimension" else theirs.get(key, 0)
        if other != ours:
            raise DistqError(f"train.init: the run in {config.train.init} has {key} {other!r}, this run {ours!r}")
    if not stored(payload).same_as(dataset.standardization):
        raise DistqError(f"train.init: the run in {config.train.init} was trained on data standardised otherwise "
                         "(data.standardize, or other data): its policy works in other coordinates")
    return deployed_policy(payload["learner"])


def _resumed_standardization(run_dir: Path) -> Optional[Standardization]:
    """On --resume, the checkpoint's standardisation (a run from before data.standardize resumes unstandardised);
    None without a readable checkpoint (check_run reports that)."""
    try:
        return stored(load_checkpoint(run_dir / rundir.CHECKPOINT))
    except DistqError:
        return None


def check_inputs(config: Config, resume: bool, run_dir: Optional[Path] = None):
    """Check the inputs before the run directory is touched: devices, data, reward (on all the data for weighted
    dsm), initial run. -> (dataset, reward, initial policy or None, weighted dsm's tilt or None)."""
    rollout_device(config)  # this process evaluates the run
    if config.parallel.workers == 0:  # else the Learner actor (or each ddp worker) checks its own, on its node
        learner_device(config)
    standardization = _resumed_standardization(run_dir) if resume and run_dir is not None else None
    dataset = load_dataset(config.data, config.seed, standardization)
    check_distinct(dataset, config.eval.k)
    reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values,
                         dataset.standardization)
    init = initial_policy(config, dataset) if config.train.init and not resume else None
    return dataset, reward, init, build_tilt(config, dataset.points, reward, dataset.labels)


def check_run(config: Config, run_dir: Path, resume: bool, overwrite: bool) -> Optional[dict[str, Any]]:
    """Check the run directory (its lock held) and, with `resume`, load its checkpoint."""
    rundir.check_run_dir(run_dir, resume, overwrite)
    if not resume:
        return None
    payload = load_checkpoint(run_dir / rundir.CHECKPOINT)
    check_compatible(payload, config, run_dir / rundir.CHECKPOINT)
    if config.train.episodes < payload["episode"]:
        raise DistqError(f"train.episodes={config.train.episodes} is below the {payload['episode']} episodes "
                         f"already trained in {run_dir}; resume to at least that many")
    return payload


@dataclasses.dataclass
class Kept:
    """The episode of the checkpoint this run leaves in run_dir (None: none yet), for an interruption's message."""

    run_dir: Path
    episode: Optional[int]

    def message(self, signum: int) -> str:
        stopped, path = f"interrupted by {signal_name(signum)}", self.run_dir / rundir.CHECKPOINT
        if self.episode is not None:
            return f"{stopped}; kept {path} at episode {self.episode} (continue with --resume {self.run_dir})"
        if path.exists():  # --overwrite stopped before it replaced anything
            return f"{stopped} before training started; the run in {self.run_dir} is unchanged"
        return f"{stopped} before the first checkpoint; no checkpoint was written (start again, {self.run_dir} holds no run)"


@dataclasses.dataclass(frozen=True)
class Reports:
    """Reports during a run, for a Tune trial that keeps one run (data, networks, actors) across its reports: every
    `every` episodes before the last the run is checkpointed and evaluated, summary.json is written (no samples, no
    plots) and send(summary) is called. The last report is train()'s return value."""

    every: int
    send: Callable[[dict[str, Any]], None]


def train(config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, echo: Echo = print,
          address: Optional[str] = None, reports: Optional[Reports] = None) -> dict[str, Any]:
    """Train (or continue) a run in `run_dir`, evaluate it, write all outputs; returns summary.json's contents.

    `address` joins an existing Ray cluster when parallel.workers > 0 (None: RAY_ADDRESS or an embedded instance).
    `reports`: interim reports (not with parallel.mode ddp, whose loop runs in its workers).
    The run directory is locked throughout. SIGINT or SIGTERM stops the run after its current episode, with a
    checkpoint of it: Interrupted, whose message says which checkpoint is kept.
    """
    run_dir = Path(run_dir)
    if reports is not None and config.parallel.mode == "ddp":
        raise ValueError("interim reports are not available with parallel.mode ddp")
    configure_cpu(config.train.threads)
    dataset, reward, init, tilt = check_inputs(config, resume, run_dir)
    with rundir.locked(run_dir, "--resume" if resume else "--out"):
        payload = check_run(config, run_dir, resume, overwrite)
        kept = Kept(run_dir, payload["episode"] if payload is not None else None)
        tracker = open_tracker(config, run_dir)
        try:
            summary = _train(config, run_dir, dataset, reward, payload, init, tilt, kept, echo, address, tracker,
                             reports)
        except KeyboardInterrupt:  # before the run's own handlers were up
            raise Interrupted(signal.SIGINT, kept.message(signal.SIGINT)) from None
        except Interrupted as stop:
            raise Interrupted(stop.signum, kept.message(stop.signum)) from None
        finally:
            if tracker is not None:
                tracker.close(failed=sys.exc_info()[0] is not None)
        if tracker is not None:
            echo(f"W&B run: {tracker.directory}" + (f" (upload with `wandb sync {tracker.directory}`)"
                                                     if tracker.mode == "offline" else ""))
        return summary


def open_tracker(config: Config, run_dir: Path):
    """The run's W&B run (distq.runs.tracking.RunTracker), or None with tracking.wandb off or W&B's mode disabled.
    Inside a sweep distq.edges.tuning turns tracking.wandb off: the trial's callback is its logger."""
    if not config.tracking.wandb:
        return None
    from distq.runs.tracking import RunTracker, wandb_mode

    mode = wandb_mode(config.tracking.mode)
    return None if mode == "disabled" else RunTracker(config, run_dir, mode)


def _train(config: Config, run_dir: Path, dataset: Dataset, reward, payload: Optional[dict], init,
           tilt: Optional[DataTilt], kept: Kept, echo: Echo, address: Optional[str], tracker,
           reports: Optional[Reports] = None) -> dict[str, Any]:
    start = payload["episode"] if payload is not None else 0
    warning = ess_warning(tilt, config, dataset)
    if warning:
        echo(warning)
    backend = make_backend(config, dataset, reward, address, echo)
    monitor = Monitor(config, dataset, reward, payload.get("monitor") if payload is not None else None)

    def extras(workers: int, restarts: int, wall: float) -> dict[str, Any]:
        """What summary.json adds to the evaluation: workers, the KL budget's state, weighted dsm's ESS."""
        return {"workers": workers, "worker_restarts": restarts, **monitor.summary(run_dir, wall),
                **ess_summary(tilt, dataset)}

    with StopRequest() as stop:  # after make_backend: ray.init installs a SIGTERM handler of its own
        try:
            log = MetricsLog(config, _begin(config, run_dir, backend, dataset, payload, init), start, echo,
                             tracker.row if tracker is not None else None, tilt,
                             reports.every if reports is not None else 0)
            began = time.perf_counter()
            report = None
            if reports is not None:
                evaluator = build_rollout(config, dataset.points, reward, labels=dataset.labels)

                def report(episode: int) -> None:
                    evaluator.set_weights(backend.policy_weights())
                    wall = time.perf_counter() - began
                    summary = summarize(config, dataset, evaluation(config, evaluator, dataset, reward)[0],
                                        (start, episode), wall, extras(backend.workers, backend.restarts, wall))
                    rundir.write_json(run_dir / rundir.SUMMARY, summary)
                    reports.send(summary)
            if config.parallel.mode == "ddp":  # the loop runs in the Ray Train workers
                backend.loop(run_dir, dataset, log, start, stop, kept)
                last = config.train.episodes
            else:
                last = _loop(config, run_dir, backend, dataset, log, start, stop, kept, monitor,
                             (reports.every, report) if reports is not None else None)
            wall = time.perf_counter() - began
            stop.stop_deferring()
            weights = backend.policy_weights()
            workers, restarts = backend.workers, backend.restarts
        finally:
            backend.close()
        rollout = build_rollout(config, dataset.points, reward, labels=dataset.labels)
        rollout.set_weights(weights)
        try:
            summary = finish(config, run_dir, rollout, dataset, reward, log, (start, last), wall, echo,
                             extras(workers, restarts, wall))
        except DistqError as err:
            raise DistqError(f"{err}; training finished and {run_dir / rundir.CHECKPOINT} (episode {kept.episode}) "
                             f"is kept: `distq evaluate {run_dir}` evaluates it") from None
    if tracker is not None:
        tracker.finish(summary, [run_dir / rundir.PLOT, run_dir / rundir.TRAINING_PLOT])
    return summary


def _begin(config: Config, run_dir: Path, backend, dataset: Dataset, payload: Optional[dict], init) -> list[dict]:
    """Load the starting state into the backend, check the disk, write config.yaml: the first write of a run, once
    its backend is up. -> the metrics rows kept from before."""
    if payload is not None:
        backend.load_learner_state(payload["learner"])
    elif init is not None:  # the pretrained policy, also dpok's reference; the value network starts fresh
        backend.load_learner_state(with_initial_policy(backend.learner_state(), init))
    # The new checkpoint is written beside the old one; samples are float32.
    samples = 4 * dataset.dim * config.eval.n_samples * config.eval.batches
    rundir.check_space(run_dir, 2 * _nbytes(backend.learner_state()) + samples)
    if payload is None:  # an --overwrite run's files, or a failed start's
        rundir.clear_outputs(run_dir)
    save_config(config, run_dir / rundir.CONFIG)
    if payload is None:
        return []
    return [r for r in rundir.read_table_rows(run_dir / rundir.METRICS) if r["episode"] <= payload["episode"]]


def _nbytes(state: Any) -> int:
    """Bytes of the tensors in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(value) for value in state)
    return 0


def _loop(config: Config, run_dir: Path, backend, dataset: Dataset, log: MetricsLog, start: int, stop: StopRequest,
          kept: Kept, monitor: Monitor, report: Optional[tuple[int, Callable[[int], None]]] = None) -> int:
    """Episodes start + 1 .. train.episodes; after a signal, the episode under way is checkpointed and the loop stops.
    report (every, call): every `every` episodes before the last, a checkpoint, then call(episode).
    -> the last episode (earlier than train.episodes if the KL budget stopped the run)."""
    episode = start
    for episode in range(start + 1, config.train.episodes + 1):
        stop.check()
        began = time.perf_counter()
        try:
            metrics = backend.step(episode)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err}. Training stopped at episode {episode}; the last good checkpoint "
                                   f"{run_dir / rundir.CHECKPOINT} is kept (if one was written)") from None
        except Exception:
            stop.check()  # the signal that stopped a critic process or a Ray worker as well is the cause
            raise
        metrics["time/episode_s"] = time.perf_counter() - began
        evals = monitor.evaluate(backend.policy_weights()) if monitor.due(episode) else {}
        if evals and monitor.is_best(episode, evals):
            _save(run_dir, config, backend, dataset, episode, log.rows, monitor, rundir.BEST_CHECKPOINT)
        log.add(episode, metrics, evals)
        if monitor.stop_reason:
            log.echo(f"stopped at episode {episode}: {monitor.stop_reason}")
            break
        reporting = report is not None and episode % report[0] == 0 and episode < config.train.episodes
        if episode % config.train.checkpoint_every == 0 or stop.signum is not None or reporting:
            _save(run_dir, config, backend, dataset, episode, log.rows, monitor)
            kept.episode = episode
        if reporting:
            report[1](episode)
    final_progress(log, start, episode)
    _save(run_dir, config, backend, dataset, episode, log.rows, monitor)
    kept.episode = episode
    return episode


def plot_image_grids(config: Config, dataset: Dataset, reward, samples: torch.Tensor,
                     conditions: Optional[torch.Tensor], path: Path, title: str):
    """samples.png of image data: the tiles it shows (a row per condition in conditional runs), each row's condition
    and mean reward under it; h is evaluated on the shown tiles only. samples: the model's coordinates."""
    panels, groups, rewards = [], [], []
    for points, labels in ((samples, conditions), (dataset.points, dataset.labels)):
        names = (None if labels is None else
                 [f"{config.data.condition} {dataset.condition_values[int(c)]}" for c in labels])
        shown = torch.from_numpy(np.concatenate(grid_rows(points.shape[0], GRID_ROWS, names)))
        inputs = (points[shown],) + (() if labels is None else (labels[shown],))
        panels.append(dataset.standardization.to_user(points[shown]))
        groups.append(None if names is None else [names[i] for i in shown.tolist()])
        rewards.append(np.asarray(reward(*inputs).detach().cpu(), dtype=float))
    return plot_samples(*panels, dataset.columns, path, title=title,
                        groups=None if groups[0] is None else (groups[0], groups[1]), rewards=(rewards[0], rewards[1]))


def evaluation(config: Config, rollout: Rollout, dataset: Dataset, reward
               ) -> tuple[dict[str, Any], torch.Tensor, Optional[torch.Tensor]]:
    """A run's evaluation (evaluate_policy) with the KL estimate's reliability: (metrics, samples, conditions)."""
    metrics, samples, conditions = evaluate_policy(rollout, dataset, reward, config)
    metrics.update(kl_reliability(config, dataset.dim))
    return metrics, samples, conditions


def summarize(config: Config, dataset: Dataset, metrics: dict[str, Any], episodes: tuple[int, int], wall: float,
              extra: dict[str, Any]) -> dict[str, Any]:
    """summary.json's contents: the evaluation's metrics of the run trained over `episodes` (first, last] in `wall`
    seconds, what it was, and `extra`."""
    start, last = episodes
    return {**metrics, "episodes": last, "wall_s": wall,
            "episodes_per_s": (last - start) / wall if wall > 0 else 0.0, "dim": dataset.dim, "n_data": dataset.n,
            "beta": config.train.beta, "temperature": config.train.temperature, "sampler": config.sde.sampler,
            "steps": config.sde.num_steps, "schedule": config.sde.schedule,
            "standardized": not dataset.standardization.identity, **extra}


def finish(config: Config, run_dir: Path, rollout: Rollout, dataset: Dataset, reward, log: MetricsLog,
           episodes: tuple[int, int], wall: float, echo: Echo, extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the run trained over `episodes` (first, last], write samples, plots and summary.json, and print the
    headline metrics."""
    metrics, samples, conditions = evaluation(config, rollout, dataset, reward)
    to_user = dataset.standardization.to_user
    model_samples, samples = samples, to_user(samples)
    rundir.write_samples(run_dir / rundir.SAMPLES, samples, dataset.columns,
                         _condition_column(config, dataset, conditions))
    title = (f"{dataset.name}: beta={config.train.beta:g}, {config.sde.sampler}, K={config.sde.num_steps}\n"
             f"reward {metrics['reward_mean']:.3f} +- {metrics['reward_ci95']:.3f}, "
             f"KL {metrics['kl_mean']:.3f} +- {metrics['kl_ci95']:.3f} (95% CIs)")
    if is_image(dataset.dim):
        plot_image_grids(config, dataset, reward, model_samples, conditions, run_dir / rundir.PLOT, title)
    else:
        plot_samples(samples, to_user(dataset.points), dataset.columns, run_dir / rundir.PLOT, title=title,
                     region=rewarded_region(config.reward.fn))
    if log.rows:
        columns = list(dict.fromkeys(k for r in log.rows for k in r))
        plot_training_curves({k: [r.get(k) for r in log.rows] for k in columns}, run_dir / rundir.TRAINING_PLOT)
    summary = summarize(config, dataset, metrics, episodes, wall, extra)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    echo(f"reward {metrics['reward_mean']:.4f} ± {metrics['reward_ci95']:.4f} | "
         f"KL {metrics['kl_mean']:.4f} ± {metrics['kl_ci95']:.4f} (estimator floor {metrics['kl_floor']:.4f}) | "
         f"{summary['episodes_per_s']:.1f} episodes/s" + (f"\nwarning: {metrics['kl_warning']}" if 'kl_warning' in metrics
                                                         else ""))
    echo(f"plot: {run_dir / rundir.PLOT}\nsummary: {run_dir / rundir.SUMMARY}")
    return summary
