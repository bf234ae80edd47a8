"""Algorithm 1 over Ray: RolloutWorker actors run step 1, one Learner actor runs steps 2-3 (E15-E16).

The only module that imports ray. Data go to the object store once (`ray.put` of a numpy array) and actors hold
the reference; each actor computes on a zero-copy, read-only view of its node's one copy (torch.from_numpy over
the object store's shared memory), so no actor holds a copy of the data. The learner's weights leave it once per
update as one object that every worker reads, and the workers' batches go to the learner by reference (the driver
never fetches them). A batch is split across the workers in whole chunks of distq.backends.rollout.episode_chunks, so with
the same seed the synchronous mode gives the same updates for any number of workers. A worker that dies is
replaced and its chunks are generated again with the same seeds. Actors rebuild the rollout and the learner from
the config (user reward callables are never pickled). Everything that leaves an
actor (batches, weights, learner states) is CPU tensors, whatever device the actor computes on (distq.setup.devices).

Over 300 lines: the two actor classes and the backend that drives them, with worker replacement and the
learner's reading of the workers' parts, are one protocol that changes together.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import ray
import torch

from distq.algorithms.batch import Chunk, Trajectories, episode_chunks
from distq.backends.build import build_learner, build_rollout, build_tilt, listed_reward_names
from distq.backends.ray_cluster import connect_ray, wait_placed
from distq.errors import DistqError
from distq.problems.rewards import load_reward
from distq.problems.standardize import Standardization
from distq.setup.config import Config, ParallelConfig
from distq.setup.devices import CPU, to_device
from distq.setup.machine import configure_cpu

if TYPE_CHECKING:  # actor processes import this module: keep distq.problems.data (sklearn, pyarrow) out of them
    from distq.problems.data import Dataset

ATTEMPTS = 3
"""Replacements of one worker in a row (for one batch) before the run gives up."""
LOST = "lost_parts"
"""The Learner's answer, instead of metrics, when parts of a batch could not be read."""


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the read-only numpy view that ray.get returns for an object store array: no copy. torch warns
    that it cannot mark the tensor read-only; distq never writes into its data."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class _Actor:
    """Builds its objects in the actor process; a DistqError while building is raised by every later call."""

    def __init__(self, config: Config, data: list, condition_values: tuple = (),
                 standardization: Optional[Standardization] = None):
        """data: [the points' ref] or, in conditional runs, [the points' ref, their condition indices' ref], with
        the conditions' values (what a conditional reward receives) and the points' standardisation (the reward
        sees the user's coordinates)."""
        configure_cpu(1)
        self.data, self.error = data[0], None
        try:
            points, *labels = (shared_tensor(array) for array in ray.get(data))
            labels = labels[0] if labels else None
            self.build(config, points, labels,
                       load_reward(config.reward, points, labels, condition_values, standardization))
        except DistqError as err:
            self.error = err

    def build(self, config: Config, points: torch.Tensor, labels: Optional[torch.Tensor], reward) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True

    def data_ref(self) -> list:
        """[the ObjectRef of the data], as held (the list keeps Ray from resolving it)."""
        return [self.data]

    def get_pid(self) -> int:
        return os.getpid()

    def get_node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote
class RolloutWorker(_Actor):
    """Step 1 of Algorithm 1 for the chunks it is given, with the weights it is given."""

    def build(self, config: Config, points: torch.Tensor, labels: Optional[torch.Tensor], reward) -> None:
        self.rollout = build_rollout(config, points, reward, labels=labels,
                                     tilt=build_tilt(config, points, reward, labels))

    @ray.method(num_returns=2)
    def run(self, weights: dict[str, torch.Tensor], chunks: list[Chunk]) -> tuple[Trajectories, dict[str, float]]:
        """The chunks' trajectories under the policy-mean weights, and small stats for the driver."""
        self.ready()
        began = time.perf_counter()
        self.rollout.set_weights(weights)
        batch = to_device(self.rollout.run(chunks), CPU)
        return batch, {"generate_s": time.perf_counter() - began, "trajectories": batch.batch_size,
                       "weights_bytes": _nbytes(weights.values()), "trajectory_bytes": _nbytes(vars(batch).values())}


@ray.remote
class Learner(_Actor):
    """Steps 2-3 of Algorithm 1 (E15-E16) on batches read straight from the workers' results."""

    def __init__(self, *args, reward_names: tuple[str, ...] = ()):
        """reward_names: the driver's names of a list reward.fn's entries (distq.backends.build.build_learner)."""
        self.reward_names = reward_names
        super().__init__(*args)

    def build(self, config: Config, points: torch.Tensor, labels: Optional[torch.Tensor], reward) -> None:
        self.learner = build_learner(config, points, reward, labels, self.reward_names)

    @ray.method(num_returns=2)
    def update(self, parts: list[ray.ObjectRef]) -> tuple[dict[str, Any], Optional[dict[str, torch.Tensor]]]:
        """One update on the batch's parts (refs in chunk order); returns the metrics and the new weights, or, if a
        part could not be read, ({LOST: its indices}, None) and no update."""
        self.ready()
        read, lost = self.read_parts(parts)
        if lost:
            return {LOST: lost}, None
        return self.learner.update(Trajectories.concat(read)), self.learner.policy_weights()

    def read_parts(self, parts: list[ray.ObjectRef]) -> tuple[list[Trajectories], list[int]]:
        """The parts that can be read, and the indices of those that cannot: their worker died before finishing, or
        the node that held the finished part was lost (Ray cannot rebuild it: workers are never restarted). The
        learner reads them itself, not as task arguments, so that a loss is reported part by part instead of failing
        the call, whenever it happens."""
        read, lost = [], []
        for index, ref in enumerate(parts):
            try:
                read.append(ray.get(ref))
            except (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError):
                lost.append(index)
            except ray.exceptions.RayTaskError as err:  # the worker's own error, e.g. a bad reward: one line
                raise (err.cause if isinstance(err.cause, DistqError) else err) from None
        return read, lost

    def weights(self, deployed: bool = False) -> dict[str, torch.Tensor]:
        self.ready()
        return self.learner.policy_weights(deployed)

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


@dataclass
class _Batch:
    """One episode's batch in flight: per worker slot its chunks and its call (actor, trajectories, stats refs)."""

    episode: int
    version: int
    weights: ray.ObjectRef
    groups: dict[int, list[Chunk]]
    calls: dict[int, tuple[Any, ray.ObjectRef, ray.ObjectRef]]


def split_chunks(chunks: list[Chunk], workers: int) -> dict[int, list[Chunk]]:
    """Contiguous groups of whole chunks, one per worker slot (slots left without a chunk are omitted)."""
    bounds = [i * len(chunks) // workers for i in range(workers + 1)]
    return {i: chunks[a:b] for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a}


def portable_config(config: Config) -> Config:
    """The config with user reward files made absolute, so actors find them whatever their working directory."""
    fns = tuple(_absolute_reference(ref) for ref in config.reward.fns)
    if fns == config.reward.fns:
        return config
    reward = dataclasses.replace(config.reward, fn=fns if isinstance(config.reward.fn, tuple) else fns[0])
    return dataclasses.replace(config, reward=reward)


def _absolute_reference(ref: str) -> str:
    """A reward reference `path/to/file.py:function` with the path made absolute; others as they are."""
    target, sep, attr = ref.rpartition(":")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if not sep or not is_file or Path(target).is_absolute():
        return ref
    return f"{Path(target).resolve()}:{attr}"


def _reserved_devices(config: Config) -> Config:
    """The config with `auto` devices as cpu for the actors that reserve no GPU: Ray leaves a node's GPUs visible to
    those too, and `auto` must not compute on a GPU that another actor reserved."""
    parallel, train = config.parallel, config.train
    if train.device == "auto" and parallel.learner_num_gpus == 0:
        config = dataclasses.replace(config, train=dataclasses.replace(train, device="cpu"))
    if parallel.rollout_device == "auto" and parallel.num_gpus_per_worker == 0:
        config = dataclasses.replace(config, parallel=dataclasses.replace(parallel, rollout_device="cpu"))
    return config


def _memory(mebibytes: Optional[float]) -> dict[str, int]:
    """An actor's Ray memory reservation in bytes, if one is configured."""
    return {} if mebibytes is None else {"memory": int(mebibytes * 2**20)}


def _check_fits(parallel: ParallelConfig) -> None:
    """Actors that cannot all be placed would wait forever: fail now, naming the fields to change."""
    cpus = parallel.workers * parallel.num_cpus_per_worker + parallel.learner_num_cpus
    gpus = parallel.workers * parallel.num_gpus_per_worker + parallel.learner_num_gpus
    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0) + 1e-9 or gpus > have.get("GPU", 0) + 1e-9:
        raise DistqError(
            f"parallel.workers={parallel.workers} actors x parallel.num_cpus_per_worker={parallel.num_cpus_per_worker} "
            f"+ parallel.learner_num_cpus={parallel.learner_num_cpus} need {cpus:g} CPUs and {gpus:g} GPUs, but the "
            f"embedded Ray has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; lower those fields or "
            "raise parallel.ray_num_cpus")
    memory = parallel.workers * (parallel.memory_per_worker_mb or 0) + (parallel.learner_memory_mb or 0)
    if memory * 2**20 > have.get("memory", 0):
        raise DistqError(
            f"parallel.workers={parallel.workers} actors x parallel.memory_per_worker_mb="
            f"{parallel.memory_per_worker_mb} + parallel.learner_memory_mb={parallel.learner_memory_mb} reserve "
            f"{memory:g} MiB, but the embedded Ray has {have.get('memory', 0) / 2**20:.0f} MiB; lower those fields")


def _asked(parallel: ParallelConfig) -> str:
    """The actors' resources, as the fields that set them."""
    memory = (f", parallel.memory_per_worker_mb={parallel.memory_per_worker_mb}, parallel.learner_memory_mb="
              f"{parallel.learner_memory_mb}" if parallel.memory_per_worker_mb or parallel.learner_memory_mb else "")
    return (f"parallel.workers={parallel.workers} RolloutWorkers x (parallel.num_cpus_per_worker="
            f"{parallel.num_cpus_per_worker} CPU, parallel.num_gpus_per_worker={parallel.num_gpus_per_worker} GPU) + "
            f"a Learner (parallel.learner_num_cpus={parallel.learner_num_cpus} CPU, parallel.learner_num_gpus="
            f"{parallel.learner_num_gpus} GPU){memory}")


def _discard(refs: list, timeout: Optional[float] = None) -> None:
    """Read results that are not needed, ignoring their errors (else Ray logs each error as unhandled)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False) if refs else ([], [])
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            pass


def _get(ref: ray.ObjectRef, *siblings: ray.ObjectRef) -> Any:
    """ray.get, re-raising a DistqError (or a lost object) from an actor as itself, so the CLI prints one line;
    `siblings`, the other returns of the same call, are discarded on failure."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        _discard(list(siblings))
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(
                err.cause, (DistqError, ray.exceptions.ObjectLostError)):
            raise err.cause from None
        raise


def _outstanding(batch: _Batch) -> list:
    return [ref for _, *refs in batch.calls.values() for ref in refs]


class RayBackend:
    """The training loop's backend over W RolloutWorker actors and one Learner actor (see distq.training.trainer)."""

    def __init__(self, config: Config, dataset: "Dataset", reward, address: Optional[str]) -> None:
        del reward  # rebuilt in each actor from config.reward: user callables are not pickled
        self.config, self.workers, self.restarts = _reserved_devices(portable_config(config)), config.parallel.workers, 0
        self.rollout_workers: list = []
        self._learner, self._pending = None, None
        address = address or os.environ.get("RAY_ADDRESS")
        parallel = config.parallel
        self._started = connect_ray(address, parallel.connect_timeout_s, parallel.ray_num_cpus)
        try:
            if self._started and not address:
                _check_fits(config.parallel)
            # the condition labels (conditional runs) travel as the points do: put once, read in place; the points
            # are already standardised (in place, distq.problems.data), so the object store holds their only copy
            self._data = [ray.put(array.numpy()) for array in (dataset.points, dataset.labels) if array is not None]
            self._condition_values, self._standardization = dataset.condition_values, dataset.standardization
            self._learner = Learner.options(num_cpus=parallel.learner_num_cpus, num_gpus=parallel.learner_num_gpus,
                                            max_restarts=0, **_memory(parallel.learner_memory_mb)
                                            ).remote(self.config, self._data, self._condition_values,
                                                      self._standardization, reward_names=listed_reward_names(config))
            self.rollout_workers = [self._new_worker() for _ in range(self.workers)]
            ready = [actor.ready.remote() for actor in (self._learner, *self.rollout_workers)]
            for ref in wait_placed(ready, parallel.connect_timeout_s, _asked(parallel)):
                _get(ref)
            self._weights, self._version = self._learner.weights.remote(), 0
        except BaseException:
            self.close()
            raise

    def _new_worker(self):
        parallel, context = self.config.parallel, ray.get_runtime_context()
        # SPREAD: rollouts are the part that scales out over nodes. But inside a placement group that captures its
        # children (a Tune trial's), the actors must take the group's bundles: the default strategy does.
        captured = context.get_placement_group_id() and context.should_capture_child_tasks_in_placement_group
        return RolloutWorker.options(num_cpus=parallel.num_cpus_per_worker, num_gpus=parallel.num_gpus_per_worker,
                                     max_restarts=0, scheduling_strategy=None if captured else "SPREAD",
                                     **_memory(parallel.memory_per_worker_mb)).remote(self.config, self._data,
                                                                                      self._condition_values,
                                                                                      self._standardization)

    def _submit(self, episode: int) -> _Batch:
        """Start generating an episode's batch with the current weights, whole chunks per worker."""
        train = self.config.train
        groups = split_chunks(episode_chunks(self.config.seed, episode, train.batch_size, train.chunk_size), self.workers)
        return _Batch(episode, self._version, self._weights, groups,
                      {slot: self._call(slot, self._weights, group) for slot, group in groups.items()})

    def _call(self, slot: int, weights: ray.ObjectRef, chunks: list[Chunk]) -> tuple[Any, ray.ObjectRef, ray.ObjectRef]:
        actor = self.rollout_workers[slot]
        return (actor, *actor.run.remote(weights, chunks))

    def _replace(self, slot: int, dead) -> None:
        """Replace the slot's actor if it is still the one that died (a pending call may have found it first)."""
        if self.rollout_workers[slot] is dead:
            ray.kill(dead, no_restart=True)
            self.rollout_workers[slot] = self._new_worker()
            self.restarts += 1

    def _regenerate(self, batch: _Batch, slot: int) -> None:
        """Generate a slot's chunks again with the batch's weights, replacing its worker while it is dead."""
        for attempt in range(ATTEMPTS + 1):
            actor, trajectories, stats = batch.calls[slot] = self._call(slot, batch.weights, batch.groups[slot])
            try:
                _get(stats, trajectories)
                return
            except ray.exceptions.RayActorError as err:
                if attempt == ATTEMPTS:
                    raise DistqError(f"RolloutWorker {slot} died {ATTEMPTS + 1} times in a row generating episode "
                                     f"{batch.episode}: {str(err).splitlines()[0]}") from None
                self._replace(slot, actor)

    def _update(self, batch: _Batch) -> tuple[dict[str, float], ray.ObjectRef]:
        """The learner's update on the batch and its new weights; in async mode the next batch starts meanwhile.

        Exactness under failures is kept here, not left to Ray: workers are never restarted and their calls never
        retried by Ray (a restarted actor would not know which weights and chunks were lost), and Ray's lineage
        reconstruction cannot rebuild a non-restartable actor's results, so a part lost with its node fails to
        read. Whenever that happens, before or while the learner reads the batch, the learner reports the parts it
        could not read and does not update; only those parts are generated again, with the same weights and chunks
        (so the same seeds), and the learner reads the batch again. A part lost after the learner read it is no
        longer needed. So every chunk enters exactly one update, as in an uninterrupted run."""
        for attempt in range(ATTEMPTS + 1):
            slots = sorted(batch.calls)
            metrics, weights = self._learner.update.remote([batch.calls[slot][1] for slot in slots])
            if attempt == 0 and self.config.parallel.mode == "async" and batch.episode < self.config.train.episodes:
                self._pending = self._submit(batch.episode + 1)
            try:
                result = _get(metrics, weights)
            except ray.exceptions.RayActorError as err:
                raise DistqError(f"the Learner actor died ({str(err).splitlines()[0]}); its state is lost: continue "
                                 "from the last checkpoint with --resume RUN_DIR") from None
            if LOST not in result:
                return result, weights
            for index in result[LOST]:
                self._regenerate(batch, slots[index])
        raise DistqError(f"parts of episode {batch.episode}'s batch were lost {ATTEMPTS + 1} times in a row")

    def _stats(self, batch: _Batch) -> dict[int, dict[str, float]]:
        """Each slot's stats (small results, kept by the driver: they outlive a lost node)."""
        return dict(zip(sorted(batch.calls), ray.get([batch.calls[slot][2] for slot in sorted(batch.calls)])))

    def step(self, episode: int) -> dict[str, float]:
        """One episode: the batch from the workers, one learner update; the learner's metrics plus time/rollout_s
        (the slowest worker's generation), time/transfer_s (the rest of the wall time beyond the update and, in
        sync mode, the rollout: Ray's calls and transfers), policy lag and throughput."""
        began = time.perf_counter()
        pending, self._pending = self._pending, None
        batch = pending if pending is not None and pending.episode == episode else self._submit(episode)
        try:
            metrics, weights = self._update(batch)
            stats = self._stats(batch)
        except BaseException:
            _discard(_outstanding(batch))  # read every failed result, else Ray reports each as unhandled
            raise
        lag = self._version - batch.version
        self._weights, self._version = weights, self._version + 1
        rollout = max(s["generate_s"] for s in stats.values())
        hidden = rollout if self.config.parallel.mode == "sync" else 0.0
        metrics["time/rollout_s"] = rollout
        metrics["time/transfer_s"] = max(time.perf_counter() - began - metrics["time/update_s"] - hidden, 0.0)
        metrics["parallel/policy_lag"] = float(lag)
        metrics["parallel/restarts"] = float(self.restarts)
        metrics["parallel/bytes_per_update"] = float(sum(s["weights_bytes"] + s["trajectory_bytes"]
                                                         for s in stats.values()))
        for slot, s in stats.items():
            metrics[f"parallel/worker{slot}_trajectories_per_s"] = s["trajectories"] / max(s["generate_s"], 1e-9)
        return metrics

    def learner_state(self) -> dict:
        return _get(self._learner.state_dict.remote())

    def load_learner_state(self, state: dict) -> None:
        """Load a checkpoint into the learner; the next batch is generated with its weights (on every worker)."""
        _get(self._learner.load_state_dict.remote(state))
        self._pending = None
        self._weights, self._version = self._learner.weights.remote(), self._version + 1

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The weights the run evaluates with (the moving average with train.ema_rate > 0)."""
        return _get(self._learner.weights.remote(deployed=True))

    def close(self) -> None:
        """Stop the actors; shut Ray down only if this backend started (or joined) it."""
        if self._pending is not None and ray.is_initialized():
            _discard(_outstanding(self._pending), timeout=10)
        for actor in (*self.rollout_workers, self._learner):
            if actor is not None and ray.is_initialized():
                ray.kill(actor, no_restart=True)
        self.rollout_workers, self._learner, self._pending = [], None, None
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False
