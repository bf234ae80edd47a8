"""distq.setup.devices: resolving train.device / parallel.rollout_device, moving records, and the fake device split.

The fake device split. This machine has no GPU, and torch offers no second CPU device to stand in for one, so
conftest.FakeCuda simulates torch.device("cuda") on the CPU: the tensors that distq.setup.devices moves there are
tracked, and a dispatch mode applies a real device's rules to every torch operation (mixing device tensors with
CPU tensors fails; so do numpy on them and pickling them, as a Ray transfer or checkpoint would for a CPU-only
reader; any use of the device that bypasses distq.setup.devices hits the CPU-only torch build and fails). A run is then
trained with the learner on the fake device and the rollouts on the CPU (and the other way round, and both on the
device), and must give exactly the numbers of the all-CPU run. The alternatives were weaker: counting calls to
the hand-off cannot see a tensor that skips it, and a float64 "device" lets elementwise ops promote silently and
changes the numbers. The mutation tests below show that the check catches the regressions it is there for: a batch
not moved at the learner's hand-off, a learner state left on the device when it is saved, the rollout's noise
left on the CPU, samples left on the device. (What leaves a Ray actor is checked the same way in test_ray_actors.)
"""
import copy
import json

import pytest
import torch

from distq.algorithms.batch import Trajectories
from distq.algorithms.learner import Learner
from distq.backends.rollout import Rollout
from distq.errors import DistqError
from distq.maths.schedules import TimeGrid
from distq.runs import rundir
from distq.runs.checkpoint import load_checkpoint
from distq.setup import devices
from distq.setup.config import config_from_dict
from distq.setup.devices import CPU, resolve_device, to_device
from distq.training.trainer import train

CUDA = torch.device("cuda")
TINY = {"seed": 5, "data": {"source": "swiss_roll", "n_samples": 64}, "sde": {"dt": 0.5},
        "eval": {"n_samples": 32, "batches": 2},
        "train": {"batch_size": 32, "chunk_size": 8, "episodes": 3, "beta": 1.0, "log_every": 1,
                  "progress_seconds": 0}}


def _config(learner="cpu", rollout="cpu", **train):
    values = copy.deepcopy(TINY)
    values["train"].update(device=learner, **train)
    values["parallel"] = {"rollout_device": rollout}
    return config_from_dict(values)


def test_resolve_device_on_a_machine_without_cuda():
    assert resolve_device("cpu", "train.device") == CPU
    assert resolve_device("auto", "train.device") == CPU
    with pytest.raises(DistqError, match=r"^parallel.rollout_device is cuda, but this process sees no CUDA device"):
        resolve_device("cuda", "parallel.rollout_device")


def test_resolve_device_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "train.device") == CUDA == resolve_device("cuda", "train.device")
    assert resolve_device("cpu", "train.device") == CPU


def test_to_device_rebuilds_records_and_containers_and_keeps_tensors_already_there():
    tensor, module = torch.ones(2), torch.nn.Linear(2, 1)
    batch = Trajectories(torch.ones(3, 2, 1), torch.ones(3, 2, 1), None, torch.ones(2, 1), torch.ones(2))
    moved = to_device({"batch": batch, "list": [tensor, None, 3], "pair": (1.5, "x"), "net": module}, CPU)
    assert isinstance(moved["batch"], Trajectories) and moved["batch"] is not batch
    assert moved["batch"].states is batch.states and moved["batch"].running_rewards is None
    assert moved["list"][0] is tensor and moved["list"][1:] == [None, 3] and moved["pair"] == (1.5, "x")
    assert moved["net"] is module
    with pytest.raises(TypeError, match="cannot move a object"):
        to_device(object(), CPU)


def test_to_device_moves_a_frozen_grid_field_by_field(fake_cuda):
    grid = TimeGrid(5.0, *(torch.arange(3.0) for _ in range(9)))
    with fake_cuda:
        moved = to_device(grid, CUDA)
        assert moved.T == 5.0 and all(fake_cuda.holds(getattr(moved, name)) for name in ("tau", "dt", "sigma2_next"))
        assert not fake_cuda.holds(grid.tau)
        back = to_device(moved, CPU)
        assert not fake_cuda.holds(back.tau) and torch.equal(back.tau, grid.tau)


def test_a_direct_use_of_the_device_fails_under_the_fake(fake_cuda):
    """The premise of the split test: only distq.setup.devices' moves can put a tensor on the fake device."""
    with fake_cuda:
        for direct in (lambda: torch.zeros(2, device=CUDA), lambda: torch.zeros(2).to(CUDA),
                       lambda: torch.nn.Linear(2, 1).to(CUDA)):
            with pytest.raises(AssertionError, match="not compiled with CUDA"):
                direct()
        on_device = to_device(torch.ones(2, 3), CUDA)
        with pytest.raises(AssertionError, match="mixes tensors on the cuda device with CPU tensors"):
            on_device + torch.ones(2, 3)
        assert fake_cuda.holds(on_device + torch.tensor(1.0))  # CPU scalars are fine, as on a GPU


def _outputs(run_dir):
    learner = load_checkpoint(run_dir / rundir.CHECKPOINT)["learner"]
    tensors = {f"{net}.{name}": value for net in ("policy", "value") for name, value in learner[net].items()}
    tensors.update({f"adam.{net}.{i}.{key}": value for net in ("policy", "value")
                    for i, state in learner["optimizers"][net]["state"].items() for key, value in state.items()})
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    return tensors, rundir.read_samples(run_dir / rundir.SAMPLES, ("x0", "x1")), summary


@pytest.fixture(scope="module")
def all_cpu(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cpu") / "run"
    train(_config(), run_dir, echo=lambda line: None)
    return _outputs(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("learner, rollout", [("cuda", "cpu"), ("cpu", "cuda"), ("auto", "auto")])
def test_learner_and_rollouts_on_different_devices_give_the_all_cpu_numbers(all_cpu, fake_cuda, tmp_path,
                                                                            learner, rollout):
    with fake_cuda:
        train(_config(learner, rollout), tmp_path / "run", echo=lambda line: None)
    tensors, samples, summary = _outputs(tmp_path / "run")
    cpu_tensors, cpu_samples, cpu_summary = all_cpu
    assert tensors.keys() == cpu_tensors.keys()
    assert all(torch.equal(tensors[name], cpu_tensors[name]) for name in tensors)
    assert torch.equal(samples, cpu_samples)
    for key in ("reward_mean", "kl_mean", "kl_floor"):
        assert summary[key] == cpu_summary[key]


def _broken(monkeypatch, name):
    """The regressions the fake device split is there to catch, one at a time."""
    if name == "batch not moved at the hand-off":
        monkeypatch.setattr(Learner, "update", lambda self, batch: self.update_on_device(batch))
    elif name == "learner state saved on the device":
        state_dict = Learner.state_dict
        monkeypatch.setattr(Learner, "state_dict", lambda self: to_device(state_dict(self), self.device))
    elif name == "noise left on the CPU":
        noise = Rollout._noise
        monkeypatch.setattr(Rollout, "_noise", lambda self, chunks: to_device(noise(self, chunks), CPU))
    else:
        generate = Rollout.generate
        monkeypatch.setattr(Rollout, "generate", lambda self, *args, **kwargs: to_device(
            generate(self, *args, **kwargs), self.device))


@pytest.mark.parametrize("broken, learner, rollout, message", [
    ("batch not moved at the hand-off", "cuda", "cpu", "mixes tensors on the cuda device with CPU tensors"),
    ("learner state saved on the device", "cuda", "cpu", "is being pickled"),
    ("noise left on the CPU", "cpu", "cuda", "mixes tensors on the cuda device with CPU tensors"),
    ("samples left on the device", "cpu", "cuda", "mixes tensors on the cuda device with CPU tensors")])
def test_the_fake_device_split_catches_a_tensor_on_the_wrong_device(fake_cuda, monkeypatch, tmp_path, broken,
                                                                    learner, rollout, message):
    _broken(monkeypatch, broken)
    with fake_cuda, pytest.raises(AssertionError, match=message):
        train(_config(learner, rollout), tmp_path / "run", echo=lambda line: None)


def test_a_missing_gpu_stops_the_run_before_anything_is_written(tmp_path):
    for learner, rollout, field in (("cuda", "cpu", "train.device"), ("cpu", "cuda", "parallel.rollout_device")):
        with pytest.raises(DistqError, match=rf"^{field} is cuda, but this process sees no CUDA device"):
            train(_config(learner, rollout), tmp_path / "run", echo=lambda line: None)
        assert not (tmp_path / "run").exists()


def test_the_primitive_moves_are_tensor_to_and_module_to():
    """What FakeCuda replaces: on a real machine the moves are torch's own (no copy where nothing moves)."""
    tensor, module = torch.ones(2), torch.nn.Linear(2, 1)
    assert devices._move_tensor(tensor, CPU) is tensor and devices._move_module(module, CPU) is module
