"""Value function J_phi(tau, y) for tau < T with the exact terminal condition J(T, y) = beta h(y) (E12),
and the TD errors of Algorithm 1 (E15).

J_phi = c(tau) + offset + scale * net(normalised inputs). c(tau) = int_tau^T (theta d / 2) log(2 pi theta / g^2) ds
is the part of J that every policy of the family (E10) shares (the expected r_hat - q per unit time does not
depend on the state beyond the squared mean error), so the network only learns the state-dependent rest;
offset = beta E[h(data)] and scale = 1 + beta std[h(data)] put the output at the reward's scale.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from distq.policy import Preconditioner, TimeEmbedding, mlp, one_hot
from distq.schedules import Schedule

_BASELINE_NODES = 1025


class ValueNet(nn.Module):
    """J_phi(tau, y) for tau in [0, T); tau broadcastable to y.shape[:-1], y: (..., d) -> (...)."""

    def __init__(self, dim: int, hidden: int, preconditioner: Preconditioner, temperature: float,
                 offset: float = 0.0, scale: float = 1.0, classes: int = 0, time_frequencies: int = 0):
        super().__init__()
        self.pre, self.classes, self.time = preconditioner, classes, TimeEmbedding(time_frequencies)
        self.net = mlp(dim + self.time.size + classes, hidden, 1, zero_last=True)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("baseline_table", entropy_baseline_table(preconditioner.schedule, preconditioner.T,
                                                                      temperature, dim))

    def baseline(self, tau: torch.Tensor) -> torch.Tensor:
        """c(tau) by linear interpolation of a fine table (exact for schedules with constant g)."""
        position = (tau / self.pre.T).clamp(0, 1) * (_BASELINE_NODES - 1)
        lower = position.floor().long().clamp_max(_BASELINE_NODES - 2)
        frac = position - lower
        return self.baseline_table[lower] * (1 - frac) + self.baseline_table[lower + 1] * frac

    def forward(self, tau: torch.Tensor, y: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """condition: (B,) condition indices (conditional networks only)."""
        code = one_hot(condition, self.classes)
        out = self.net(self.pre.features(self.pre.coefficients(tau), y, self.time, code)).squeeze(-1)
        return self.baseline(tau) + self.offset + self.scale * out


def entropy_baseline_table(schedule: Schedule, T: float, temperature: float, dim: int) -> torch.Tensor:
    """c(tau) on `_BASELINE_NODES` uniform tau nodes in [0, T] (cumulative trapezoid, float64) -> (nodes,) float32."""
    tau = torch.linspace(0, T, _BASELINE_NODES, dtype=torch.float64)
    rate = 0.5 * temperature * dim * torch.log(2 * math.pi * temperature / schedule.g2(T - tau))
    segments = 0.5 * (rate[1:] + rate[:-1]) * (tau[1:] - tau[:-1])
    tail = torch.cat([segments.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    return tail.float()


def td_errors(values: torch.Tensor, terminal_values: torch.Tensor, running_rewards: torch.Tensor,
              q_values: torch.Tensor, dt) -> torch.Tensor:
    """delta_k = J(tau_{k+1}, Y_{k+1}) - J_phi(tau_k, Y_k) + (r_hat_k - q_psi(tau_k, Y_k, a_k)) dt_k (E15).

    values: J_phi at (tau_k, Y_k), (K, B); terminal_values: beta h(Y_K), (B,); running_rewards, q_values: (K, B);
    dt: the step lengths (K, 1) (or one float). The next-state values are detached (semi-gradient, E16). Returns (K, B).
    """
    next_values = torch.cat([values[1:].detach(), terminal_values.unsqueeze(0)], 0)
    return next_values - values + (running_rewards - q_values) * dt
