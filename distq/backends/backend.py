"""Who runs the episodes: the Backend protocol, the in-process backend and the choice among backends.

Every backend runs Algorithm 1's episodes for the training loop (distq.training.trainer) and holds the learner
state: in this process (InProcessBackend), with the critic in a child process (two_process), over Ray actors
(ray_actors). The data-parallel backend (data_parallel, parallel.mode = ddp) keeps the state and close of this
protocol but runs the loop itself, in its Ray Train workers (`loop` instead of `step`).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Protocol

import torch

from distq.algorithms.batch import episode_chunks
from distq.algorithms.learner import Learner
from distq.backends.build import build_learner, build_rollout, build_tilt, rollout_device
from distq.problems.data import Dataset
from distq.runs.progress import Echo
from distq.setup.config import Config, single_process_reason


class Backend(Protocol):
    """What the training loop asks of a backend."""

    workers: int
    """Rollout processes besides the driver (0 in process)."""
    restarts: int
    """Workers replaced after a failure so far."""

    def step(self, episode: int) -> dict[str, float]:
        """Run episode `episode`: collect its batch with the current policy and apply one update; the metrics."""

    def learner_state(self) -> dict[str, Any]:
        """The learner's state for a checkpoint."""

    def load_learner_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's learner state."""

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy-mean weights the run evaluates with."""

    def close(self) -> None:
        """Stop what the backend started."""


class LocalLearner:
    """The Backend state methods of a backend whose learner (`self.learner`) lives in this process."""

    learner: Learner

    def learner_state(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The weights the run evaluates with (the moving average with train.ema_rate > 0)."""
        return self.learner.policy_weights(deployed=True)


class InProcessBackend(LocalLearner):
    """Algorithm 1 in the training process. On one device the rollout shares the learner's policy module (no weight
    copies); on two (train.device != parallel.rollout_device) it has its own, loaded before every batch.

    A backend runs one episode per `step` and hands back the learner's metrics; distq.backends.ray_actors.RayBackend is the
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

    def close(self) -> None:
        """Nothing to stop."""


def make_backend(config: Config, dataset: Dataset, reward, address: Optional[str] = None, echo: Echo = print):
    """In-process for parallel.workers = 0 (with the critic in a child process for train.processes = 2 where it
    applies; where not, the run takes 1 process and says so); Ray Train workers for parallel.mode = ddp; Ray actors
    otherwise (the only paths that import ray)."""
    reason = single_process_reason(config)
    if reason:
        echo(f"distq: note: train.processes={config.train.processes} is for in-process qlearning runs on the CPU; "
             f"{reason} (train.processes taken as 1)")
    if config.parallel.mode == "ddp":
        from distq.backends.data_parallel import DdpBackend

        return DdpBackend(config, dataset, reward, address)
    if config.parallel.workers == 0:
        if config.train.processes == 2 and not reason:
            from distq.backends.two_process import TwoProcessBackend

            return TwoProcessBackend(config, dataset, reward)
        return InProcessBackend(config, dataset, reward)
    from distq.backends.ray_actors import RayBackend

    return RayBackend(config, dataset, reward, address)
