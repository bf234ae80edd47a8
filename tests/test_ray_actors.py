"""distq.backends.ray_actors: synchronous updates equal to the in-process run for any worker count, async updates equal to
Algorithm 1 with a one-update-stale policy, data put once and read without a copy, memory reservations, the
actors' hand-offs across a (simulated) learner GPU, killed workers replaced without losing or repeating an
episode, a two-node cluster with node loss, the CLI path and actor errors as one-line DistqErrors."""
import copy
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from distq.algorithms.batch import episode_chunks  # noqa: E402
from distq.backends import ray_actors as parallel  # noqa: E402
from distq.backends.backend import InProcessBackend
from distq.backends.build import build_learner, build_rollout  # noqa: E402
from distq.edges.cli import main  # noqa: E402
from distq.errors import DistqError  # noqa: E402
from distq.problems.data import load_dataset  # noqa: E402
from distq.problems.rewards import load_reward  # noqa: E402
from distq.runs import rundir
from distq.runs.checkpoint import load_checkpoint  # noqa: E402
from distq.setup.config import config_from_dict  # noqa: E402
from distq.training import trainer as train_module  # noqa: E402
from distq.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.ray

B, CHUNK, N = 32, 8, 64
TINY = {"seed": 5, "data": {"source": "swiss_roll", "n_samples": N}, "reward": {"fn": "swiss_roll_rectangle"},
        "sde": {"dt": 0.5}, "eval": {"n_samples": 32, "batches": 2}}



def _config(workers=2, mode="sync", episodes=4, batch_size=B, chunk_size=CHUNK):
    return config_from_dict({
        **TINY,
        "train": {"batch_size": batch_size, "chunk_size": chunk_size, "episodes": episodes, "beta": 1.0,
                  "log_every": 1, "progress_seconds": 0},
        # W = 2 workers and the learner fit in the session's 2 CPUs
        "parallel": {"workers": workers, "mode": mode, "num_cpus_per_worker": 0.5, "learner_num_cpus": 0.5},
    })


def _inputs(config):
    dataset = load_dataset(config.data, config.seed)
    return dataset, load_reward(config.reward, dataset.points[:8])


def _run(backend, episodes):
    """Step a backend through the episodes, close it; its learner state and the metrics of each step."""
    try:
        metrics = [backend.step(episode) for episode in range(1, episodes + 1)]
        return backend.learner_state(), metrics
    finally:
        backend.close()


def _assert_same_learner(state, reference):
    for net in ("policy", "value"):
        for name, tensor in reference[net].items():
            assert torch.allclose(state[net][name], tensor, atol=1e-6), f"{net}.{name}"


def test_sync_updates_are_the_same_for_any_worker_count_and_after_a_resume(ray_session):
    config = _config(workers=0)
    dataset, reward = _inputs(config)
    in_process = InProcessBackend(config, dataset, reward)
    in_process.step(1)
    after_one = copy.deepcopy(in_process.learner_state())
    in_process.step(2)
    in_process.step(3)
    reference = in_process.learner_state()
    assert not torch.allclose(reference["policy"]["net.0.weight"], after_one["policy"]["net.0.weight"])
    for workers in (1, 2):
        backend = parallel.RayBackend(_config(workers), dataset, reward, None)
        try:
            metrics = [backend.step(episode) for episode in (1, 2, 3)]
            _assert_same_learner(backend.learner_state(), reference)
            assert all(m["parallel/policy_lag"] == 0 for m in metrics)
            backend.load_learner_state(after_one)  # as on --resume: the workers must generate with these weights
            backend.step(2)
            backend.step(3)
            _assert_same_learner(backend.learner_state(), reference)
        finally:
            backend.close()
    assert ray.is_initialized()  # the session's Ray: joined, not stopped


def test_conditional_sync_updates_equal_the_in_process_run(ray_session, tmp_path):
    """Algorithm 2 on actors: the labels reach every actor with the data (one object each), each trajectory's
    minibatch comes from its own condition's points, and the actors' reward h(x, c) gets the condition values."""
    (tmp_path / "cond_reward.py").write_text("def h(x, c):\n    return x[:, 0] * (c + 1)\n")
    values = {**TINY, "data": {"source": "swiss_roll", "n_samples": N, "condition": "label", "classes": 2},
              "reward": {"fn": f"{tmp_path / 'cond_reward.py'}:h"}, "ratio": {"minibatch": 16},
              "train": {"batch_size": B, "chunk_size": CHUNK, "beta": 1.0}}
    config = config_from_dict(values)
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values)
    reference = _run(InProcessBackend(config, dataset, reward), 3)
    for workers in (1, 2):
        actors = config_from_dict({**values, "parallel": {"workers": workers, "num_cpus_per_worker": 0.5,
                                                          "learner_num_cpus": 0.5}})
        state, metrics = _run(parallel.RayBackend(actors, dataset, reward, None), 3)
        _assert_same_learner(state, reference[0])
        for ours, theirs in zip(metrics, reference[1]):
            for key in ("reward/terminal_mean", "reward/running_mean", "loss/td"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_a_list_reward_s_columns_equal_the_in_process_run(ray_session, monkeypatch, tmp_path):
    """reward.fn [a relative h(x, c) file, swiss_roll_rectangle] on two workers: the Learner actor reports each
    reward's mean over the whole batch, named as the driver names it (the actors' config names the file by its
    absolute path), equal to the in-process run's; the weighted means add up to reward/terminal_mean."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cond_reward.py").write_text("def h(x, c):\n    return x[:, 0] * (c + 1)\n")
    values = {**TINY, "data": {"source": "swiss_roll", "n_samples": N, "condition": "label", "classes": 2},
              "reward": {"fn": ["cond_reward.py:h", "swiss_roll_rectangle"], "weights": [0.5, 2.0]},
              "train": {"batch_size": B, "chunk_size": CHUNK, "beta": 1.0}}
    config = config_from_dict(values)
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values)
    reference = _run(InProcessBackend(config, dataset, reward), 2)[1]
    actors = config_from_dict({**values, "parallel": {"workers": 2, "num_cpus_per_worker": 0.5,
                                                      "learner_num_cpus": 0.5}})
    metrics = _run(parallel.RayBackend(actors, dataset, reward, None), 2)[1]
    names = ["reward/terminal_mean/cond_reward.py:h", "reward/terminal_mean/swiss_roll_rectangle"]
    for ours, theirs in zip(metrics, reference):
        assert sorted(k for k in ours if k.startswith("reward/terminal_mean/")) == sorted(names)
        for key in names:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
        weighted = 0.5 * ours[names[0]] + 2.0 * ours[names[1]]
        assert weighted == pytest.approx(ours["reward/terminal_mean"], rel=1e-5)


def test_rao_blackwell_sync_updates_equal_the_in_process_run(ray_session):
    """train.policy_gradient = rao_blackwell on actors: the scores and mean-action successors travel with the batch
    from two workers to the learner actor, whose updates are the in-process ones; the learner actor keeps the
    policy's moving average (train.ema_rate) and deploys it."""
    values = {**TINY, "train": {"batch_size": B, "chunk_size": CHUNK, "beta": 1.0,
                                "policy_gradient": "rao_blackwell", "ema_rate": 0.5}}
    config = config_from_dict(values)
    dataset, reward = _inputs(config)
    reference = _run(InProcessBackend(config, dataset, reward), 3)
    actors = config_from_dict({**values, "parallel": {"workers": 2, "num_cpus_per_worker": 0.5,
                                                      "learner_num_cpus": 0.5}})
    backend = parallel.RayBackend(actors, dataset, reward, None)
    try:
        metrics = [backend.step(episode) for episode in (1, 2, 3)]
        state, deployed = backend.learner_state(), backend.policy_weights()
    finally:
        backend.close()
    _assert_same_learner(state, reference[0])
    assert [m["loss/td"] for m in metrics] == pytest.approx([m["loss/td"] for m in reference[1]], rel=1e-5)
    for name, tensor in reference[0]["policy_average"].items():
        assert torch.allclose(deployed[name], tensor, atol=1e-6), name
    assert not torch.allclose(deployed["net.0.weight"], state["policy"]["net.0.weight"])


def _stale_policy_reference(config, dataset, reward, episodes):
    """Algorithm 1 where batch e >= 2 is generated with the weights after update e - 2 (one update behind)."""
    learner = build_learner(config, dataset.points, reward)
    rollout = build_rollout(config, dataset.points, reward)
    history = [copy.deepcopy(learner.policy_weights())]
    for episode in range(1, episodes + 1):
        rollout.set_weights(history[max(episode - 2, 0)])
        learner.update(rollout.run(episode_chunks(config.seed, episode, config.train.batch_size,
                                                  config.train.chunk_size)))
        history.append(copy.deepcopy(learner.policy_weights()))
    return learner.state_dict()


def test_async_run_reports_policy_lag_and_moves_the_data_once(ray_session, monkeypatch):
    config = _config(workers=2, mode="async", episodes=5)
    dataset, reward = _inputs(config)
    puts, real_put = [], ray.put

    def spy(value, *args, **kwargs):
        puts.append((value, real_put(value, *args, **kwargs)))
        return puts[-1][1]

    monkeypatch.setattr(parallel.ray, "put", spy)
    backend = parallel.RayBackend(config, dataset, reward, None)
    try:
        metrics = [backend.step(episode) for episode in range(1, 6)]
        held = [ray.get(worker.data_ref.remote())[0] for worker in backend.rollout_workers]
        state, weights = backend.learner_state(), backend.policy_weights()
    finally:
        backend.close()
    # batch e >= 2 is generated while update e - 1 runs, with the weights of update e - 2
    assert [m["parallel/policy_lag"] for m in metrics] == [0, 1, 1, 1, 1]
    _assert_same_learner(state, _stale_policy_reference(config, dataset, reward, 5))
    for m in metrics:
        assert min(m["time/rollout_s"], m["time/transfer_s"], m["time/update_s"]) >= 0
        assert m["parallel/worker0_trajectories_per_s"] > 0 and m["parallel/worker1_trajectories_per_s"] > 0
    # the data: one ray.put, of a numpy view of the points (no copy on the driver), and each actor holds that reference
    assert len(puts) == 1 and np.shares_memory(puts[0][0], dataset.points.numpy())
    assert all(isinstance(ref, ray.ObjectRef) and ref.hex() == puts[0][1].hex() for ref in held)
    # per update: the weights to each worker, and back the batch's (K, B, d) states and actions, (K, B) running
    # rewards, (B, d) final states and (B,) terminal rewards, all float32
    K, d = config.sde.num_steps, dataset.dim
    expected = 2 * sum(t.numel() * 4 for t in weights.values()) + 4 * (2 * K * B * d + K * B + B * d + B)
    assert all(m["parallel/bytes_per_update"] == expected for m in metrics)


def test_workers_compute_on_their_node_s_one_copy_of_the_data_and_reserve_their_memory(ray_session):
    def held_data(actor) -> dict:  # runs in a RolloutWorker (defined here: Ray ships it by value)
        view = ray.get(actor.data)
        return {"writeable": view.flags.writeable,
                "same_buffer": actor.rollout.ratio.data.data_ptr() == view.ctypes.data}

    config = dataclasses.replace(_config(workers=2), parallel=dataclasses.replace(
        _config(workers=2).parallel, memory_per_worker_mb=64.0, learner_memory_mb=32.0))
    dataset, reward = _inputs(config)
    before = ray.available_resources().get("memory", 0)
    backend = parallel.RayBackend(config, dataset, reward, None)
    try:
        held = ray.get([worker.__ray_call__.remote(held_data) for worker in backend.rollout_workers])
        reserved = _reserved_memory(before)
        backend.step(1)
    finally:
        backend.close()
    # one object in the node's object store, read by every worker in place: no copy in any actor's own memory
    assert held == [{"writeable": False, "same_buffer": True}] * 2
    assert reserved == (2 * 64 + 32) * 2**20


def _reserved_memory(before: float) -> float:
    """The memory Ray has reserved since `before` (its resource view settles within moments)."""
    deadline = time.monotonic() + 10
    while True:
        reserved = before - ray.available_resources().get("memory", 0)
        if reserved > 0 or time.monotonic() > deadline:
            return reserved
        time.sleep(0.1)


def test_a_budget_the_embedded_ray_cannot_hold_is_refused_naming_the_fields(ray_session):
    have = ray.cluster_resources()["memory"] / 2**20
    too_much = dataclasses.replace(_config(workers=2).parallel, memory_per_worker_mb=have)
    with pytest.raises(DistqError, match="parallel.memory_per_worker_mb=.* reserve .* MiB, but the embedded Ray has"):
        parallel._check_fits(too_much)
    parallel._check_fits(dataclasses.replace(too_much, memory_per_worker_mb=have / 4))


@pytest.mark.parametrize("learner_device, rollout_device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_actors_hand_on_only_cpu_tensors_across_a_device_split(ray_session, fake_cuda, learner_device,
                                                                rollout_device):
    """The actors' code, run in this process with the learner or the rollouts on a simulated GPU (conftest.FakeCuda):
    the weights the learner sends, the batch a worker returns and the learner's state all pickle (FakeCuda refuses
    device tensors, as a node without a GPU could not load them), each computes on its own device, and the update
    is the all-CPU one."""
    train = {"batch_size": B, "chunk_size": CHUNK, "beta": 1.0}
    config = config_from_dict({**TINY, "train": {**train, "device": learner_device}, "parallel": {
        "workers": 1, "rollout_device": rollout_device, "learner_num_gpus": 1, "num_gpus_per_worker": 1}})
    dataset, reward = _inputs(config)
    data = [ray.put(dataset.points.numpy())]
    with fake_cuda:
        learner = parallel.Learner.__ray_actor_class__(config, data)
        worker = parallel.RolloutWorker.__ray_actor_class__(config, data)
        assert learner.ready() and worker.ready()
        assert fake_cuda.holds(next(learner.learner.value.parameters())) == (learner_device == "cuda")
        assert fake_cuda.holds(worker.rollout.ratio.data) == (rollout_device == "cuda")
        weights = pickle.loads(pickle.dumps(learner.weights()))
        batch, _ = worker.run(weights, episode_chunks(config.seed, 1, B, CHUNK))
        _, weights = learner.update([ray.put(batch)])  # pickled, as a worker's result is
        state = pickle.loads(pickle.dumps((weights, learner.state_dict())))[1]
    cpu = InProcessBackend(config_from_dict({**TINY, "train": train}), dataset, reward)
    cpu.step(1)
    _assert_same_learner(state, cpu.learner_state())


def test_auto_takes_a_gpu_only_in_actors_that_reserve_one():
    """Ray leaves a node's GPUs visible to actors that reserve none: auto must not compute on one there."""
    config = config_from_dict({**TINY, "train": {"batch_size": B, "chunk_size": CHUNK, "device": "auto"},
                               "parallel": {"workers": 2, "rollout_device": "auto", "learner_num_gpus": 1}})
    actors = parallel._reserved_devices(config)
    assert (actors.train.device, actors.parallel.rollout_device) == ("auto", "cpu")
    both = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, num_gpus_per_worker=0.25))
    assert parallel._reserved_devices(both) == both
    neither = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, learner_num_gpus=0))
    assert parallel._reserved_devices(neither).train.device == "cpu"


@pytest.mark.parametrize("kill", ["process", "ray_kill"])
def test_killed_worker_is_replaced_and_no_episode_is_lost(ray_session, monkeypatch, tmp_path, kill):
    mode = "sync" if kill == "process" else "async"  # async: the next batch is in flight when the worker dies
    config = _config(workers=2, mode=mode, episodes=5)
    backends, make_backend = [], train_module.make_backend

    def capture(*args):
        backends.append(make_backend(*args))
        return backends[-1]

    def echo(line):
        if line.startswith("episode 2/"):
            worker = backends[0].rollout_workers[1]
            if kill == "process":
                pid = ray.get(worker.get_pid.remote())
                if os.path.exists(f"/proc/{pid}/cmdline"):  # the title operators see in ps / ray list actors
                    assert open(f"/proc/{pid}/cmdline").read().startswith("ray::RolloutWorker")
                os.kill(pid, signal.SIGKILL)
            else:
                ray.kill(worker, no_restart=False)

    monkeypatch.setattr(train_module, "make_backend", capture)
    summary = train(config, tmp_path / "run", echo=echo)
    assert summary["episodes"] == 5 and summary["workers"] == 2 and summary["worker_restarts"] >= 1
    assert json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())["worker_restarts"] == summary["worker_restarts"]
    state = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["learner"]
    assert state["updates"] == 5
    dataset, reward = _inputs(config)
    if mode == "sync":  # the regenerated chunks are the lost ones: the run equals one without a failure
        _assert_same_learner(state, _run(InProcessBackend(config, dataset, reward), 5)[0])
    else:
        _assert_same_learner(state, _stale_policy_reference(config, dataset, reward, 5))


def _write_config(path, reward_fn):
    values = {**TINY, "reward": {"fn": reward_fn},
              "train": {"batch_size": B, "chunk_size": CHUNK, "episodes": 3, "beta": 1.0, "log_every": 1},
              "parallel": {"num_cpus_per_worker": 0.5, "learner_num_cpus": 0.5}}
    path.write_text(json.dumps(values))  # JSON is YAML


def test_cli_trains_with_two_workers_a_relative_reward_file_and_processes_2(ray_session, monkeypatch, tmp_path, capsys):
    # the actors' working directory is the session's, not this one: the relative path must be made absolute
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text("def h(x):\n    return (x[:, 1] > 0).float()\n")
    _write_config(tmp_path / "config.yaml", "my_reward.py:h")
    # configs/swiss_roll.yaml's train.processes: 2 is for in-process runs: a Ray run takes 1 and says so once
    assert main(["train", "config.yaml", "--out", "run", "--set", "parallel.workers=2", "--set",
                 "train.processes=2"]) == 0
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    assert summary["workers"] == 2 and summary["worker_restarts"] == 0 and summary["episodes"] == 3
    out = capsys.readouterr().out
    assert "episode 3/3" in out
    assert out.count("distq: note: train.processes=2") == 1
    assert "with parallel.workers=2 the learner runs in one Ray actor (train.processes taken as 1)" in out
    assert ray.is_initialized()


@pytest.mark.parametrize("bad_batch, workers", [(N, 1), (2 * CHUNK, 2)])
def test_bad_reward_in_an_actor_is_a_one_line_error(ray_session, monkeypatch, tmp_path, capsys, bad_batch, workers):
    # fine on the driver's 8-point probe; NaN on all N points (the Learner's value scale) or on one worker's
    # 2 chunks (a RolloutWorker's batch; the in-process batch of B points would pass)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text(textwrap.dedent(f"""
        def h(x):
            out = x[:, 0].clone()
            if x.shape[0] == {bad_batch}:
                out[0] = float("nan")
            return out
    """))
    _write_config(tmp_path / "config.yaml", "my_reward.py:h")
    assert main(["train", "config.yaml", "--out", "run", "--set", f"parallel.workers={workers}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distq: error: reward.fn '")
    assert f"returned 1 non-finite values (NaN or inf) in a batch of {bad_batch}" in err
    assert ray.is_initialized()


TWO_NODES = """
import json, os, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
sys.path.insert(0, {tests!r})
from test_ray_actors import _assert_same_learner, _config, _inputs, _run
from distq.backends import ray_actors as parallel
from distq.backends.backend import InProcessBackend

GATE = Path.cwd()


def wait_for(path, what):
    deadline = time.monotonic() + 120  # a bound against a hang, not a guess at timing: the events come in seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"gave up waiting for {{what}}"
        time.sleep(0.05)


def gated(update, before_part):
    # The Learner's read of the batch, stopped before part `before_part` of its `update`-th call (len(parts): after
    # reading them all) until the driver says go; every part is finished then, so a loss is of a finished part.
    class GatedLearner(parallel.Learner.__ray_actor_class__):
        calls = 0

        def read_parts(self, parts):
            GatedLearner.calls += 1
            if GatedLearner.calls != update:
                return super().read_parts(parts)
            ray.wait(parts, num_returns=len(parts), fetch_local=False)
            read, lost = super().read_parts(parts[:before_part])
            (GATE / "at_gate").touch()
            wait_for(GATE / "go", "the driver's go")
            more, more_lost = super().read_parts(parts[before_part:])
            return read + more, lost + [before_part + i for i in more_lost]

    return ray.remote(GatedLearner)


cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
results = {{}}
try:
    # chunks above Ray's 100 KB inline limit: a finished part lives in its node's object store
    config = _config(workers=2, mode="sync", episodes=5, batch_size=2800, chunk_size=1400)
    dataset, reward = _inputs(config)
    reference = _run(InProcessBackend(config, dataset, reward), 5)[0]
    for timing, before_part in (("before", 0), ("while", 1), ("after", 2)):
        for name in ("at_gate", "go"):
            (GATE / name).unlink(missing_ok=True)
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        parallel.Learner = gated(3, before_part)
        backend = parallel.RayBackend(config, dataset, reward, cluster.address)
        try:
            nodes = ray.get([worker.get_node_id.remote() for worker in backend.rollout_workers])
            assert len(set(nodes)) == 2, "SPREAD put both workers on one node"
            if nodes[0] == second.node_id:  # the lost part is the second one the learner reads
                backend.rollout_workers.reverse()
            backend.step(1)
            backend.step(2)
            stepping = threading.Thread(target=backend.step, args=(3,))
            stepping.start()
            wait_for(GATE / "at_gate", "the learner at its gate")
            cluster.remove_node(second)
            (GATE / "go").touch()
            stepping.join()
            backend.step(4)
            backend.step(5)
            state, restarts = backend.learner_state(), backend.restarts
        finally:
            backend.close()
        _assert_same_learner(state, reference)
        results[timing] = {{"restarts": restarts, "updates": state["updates"]}}
    print(json.dumps(results))
finally:
    cluster.shutdown()
"""


@pytest.mark.slow
def test_a_node_lost_before_while_or_after_the_learner_reads_its_part_loses_nothing(tmp_path):
    """A two-node cluster; the node of one worker is removed when its part of episode 3 is finished, at a gate in
    the learner's read of the batch: before it reads any part, after it read the other part, or after it read
    both. Each run equals the in-process one (the lost part generated again once, by a replacement worker, with the
    same weights and seeds; or, lost after reading, not needed), with one worker replaced."""
    # its own Ray instances, in a process group of its own so that nothing outlives the test
    script = TWO_NODES.format(tests=os.path.dirname(__file__))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path, start_new_session=True)
    try:
        out, err = process.communicate(timeout=600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {timing: {"restarts": 1, "updates": 5} for timing in ("before", "while", "after")}
