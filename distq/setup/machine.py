"""Process-level CPU settings for training (torch threads and the C allocator), and what the machine is.

Each update allocates activation buffers of a few MB (K B rows by the hidden width). glibc serves blocks that
large with mmap and returns them to the OS when freed, so every episode page-faults its buffers in again;
on this 2-core machine that cost about a fifth of an episode at paper scale. Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse.

That setting reaches only glibc's main arena. Ray Train and Tune run the training function in a thread of their
worker process, and by then Ray's own threads have made glibc fix its arena count, so the thread gets an arena of
its own that hands freed heaps back to the OS: a ddp replica spent about 15% of its time in page faults, its rollout
took 1.3x the same code's in the driver. Ray workers therefore start with one arena (worker_env()), set in their
environment because glibc reads it only at process start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap; False where there is no glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False


def worker_env() -> dict[str, str]:
    """Environment variables of the Ray worker processes that train (ddp replicas, Tune trials, rollout actors):
    glibc's one arena (a user's own MALLOC_ARENA_MAX in the driver's environment wins)."""
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}


def configure_cpu(threads: int) -> None:
    """torch intra-op threads (0 = torch's default) and the allocator setting above."""
    import torch  # here: the Tune driver imports this module and trains nothing

    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()


def machine() -> dict[str, object]:
    """What benchmark and result files record of the machine: CPU model and logical cores, memory, OS, torch and the
    GPU (None without CUDA)."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        memory = None
    return {"cpu": models[0] if models else platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": memory, "platform": platform.platform(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def describe_machine() -> str:
    """machine() in one line, for result tables."""
    info = machine()
    memory = f", {info['memory_gib']} GiB" if info["memory_gib"] else ""
    return (f"{info['cpu']}, {info['cpus']} logical CPUs{memory}, {info['gpu'] or 'no GPU'}, torch {info['torch']}, "
            f"{info['platform']}")
