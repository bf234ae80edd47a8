"""Gaussian policy (E10) and its q-function (E11), with the preconditioned policy-mean network.

Convention: networks take generation time tau (forward time t = T - tau) and a state y.
Preconditioning (algorithm.md section 13, `model.precondition: edm`): the mean is written through a denoiser,
mu_psi(tau, y) = (-y + mu_t x0_psi) / sigma_t^2 with
x0_psi = m + c_skip (y - mu_t m) + c_out net(c_in (y - mu_t m), tau / T),
var = mu_t^2 s^2 + sigma_t^2, c_in = 1 / sqrt(var), c_skip = mu_t s^2 / var, c_out = s sigma_t / sqrt(var),
where m (per coordinate) and s (scalar) are the data's mean and spread. With net = 0 this is the exact score of
N(m, s^2 I) data, so training starts from a sensible policy; the family (E10) is unchanged, only its coordinates.
`none` is the paper's plain network mu_psi = net(y, tau / T).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from distq.schedules import Schedule


def mlp(in_dim: int, hidden: int, out_dim: int, zero_last: bool) -> nn.Sequential:
    """Paper Table 1: Linear -> Tanh -> Linear -> ReLU -> Linear."""
    net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, out_dim))
    if zero_last:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


class Preconditioner(nn.Module):
    """Normalised network inputs shared by the policy and value networks."""

    def __init__(self, schedule: Schedule, T: float, data_mean: torch.Tensor, data_scale: float, enabled: bool):
        super().__init__()
        self.schedule, self.T, self.enabled = schedule, T, enabled
        self.register_buffer("data_mean", data_mean.float().clone())
        self.register_buffer("data_scale", torch.tensor(float(data_scale)))

    def forward(self, tau: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """tau broadcastable to y.shape[:-1], y: (..., d) -> features (..., d + 1) and mu, sigma2, var (..., 1)."""
        tau = tau.expand(y.shape[:-1]).unsqueeze(-1)
        t = self.T - tau
        mu, sigma2 = self.schedule.mu(t), self.schedule.sigma2(t)
        if not self.enabled:
            return {"features": torch.cat([y, tau / self.T], -1), "mu": mu, "sigma2": sigma2}
        centred = y - mu * self.data_mean
        var = mu.square() * self.data_scale.square() + sigma2
        features = torch.cat([centred * var.rsqrt(), tau / self.T], -1)
        return {"features": features, "mu": mu, "sigma2": sigma2, "var": var, "centred": centred}


class PolicyMean(nn.Module):
    """mu_psi(tau, y), the mean of the Gaussian policy (E10); tau broadcastable to y.shape[:-1], y: (..., d)."""

    def __init__(self, dim: int, hidden: int, preconditioner: Preconditioner):
        super().__init__()
        self.pre = preconditioner
        self.net = mlp(dim + 1, hidden, dim, zero_last=preconditioner.enabled)

    def forward(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inputs = self.pre(tau, y)
        out = self.net(inputs["features"])
        if not self.pre.enabled:
            return out
        mu, sigma2, var, s = inputs["mu"], inputs["sigma2"], inputs["var"], self.pre.data_scale
        x0 = self.pre.data_mean + (mu * s.square() / var) * inputs["centred"] + (s * (sigma2 / var).sqrt()) * out
        return (mu * x0 - y) / sigma2


def action_std(g2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Standard deviation sqrt(theta / g^2) of each action coordinate (E10)."""
    return (temperature / g2).sqrt()


def q_value(action: torch.Tensor, mean: torch.Tensor, g2: torch.Tensor, temperature: float) -> torch.Tensor:
    """q_psi = -(g^2/2)|a - mu_psi|^2 - (theta d / 2) log(2 pi theta / g^2) (E11); action, mean: (..., d) -> (...).

    g2 broadcastable to the output. exp(q / theta) is the policy density, so it integrates to 1 over a.
    """
    dim = action.shape[-1]
    return -0.5 * g2 * (action - mean).pow(2).sum(-1) - 0.5 * temperature * dim * torch.log(
        2 * math.pi * temperature / g2)


def policy_log_density(action: torch.Tensor, mean: torch.Tensor, g2: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi_psi(a | tau, y) = q_psi / theta (E10-E11); -> (...)."""
    return q_value(action, mean, g2, temperature) / temperature
