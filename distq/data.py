"""Training data (algorithm.md section 12): the built-in laws gmm1d, swiss_roll, gaussian, or a user file.

Data stay at their own scale: the diffusion runs on the points as given (section 12 explains why scale matters).
Every bad file raises DistqError naming the file, the config field and what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

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


def gmm_means(components: int, dim: int, seed: int) -> torch.Tensor:
    """(components, dim) means of the `gmm` source, drawn from N(0, 9 I) with the run's seed."""
    return 3.0 * torch.randn(components, dim, generator=torch.Generator().manual_seed(seed))


def gmm_sampler(means: torch.Tensor, std: float, weights: Optional[torch.Tensor] = None) -> Sampler:
    """Draws from sum_j w_j N(means_j, std^2 I) (equal weights by default)."""
    weights = torch.full((means.shape[0],), 1.0 / means.shape[0]) if weights is None else weights

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, d) mixture draws."""
        which = torch.multinomial(weights, n, replacement=True, generator=generator)
        return means[which] + std * torch.randn(n, means.shape[1], generator=generator)

    return sample


def tilted_gmm(means: torch.Tensor, std: float, beta: float, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form exponential tilt (E7) of an equal-weight Gaussian mixture by exp(beta coef . x): again a
    mixture, component j moved to m_j + beta s^2 c and reweighted by exp(beta c . m_j) (normalised).
    Returns (means (J, d), weights (J,))."""
    logits = beta * means @ coef
    return means + beta * std**2 * coef, torch.softmax(logits, 0)


def _digits() -> torch.Tensor:
    """sklearn's 8x8 digits as (1797, 64) float32 pixel intensities 0..16, shipped with sklearn (no download)."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().data.astype(np.float32))


def _builtin(cfg: DataConfig, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    if cfg.source == "swiss_roll":
        points, fresh = swiss_roll_sample(cfg.n_samples, seed), _fresh_swiss_roll
    elif cfg.source == "digits":
        points, fresh = _digits(), None
    elif cfg.source == "gmm":
        fresh = gmm_sampler(gmm_means(cfg.components, cfg.dim, seed), cfg.std)
        points = fresh(cfg.n_samples, generator)
    else:
        fresh = gmm1d_sample if cfg.source == "gmm1d" else _gaussian_sampler(cfg.mean, cfg.std)
        points = fresh(cfg.n_samples, generator)
    return Dataset(points, _default_columns(points.shape[1]), cfg.source, fresh)


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


def _parquet_batches(path: Path, wanted: Optional[tuple[str, ...]]) -> Batches:
    """A Parquet file read in record batches of PARQUET_BATCH_ROWS (never whole, never as Python objects)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _fail(path, f"could not be read as parquet: {err}") from None
    names = _select(parquet.schema_arrow.names, wanted, path)
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


def _csv_batches(path: Path, wanted: Optional[tuple[str, ...]]) -> Batches:
    """A CSV file as one block."""
    try:
        table = pa_csv.read_csv(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _fail(path, f"could not be read as csv: {err}") from None
    names = _select(table.column_names, wanted, path)
    if table.num_rows:  # a header-only CSV has untyped (null) columns
        _check_numeric(table.schema, names, path)
    return names, table.num_rows, iter([_columns_of(table, names)])


def _select(available: list[str], wanted: Optional[tuple[str, ...]], path: Path) -> list[str]:
    """The requested column names (all if None), checked against the file's."""
    if wanted is None:
        return available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise _fail(path, f"data.columns lists {', '.join(map(repr, missing))}, which the file does not have; "
                          f"available: {', '.join(available)}")
    return list(wanted)


def _npy_batches(path: Path, wanted: Optional[tuple[str, ...]]) -> Batches:
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
    available = list(_default_columns(array.shape[1]))
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


def _from_file(cfg: DataConfig) -> Dataset:
    path = Path(cfg.path)
    if not path.is_file():
        raise _fail(path, "file does not exist")
    if path.suffix not in FILE_FORMATS:
        raise _fail(path, f"unsupported extension '{path.suffix}'; use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    read = {".parquet": _parquet_batches, ".csv": _csv_batches, ".npy": _npy_batches}[path.suffix]
    names, rows, blocks = read(path, cfg.columns)
    if not names:
        raise _fail(path, "file has no columns")
    if rows < 2:
        raise _fail(path, f"file has {rows} rows; at least 2 are needed")
    points, offset = np.empty((rows, len(names)), dtype=np.float32), 0
    for values in blocks:
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported just below
            block = values.astype(np.float32)
        _check_finite(block, values, names, path, offset)
        points[offset:offset + len(block)] = block
        offset += len(block)
    return Dataset(torch.from_numpy(points), tuple(names), str(cfg.path), None)


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The training data named by `data.source`; built-in draws are deterministic given `seed`."""
    if cfg.source == "file":
        return _from_file(cfg)
    return _builtin(cfg, seed)
