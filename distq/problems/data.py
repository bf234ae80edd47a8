"""Training data (algorithm.md section 12): the Dataset record and the built-in laws gmm1d, swiss_roll, gaussian,
digits; user files are read by distq.problems.files.

Built-in data stay at their own scale (section 12 explains why scale matters); `file` data are standardised by
default (data.standardize, distq.problems.standardize): Dataset.points are then in the model's coordinates and
Dataset.standardization maps them back. Every bad file raises DistqError naming the file, the config field and what
is wrong, before training: unreadable, non-numeric, non-finite or overflowing values, constant columns, too few
distinct rows for the evaluation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.datasets import make_swiss_roll

from distq.errors import DistqError
from distq.problems.files import default_columns, read_data_file
from distq.problems.standardize import Standardization, fitted, identity
from distq.setup.config import DataConfig

Sampler = Callable[[int, torch.Generator], torch.Tensor]
LabelledSampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Dataset:
    """N training points of dimension d, and a sampler of the true law when it is known."""

    points: torch.Tensor
    """(N, d) float32 training data in the model's coordinates (standardised if data.standardize is on)."""
    columns: tuple[str, ...]
    """Column names, length d: 'x0', 'x1', ... for built-ins and .npy files, the file's names otherwise."""
    name: str
    """'swiss_roll', 'gmm1d', 'gaussian', or the file path."""
    fresh: Optional[Sampler]
    """(n, generator) -> (n, d) float32 fresh draws from the true law; None for files."""
    labels: Optional[torch.Tensor] = None
    """(N,) long condition index of each point (data.condition), or None."""
    condition_values: tuple = ()
    """The condition's values; labels index them (a file's own label values, 0..C-1 for built-ins)."""
    fresh_labelled: Optional[LabelledSampler] = None
    """(n, generator) -> fresh draws and their condition indices, when the law is known."""
    standardization: Optional[Standardization] = None
    """The map from the user's coordinates to those of `points` (None: the identity)."""

    def __post_init__(self) -> None:
        if self.standardization is None:
            object.__setattr__(self, "standardization", identity(self.dim))

    @property
    def classes(self) -> int:
        """Number of conditions C (0: unconditional)."""
        return len(self.condition_values)

    def class_probabilities(self) -> torch.Tensor:
        """(C,) share of each condition among the training points."""
        return torch.bincount(self.labels, minlength=self.classes).float() / self.n

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @property
    def n(self) -> int:
        return self.points.shape[0]

    def reference_pair(self, n: int, generator: torch.Generator,
                       condition: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent reference batches for the KL estimator's floor: fresh draws, or for files two disjoint
        random subsets of min(n, N // 2) points (overlapping subsets would share points at distance 0); of one
        condition's law or points if `condition` is given."""
        if self._fresh_for(condition) is not None:
            return self.reference(n, generator, condition), self.reference(n, generator, condition)
        points = self._points_of(condition)
        size = min(n, points.shape[0] // 2)
        order = torch.randperm(points.shape[0], generator=generator)
        return points[order[:size]], points[order[size:2 * size]]

    def reference(self, n: int, generator: torch.Generator, condition: Optional[int] = None) -> torch.Tensor:
        """(n, d) samples to compare generated ones against (only N rows if a file holds N < n points), of one
        condition if given.

        Fresh draws when the law is known; else a random subset of the points without replacement (all if n >= N).
        """
        if condition is not None and self.fresh_labelled is not None:
            kept, have = [], 0
            while have < n:  # rejection: fresh labelled draws of that condition
                points, labels = self.fresh_labelled(2 * n, generator)
                kept.append(points[labels == condition])
                have += kept[-1].shape[0]
            return torch.cat(kept)[:n]
        if condition is None and self.fresh is not None:
            return self.fresh(n, generator)
        points = self._points_of(condition)
        if n >= points.shape[0]:
            return points
        return points[torch.randperm(points.shape[0], generator=generator)[:n]]

    def _fresh_for(self, condition: Optional[int]):
        return self.fresh if condition is None else self.fresh_labelled

    def _points_of(self, condition: Optional[int]) -> torch.Tensor:
        return self.points if condition is None else self.points[self.labels == condition]


def gmm1d_labelled(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1) draws from 0.5 N(-2, 1) + 0.5 N(2, 1) and their components (n,) (0: the left one)."""
    components = torch.randint(0, 2, (n, 1), generator=generator)
    return 4.0 * components.float() - 2.0 + torch.randn(n, 1, generator=generator), components[:, 0]


def gmm1d_sample(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1) draws from 0.5 N(-2, 1) + 0.5 N(2, 1)."""
    return gmm1d_labelled(n, generator)[0]


_ROLL_START, _ROLL_SPAN = 1.5 * np.pi, 3.0 * np.pi  # make_swiss_roll's parameter t is uniform on [1.5 pi, 4.5 pi]


def swiss_roll_labelled(n: int, random_state: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2) sklearn make_swiss_roll(n, noise=0.5) columns (0, 2), unscaled, and the segment (n,) of each point:
    `classes` equal pieces of the roll's parameter t, from its inner end."""
    x, t = make_swiss_roll(n, noise=0.5, random_state=random_state)
    segments = np.clip(((t - _ROLL_START) / _ROLL_SPAN * classes).astype(np.int64), 0, classes - 1)
    return torch.from_numpy(x[:, [0, 2]].astype(np.float32)), torch.from_numpy(segments)


def swiss_roll_sample(n: int, random_state: int) -> torch.Tensor:
    """(n, 2) sklearn make_swiss_roll(n, noise=0.5) columns (0, 2), unscaled."""
    return swiss_roll_labelled(n, random_state, 1)[0]


def _numpy_seed(generator: torch.Generator) -> int:
    # sklearn takes a numpy seed: derive one from the torch generator so repeated calls draw new points.
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def _fresh_swiss_roll(n: int, generator: torch.Generator) -> torch.Tensor:
    return swiss_roll_sample(n, _numpy_seed(generator))


def _gaussian_sampler(mean: tuple[float, ...], std: float) -> Sampler:
    centre = torch.tensor(mean, dtype=torch.float32)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, d) draws from N(mean, std^2 I)."""
        return centre + std * torch.randn(n, len(mean), generator=generator)

    return sample


def gmm_means(components: int, dim: int, seed: int) -> torch.Tensor:
    """(components, dim) means of the `gmm` source, drawn from N(0, 9 I) with the run's seed."""
    return 3.0 * torch.randn(components, dim, generator=torch.Generator().manual_seed(seed))


def gmm_labelled_sampler(means: torch.Tensor, std: float, weights: Optional[torch.Tensor] = None) -> LabelledSampler:
    """Draws from sum_j w_j N(means_j, std^2 I) (equal weights by default) with their components."""
    weights = torch.full((means.shape[0],), 1.0 / means.shape[0]) if weights is None else weights

    def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) mixture draws and their components (n,)."""
        which = torch.multinomial(weights, n, replacement=True, generator=generator)
        return means[which] + std * torch.randn(n, means.shape[1], generator=generator), which

    return sample


def gmm_sampler(means: torch.Tensor, std: float, weights: Optional[torch.Tensor] = None) -> Sampler:
    """Draws (n, d) from sum_j w_j N(means_j, std^2 I) (equal weights by default)."""
    labelled = gmm_labelled_sampler(means, std, weights)
    return lambda n, generator: labelled(n, generator)[0]


def tilted_gmm(means: torch.Tensor, std: float, beta: float, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form exponential tilt (E7) of an equal-weight Gaussian mixture by exp(beta coef . x): again a
    mixture, component j moved to m_j + beta s^2 c and reweighted by exp(beta c . m_j) (normalised).
    Returns (means (J, d), weights (J,))."""
    logits = beta * means @ coef
    return means + beta * std**2 * coef, torch.softmax(logits, 0)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits as (1797, 64) float32 pixel intensities 0..16 and their digits (1797,), shipped with
    sklearn (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.data.astype(np.float32)), torch.from_numpy(digits.target.astype(np.int64))


def _builtin(cfg: DataConfig, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    labelled, classes = None, 0
    if cfg.source == "swiss_roll":
        classes = cfg.classes
        points, labels = swiss_roll_labelled(cfg.n_samples, seed, classes)
        fresh = _fresh_swiss_roll
        labelled = lambda n, g: swiss_roll_labelled(n, _numpy_seed(g), classes)  # noqa: E731
    elif cfg.source == "digits":
        (points, labels), fresh, classes = _digits(), None, 10
    elif cfg.source == "gaussian":
        fresh = _gaussian_sampler(cfg.mean, cfg.std)
        points, labels = fresh(cfg.n_samples, generator), None
    else:
        labelled = (gmm1d_labelled if cfg.source == "gmm1d"
                    else gmm_labelled_sampler(gmm_means(cfg.components, cfg.dim, seed), cfg.std))
        classes = 2 if cfg.source == "gmm1d" else cfg.components
        fresh = lambda n, g: labelled(n, g)[0]  # noqa: E731
        points, labels = labelled(cfg.n_samples, generator)
    dataset = Dataset(points, default_columns(points.shape[1]), cfg.source, fresh)
    if cfg.condition is None:
        return dataset
    return _conditioned(dataset, labels, tuple(range(classes)), labelled)


def _conditioned(dataset: Dataset, labels: torch.Tensor, values: tuple, labelled) -> Dataset:
    """The dataset with condition labels; every condition must have at least 2 points."""
    counts = torch.bincount(labels, minlength=len(values))
    if int(counts.min()) < 2:
        empty = values[int(counts.argmin())]
        raise DistqError(f"data.condition: condition {empty!r} has {int(counts.min())} of the {dataset.n} points; "
                         "each needs at least 2 (more data, or fewer data.classes)")
    return dataclasses.replace(dataset, labels=labels, condition_values=values, fresh_labelled=labelled)


def check_distinct(dataset: Dataset, k: int) -> None:
    """DistqError naming the data if they have fewer than 2 (k + 1) distinct rows: the evaluation's kNN KL (eval.k =
    k) needs k + 1 distinct points in each of two disjoint halves for its floor. Counts the first 4096 rows first
    (enough for almost any data), all rows only if those fall short."""
    needed, points = 2 * (k + 1), dataset.points
    if torch.unique(points[:4096], dim=0).shape[0] >= needed:
        return
    distinct = torch.unique(points, dim=0).shape[0]
    if distinct < needed:
        where = f"data file '{dataset.name}' (data.path)" if dataset.fresh is None else f"data.source {dataset.name}"
        raise DistqError(f"{where}: has {distinct} distinct rows of {dataset.n}; the evaluation's kNN KL (eval.k = {k}) "
                         f"needs at least {needed} (k + 1 in each of two disjoint halves)")


def _from_file(cfg: DataConfig) -> Dataset:
    points, names, conditions = read_data_file(cfg)
    dataset = Dataset(points, names, str(cfg.path), None)
    return dataset if conditions is None else _conditioned(dataset, *conditions, None)


def load_dataset(cfg: DataConfig, seed: int, standardization: Optional[Standardization] = None) -> Dataset:
    """The training data named by `data.source`, built-in draws deterministic given `seed`, standardised in place by
    `standardization` (a checkpoint's) or, if None, by the map fitted to them when data.standardize is on."""
    dataset = _from_file(cfg) if cfg.source == "file" else _builtin(cfg, seed)
    if standardization is None:
        standardization = fitted(dataset.points) if cfg.standardized else identity(dataset.dim)
    return standardized(dataset, standardization)


def standardized(dataset: Dataset, standardization: Standardization) -> Dataset:
    """The dataset in the model's coordinates: its points mapped in place, fresh draws mapped as they are drawn."""
    if standardization.identity:
        return dataclasses.replace(dataset, standardization=standardization)
    if standardization.mean.shape[0] != dataset.dim:
        raise DistqError(f"data: the run's standardisation has {standardization.mean.shape[0]} columns, the data "
                         f"{dataset.dim}")
    standardization.to_model_(dataset.points)
    fresh, labelled = dataset.fresh, dataset.fresh_labelled
    return dataclasses.replace(
        dataset, standardization=standardization,
        fresh=None if fresh is None else lambda n, g: standardization.to_model(fresh(n, g)),
        fresh_labelled=None if labelled is None else lambda n, g: _mapped(labelled(n, g), standardization))


def _mapped(drawn: tuple[torch.Tensor, torch.Tensor], standardization: Standardization):
    points, labels = drawn
    return standardization.to_model(points), labels
