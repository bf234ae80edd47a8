"""One step of the controlled reverse process for each sampler (E5 and section 8).

Every step maps (Y_k, a_k) to Y_{k+1} on a TimeGrid; the action a_k stands where the score would.
y, action, noise: (B, d); grid constants are scalars of step k.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from distq.maths.schedules import TimeGrid

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


def _half_log_snr(mu: float, sigma2: float) -> float:
    """lambda_t = log(mu_t / sigma_t)."""
    return math.log(mu) - 0.5 * math.log(sigma2)


def dpmpp_2m_step(grid: TimeGrid, k: int, y: torch.Tensor, action: torch.Tensor,
                  previous_x0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, second order): the exact integral of the probability-flow ODE's
    linear part in lambda = log(mu_t / sigma_t), with the data prediction x0_hat = (Y + sigma_t^2 a) / mu_t taken
    linear in lambda through this step's and the previous step's x0_hat:
    Y_{k+1} = (sigma_{k+1} / sigma_k) Y - mu_{k+1} (e^{-h} - 1) D, h = lambda_{k+1} - lambda_k,
    D = (1 + 1 / (2 r)) x0_hat_k - x0_hat_{k-1} / (2 r), r = h_{k-1} / h. With D = x0_hat_k (the first step, and the
    last, into t = 0 where lambda is infinite: it returns x0_hat) it is ddim exactly. One action per step, as ddim,
    but it needs the previous step's x0_hat, so for generation only. -> (Y_{k+1}, x0_hat_k to pass on)."""
    mu, sigma2 = float(grid.mu[k]), float(grid.sigma2[k])
    mu_next, sigma2_next = float(grid.mu_next[k]), float(grid.sigma2_next[k])
    x0_hat = (y + action * sigma2) / mu
    if sigma2_next == 0:
        return x0_hat, x0_hat
    lam = _half_log_snr(mu, sigma2)
    h = _half_log_snr(mu_next, sigma2_next) - lam
    direction = x0_hat
    if previous_x0 is not None:
        r = (lam - _half_log_snr(float(grid.mu[k - 1]), float(grid.sigma2[k - 1]))) / h
        direction = x0_hat * (1 + 0.5 / r) - previous_x0 * (0.5 / r)
    return y * (sigma2_next / sigma2) ** 0.5 - direction * (mu_next * math.expm1(-h)), x0_hat


SAMPLERS: dict[str, Step] = {"sde": sde_step, "ode_euler": ode_euler_step, "ddim": ddim_step}


def reverse_process(grid: TimeGrid, sampler: str, y: torch.Tensor, action: Callable[[int, torch.Tensor], torch.Tensor],
                    noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Y_K from Y_0 = y (B, d) over the grid's K steps with `sampler` (SAMPLERS, heun or dpmpp_2m), the action at
    step k being action(k, Y_k) (B, d); noise() draws the Brownian increments (B, d) of stochastic samplers, step by
    step after the action."""
    previous_x0 = None
    for k in range(grid.num_steps):
        a = action(k, y)
        if sampler == "heun":
            y = heun_step(grid, k, y, a, lambda predicted, k=k: action(k + 1, predicted))
        elif sampler == "dpmpp_2m":
            y, previous_x0 = dpmpp_2m_step(grid, k, y, a, previous_x0)
        else:
            y = SAMPLERS[sampler](grid, k, y, a, noise() if is_stochastic(sampler) else None)
    return y


def action_gains(grid: TimeGrid, sampler: str) -> torch.Tensor:
    """dY_{k+1} / da_k of each step (K,): the steps are affine in the action with a scalar gain (sde: g^2 dt)."""
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    step = SAMPLERS[sampler]
    return torch.tensor([float(step(grid, k, zero, one, zero) - step(grid, k, zero, zero, zero))
                         for k in range(grid.num_steps)])


def is_stochastic(sampler: str) -> bool:
    """Whether the sampler's step draws Brownian noise."""
    return sampler == "sde"
