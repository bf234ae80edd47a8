"""Training data (algorithm.md section 12): the built-in laws gmm1d, swiss_roll, gaussian, or a user file.

Data stay at their own scale: the diffusion runs on the points as given (section 12 explains why scale matters).
Every bad file raises DistqError naming the file, the config field and what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from sklearn.datasets import make_swiss_roll

from distq.config import DataConfig
from distq.errors import DistqError

FILE_FORMATS = (".parquet", ".csv", ".npy")

Sampler = Callable[[int, torch.Generator], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Dataset:
    """N training points of dimension d, and a sampler of the true law when it is known."""

    points: torch.Tensor
    """(N, d) float32 training data."""
    columns: tuple[str, ...]
    """Column names, length d: 'x0', 'x1', ... for built-ins and .npy files, the file's names otherwise."""
    name: str
    """'swiss_roll', 'gmm1d', 'gaussian', or the file path."""
    fresh: Optional[Sampler]
    """(n, generator) -> (n, d) float32 fresh draws from the true law; None for files."""

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @property
    def n(self) -> int:
        return self.points.shape[0]

    def reference_pair(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent reference batches for the KL estimator's floor: fresh draws, or for files two disjoint
        random subsets of min(n, N // 2) points (overlapping subsets would share points at distance 0)."""
        if self.fresh is not None:
            return self.fresh(n, generator), self.fresh(n, generator)
        size = min(n, self.n // 2)
        order = torch.randperm(self.n, generator=generator)
        return self.points[order[:size]], self.points[order[size:2 * size]]

    def reference(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, d) samples to compare generated ones against (only N rows if a file holds N < n points).

        Fresh draws when the law is known; else a random subset of the points without replacement (all if n >= N).
        """
        if self.fresh is not None:
            return self.fresh(n, generator)
        if n >= self.n:
            return self.points
        return self.points[torch.randperm(self.n, generator=generator)[:n]]


def _default_columns(d: int) -> tuple[str, ...]:
    return tuple(f"x{i}" for i in range(d))


def gmm1d_sample(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1) draws from 0.5 N(-2, 1) + 0.5 N(2, 1)."""
    centres = 4.0 * torch.randint(0, 2, (n, 1), generator=generator).float() - 2.0
    return centres + torch.randn(n, 1, generator=generator)


def swiss_roll_sample(n: int, random_state: int) -> torch.Tensor:
    """(n, 2) sklearn make_swiss_roll(n, noise=0.5) columns (0, 2), unscaled."""
    x, _ = make_swiss_roll(n, noise=0.5, random_state=random_state)
    return torch.from_numpy(x[:, [0, 2]].astype(np.float32))


def _fresh_swiss_roll(n: int, generator: torch.Generator) -> torch.Tensor:
    # sklearn takes a numpy seed: derive one from the torch generator so repeated calls draw new points.
    return swiss_roll_sample(n, int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))


def _gaussian_sampler(mean: tuple[float, ...], std: float) -> Sampler:
    centre = torch.tensor(mean, dtype=torch.float32)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, d) draws from N(mean, std^2 I)."""
        return centre + std * torch.randn(n, len(mean), generator=generator)

    return sample


def _builtin(cfg: DataConfig, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    if cfg.source == "swiss_roll":
        points, fresh = swiss_roll_sample(cfg.n_samples, seed), _fresh_swiss_roll
    else:
        fresh = gmm1d_sample if cfg.source == "gmm1d" else _gaussian_sampler(cfg.mean, cfg.std)
        points = fresh(cfg.n_samples, generator)
    return Dataset(points, _default_columns(points.shape[1]), cfg.source, fresh)


def _fail(path: Path, message: str) -> DistqError:
    return DistqError(f"data file '{path}' (data.path): {message}")


def _read_table(path: Path) -> pa.Table:
    """Parquet or CSV -> arrow table; unreadable files become DistqError."""
    try:
        return pq.read_table(path) if path.suffix == ".parquet" else pa_csv.read_csv(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _fail(path, f"could not be read as {path.suffix[1:]}: {err}") from None


def _select(available: list[str], wanted: Optional[tuple[str, ...]], path: Path) -> list[str]:
    """The requested column names (all if None), checked against the file's."""
    if wanted is None:
        return available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise _fail(path, f"data.columns lists {', '.join(map(repr, missing))}, which the file does not have; "
                          f"available: {', '.join(available)}")
    return list(wanted)


def _table_values(path: Path, wanted: Optional[tuple[str, ...]]) -> tuple[np.ndarray, list[str]]:
    """(N, d) float64 values and column names of a parquet/CSV file."""
    table = _read_table(path)
    names = _select(table.column_names, wanted, path)
    if table.num_rows == 0:
        # Checked before the types: a header-only CSV has untyped (null) columns.
        return np.zeros((0, len(names))), names
    for name in names:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise _fail(path, f"column '{name}' is not numeric (arrow type {kind})")
    if not names:
        return np.zeros((table.num_rows, 0)), names
    # Nulls become NaN here and are reported by the finiteness check.
    columns = [table.column(n).to_numpy().astype(np.float64) for n in names]
    return np.column_stack(columns), names


def _npy_values(path: Path, wanted: Optional[tuple[str, ...]]) -> tuple[np.ndarray, list[str]]:
    """(N, d) values and column names 'x0', ... of a 1-D or 2-D numeric .npy file."""
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
    available = list(_default_columns(array.shape[1]))
    names = _select(available, wanted, path)
    return array[:, [available.index(n) for n in names]], names


def _check_finite(points: np.ndarray, values: np.ndarray, names: list[str], path: Path) -> None:
    """Name the first (row, column) where the float32 `points` are not finite, quoting the file's `values`."""
    bad = ~np.isfinite(points)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise _fail(path, f"column '{names[col]}' has a value that is not a finite float32 "
                          f"({values[row, col]}) at row {row}")


def _from_file(cfg: DataConfig) -> Dataset:
    path = Path(cfg.path)
    if not path.is_file():
        raise _fail(path, "file does not exist")
    if path.suffix not in FILE_FORMATS:
        raise _fail(path, f"unsupported extension '{path.suffix}'; use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    read = _npy_values if path.suffix == ".npy" else _table_values
    values, names = read(path, cfg.columns)
    if values.shape[1] == 0:
        raise _fail(path, "file has no columns")
    if values.shape[0] < 2:
        raise _fail(path, f"file has {values.shape[0]} rows; at least 2 are needed")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported just below
        points = values.astype(np.float32)
    _check_finite(points, values, names, path)
    return Dataset(torch.from_numpy(points), tuple(names), str(cfg.path), None)


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The training data named by `data.source`; built-in draws are deterministic given `seed`."""
    if cfg.source == "file":
        return _from_file(cfg)
    return _builtin(cfg, seed)
