"""Process-level CPU settings for training: torch threads and the C allocator.

Each update allocates activation buffers of a few MB (K B rows by the hidden width). glibc serves blocks that
large with mmap and returns them to the OS when freed, so every episode page-faults its buffers in again;
on this 2-core machine that cost about a fifth of an episode at paper scale. Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

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


def configure_cpu(threads: int) -> None:
    """torch intra-op threads (0 = torch's default) and the allocator setting above."""
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
