"""Internal standardisation of the data (data.standardize): z = (x - m) / s per column, with the training data's
mean m and standard deviation s.

Why: the sampler's Euler step (E5) of the OU drift multiplies by 1 + dt where the exact flow has e^dt, so every
step loses about 2.6% (dt = 0.25) of the state's distance from the origin, and the score's pull back toward the data
is ~1 / (mu_t^2 s^2 + sigma_t^2): weak when s >> 1. Data far from the origin or widely spread therefore shrink
toward the origin even under the exact score (algorithm.md (E5); docs/data-and-rewards.md). On standardised data
neither happens, and training becomes affine-equivariant: a x + b (a diagonal, invertible) trains exactly as x does.
The tilt (E7) does not depend on the coordinates, so h(s z + m) in standardised coordinates is the same target.

The ratio estimator, networks and rollouts work on z; rewards see the user's x; samples, plots and files are in x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True, eq=False)
class Standardization:
    """The per-column affine map between the user's coordinates x and the model's z = (x - mean) / scale."""

    mean: torch.Tensor
    """(d,) float32 column means m of the training data (zeros: no standardisation)."""
    scale: torch.Tensor
    """(d,) float32 column standard deviations s (ones: none; 1 for a constant built-in column, e.g. digits' pixels)."""

    @property
    def identity(self) -> bool:
        return bool((self.mean == 0).all() and (self.scale == 1).all())

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """z = (x - m) / s for x: (..., d); x itself (no copy) for the identity."""
        return x if self.identity else (x - self.mean.to(x.device)) / self.scale.to(x.device)

    def to_user(self, z: torch.Tensor) -> torch.Tensor:
        """x = s z + m for z: (..., d); z itself for the identity."""
        return z if self.identity else torch.addcmul(self.mean.to(z.device), z, self.scale.to(z.device))

    def to_model_(self, points: torch.Tensor) -> torch.Tensor:
        """The (N, d) float32 points standardised in place (no second copy of a large data set); returns them."""
        if not self.identity:
            for start in range(0, points.shape[0], _CHUNK_ROWS):
                points[start:start + _CHUNK_ROWS].sub_(self.mean).div_(self.scale)
        return points

    def state(self) -> Optional[dict[str, list[float]]]:
        """What a checkpoint stores (None for the identity)."""
        return None if self.identity else {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    def same_as(self, other: "Standardization") -> bool:
        return self.mean.shape == other.mean.shape and bool(
            torch.allclose(self.mean, other.mean, rtol=1e-5, atol=1e-6)
            and torch.allclose(self.scale, other.scale, rtol=1e-5, atol=1e-6))


def identity(dim: int) -> Standardization:
    return Standardization(torch.zeros(dim), torch.ones(dim))


def from_state(state: Optional[dict[str, Any]], dim: int) -> Standardization:
    """The map a checkpoint stored; a checkpoint without one (None, or from before data.standardize) is the identity."""
    if not state:
        return identity(dim)
    return Standardization(torch.tensor(state["mean"], dtype=torch.float32),
                           torch.tensor(state["scale"], dtype=torch.float32))


def stored(payload: dict[str, Any]) -> Standardization:
    """The standardisation a checkpoint's run was trained with (the identity for runs from before data.standardize)."""
    return from_state(payload.get("standardization"), len(payload["columns"]))


def column_statistics(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means and standard deviations (population, ddof 0) of points (N, d), both (d,) float64, accumulated in
    float64 over row chunks (no float64 copy of the whole array)."""
    mean = points.sum(0, dtype=torch.float64) / points.shape[0]
    squares = torch.zeros_like(mean)
    for start in range(0, points.shape[0], _CHUNK_ROWS):
        squares += (points[start:start + _CHUNK_ROWS].double() - mean).square().sum(0)
    return mean, (squares / points.shape[0]).sqrt()


def fitted(points: torch.Tensor) -> Standardization:
    """The standardisation of the training points (N, d); a constant column keeps scale 1 (it is only centred)."""
    mean, std = column_statistics(points)
    return Standardization(mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float())


class InUserCoordinates:
    """A reward h(x) in the user's coordinates, called on model coordinates z: h(s z + m) (with the conditions, if
    given). Attributes of the wrapped reward (its name, ...) stay reachable."""

    def __init__(self, reward, standardization: Standardization):
        self.reward, self.standardization = reward, standardization

    def __call__(self, z: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.standardization.to_user(z)
        return self.reward(x) if conditions is None else self.reward(x, conditions)

    def __getattr__(self, name: str):
        if name == "reward":  # not yet set (while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.reward, name)
