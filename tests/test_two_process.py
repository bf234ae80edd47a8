"""distq.backends.two_process: Algorithm 1 with the critic in a second process gives the single-process learner's numbers exactly,
checkpoints and resumes across process counts, and reports a failed or vanished critic as a DistqError."""
import copy
import os
import signal

import pytest
import torch

from distq.backends.backend import InProcessBackend
from distq.backends.two_process import TwoProcessBackend
from distq.errors import DistqError
from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.runs.checkpoint import load_checkpoint
from distq.setup.config import config_from_dict
from distq.training.trainer import train

GAUSSIAN = {"source": "gaussian", "mean": [1.0, -1.0], "std": 1.0, "n_samples": 200}
CONDITIONAL = {"source": "gmm", "dim": 2, "components": 3, "n_samples": 200, "condition": "label"}


def _config(processes=2, data=GAUSSIAN, **ratio):
    return config_from_dict({
        "seed": 3,
        "data": data,
        "reward": {"fn": "linear", "coef": [1.0, 0.0]},
        "sde": {"T": 5.0, "dt": 0.5},
        "ratio": ratio,
        "model": {"hidden": 16},
        "train": {"beta": 1.0, "episodes": 6, "batch_size": 40, "chunk_size": 20, "processes": processes,
                  "log_every": 1, "checkpoint_every": 3, "progress_seconds": 1e9},
        "eval": {"n_samples": 50, "batches": 2},
    })


def _backends(config):
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values)
    return InProcessBackend(config, dataset, reward), TwoProcessBackend(config, dataset, reward)


def _assert_same_state(one, two):
    for net in ("policy", "value"):
        for key, tensor in one[net].items():
            assert torch.equal(tensor, two[net][key]), f"{net}.{key}"
    for net in ("policy", "value"):
        first, second = one["optimizers"][net]["state"], two["optimizers"][net]["state"]
        assert all(torch.equal(first[i]["exp_avg_sq"], second[i]["exp_avg_sq"]) for i in first)
    assert one["updates"] == two["updates"] and one["schedulers"] == two["schedulers"]


@pytest.mark.parametrize("data, ratio", [(GAUSSIAN, {}), (GAUSSIAN, {"minibatch": 50}), (GAUSSIAN, {"eps": 1e-3}),
                                          (CONDITIONAL, {}), (CONDITIONAL, {"minibatch": 30})])
def test_two_processes_give_the_single_process_numbers(data, ratio):
    """Conditional runs too: the critic scores each trajectory with its own condition's data (and minibatches)."""
    one, two = _backends(_config(data=data, **ratio))
    try:
        metrics = [(one.step(e), two.step(e)) for e in range(1, 5)]
        _assert_same_state(one.learner_state(), two.learner_state())
    finally:
        two.close()
    for episode, (a, b) in enumerate(metrics):
        for key in ("loss/td", "td/abs_mean", "reward/running_mean", "reward/terminal_mean", "grad_norm/policy"):
            assert a[key] == b[key], key
        if episode:  # the critic reports its gradient norm one update late
            assert b["grad_norm/value"] == metrics[episode - 1][0]["grad_norm/value"]
    assert not two.process.is_alive()


def test_load_state_continues_identically():
    one, two = _backends(_config())
    try:
        for e in range(1, 3):
            one.step(e)
        two.load_learner_state(copy.deepcopy(one.learner_state()))  # as from a checkpoint: no shared tensors
        for e in range(3, 5):
            one.step(e)
            two.step(e)
        _assert_same_state(one.learner_state(), two.learner_state())
    finally:
        two.close()


def test_critic_failure_is_a_distq_error_and_sticks():
    _, two = _backends(_config())
    try:
        with pytest.raises(DistqError, match="critic process of train.processes = 2 failed: KeyError"):
            two._call("no such command")
        with pytest.raises(DistqError, match="KeyError"):  # the critic's state is suspect: no further work
            two.step(1)
    finally:
        two.close()


def test_vanished_critic_is_a_distq_error():
    _, two = _backends(_config())
    try:
        two.step(1)
        os.kill(two.process.pid, signal.SIGKILL)
        two.process.join(timeout=10)
        with pytest.raises(DistqError, match="critic process of train.processes = 2 stopped"):
            two.step(2)
    finally:
        two.close()
    assert not two.process.is_alive()


@pytest.mark.slow
def test_train_and_resume_across_process_counts(tmp_path):
    """A run with train.processes = 2 resumed with 1 process ends where a single-process run ends."""
    quiet = lambda _: None  # noqa: E731
    reference = train(_config(processes=1), tmp_path / "one", echo=quiet)
    first = _config(processes=2)
    train(config_from_dict({**first.to_dict(), "train": {**first.to_dict()["train"], "episodes": 3}}),
          tmp_path / "split", echo=quiet)
    resumed = train(_config(processes=1), tmp_path / "split", resume=True, echo=quiet)
    for key in ("reward_mean", "kl_mean"):
        assert resumed[key] == reference[key]
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["learner"]
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["learner"]
    _assert_same_state(one, split)
