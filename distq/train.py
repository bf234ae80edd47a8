"""The training driver: Algorithm 1 over episodes, then evaluation and the run directory's outputs.

Episodes run on a backend (in-process here; Ray actors in distq.parallel), so the loop is the same for both.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from distq import rundir
from distq.budget import Monitor
from distq.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from distq.components import build_learner, build_rollout, build_tilt, learner_device, rollout_device
from distq.config import Config, single_process_reason
from distq.configfile import save_config
from distq.data import Dataset, check_distinct, load_dataset
from distq.denoising import DataTilt
from distq.errors import DistqError
from distq.evaluation import evaluate_policy, kl_reliability
from distq.interrupt import Interrupted, StopRequest
from distq.interrupt import name as signal_name
from distq.learner import TERMINAL_MEAN, TrainingDiverged, deployed_policy, with_initial_policy
from distq.plots import GRID_ROWS, grid_rows, is_image, plot_samples, plot_training_curves
from distq.rewards import load_reward, rewarded_region
from distq.rollout import Rollout, episode_chunks
from distq.runtime import configure_cpu
from distq.schema import flatten
from distq.standardize import Standardization, stored

Echo = Callable[[str], None]


class InProcessBackend:
    """Algorithm 1 in the training process. On one device the rollout shares the learner's policy module (no weight
    copies); on two (train.device != parallel.rollout_device) it has its own, loaded before every batch.

    A backend runs one episode per `step` and hands back the learner's metrics; distq.parallel.RayBackend is the
    same interface over Ray actors.
    """

    workers = 0
    restarts = 0

    def __init__(self, config: Config, dataset: Dataset, reward):
        self.config = config
        self.learner = build_learner(config, dataset.points, reward, dataset.labels)
        device = rollout_device(config)
        self.shared = device == self.learner.device
        shared = {"policy": self.learner.policy, "reference": self.learner.reference} if self.shared else {}
        self.rollout = build_rollout(config, dataset.points, reward, labels=dataset.labels, device=device,
                                     tilt=build_tilt(config, dataset.points, reward, dataset.labels), **shared)

    def step(self, episode: int) -> dict[str, float]:
        """Collect the episode's batch with the current policy (E10) and apply one update (E15-E16)."""
        train = self.config.train
        began = time.perf_counter()
        if not self.shared:
            self.rollout.set_weights(self.learner.policy_weights())
        batch = self.rollout.run(episode_chunks(self.config.seed, episode, train.batch_size, train.chunk_size))
        collected = time.perf_counter()
        metrics = self.learner.update(batch)
        metrics["time/rollout_s"] = collected - began
        metrics["time/transfer_s"] = 0.0
        return metrics

    def learner_state(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The weights the run evaluates with (the moving average with train.ema_rate > 0)."""
        return self.learner.policy_weights(deployed=True)

    def close(self) -> None:
        """Nothing to stop."""


class MetricsLog:
    """Window means of the learner's metrics, one row per `log_every` episodes, and the progress line."""

    def __init__(self, config: Config, rows: list[dict[str, Any]], start_episode: int, echo: Echo,
                 on_row: Optional[Callable[[dict[str, Any]], None]] = None, tilt: Optional[DataTilt] = None,
                 report_every: int = 0):
        """tilt: weighted dsm's data tilt, whose effective sample size every progress line shows. report_every: a
        row also ends at each report (Reports), whose metrics read the last row."""
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


def _condition_column(config: Config, dataset: Dataset, conditions) -> Optional[tuple[str, list]]:
    """(name, values) of the samples' condition column in conditional runs, else None."""
    if conditions is None:
        return None
    return config.data.condition, [dataset.condition_values[int(c)] for c in conditions]


def run_header(config: Config, dataset: Dataset) -> dict[str, Any]:
    """What a checkpoint holds beside the episode and the learner state: the config, the data's columns and
    standardisation (and conditions)."""
    header = {"config": config.to_dict(), "columns": list(dataset.columns),
              "standardization": dataset.standardization.state()}
    if dataset.classes:  # what `distq sample` needs to generate by condition without the data
        header["conditions"] = {"values": list(dataset.condition_values),
                                "probabilities": dataset.class_probabilities().tolist()}
    return header


def save_run(run_dir: Path, header: dict[str, Any], episode: int, learner: dict[str, Any], rows: list,
             name: str = rundir.CHECKPOINT) -> None:
    """The checkpoint `name` of a run at `episode` and (with the run's own checkpoint) metrics.parquet."""
    save_checkpoint(run_dir / name, {**header, "episode": episode, "learner": learner})
    if name == rundir.CHECKPOINT:
        rundir.write_table(run_dir / rundir.METRICS, rows)


def _save(run_dir: Path, config: Config, backend, dataset: Dataset, episode: int, rows: list, monitor: Monitor,
          name: str = rundir.CHECKPOINT) -> None:
    save_run(run_dir, {**run_header(config, dataset), "monitor": monitor.state()}, episode, backend.learner_state(),
             rows, name)


def make_backend(config: Config, dataset: Dataset, reward, address: Optional[str] = None, echo: Echo = print):
    """In-process for parallel.workers = 0 (with the critic in a child process for train.processes = 2 where it
    applies; where not, the run takes 1 process and says so); Ray Train workers for parallel.mode = ddp; Ray actors
    otherwise (the only paths that import ray)."""
    reason = single_process_reason(config)
    if reason:
        echo(f"distq: note: train.processes={config.train.processes} is for in-process qlearning runs on the CPU; "
             f"{reason} (train.processes taken as 1)")
    if config.parallel.mode == "ddp":
        from distq.ddp import DdpBackend

        return DdpBackend(config, dataset, reward, address)
    if config.parallel.workers == 0:
        if config.train.processes == 2 and not reason:
            from distq.split import TwoProcessBackend

            return TwoProcessBackend(config, dataset, reward)
        return InProcessBackend(config, dataset, reward)
    from distq.parallel import RayBackend

    return RayBackend(config, dataset, reward, address)


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
    """The run's W&B run (distq.run_tracking.RunTracker), or None with tracking.wandb off or W&B's mode disabled.
    Inside a sweep distq.tuning turns tracking.wandb off: the trial's callback is its logger."""
    if not config.tracking.wandb:
        return None
    from distq.run_tracking import RunTracker, wandb_mode

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


def final_progress(log: MetricsLog, start: int, episode: int) -> None:
    """The last progress line, from the last row, once training reached its last episode."""
    if log.rows and log.rows[-1]["episode"] == episode and episode > start:
        log.progress(episode, {k: v for k, v in log.rows[-1].items()
                               if k.startswith((TERMINAL_MEAN, "loss/"))})


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
