"""The run directory: which files a run writes, atomic writers, its lock, and the guard against clobbering a run."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from distq.errors import DistqError
from distq.setup.config import Config

if TYPE_CHECKING:  # torch only where samples are read: the Tune driver imports this module
    import torch

CONFIG, METRICS, CHECKPOINT = "config.yaml", "metrics.parquet", "checkpoint.pt"
SAMPLES, PLOT, SUMMARY = "samples.parquet", "samples.png", "summary.json"
BEST_CHECKPOINT, TRAINING_PLOT = "checkpoint_best.pt", "training.png"
OUTPUTS = (CONFIG, METRICS, CHECKPOINT, BEST_CHECKPOINT, SAMPLES, PLOT, SUMMARY, TRAINING_PLOT, "evaluation.json")
LOCK, PROBE = ".lock", ".write-probe"
MARGIN = 16 * 2**20
"""Free bytes asked for beyond the checkpoints and samples: metrics, plots, summary, config."""


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run over an existing one unless asked; a resumed run needs its checkpoint. Only a
    checkpoint makes a directory a run: what a start that failed before its first checkpoint left is replaced."""
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise DistqError(f"cannot resume: {run_dir / CHECKPOINT} does not exist")
        return
    check_writable_dir(run_dir, "--out")
    if (run_dir / CHECKPOINT).exists() and not overwrite:
        existing = [name for name in OUTPUTS if (run_dir / name).exists()]
        raise DistqError(f"{run_dir} already holds a run ({', '.join(existing)}); "
                         "pass --resume to continue it or --overwrite to replace it")


@contextlib.contextmanager
def locked(run_dir: Path, flag: str) -> Iterator[None]:
    """Hold RUN_DIR/.lock (an flock, with this pid written in it) inside `with`, creating the directory if needed;
    DistqError naming the holder's pid if another process holds it. The kernel drops the lock of a dead process, so
    a file left behind blocks nothing; the holder removes it before unlocking."""
    check_writable_dir(run_dir, flag)
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path)
    except OSError as err:
        raise DistqError(f"{flag} {run_dir}: cannot create its lock file {path} ({_reason(err)})") from None
    if handle is None:
        holder = _read_pid(path)
        raise DistqError(f"{run_dir} is in use by process {holder} (it holds {path}); wait for it to end or stop it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(handle)


def _acquire(path: Path) -> Optional[int]:
    """A descriptor holding the flock of the file now at `path`, or None if another process holds it. A holder
    unlinks the file before unlocking, so a lock won on a file no longer at `path` is retried on the new one."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                with contextlib.suppress(OSError):  # the pid is for the message only
                    os.ftruncate(handle, 0)
                    os.write(handle, f"{os.getpid()}\n".encode())
                return handle
        os.close(handle)


def _read_pid(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or "(pid not yet written)"
    return "(pid unknown)"


def check_space(run_dir: Path, needed: int) -> None:
    """DistqError unless a file can be written in `run_dir` and it has `needed` bytes (plus MARGIN) free."""
    probe = run_dir / PROBE
    try:
        probe.write_bytes(b"distq")
    except OSError as err:
        raise DistqError(f"cannot write in {run_dir}: {probe} ({_reason(err)})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free, wanted = shutil.disk_usage(run_dir).free, needed + MARGIN
    if free < wanted:
        raise DistqError(f"{run_dir} has {free / 2**20:.0f} MiB free; this run needs about {wanted / 2**20:.0f} MiB "
                         "(checkpoint and its temporary copy, samples, plots)")


def check_writable_dir(path: Path, flag: str) -> None:
    """DistqError unless `path` is, or can be created as, a directory (no regular file on the way)."""
    for node in (path, *path.parents):
        if node.exists():
            if not node.is_dir():
                raise DistqError(f"{flag} {path}: {node} exists and is not a directory")
            return


def clear_outputs(run_dir: Path) -> None:
    """Remove the files a previous run wrote (and only those)."""
    for name in OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp) beside `path`, then rename: a failure or an interruption leaves any earlier `path` intact and
    removes the temporary file; an OSError (full disk, no permission) is a DistqError naming `path`. An existing
    `path` that is not a regular file (/dev/null, a FIFO) is written in place: a rename would replace the device
    itself (as root, `--out /dev/null` once turned /dev/null into a file)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        try:
            write(path)
        except OSError as err:
            raise DistqError(f"cannot write {path} ({_reason(err)})") from None
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DistqError(f"cannot write {path} ({_reason(err)}); any earlier version of it is kept") from None
        raise


def _reason(err: OSError) -> str:
    """'No space left on device' and the like; pyarrow's OSErrors carry only a message."""
    lines = str(err).splitlines()
    return err.strerror or (lines[0] if lines else type(err).__name__)


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Atomically write a JSON object."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(values, indent=2) + "\n"))


def write_table(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically write rows of scalars as Parquet; a key missing from some rows is null there."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = pa.table({key: [row.get(key) for row in rows] for key in columns})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_table_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file written by write_table ([] if absent)."""
    return pq.read_table(path).to_pylist() if path.is_file() else []


def write_samples(path: Path, samples: torch.Tensor, columns: Sequence[str],
                  condition: Optional[tuple[str, list]] = None) -> None:
    """Atomically write samples (n, d) as Parquet with one float column per data column, and the (name, values)
    of their condition column in conditional runs."""
    values = samples.detach().cpu().numpy().astype(np.float32)
    table = pa.table({**{name: values[:, i] for i, name in enumerate(columns)},
                      **({condition[0]: condition[1]} if condition else {})})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _read_samples_table(path: Path) -> pa.Table:
    """The Parquet table of a samples file; DistqError naming the file if it is absent or unreadable."""
    if not path.is_file():
        raise DistqError(f"samples file {path} does not exist")
    try:
        return pq.read_table(path)
    except Exception as err:
        raise DistqError(f"samples file {path} is not readable Parquet ({err})") from None


def read_samples(path: Path, columns: Sequence[str]) -> torch.Tensor:
    """Samples (n, d) from a Parquet file holding the given columns; DistqError naming the file otherwise."""
    table = _read_samples_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DistqError(f"samples file {path} lacks columns {', '.join(missing)} (has {', '.join(table.column_names)})")
    try:
        values = np.stack([table.column(c).to_numpy().astype(np.float32) for c in columns], axis=1)
    except (ValueError, TypeError, pa.ArrowException) as err:
        raise DistqError(f"samples file {path} has non-numeric or missing values ({err})") from None
    if not np.isfinite(values).all():
        raise DistqError(f"samples file {path} holds NaN or infinite values")
    import torch

    return torch.from_numpy(values)


def read_conditions(path: Path, name: str, values: Sequence) -> torch.Tensor:
    """The condition indices (n,) into `values` of the samples in a Parquet file's condition column `name` (as
    write_samples writes it); DistqError naming the file if the column is missing or holds another value."""
    table = _read_samples_table(path)
    if name not in table.column_names:
        raise DistqError(f"samples file {path} lacks the condition column {name} of this conditional run "
                         f"(has {', '.join(table.column_names)})")
    index = {value: i for i, value in enumerate(values)}
    column = table.column(name).to_pylist()
    unknown = sorted({repr(v) for v in column if not isinstance(v, Hashable) or v not in index})
    if unknown:
        raise DistqError(f"samples file {path}: column {name} holds {', '.join(unknown[:5])}, not one of the run's "
                         f"conditions ({', '.join(map(str, values))})")
    import torch

    return torch.tensor([index[v] for v in column], dtype=torch.long)


def save_config(config: Config, path: str | Path) -> None:
    """Atomically write the fully resolved config as YAML; DistqError naming `path` if it cannot be written."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
