"""Devices: where a run's learner and rollouts compute (train.device, parallel.rollout_device), and moving tensors.

Every tensor that changes device in distq goes through `to_device`, so the crossings are few and visible: networks,
grids and data when they are built, a batch when the learner receives it (distq.algorithms.learner.Learner.update), weights
and learner states when they leave a learner (always CPU tensors, which any process can unpickle, and a checkpoint
loads on any machine). Random draws stay on the CPU (seeded generators give the same numbers on every device) and
move to the rollout's device; rewards are computed on CPU tensors (user functions may use numpy).
The FakeCuda of tests/conftest.py replaces the two primitive moves at the bottom to run a learner and rollouts on
two different (simulated) devices on a CPU-only machine (tests/test_devices.py).
"""
from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
from torch import nn

from distq.errors import DistqError

CPU = torch.device("cpu")
T = TypeVar("T")
_LEAVES = (int, float, bool, str, type(None))
"""Values that `to_device` passes through: optimiser hyperparameters, counters, absent fields."""


def resolve_device(name: str, field: str) -> torch.device:
    """The device that the value `name` (auto | cpu | cuda) of the setting `field` names in this process:
    auto = cuda if torch sees a CUDA device here, else cpu. DistqError naming `field` for cuda where there is none
    (called when a run starts, not when a config is read: configs are written on laptops for GPU clusters)."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise DistqError(f"{field} is cuda, but this process sees no CUDA device (torch {torch.__version__}, CUDA "
                         f"build: {torch.version.cuda or 'none'}); use cpu or auto")
    return torch.device({"cpu": "cpu", "cuda": "cuda", "auto": "cuda" if cuda else "cpu"}[name])


def to_device(value: T, device: torch.device) -> T:
    """`value` with its tensors on `device`: a tensor (itself if already there, as Tensor.to), a module (moved in
    place, as nn.Module.to), or dicts, lists, tuples and dataclass records (Trajectories, TimeGrid) of them, rebuilt.
    Numbers, strings and None pass through; anything else is a TypeError rather than silently left behind."""
    if isinstance(value, torch.Tensor):
        return _move_tensor(value, device)
    if isinstance(value, nn.Module):
        return _move_module(value, device)
    if isinstance(value, dict):
        return type(value)((key, to_device(item, device)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, _LEAVES):
        return value
    raise TypeError(f"to_device cannot move a {type(value).__name__}")


def _move_tensor(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device)


def _move_module(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device)
