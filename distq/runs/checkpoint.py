"""Checkpoints: written atomically, read back with errors that name the file and what is wrong.

A checkpoint holds the resolved config, the episode reached, the learner's networks, optimisers and schedulers,
and the data's column names. Rollout randomness is counter-based (rollout.episode_chunks), so the episode number
is the whole random state needed to continue exactly.

The file is one header line, `distq checkpoint sha256 <hex digest of the rest>`, then torch.save's bytes: a byte
changed anywhere fails the comparison (torch's zip format alone loads many damaged files without a complaint).
Format 1 files (torch.save's bytes alone, from before the header) are read without a check.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from distq.errors import DistqError
from distq.problems.data import Dataset
from distq.runs import rundir
from distq.setup.config import Config, config_from_dict, run_settings
from distq.setup.schema import flatten

FORMAT, UNCHECKED_FORMAT = 2, 1
HEADER = b"distq checkpoint sha256 "
_REQUIRED = ("format", "config", "episode", "learner", "columns")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` with its checksum to `path` via a temporary file and an atomic rename, so a crash never leaves
    half a file; DistqError naming `path` if it cannot be written (the previous checkpoint is kept)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    body = buffer.getvalue()
    header = HEADER + hashlib.sha256(body).hexdigest().encode() + b"\n"
    rundir.atomic_write(Path(path), lambda tmp: tmp.write_bytes(header + body))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; DistqError if it is missing, damaged or of another format."""
    path = Path(path)
    if not path.is_file():
        raise DistqError(f"checkpoint {path} does not exist")
    body, expected = _verified_body(path)
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise DistqError(f"checkpoint {path} is corrupt or not a distq checkpoint ({_reason(err)})") from None
    missing = [key for key in _REQUIRED if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise DistqError(f"checkpoint {path} is not a distq checkpoint (missing {', '.join(missing)})")
    if payload["format"] != expected:
        raise DistqError(f"checkpoint {path} has format {payload['format']}"
                         + (" but no checksum header" if expected == UNCHECKED_FORMAT else "")
                         + f"; this distq reads format {FORMAT} (and {UNCHECKED_FORMAT}, unchecked)")
    return payload


def _verified_body(path: Path) -> tuple[bytes, int]:
    """The torch.save bytes of a checkpoint file, checked against its header's digest, and the format they must
    hold (UNCHECKED_FORMAT for a file without a header: torch's zip archives start with PK)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DistqError(f"cannot read checkpoint {path} ({err.strerror or err})") from None
    if data.startswith(b"PK"):
        return data, UNCHECKED_FORMAT
    if not data.startswith(HEADER):
        raise DistqError(f"checkpoint {path} is corrupt or not a distq checkpoint (no distq checkpoint header)")
    digest, _, body = data[len(HEADER):].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise DistqError(f"checkpoint {path} is corrupt (checksum mismatch): it changed after distq wrote it; "
                         "restore it from a copy or train again")
    return body, FORMAT


def _reason(err: Exception) -> str:
    """torch's load error in one line; its weights-only advice (load untrusted files unsafely) is left out."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((line for line in lines[1:] if "WeightsUnpickler error" not in line and "documentation" not in line), "")
        return f"unpickling failed: {detail}" if detail else "unpickling failed"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def config_differences(saved: dict[str, Any], config: Config) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's config and `config`, ignoring the run settings
    (distq.setup.config.run_settings: how long, how it reports and where it computes -- a GPU-trained run continues on a
    laptop -- not what it learns).
    Keys that an older distq did not write take their defaults (they did what the default does)."""
    try:
        saved = config_from_dict(saved).to_dict()
    except DistqError:
        pass  # compared as written: every differing key is named
    old, new = flatten(saved), flatten(config.to_dict())
    keys = sorted(set(old) | set(new))
    resumable = run_settings()
    return [k for k in keys if k not in resumable and old.get(k) != new.get(k)]


def check_compatible(payload: dict[str, Any], config: Config, path: str | Path) -> None:
    """DistqError naming the differing fields if the checkpoint was trained with another config."""
    diffs = config_differences(payload["config"], config)
    if diffs:
        flat_old = flatten(payload["config"])
        shown = ", ".join(f"{k} (checkpoint {flat_old.get(k)!r})" for k in diffs[:6])
        raise DistqError(f"checkpoint {path} was trained with a different config: {shown}; "
                         "only run settings (how long, devices, workers, logging, evaluation, tracking; "
                         "docs/configuration.md) may change on --resume")


def run_header(config: Config, dataset: Dataset) -> dict[str, Any]:
    """What a checkpoint holds beside the episode and the learner state: the config, the data's columns and
    standardisation (and conditions)."""
    header = {"config": config.to_dict(), "columns": list(dataset.columns),
              "standardization": dataset.standardization.state()}
    if dataset.classes:  # what `distq sample` needs to generate by condition without the data
        header["conditions"] = {"values": list(dataset.condition_values),
                                "probabilities": dataset.class_probabilities().tolist()}
    return header


def save_run(run_dir: Path, header: dict[str, Any], episode: int, learner: dict[str, Any], rows: list,
             name: str = rundir.CHECKPOINT) -> None:
    """The checkpoint `name` of a run at `episode` and (with the run's own checkpoint) metrics.parquet."""
    save_checkpoint(run_dir / name, {**header, "episode": episode, "learner": learner})
    if name == rundir.CHECKPOINT:
        rundir.write_table(run_dir / rundir.METRICS, rows)
