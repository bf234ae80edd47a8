"""Forward noising schedules (E1-E2) and the time grid of the reverse process.

Convention: `t` is forward (noising) time in [0, T]; generation time is tau = T - t.
Each schedule gives f(t), g(t)^2, mu_t = exp(-int_0^t f) and sigma_t^2 = int_0^t exp(-2 int_s^t f) g(s)^2 ds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distq.setup.config import SDEConfig


class Schedule:
    """f, g^2, mu_t, sigma_t^2 of the forward SDE (E1-E2) as functions of forward time t (tensor)."""

    def f(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mu(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OUSchedule(Schedule):
    """`ou`: f = 1, g = sqrt(2); mu_t = e^-t, sigma_t^2 = 1 - e^-2t (stationary law N(0, I))."""

    def f(self, t):
        return torch.ones_like(t)

    def g2(self, t):
        return torch.full_like(t, 2.0)

    def mu(self, t):
        return torch.exp(-t)

    def sigma2(self, t):
        return -torch.expm1(-2.0 * t)


class VESchedule(Schedule):
    """`ve`: f = 0, g = 1; mu_t = 1, sigma_t^2 = t."""

    def f(self, t):
        return torch.zeros_like(t)

    def g2(self, t):
        return torch.ones_like(t)

    def mu(self, t):
        return torch.ones_like(t)

    def sigma2(self, t):
        return t.clone()


class VPSchedule(Schedule):
    """`vp` (Song et al. 2021): beta(t) linear from beta_min at t = 0 to beta_max at t = T; f = beta / 2, g^2 = beta."""

    def __init__(self, beta_min: float, beta_max: float, T: float):
        self.beta_min, self.beta_max, self.T = beta_min, beta_max, T

    def _beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * t / self.T

    def _integral(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2 / self.T

    def f(self, t):
        return 0.5 * self._beta(t)

    def g2(self, t):
        return self._beta(t)

    def mu(self, t):
        return torch.exp(-0.5 * self._integral(t))

    def sigma2(self, t):
        return -torch.expm1(-self._integral(t))


def make_schedule(cfg: SDEConfig) -> Schedule:
    """The schedule named by `sde.schedule`."""
    if cfg.schedule == "ou":
        return OUSchedule()
    if cfg.schedule == "ve":
        return VESchedule()
    return VPSchedule(cfg.beta_min, cfg.beta_max, cfg.T)


@dataclass(frozen=True)
class TimeGrid:
    """Per-step constants of a grid of K steps, k = 0..K-1 (E5): all tensors (K,) float32.

    t_k is forward time (t_0 = T, t_K = 0), tau_k = T - t_k generation time, dt_k = t_k - t_{k+1} the step length
    (all equal, T / K, on the paper's uniform grid), and the schedule at t_k; `mu_next`, `sigma2_next` are at
    t_{k+1} (used by the ddim sampler; the last is mu_0 = 1, sigma_0^2 = 0).
    """

    T: float
    dt: torch.Tensor
    tau: torch.Tensor
    t: torch.Tensor
    f: torch.Tensor
    g2: torch.Tensor
    mu: torch.Tensor
    sigma2: torch.Tensor
    mu_next: torch.Tensor
    sigma2_next: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.tau.shape[0]


def grid_times(T: float, num_steps: int, power: float = 1.0) -> torch.Tensor:
    """Forward times t_k = T ((K - k) / K)^power, k = 0..K, float64 (K + 1,): power 1 is the paper's uniform grid;
    power > 1 takes shorter steps near t = 0, where the score changes fastest (the last noise level, T / K^power,
    acts as the bandwidth of the samples; algorithm.md section 13)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64)
    # T (K - k) / K rather than T - k dt, so that t_K is exactly 0 for any horizon
    return T * ((num_steps - steps) / num_steps) ** power


def time_grid(schedule: Schedule, T: float, num_steps: int, power: float = 1.0) -> TimeGrid:
    """The grid of `num_steps` steps over [0, T] at the times of grid_times; computed in float64, stored float32."""
    times = grid_times(T, num_steps, power)
    t, t_next = times[:-1], times[1:]
    values = dict(dt=t - t_next, tau=T - t, t=t, f=schedule.f(t), g2=schedule.g2(t), mu=schedule.mu(t),
                  sigma2=schedule.sigma2(t), mu_next=schedule.mu(t_next), sigma2_next=schedule.sigma2(t_next))
    return TimeGrid(T=T, **{k: v.float() for k, v in values.items()})


def prior_std(schedule: Schedule, T: float) -> float:
    """Standard deviation of the reverse process's start Y_0 ~ N(0, sigma_T^2 I) (E4)."""
    return math.sqrt(float(schedule.sigma2(torch.tensor(T, dtype=torch.float64))))
