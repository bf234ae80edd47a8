"""Algorithm 1 data-parallel over Ray Train (parallel.mode = ddp): W TorchTrainer workers, each a full replica.

Each episode every worker rolls out its share of the batch (the chunks of distq.backends.rollout.episode_chunks, split over
the workers as in distq.backends.ray_actors, so a batch does not depend on W), computes the loss of (E15-E16) on it divided by
the whole batch's B, and the workers sum their gradients and metric sums with one torch.distributed all_reduce per
update (gloo on CPU, nccl on GPU). Every replica then clips and takes the same Adam step on the same numbers, so the
replicas stay equal, and equal to the in-process learner up to float summation order. During training only
gradients cross processes; the data are put once and every worker reads them in place (distq.backends.ray_actors).

The training loop runs in the workers. Rank 0 keeps the metrics rows and progress lines and, every
train.checkpoint_every episodes, reports a checkpoint (distq.runs.checkpoint's format, with metrics.parquet) through
ray.train.report; a Channel actor carries progress lines and checkpoint notices to the driver, which copies each
checkpoint into the run directory, and carries a stop request (SIGINT, SIGTERM) back. A worker that dies costs the
episodes since the last checkpoint: Ray Train (FailureConfig(max_failures)) restarts every worker from it, and as
batches come from counter-based seeds the run then equals an uninterrupted one. A DistqError in one worker (a bad
reward, a diverged loss) is flagged through the same all_reduce, so every worker stops at that episode; it reaches
the driver as one line and is not retried.

Over 300 lines: the replicas' loop, the driver's backend and the channel between them (progress, stop requests,
checkpoints, errors) are one protocol; split over modules, a change to one side would miss the other.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distq.algorithms.batch import episode_chunks
from distq.algorithms.learner import Learner, TrainingDiverged
from distq.backends.backend import LocalLearner
from distq.backends.build import build_learner, build_rollout, build_tilt, listed_reward_names
from distq.backends.ray_actors import portable_config, shared_tensor, split_chunks
from distq.backends.ray_cluster import connect_ray
from distq.errors import DistqError
from distq.problems.rewards import load_reward
from distq.problems.standardize import Standardization
from distq.runs import rundir
from distq.runs.checkpoint import load_checkpoint
from distq.setup.config import Config
from distq.setup.machine import configure_cpu, worker_env

if TYPE_CHECKING:
    from distq.problems.data import Dataset
    from distq.runs.interrupt import StopRequest

STORAGE = "ray_train"
"""Ray Train's storage folder in the run directory (its copies of the checkpoints; removed at the end)."""
NAME = "ddp"


@ray.remote(num_cpus=0)
class Channel:
    """Between the driver and rank 0: events out (progress lines, checkpoints, a user error), a stop request in,
    and how many times training started (1 + Ray Train's restarts)."""

    def __init__(self):
        self.events: list[tuple[str, Any]] = []
        self.stop, self.starts = False, 0

    def started(self) -> None:
        self.starts += 1

    def send(self, kind: str, value: Any) -> None:
        self.events.append((kind, value))

    def take(self) -> list[tuple[str, Any]]:
        events, self.events = self.events, []
        return events

    def request_stop(self) -> None:
        self.stop = True

    def stopping(self) -> bool:
        return self.stop

    def start_count(self) -> int:
        return self.starts


class _PeerFailed(Exception):
    """Another worker failed with a DistqError at this episode (it reports it)."""


class _Reducer:
    """Sums a replica's gradients and metric sums over the workers, with a stop and a failure flag, in one
    all_reduce of a flat buffer per update (distq.algorithms.learner.Reduce)."""

    def __init__(self, learner: Learner):
        self.size = (sum(p.numel() for net in learner.networks.values() for p in net.parameters())
                     + learner.metric_sums_size + 2)
        self.device = learner.device
        self.stop = self.stopping = self.reduced = False
        self.began = self.ended = 0.0

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        flags = torch.tensor([float(self.stop), 0.0], device=self.device)
        flat = torch.cat([t.reshape(-1) for t in tensors] + [flags])
        self.began = time.perf_counter()
        dist.all_reduce(flat)
        self.ended, self.reduced = time.perf_counter(), True
        stop, failed = flat[-2:].tolist()
        if failed:
            raise _PeerFailed
        self.stopping = stop > 0
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    @property
    def nbytes(self) -> int:
        return self.size * 4

    def fail(self) -> None:
        """This worker's part of the update's all_reduce when it failed before reaching it: the failure flag."""
        if not self.reduced:
            flat = torch.zeros(self.size, device=self.device)
            flat[-1] = 1.0
            dist.all_reduce(flat)


class _Replica:
    """One worker's learner and rollout (sharing the policy network), built from the config in the worker."""

    def __init__(self, config: Config, data: list, condition_values: tuple, standardization: Standardization,
                 state: dict[str, Any], reward_names: tuple[str, ...]):
        """reward_names: the driver's names of a list reward.fn's entries (distq.backends.build.build_learner)."""
        points, *labels = (shared_tensor(array) for array in ray.get(data))
        labels = labels[0] if labels else None
        # the points are the run's standardised ones; the reward sees the user's coordinates
        reward = load_reward(config.reward, points, labels, condition_values, standardization)
        self.config = config
        self.learner = build_learner(config, points, reward, labels, reward_names)
        self.learner.load_state_dict(state)
        self.rollout = build_rollout(config, points, reward, policy=self.learner.policy,
                                     reference=self.learner.reference, labels=labels, device=self.learner.device,
                                     tilt=build_tilt(config, points, reward, labels))
        self.reducer = _Reducer(self.learner)
        context = ray.train.get_context()
        self.rank, self.size = context.get_world_rank(), context.get_world_size()

    def step(self, episode: int, stop: bool) -> dict[str, float]:
        """One episode: this worker's chunks, its part of the update; the metrics (the whole batch's) with the
        time split of this worker. `stop`: ask every worker to stop after this episode."""
        train = self.config.train
        began = time.perf_counter()
        self.reducer.stop, self.reducer.reduced = stop, False
        chunks = split_chunks(episode_chunks(self.config.seed, episode, train.batch_size, train.chunk_size),
                              self.size)[self.rank]
        part = self.rollout.run(chunks)
        rolled = time.perf_counter()
        metrics = self.learner.update_on_device(part, train.batch_size, self.reducer)
        reducer = self.reducer
        metrics.update({"time/rollout_s": rolled - began, "time/gradient_s": reducer.began - rolled,
                        "time/allreduce_s": reducer.ended - reducer.began,
                        "time/step_s": time.perf_counter() - reducer.ended,
                        "parallel/bytes_allreduced": float(reducer.nbytes)})
        return metrics


class _StopWatch:
    """Rank 0's view of the driver's stop request, asked without waiting (one question in flight)."""

    def __init__(self, channel):
        self.channel, self.pending = channel, channel.stopping.remote()

    def requested(self) -> bool:
        ready, _ = ray.wait([self.pending], timeout=0)
        if not ready:
            return False
        if ray.get(self.pending):
            return True
        self.pending = self.channel.stopping.remote()
        return False


def _any(flag: bool) -> bool:
    """Whether `flag` is set on any worker."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total)
    return bool(total.item())


def _failure(err: DistqError) -> tuple[bool, str]:
    return isinstance(err, TrainingDiverged), str(err)


def _starting_point(settings: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The episode and learner state to start from, and the metrics rows so far: Ray Train's last checkpoint after a
    restart, else what the driver started the run with."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return ray.get(settings["start"][0]), settings["rows"]
    with checkpoint.as_directory() as folder:
        return (load_checkpoint(Path(folder) / rundir.CHECKPOINT),
                rundir.read_table_rows(Path(folder) / rundir.METRICS))


def train_worker(settings: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: build the replica, then train from the starting point to the end."""
    from distq.runs.progress import MetricsLog

    config, channel = settings["config"], settings["channel"]
    configure_cpu(config.train.threads)
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        channel.started.remote()
    payload, rows = _starting_point(settings)
    replica, failed = None, None
    try:
        replica = _Replica(config, settings["data"], settings["condition_values"], settings["standardization"],
                           payload["learner"], settings["reward_names"])
    except DistqError as err:
        failed = err
    if _any(failed is not None):  # every worker stops; those that failed say why
        if failed is not None:
            ray.get(channel.send.remote("failure", _failure(failed)))
        return
    log = (MetricsLog(config, rows, payload["episode"], lambda line: channel.send.remote("line", line))
           if rank == 0 else None)
    _episodes(replica, log, channel, settings["header"], payload["episode"])


def _episodes(replica: _Replica, log, channel, header: dict[str, Any], start: int) -> None:
    """Episodes start + 1 .. train.episodes, with checkpoints; stops early on a stop request or a DistqError."""
    from distq.runs.progress import final_progress

    train = replica.config.train
    watch = _StopWatch(channel) if log is not None else None
    for episode in range(start + 1, train.episodes + 1):
        began = time.perf_counter()
        try:
            metrics = replica.step(episode, watch is not None and watch.requested())
        except _PeerFailed:
            return
        except DistqError as err:
            replica.reducer.fail()
            ray.get(channel.send.remote("failure", _failure(err)))
            return
        stopping = replica.reducer.stopping
        if log is not None:
            metrics["time/episode_s"] = time.perf_counter() - began
            log.add(episode, metrics, {})
            if episode == train.episodes:
                final_progress(log, start, replica.config.train.episodes)
        if episode % train.checkpoint_every == 0 or stopping or episode == train.episodes:
            _report(replica, log, channel, header, episode)
        if stopping:
            return


def _report(replica: _Replica, log, channel, header: dict[str, Any], episode: int) -> None:
    """A checkpoint at `episode` through ray.train.report (rank 0 writes it; every worker takes part)."""
    from distq.runs.checkpoint import save_run

    if log is None:
        ray.train.report({"episode": episode})
        return
    with tempfile.TemporaryDirectory() as folder:
        save_run(Path(folder), header, episode, replica.learner.state_dict(), log.rows)
        ray.train.report({"episode": episode}, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=_checkpoint_name(episode))
    ray.get(channel.send.remote("checkpoint", episode))  # after the lines before it (one caller's calls keep order)


def _checkpoint_name(episode: int) -> str:
    return f"episode_{episode:09d}"


def _check_fits(config: Config) -> None:
    """Workers that cannot all be placed would wait: fail now, naming the fields to change."""
    parallel, have = config.parallel, ray.cluster_resources()
    cpus, gpus = parallel.workers * parallel.num_cpus_per_worker, parallel.workers * parallel.num_gpus_per_worker
    if cpus > have.get("CPU", 0) + 1e-9 or gpus > have.get("GPU", 0) + 1e-9:
        raise DistqError(
            f"parallel.workers={parallel.workers} ddp workers x (parallel.num_cpus_per_worker="
            f"{parallel.num_cpus_per_worker} CPU, parallel.num_gpus_per_worker={parallel.num_gpus_per_worker} GPU) "
            f"need {cpus:g} CPUs and {gpus:g} GPUs, but Ray has {have.get('CPU', 0):g} CPUs and "
            f"{have.get('GPU', 0):g} GPUs; lower those fields or raise parallel.ray_num_cpus")


class DdpBackend(LocalLearner):
    """distq.training.trainer's backend for parallel.mode = ddp. The training loop runs in the Ray Train workers (`loop`); the
    driver holds the learner state before the run (what the workers start from) and after it (what is evaluated)."""

    def __init__(self, config: Config, dataset: "Dataset", reward, address: Optional[str]) -> None:
        self.config, self.portable = config, portable_config(config)
        self.workers, self.restarts = config.parallel.workers, 0
        # the driver's copy only holds states: on the CPU whatever device the workers compute on
        on_cpu = dataclasses.replace(config, train=dataclasses.replace(config.train, device="cpu"),
                                     parallel=dataclasses.replace(config.parallel, rollout_device="cpu"))
        self.learner = build_learner(on_cpu, dataset.points, reward, dataset.labels)
        self._started = connect_ray(address or os.environ.get("RAY_ADDRESS"), config.parallel.connect_timeout_s,
                                    config.parallel.ray_num_cpus)
        try:
            _check_fits(config)
            self._data = [ray.put(array.numpy()) for array in (dataset.points, dataset.labels) if array is not None]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Shut Ray down only if this backend started (or joined) it."""
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def _trainer(self, settings: dict[str, Any], storage: Path) -> TorchTrainer:
        parallel = self.config.parallel
        resources = {"CPU": parallel.num_cpus_per_worker, **({"GPU": parallel.num_gpus_per_worker}
                                                            if parallel.num_gpus_per_worker else {})}
        return TorchTrainer(train_worker, train_loop_config=settings,
                            scaling_config=ScalingConfig(num_workers=parallel.workers,
                                                         use_gpu=parallel.num_gpus_per_worker > 0,
                                                         resources_per_worker=resources),
                            run_config=RunConfig(name=NAME, storage_path=str(storage),
                                                 failure_config=FailureConfig(max_failures=parallel.max_failures),
                                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                                 worker_runtime_env={"env_vars": worker_env()}))

    def loop(self, run_dir: Path, dataset: "Dataset", log, start: int, stop: "StopRequest", kept) -> None:
        """Train episodes start + 1 .. train.episodes on the workers; each checkpoint they report is copied into
        run_dir (kept.episode follows it) and the rows into log.rows. A signal (stop) stops every worker after
        its episode, with a checkpoint."""
        from distq.runs.checkpoint import run_header

        storage = (run_dir / STORAGE).resolve()
        shutil.rmtree(storage, ignore_errors=True)  # Ray Train would restore an earlier attempt's checkpoints
        channel = Channel.remote()
        settings = {"config": self.portable, "data": self._data, "condition_values": dataset.condition_values,
                    "standardization": dataset.standardization, "reward_names": listed_reward_names(self.config),
                    "channel": channel, "header": run_header(self.config, dataset), "rows": list(log.rows),
                    "start": [ray.put({"episode": start, "learner": self.learner.state_dict()})]}
        try:
            error, failure = self._fit(self._trainer(settings, storage), channel, run_dir, storage, log.echo,
                                       stop, kept)
            self.restarts = max(ray.get(channel.start_count.remote()) - 1, 0)
        finally:
            ray.kill(channel)
            shutil.rmtree(storage, ignore_errors=True)
        if kept.episode is not None and kept.episode > start:
            self.learner.load_state_dict(load_checkpoint(run_dir / rundir.CHECKPOINT)["learner"])
            rows = rundir.read_table_rows(run_dir / rundir.METRICS)
            if log.on_row is not None:  # the run's W&B run gets the rows the workers kept
                for row in rows[len(log.rows):]:
                    log.on_row(row)
            log.rows[:] = rows
        self._raise(error, failure, run_dir, kept, stop)

    def _raise(self, error: Optional[BaseException], failure: Optional[tuple[bool, str]], run_dir: Path, kept,
               stop: "StopRequest") -> None:
        """The run's end as one line: a worker's DistqError, Ray Train giving up, a signal; nothing if it finished."""
        path = run_dir / rundir.CHECKPOINT
        kept_text = (f"the last checkpoint {path} (episode {kept.episode}) is kept" if kept.episode is not None else
                     "before its first checkpoint")
        if failure is not None:
            diverged, message = failure
            raise (TrainingDiverged if diverged else DistqError)(f"{message}; training stopped, {kept_text}")
        if error is not None:
            # Ray Train's message is a header and the workers' tracebacks: the last line is the workers' exception
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise DistqError(f"ddp training failed after {self.restarts} worker restarts (parallel.max_failures="
                             f"{self.config.parallel.max_failures}): {lines[-1] if lines else type(error).__name__}; "
                             f"stopped {kept_text}")
        stop.check()
        if kept.episode != self.config.train.episodes:
            raise DistqError(f"the ddp workers stopped at episode {kept.episode} of {self.config.train.episodes} "
                             "without an error")

    def _fit(self, trainer: TorchTrainer, channel, run_dir: Path, storage: Path, echo, stop: "StopRequest",
             kept) -> tuple[Optional[BaseException], Optional[tuple[bool, str]]]:
        """Run trainer.fit() in a thread while this (main) thread relays the channel's events and any stop request;
        -> (fit's error, a worker's reported failure)."""
        outcome: dict[str, BaseException] = {}

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # handed to the main thread
                outcome["error"] = err

        thread = threading.Thread(target=fit, name="distq-ddp-fit", daemon=True)
        thread.start()
        failure, asked = None, False
        while True:
            thread.join(timeout=0.2)
            alive = thread.is_alive()  # events sent before fit ended are all in the next take
            if stop.signum is not None and not asked:
                channel.request_stop.remote()
                asked = True
            for kind, value in ray.get(channel.take.remote()):
                if kind == "line":
                    echo(value)
                elif kind == "checkpoint" and _publish(storage / NAME / _checkpoint_name(value), run_dir):
                    kept.episode = value
                elif kind == "failure":
                    failure = failure or value
            if not alive:
                return outcome.get("error"), failure


def _publish(folder: Path, run_dir: Path) -> bool:
    """Copy a checkpoint Ray Train persisted into the run directory; False if a later one has replaced it."""
    try:
        files = {name: (folder / name).read_bytes() for name in (rundir.CHECKPOINT, rundir.METRICS)}
    except FileNotFoundError:
        return False
    for name, data in files.items():
        rundir.atomic_write(run_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
    return True
