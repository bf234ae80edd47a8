"""Checkpoints: written atomically, read back with errors that name the file and what is wrong.

A checkpoint holds the resolved config, the episode reached, the learner's networks, optimisers and schedulers,
and the data's column names. Rollout randomness is counter-based (rollout.episode_chunks), so the episode number
is the whole random state needed to continue exactly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from distq.config import Config, config_from_dict
from distq.errors import DistqError
from distq.schema import flatten

FORMAT = 1
# Fields that may change between a run and its resumption: how long, how it reports and where it computes (a
# GPU-trained run continues on a laptop), not what it learns.
RESUMABLE_CHANGES = ("train.episodes", "train.log_every", "train.checkpoint_every", "train.progress_seconds",
                     "train.processes", "train.device",
                     "train.threads", "eval.n_samples", "eval.batches", "eval.k", "parallel.workers",
                     "parallel.num_cpus_per_worker", "parallel.num_gpus_per_worker", "parallel.learner_num_cpus",
                     "parallel.learner_num_gpus", "parallel.rollout_device", "parallel.memory_per_worker_mb",
                     "parallel.learner_memory_mb", "parallel.ray_num_cpus",
                     "parallel.connect_timeout_s")
_REQUIRED = ("format", "config", "episode", "learner", "columns")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` via a temporary file and an atomic rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; DistqError if it is missing, corrupt or of another format."""
    path = Path(path)
    if not path.is_file():
        raise DistqError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise DistqError(f"checkpoint {path} is corrupt or not a distq checkpoint ({_reason(err)})") from None
    missing = [key for key in _REQUIRED if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise DistqError(f"checkpoint {path} is not a distq checkpoint (missing {', '.join(missing)})")
    if payload["format"] != FORMAT:
        raise DistqError(f"checkpoint {path} has format {payload['format']}; this distq reads format {FORMAT}")
    return payload


def _reason(err: Exception) -> str:
    """torch's load error in one line; its weights-only advice (load untrusted files unsafely) is left out."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((line for line in lines[1:] if "WeightsUnpickler error" not in line and "documentation" not in line), "")
        return f"unpickling failed: {detail}" if detail else "unpickling failed"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def config_differences(saved: dict[str, Any], config: Config) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's config and `config`, ignoring RESUMABLE_CHANGES.
    Keys that an older distq did not write take their defaults (they did what the default does)."""
    try:
        saved = config_from_dict(saved).to_dict()
    except DistqError:
        pass  # compared as written: every differing key is named
    old, new = flatten(saved), flatten(config.to_dict())
    keys = sorted(set(old) | set(new))
    return [k for k in keys if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]


def check_compatible(payload: dict[str, Any], config: Config, path: str | Path) -> None:
    """DistqError naming the differing fields if the checkpoint was trained with another config."""
    diffs = config_differences(payload["config"], config)
    if diffs:
        flat_old = flatten(payload["config"])
        shown = ", ".join(f"{k} (checkpoint {flat_old.get(k)!r})" for k in diffs[:6])
        raise DistqError(f"checkpoint {path} was trained with a different config: {shown}; "
                         f"only {', '.join(RESUMABLE_CHANGES)} may change on --resume")
