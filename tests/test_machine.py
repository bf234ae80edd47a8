"""distq/setup/machine.py: the machine description that benchmark JSON and result tables record."""
import os

import torch

from distq.setup.machine import describe_machine, machine


def test_machine_names_this_machine():
    info = machine()
    assert info["cpus"] == os.cpu_count() and info["torch"] == torch.__version__
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["gpu"] is None if not torch.cuda.is_available() else info["gpu"] == torch.cuda.get_device_name(0)
    assert info["memory_gib"] is None or info["memory_gib"] > 0
    line = describe_machine()
    assert f"{os.cpu_count()} logical CPUs" in line and info["cpu"] in line and f"torch {torch.__version__}" in line
