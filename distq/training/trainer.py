"""The Trainer: one run of Algorithm 1 over episodes, then its evaluation and the run directory's outputs.

Episodes run on a backend (distq.backends.backend: in this process, a critic process, Ray actors), so stepping is
the same for all of them; the data-parallel backend runs its own loop in its replicas (Trainer.run hands it over).
The CLI, calibrate and Tune trials all train through the Trainer.

Over 300 lines: a run from its checks to its outputs (check inputs, start or resume, episodes with their
checkpoints, evaluation, samples, figures, summary), kept in one place so one file shows a run's whole order.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

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


class Trainer:
    """One training run in run_dir, from its checks to its outputs:

        with Trainer(config, run_dir) as trainer:
            summary = trainer.run()      # or: while not trainer.done: trainer.step() ... trainer.finish()

    The CLI and calibrate run it (train()); a Tune trial steps it, saving and evaluating between steps, so one run
    (data, networks, actors) serves all its reports (distq.edges.tuning). Entering checks the inputs before the run
    directory is touched, locks the directory until exit, starts the backend and loads the starting state (the
    checkpoint on resume, train.init's policy); inside, SIGINT or SIGTERM stops the run after its current episode
    with a checkpoint of it: Interrupted, whose message says which checkpoint is kept.
    """

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 echo: Echo = print, address: Optional[str] = None, report_every: int = 0):
        """`address` joins an existing Ray cluster when parallel.workers > 0 (None: RAY_ADDRESS or an embedded
        instance). `report_every`: a metrics row also ends every that many episodes (a trial's reports read it)."""
        self.config, self.run_dir, self.echo = config, Path(run_dir), echo
        self.resume, self.overwrite, self.address, self.report_every = resume, overwrite, address, report_every
        self.kept: Optional[Kept] = None
        self.backend = self.tracker = None
        self._failed = False
        self._exits = contextlib.ExitStack()
        self._evaluator: Optional[Rollout] = None

    def __enter__(self) -> Trainer:
        config, run_dir = self.config, self.run_dir
        configure_cpu(config.train.threads)
        self.dataset, self.reward, init, self.tilt = check_inputs(config, self.resume, run_dir)
        try:
            self._exits.enter_context(rundir.locked(run_dir, "--resume" if self.resume else "--out"))
            payload = check_run(config, run_dir, self.resume, self.overwrite)
            self.start = payload["episode"] if payload is not None else 0
            self.kept = Kept(run_dir, payload["episode"] if payload is not None else None)
            self.tracker = open_tracker(config, run_dir)
            if self.tracker is not None:
                self._exits.callback(lambda: self.tracker.close(failed=self._failed))
            warning = ess_warning(self.tilt, config, self.dataset)
            if warning:
                self.echo(warning)
            self.backend = make_backend(config, self.dataset, self.reward, self.address, self.echo)
            self._exits.callback(self.backend.close)
            self.monitor = Monitor(config, self.dataset, self.reward)
            # after make_backend: ray.init installs a SIGTERM handler of its own
            self.stop = self._exits.enter_context(StopRequest())
            self.log = MetricsLog(config, [], self.start, self.echo,
                                  self.tracker.row if self.tracker is not None else None, self.tilt,
                                  self.report_every)
            self._begin(payload, init)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.episode, self.began = self.start, time.perf_counter()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._failed = kind is not None
        self._exits.close()  # the signal handlers, the backend, the W&B run, then the lock
        if self.kept is not None and kind is KeyboardInterrupt:  # before the run's own handlers were up
            raise Interrupted(signal.SIGINT, self.kept.message(signal.SIGINT)) from None
        if self.kept is not None and kind is not None and issubclass(kind, Interrupted):
            raise Interrupted(error.signum, self.kept.message(error.signum)) from None

    def _begin(self, payload: Optional[dict], init) -> None:
        """Load the starting state, check the disk, write config.yaml: the first write of a run, once its backend
        is up."""
        if payload is not None:
            rows = rundir.read_table_rows(self.run_dir / rundir.METRICS)
            self.load_state({**payload, "rows": [r for r in rows if r["episode"] <= payload["episode"]]})
        elif init is not None:  # the pretrained policy, also dpok's reference; the value network starts fresh
            self.backend.load_learner_state(with_initial_policy(self.backend.learner_state(), init))
        # The new checkpoint is written beside the old one; samples are float32.
        samples = 4 * self.dataset.dim * self.config.eval.n_samples * self.config.eval.batches
        rundir.check_space(self.run_dir, 2 * _nbytes(self.backend.learner_state()) + samples)
        if payload is None:  # an --overwrite run's files, or a failed start's
            rundir.clear_outputs(self.run_dir)
        save_config(self.config, self.run_dir / rundir.CONFIG)

    @property
    def done(self) -> bool:
        """train.episodes reached, or the KL budget stopped the run."""
        return self.episode >= self.config.train.episodes or bool(self.monitor.stop_reason)

    def step(self) -> dict[str, float]:
        """The next episode, with the KL budget's evaluation when due and the checkpoint every
        train.checkpoint_every episodes (or after a signal, which then stops the run). -> the episode's metrics."""
        self.stop.check()
        episode, began = self.episode + 1, time.perf_counter()
        try:
            metrics = self.backend.step(episode)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err}. Training stopped at episode {episode}; the last good checkpoint "
                                   f"{self.run_dir / rundir.CHECKPOINT} is kept (if one was written)") from None
        except Exception:
            self.stop.check()  # the signal that stopped a critic process or a Ray worker as well is the cause
            raise
        self.episode = episode
        metrics["time/episode_s"] = time.perf_counter() - began
        evals = self.monitor.evaluate(self.backend.policy_weights()) if self.monitor.due(episode) else {}
        if evals and self.monitor.is_best(episode, evals):
            self.save(rundir.BEST_CHECKPOINT)
        self.log.add(episode, metrics, evals)
        if self.monitor.stop_reason:
            self.log.echo(f"stopped at episode {episode}: {self.monitor.stop_reason}")
        elif episode % self.config.train.checkpoint_every == 0 or self.stop.signum is not None:
            self.save()
        return metrics

    def state(self) -> dict[str, Any]:
        """A copy of the run as its checkpoint holds it: the run's header, episode, learner state, KL budget and
        metrics rows."""
        return copy.deepcopy({**self._header(), "episode": self.episode, "learner": self.backend.learner_state(),
                              "rows": self.log.rows})

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (state() or a checkpoint with its metrics rows)."""
        self.backend.load_learner_state(state["learner"])
        self.monitor.load_state(state.get("monitor") or {})
        self.episode = self.start = state["episode"]
        self.log.rows[:] = copy.deepcopy(state["rows"])

    def _header(self) -> dict[str, Any]:
        return {**run_header(self.config, self.dataset), "monitor": self.monitor.state()}

    def save(self, name: str = rundir.CHECKPOINT) -> None:
        """Write the checkpoint `name` (the run's own one also writes metrics.parquet)."""
        save_run(self.run_dir, self._header(), self.episode, self.backend.learner_state(), self.log.rows, name)
        if name == rundir.CHECKPOINT:
            self.kept.episode = self.episode

    def evaluate(self) -> dict[str, Any]:
        """summary.json's contents for the policy of this episode (no samples, no plots)."""
        if self._evaluator is None:
            self._evaluator = build_rollout(self.config, self.dataset.points, self.reward, labels=self.dataset.labels)
        self._evaluator.set_weights(self.backend.policy_weights())
        wall = time.perf_counter() - self.began
        metrics = evaluation(self.config, self._evaluator, self.dataset, self.reward)[0]
        return summarize(self.config, self.dataset, metrics, (self.start, self.episode), wall, self._extras(wall))

    def _extras(self, wall: float) -> dict[str, Any]:
        """What summary.json adds to the evaluation: workers, the KL budget's state, weighted dsm's ESS."""
        return {"workers": self.backend.workers, "worker_restarts": self.backend.restarts,
                **self.monitor.summary(self.run_dir, wall), **ess_summary(self.tilt, self.dataset)}

    def run(self) -> dict[str, Any]:
        """Train up to train.episodes (or the KL budget's stop), then finish(). -> summary.json's contents."""
        if self.config.parallel.mode == "ddp":  # the loop runs in the Ray Train workers
            self.backend.loop(self.run_dir, self.dataset, self.log, self.start, self.stop, self.kept)
            self.episode = self.config.train.episodes
        else:
            while not self.done:
                self.step()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Checkpoint the last episode, stop the backend, evaluate the run and write its outputs (samples, plots,
        summary.json). -> summary.json's contents."""
        if self.config.parallel.mode != "ddp":  # ddp's workers logged and checkpointed their last episode
            final_progress(self.log, self.start, self.episode)
            self.save()
        wall = time.perf_counter() - self.began
        self.stop.stop_deferring()
        weights, extras = self.backend.policy_weights(), self._extras(wall)
        self.backend.close()
        rollout = build_rollout(self.config, self.dataset.points, self.reward, labels=self.dataset.labels)
        rollout.set_weights(weights)
        try:
            summary = finish(self.config, self.run_dir, rollout, self.dataset, self.reward, self.log,
                             (self.start, self.episode), wall, self.echo, extras)
        except DistqError as err:
            raise DistqError(f"{err}; training finished and {self.run_dir / rundir.CHECKPOINT} (episode "
                             f"{self.kept.episode}) is kept: `distq evaluate {self.run_dir}` evaluates it") from None
        if self.tracker is not None:
            self.tracker.finish(summary, [self.run_dir / rundir.PLOT, self.run_dir / rundir.TRAINING_PLOT])
            self.echo(f"W&B run: {self.tracker.directory}" + (f" (upload with `wandb sync {self.tracker.directory}`)"
                                                             if self.tracker.mode == "offline" else ""))
        return summary


def train(config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, echo: Echo = print,
          address: Optional[str] = None) -> dict[str, Any]:
    """Train (or continue) a run in `run_dir`, evaluate it, write all outputs (Trainer.run); returns summary.json's
    contents."""
    with Trainer(config, run_dir, resume, overwrite, echo, address) as trainer:
        return trainer.run()


def open_tracker(config: Config, run_dir: Path):
    """The run's W&B run (distq.runs.tracking.RunTracker), or None with tracking.wandb off or W&B's mode disabled.
    Inside a sweep distq.edges.tuning turns tracking.wandb off: the trial's callback is its logger."""
    if not config.tracking.wandb:
        return None
    from distq.runs.tracking import RunTracker, wandb_mode

    mode = wandb_mode(config.tracking.mode)
    return None if mode == "disabled" else RunTracker(config, run_dir, mode)


def _nbytes(state: Any) -> int:
    """Bytes of the tensors in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(value) for value in state)
    return 0


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
