"""User data files (data.source = file): Parquet, CSV and .npy read in batches into one float32 array, with every check
a bad file needs (unreadable, non-numeric, non-finite or overflowing values, constant columns, bad condition labels),
each raising DistqError that names the file, the config field and what is wrong.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from distq.errors import DistqError
from distq.setup.config import DataConfig

FILE_FORMATS = (".parquet", ".csv", ".npy")


def default_columns(d: int) -> tuple[str, ...]:
    """Column names of data without names of their own (built-in sets, .npy files): x0, x1, ..."""
    return tuple(f"x{i}" for i in range(d))


def _fail(path: Path, message: str) -> DistqError:
    return DistqError(f"data file '{path}' (data.path): {message}")


PARQUET_BATCH_ROWS = 16384
"""Rows per record batch when reading Parquet: a large file is converted batch by batch into one float32 array."""

Batches = tuple[list[str], int, Iterator[np.ndarray]]
"""Column names, number of rows, and (rows, d) float64 blocks in row order."""


def _check_numeric(schema: pa.Schema, names: list[str], path: Path) -> None:
    for name in names:
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
            raise _fail(path, f"column '{name}' is not numeric (arrow type {kind})")


def _columns_of(batch, names: list[str]) -> np.ndarray:
    """(rows, d) float64 of an arrow table or record batch; nulls become NaN (reported by the finiteness check)."""
    if not names:
        return np.zeros((batch.num_rows, 0))
    return np.column_stack([batch.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in names])


def _parquet_batches(path: Path, wanted: Optional[tuple[str, ...]], skip: Optional[str]) -> Batches:
    """A Parquet file read in record batches of PARQUET_BATCH_ROWS (never whole, never as Python objects)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _fail(path, f"could not be read as parquet: {err}") from None
    names = _select(parquet.schema_arrow.names, wanted, path, skip)
    rows = parquet.metadata.num_rows
    if rows:
        _check_numeric(parquet.schema_arrow, names, path)

    def blocks() -> Iterator[np.ndarray]:
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=names):
                yield _columns_of(batch, names)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise _fail(path, f"could not be read as parquet: {err}") from None

    return names, rows, blocks()


def _csv_batches(path: Path, wanted: Optional[tuple[str, ...]], skip: Optional[str]) -> Batches:
    """A CSV file as one block."""
    try:
        table = pa_csv.read_csv(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _fail(path, f"could not be read as csv: {err}") from None
    names = _select(table.column_names, wanted, path, skip)
    if table.num_rows:  # a header-only CSV has untyped (null) columns
        _check_numeric(table.schema, names, path)
    return names, table.num_rows, iter([_columns_of(table, names)])


def _select(available: list[str], wanted: Optional[tuple[str, ...]], path: Path, skip: Optional[str] = None) -> list[str]:
    """The requested column names (all but `skip`, the condition column, if None), checked against the file's."""
    if wanted is None:
        return [c for c in available if c != skip]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise _fail(path, f"data.columns lists {', '.join(map(repr, missing))}, which the file does not have; "
                          f"available: {', '.join(available)}")
    return list(wanted)


def _npy_batches(path: Path, wanted: Optional[tuple[str, ...]], skip: Optional[str]) -> Batches:
    """A 1-D or 2-D numeric .npy file as one block, columns named 'x0', ...."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _fail(path, f"could not be read as npy: {err}") from None
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise _fail(path, f"array dtype {array.dtype} is not numeric")
    if array.ndim not in (1, 2):
        raise _fail(path, f"array must be 1-D or 2-D (rows, columns), got shape {array.shape}")
    if array.ndim == 1:
        array = array[:, None]
    available = list(default_columns(array.shape[1]))
    names = _select(available, wanted, path)
    return names, array.shape[0], iter([array[:, [available.index(n) for n in names]]])


def _check_finite(points: np.ndarray, values: np.ndarray, names: list[str], path: Path, offset: int) -> None:
    """Name the first (row, column) where the float32 `points` are not finite, quoting the file's `values`;
    the block starts at row `offset` of the file."""
    bad = ~np.isfinite(points)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise _fail(path, f"column '{names[col]}' has a value that is not a finite float32 "
                          f"({values[row, col]}) at row {offset + row}")


LARGEST_VALUE = 1e15
"""Largest |value| a file may hold: squared distances (d |x|^2 / sigma_t^2 in the ratio estimator, unstandardised)
and rewards of the user's values must stay far inside float32's range (3.4e38)."""


def _check_magnitude(values: np.ndarray, names: list[str], path: Path, offset: int) -> None:
    """Name the first (row, column) of a block whose |value| exceeds LARGEST_VALUE."""
    big = np.abs(values) > LARGEST_VALUE
    if big.any():
        row, col = np.argwhere(big)[0]
        raise _fail(path, f"column '{names[col]}' has {values[row, col]:g} at row {offset + row}: beyond "
                          f"|x| <= {LARGEST_VALUE:g}, float32 squares of such values overflow; rescale the column "
                          "(other units)")


def _check_not_constant(points: np.ndarray, names: list[str], path: Path) -> None:
    """A constant column carries no information and has no spread to standardise by."""
    constant = np.flatnonzero(points.min(0) == points.max(0))
    if constant.size:
        column = names[constant[0]]
        raise _fail(path, f"column '{column}' is constant ({points[0, constant[0]]:g} in every row): it has no spread; "
                          "leave it out with data.columns")


def read_data_file(cfg: DataConfig) -> tuple[torch.Tensor, tuple[str, ...], Optional[tuple[torch.Tensor, tuple]]]:
    """The points (N, d) float32 of the file data.path, their column names and, with data.condition, the condition
    labels (N,) and their values; DistqError naming the file and what is wrong otherwise."""
    path = Path(cfg.path)
    if not path.is_file():
        raise _fail(path, "file does not exist")
    if path.suffix not in FILE_FORMATS:
        raise _fail(path, f"unsupported extension '{path.suffix}'; use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    read = {".parquet": _parquet_batches, ".csv": _csv_batches, ".npy": _npy_batches}[path.suffix]
    if cfg.condition is not None and path.suffix == ".npy":
        raise _fail(path, "data.condition needs a Parquet or CSV file with a label column (.npy has no names)")
    names, rows, blocks = read(path, cfg.columns, cfg.condition)
    if not names:
        raise _fail(path, "file has no columns")
    if rows < 2:
        raise _fail(path, f"file has {rows} rows; at least 2 are needed")
    points, offset = np.empty((rows, len(names)), dtype=np.float32), 0
    for values in blocks:
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported just below
            block = values.astype(np.float32)
        _check_finite(block, values, names, path, offset)
        _check_magnitude(values, names, path, offset)
        points[offset:offset + len(block)] = block
        offset += len(block)
    _check_not_constant(points, names, path)
    if cfg.condition is None:
        return torch.from_numpy(points), tuple(names), None
    return torch.from_numpy(points), tuple(names), _file_labels(path, cfg.condition)


def _file_labels(path: Path, column: str) -> tuple[torch.Tensor, tuple]:
    """The condition column of a Parquet/CSV file: whole-number values, mapped to indices of their sorted values."""
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path, columns=[column])
        else:
            table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(include_columns=[column]))
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        raise _fail(path, f"data.condition column '{column}' could not be read: {err}") from None
    if column not in table.column_names:
        raise _fail(path, f"data.condition names column '{column}', which the file does not have")
    values = table.column(column).to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "iuf" or (values.dtype.kind == "f" and not np.all(np.isfinite(values)
                                                                                  & (values == np.round(values)))):
        raise _fail(path, f"data.condition column '{column}' must hold whole-number labels (got {values.dtype})")
    unique, labels = np.unique(values.astype(np.int64), return_inverse=True)
    return torch.from_numpy(labels.astype(np.int64)), tuple(int(v) for v in unique)
