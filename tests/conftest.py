"""Shared fixtures. Every test runs torch on one thread. `ray_session`: one local Ray instance for all tests marked `ray`, started on first use and
stopped at the end of the session (`make test` runs two pytest-xdist processes, files kept whole: one per process) (Ray's start-up costs seconds; code under test must neither re-init nor stop it).
`fake_cuda`: a simulated CUDA device on this CPU-only machine (FakeCuda), to test a learner and rollouts on two
devices. `requested_digit_rates`: how often a conditional digits run's images show the requested digit."""
import itertools
import os
import signal
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from distq.setup import devices

# W&B off unless a test turns it on (WANDB_MODE=offline): every training run would otherwise start a W&B run (seconds).
os.environ["WANDB_MODE"] = "disabled"
# Ray Train's watcher of spot-instance preemption notices: one more process (2-4 s of CPU) per ddp run, and a test
# machine is never preempted. Set before any Ray starts, so every Ray of the session and its subprocesses inherits it.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: OpenMP threads only add contention on a shared 2-core machine (as in distq's own default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_run_plots(request, monkeypatch):
    """A training run in a test not marked `plots` skips its two PNGs: about a second of matplotlib per run, hundreds
    of runs in the suite. The plots' own tests are tests/test_plots.py; a real run's, tests/test_cli.py."""
    if request.node.get_closest_marker("plots") is None:
        import distq.training.trainer

        monkeypatch.setattr(distq.training.trainer, "plot_samples", lambda *args, **kwargs: None)
        monkeypatch.setattr(distq.training.trainer, "plot_training_curves", lambda *args, **kwargs: None)


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    yield ray
    ray.shutdown()
    _kill_workers_of(raylet)


def _kill_workers_of(raylet: int) -> None:
    """Workers of the session's instance that outlived its shutdown. Seen once in a full suite: a Ray Train
    TrainController (400 MB) orphaned for good after its raylet stopped. Its title is rewritten (`ray::...`); the
    raylet's pid in its environment names the instance."""
    kill_processes_with(f"RAY_RAYLET_PID={raylet}\0".encode(), "environ")


def kill_processes_with(marker: bytes, proc_file: str) -> None:
    """SIGKILL every process whose /proc/PID/`proc_file` (cmdline, environ: NUL-separated) holds `marker`: Ray
    processes a test's instance left behind, found by what names that instance."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / proc_file).read_bytes() + b"\0":
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


class DeviceMixError(AssertionError):
    """A computation that on a real GPU would fail, or would hand a CUDA tensor to a process without one."""


class FakeCuda:
    """torch.device("cuda") simulated on the CPU, inside `with`.

    Tensors "on the device" are CPU tensors tracked by identity. Only distq.setup.devices' two primitive moves put tensors
    there (a copy, as a real move makes) or take them off; every other torch operation is watched by a dispatch mode,
    with the rules of real devices: an operation on device tensors gives device tensors, and one that mixes device
    tensors with CPU tensors of one or more dimensions (CPU scalars are allowed, as CUDA kernels take them) raises
    DeviceMixError, except copy_, which copies across devices. Device tensors that reach numpy or pickling (a Ray
    transfer, torch.save) raise too: a CPU-only process could not read them. torch.cuda.is_available() answers
    True, so distq resolves `cuda` and `auto` to torch.device("cuda") as on a GPU machine; anything that uses that
    device other than through distq.setup.devices (a factory with device=, Tensor.to, Module.to) meets this CPU-only
    torch build and fails. Operations that torch itself bases on a tensor's reported device see cpu, so code that
    builds new tensors with device=x.device is (stricter than on a real GPU) flagged too.
    """

    def __init__(self):
        self.on_device = WeakIdKeyDictionary()
        self._patches, self._modes = None, []

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor in self.on_device

    def _move_tensor(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        onto_device = device.type == "cuda"
        if self.holds(tensor) == onto_device:
            return tensor
        moved = tensor.clone()  # the dispatch mode marks a copy of a device tensor as a device tensor
        if onto_device:
            self.on_device[moved] = True
        else:
            del self.on_device[moved]
        return moved

    def _move_module(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        onto_device = device.type == "cuda"
        tensors = list(itertools.chain(module.parameters(), module.buffers()))
        if all(self.holds(t) == onto_device for t in tensors):
            return module
        module._apply(torch.clone)  # as Module.to: parameters keep their identity, buffers are replaced
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if onto_device:
                self.on_device[tensor] = True
            else:
                self.on_device.pop(tensor, None)
        return module

    def __enter__(self) -> "FakeCuda":
        fake, reduce_ex = self, torch.Tensor.__reduce_ex__

        def pickled(tensor, protocol):
            if fake.holds(tensor):
                raise DeviceMixError(f"a tensor {tuple(tensor.shape)} on the cuda device is being pickled (a Ray "
                                     "transfer or a checkpoint): a process without a GPU could not load it")
            return reduce_ex(tensor, protocol)

        self._patches = pytest.MonkeyPatch()
        self._patches.setattr(torch.cuda, "is_available", lambda: True)
        self._patches.setattr(devices, "_move_tensor", self._move_tensor)
        self._patches.setattr(devices, "_move_module", self._move_module)
        self._patches.setattr(torch.Tensor, "__reduce_ex__", pickled)
        self._modes = [_NoNumpy(self), _SameDevice(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._patches.undo()


class _SameDevice(TorchDispatchMode):
    """FakeCuda's rules for every aten operation."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(self.fake.holds(t) for t in tensors)
        crossing = func is torch.ops.aten.copy_.default
        if on_device and not crossing:
            cpu = [tuple(t.shape) for t in tensors if not self.fake.holds(t) and t.dim() > 0]
            if cpu:
                raise DeviceMixError(f"{func} mixes tensors on the cuda device with CPU tensors of shapes {cpu}")
        out = func(*args, **kwargs)
        if on_device and not crossing:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.fake.on_device[tensor] = True
        return out


class _NoNumpy(TorchFunctionMode):
    """FakeCuda: numpy cannot read a CUDA tensor."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and self.fake.holds(args[0]):
            raise DeviceMixError(f"numpy reads a tensor {tuple(args[0].shape)} on the cuda device")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_cuda() -> FakeCuda:
    """A FakeCuda to enter with `with` (what runs before it, e.g. a reference run, sees the real CPU-only torch)."""
    return FakeCuda()


@pytest.fixture
def requested_digit_rates():
    """rates(config, run_dir) -> for each digit 0..9, the share of 100 images generated for it by the finished
    class-conditional digits run in run_dir that the digits classifier (distq.problems.rewards.DigitReward) takes for it."""
    from distq.backends.build import build_rollout
    from distq.problems.data import load_dataset
    from distq.problems.rewards import DigitReward
    from distq.runs.checkpoint import load_checkpoint

    def rates(config, run_dir) -> list[float]:
        dataset = load_dataset(config.data, config.seed)
        rollout = build_rollout(config, dataset.points, None, labels=dataset.labels)
        rollout.set_weights(load_checkpoint(run_dir / "checkpoint.pt")["learner"]["policy"])
        classifier, generator = DigitReward(target=0), torch.Generator().manual_seed(1)
        shares = []
        for digit in range(10):
            images = rollout.generate(100, generator, conditions=torch.full((100,), digit))
            shares.append(float((classifier.probabilities(images).argmax(-1) == digit).double().mean()))
        return shares

    return rates


# The suite's longest files, longest first (seconds of one xdist worker in a `make test` on a 2-core machine:
# 169, 144, 129, 128, 82, 53, 48, 45, 44, 17, 15, 13, 13, 13, 12, 12): `make test` hands whole files to two processes
# in this order (--no-loadscope-reorder: xdist would otherwise order them by their number of tests), each taking the
# next when it is free, so the two end together instead of one running a long file alone at the end.
LONGEST_FIRST = ("test_ray_actors.py", "test_tuning.py", "test_docs.py", "test_trainer.py", "test_data_parallel.py",
                 "test_q_learning.py", "test_cli.py", "test_reproduce.py", "test_two_process.py",
                 "test_policy_gradient.py", "test_bench.py", "test_calibrate.py", "test_evaluation.py", "test_rewards.py",
                 "test_ray_cluster.py", "test_dsm.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
