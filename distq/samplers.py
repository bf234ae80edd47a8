"""One step of the controlled reverse process for each sampler (E5 and section 8).

Every step maps (Y_k, a_k) to Y_{k+1} on a TimeGrid; the action a_k stands where the score would.
y, action, noise: (B, d); grid constants are scalars of step k.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from distq.schedules import TimeGrid

Step = Callable[[TimeGrid, int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sde_step(grid: TimeGrid, k: int, y: torch.Tensor, action: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Euler-Maruyama (E5): Y + [f Y + g^2 a] dt + g sqrt(dt) xi; noise xi ~ N(0, I) is required."""
    f, g2, dt = float(grid.f[k]), float(grid.g2[k]), float(grid.dt[k])
    return (y * (1 + f * dt)).add_(action, alpha=g2 * dt).add_(noise, alpha=(g2 * dt) ** 0.5)


def ode_euler_step(grid: TimeGrid, k: int, y: torch.Tensor, action: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Euler on the controlled probability-flow ODE: Y + [f Y + (g^2 / 2) a] dt (section 8, paper (41))."""
    f, g2, dt = float(grid.f[k]), float(grid.g2[k]), float(grid.dt[k])
    return (y * (1 + f * dt)).add_(action, alpha=0.5 * g2 * dt)


def ddim_step(grid: TimeGrid, k: int, y: torch.Tensor, action: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) with x0_hat = (Y + sigma_t^2 a) / mu_t and eps_hat = -sigma_t a (section 8).

    Y_{k+1} = mu_{t_{k+1}} x0_hat + sigma_{t_{k+1}} eps_hat; the last step returns x0_hat itself.
    """
    mu, sigma2 = float(grid.mu[k]), float(grid.sigma2[k])
    mu_next, sigma_next = float(grid.mu_next[k]), float(grid.sigma2_next[k]) ** 0.5
    x0_hat = (y + action * sigma2) / mu
    return x0_hat * mu_next - action * (sigma2**0.5 * sigma_next)


def heun_step(grid: TimeGrid, k: int, y: torch.Tensor, action: torch.Tensor,
              action_at_next: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Heun (second order) on the controlled probability-flow ODE: the ode_euler step predicts Y' at t_{k+1}, then
    Y + (dt / 2) [v_k(Y) + v_{k+1}(Y')] with v_j(y) = f_j y + (g_j^2 / 2) a_j and a_{k+1} = action_at_next(Y').
    Two actions per step, so for generation only (a trajectory's actions are no longer one per step). The last
    step, into t = 0 where no score is defined, is the Euler step."""
    predicted = ode_euler_step(grid, k, y, action, None)
    if k + 1 == grid.num_steps:
        return predicted
    f, g2, dt = float(grid.f[k]), float(grid.g2[k]), float(grid.dt[k])
    f_next, g2_next = float(grid.f[k + 1]), float(grid.g2[k + 1])
    drift = (y * f).add_(action, alpha=0.5 * g2)
    drift_next = (predicted * f_next).add_(action_at_next(predicted), alpha=0.5 * g2_next)
    return y + (drift + drift_next) * (0.5 * dt)


SAMPLERS: dict[str, Step] = {"sde": sde_step, "ode_euler": ode_euler_step, "ddim": ddim_step}


def action_gains(grid: TimeGrid, sampler: str) -> torch.Tensor:
    """dY_{k+1} / da_k of each step (K,): the steps are affine in the action with a scalar gain (sde: g^2 dt)."""
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    step = SAMPLERS[sampler]
    return torch.tensor([float(step(grid, k, zero, one, zero) - step(grid, k, zero, zero, zero))
                         for k in range(grid.num_steps)])


def is_stochastic(sampler: str) -> bool:
    """Whether the sampler's step draws Brownian noise."""
    return sampler == "sde"
