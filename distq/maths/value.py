"""Value function J_phi(tau, y) for tau < T with the exact terminal condition J(T, y) = beta h(y) (E12),
and the TD errors of Algorithm 1 (E15).

J_phi = c(tau) + offset + scale * net(normalised inputs). c(tau) = int_tau^T (theta d / 2) log(2 pi theta / g^2) ds
is the part of J that every policy of the family (E10) shares (the expected r_hat - q per unit time does not
depend on the state beyond the squared mean error), so the network only learns the state-dependent rest;
offset = beta E[h(data)] and scale = 1 + beta std[h(data)] put the output at the reward's scale.

With model.value_prior = posterior_reward, J_phi also has the known part beta h(E[X_0 | X_t = y]) (RewardPrior:
the reward at the ratio estimator's denoised state), so the network learns only the rest (offset 0 then).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from distq.maths.policy import Preconditioner, TimeEmbedding, mlp, one_hot
from distq.maths.ratio import posterior_means, smoothed_variance
from distq.maths.schedules import Schedule

_BASELINE_NODES = 1025


class RewardPrior(nn.Module):
    """beta h(x0_hat(tau, y)), x0_hat = E[X_0 | X_t = y] at t = T - tau under the law the ratio estimator (E13)
    targets: the N data points, smoothed by N(0, h^2 I) if ratio.bandwidth h > 0 (then x0_hat -> y as t -> 0, the
    terminal condition (E12)). It is the first-order part of the optimal value
    J* = log E[exp(beta h(X_0)) | X_t = y] (E8-E9; exact in y for Gaussian data and linear h), so grad J starts at
    the reward's direction instead of zero, which the critic would otherwise learn from terminal rewards alone.
    Costs O(M N d) per M states (all N points); the data are not saved with the network."""

    def __init__(self, data: torch.Tensor, preconditioner: Preconditioner, beta: float,
                 reward: Callable[..., torch.Tensor], labels: Optional[torch.Tensor] = None):
        super().__init__()
        self.schedule, self.T, self.bandwidth = preconditioner.schedule, preconditioner.T, preconditioner.bandwidth
        self.beta, self.reward = beta, reward
        self.register_buffer("data", data.float().clone(), persistent=False)
        self.register_buffer("labels", None if labels is None else labels.clone(), persistent=False)

    def denoised(self, tau: torch.Tensor, y: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x0_hat: tau broadcastable to y.shape[:-1], y (..., B, d), condition (B,) indices -> (..., B, d)."""
        shape = y.shape[:-1]
        t = (self.T - tau).expand(shape).reshape(-1, 1)
        mu = self.schedule.mu(t)
        variance = smoothed_variance(mu, self.schedule.sigma2(t), self.bandwidth)
        flat = y.reshape(-1, y.shape[-1])
        conditions = None if condition is None else condition.expand(shape).reshape(-1)
        nearest = posterior_means(flat, self.data, mu.squeeze(1), variance.squeeze(1), self.labels, conditions)
        # the smoothing noise's own posterior mean, (mu h^2 / variance) (y - mu x0_bar), added to the points' mean
        return (nearest + (mu * self.bandwidth**2 / variance) * (flat - mu * nearest)).view(y.shape)

    def forward(self, tau: torch.Tensor, y: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """beta h(x0_hat): (..., B)."""
        x0 = self.denoised(tau, y, condition)
        flat = x0.reshape(-1, x0.shape[-1])
        if condition is None:
            return self.beta * self.reward(flat).view(x0.shape[:-1])
        return self.beta * self.reward(flat, condition.expand(x0.shape[:-1]).reshape(-1)).view(x0.shape[:-1])


class ValueNet(nn.Module):
    """J_phi(tau, y) for tau in [0, T); tau broadcastable to y.shape[:-1], y: (..., d) -> (...)."""

    def __init__(self, dim: int, hidden: int, preconditioner: Preconditioner, temperature: float,
                 offset: float = 0.0, scale: float = 1.0, classes: int = 0, time_frequencies: int = 0,
                 prior: Optional[RewardPrior] = None):
        super().__init__()
        self.prior = prior
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

    def fixed_part(self, tau: torch.Tensor, y: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The part of J_phi without parameters: c(tau) + offset (+ the reward prior), (...)."""
        fixed = self.baseline(tau) + self.offset
        return fixed if self.prior is None else fixed + self.prior(tau, y, condition)

    def forward(self, tau: torch.Tensor, y: torch.Tensor, condition: Optional[torch.Tensor] = None,
                fixed_part: Optional[torch.Tensor] = None) -> torch.Tensor:
        """condition: (B,) condition indices (conditional networks only); fixed_part: self.fixed_part(tau, y,
        condition) if already computed (a target network's copy shares it: no parameters)."""
        code = one_hot(condition, self.classes)
        out = self.net(self.pre.features(self.pre.coefficients(tau), y, self.time, code)).squeeze(-1)
        return (self.fixed_part(tau, y, condition) if fixed_part is None else fixed_part) + self.scale * out


def entropy_baseline_table(schedule: Schedule, T: float, temperature: float, dim: int) -> torch.Tensor:
    """c(tau) on `_BASELINE_NODES` uniform tau nodes in [0, T] (cumulative trapezoid, float64) -> (nodes,) float32."""
    tau = torch.linspace(0, T, _BASELINE_NODES, dtype=torch.float64)
    rate = 0.5 * temperature * dim * torch.log(2 * math.pi * temperature / schedule.g2(T - tau))
    segments = 0.5 * (rate[1:] + rate[:-1]) * (tau[1:] - tau[:-1])
    tail = torch.cat([segments.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    return tail.float()


def td_errors(values: torch.Tensor, terminal_values: torch.Tensor, running_rewards: torch.Tensor,
              q_values: torch.Tensor, dt, next_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """delta_k = J(tau_{k+1}, Y_{k+1}) - J_phi(tau_k, Y_k) + (r_hat_k - q_psi(tau_k, Y_k, a_k)) dt_k (E15).

    values: J_phi at (tau_k, Y_k), (K, B); terminal_values: beta h(Y_K), (B,); running_rewards, q_values: (K, B);
    dt: the step lengths (K, 1) (or one float); next_values: J(tau_{k+1}, Y_{k+1}) for k < K - 1, (K - 1, B), e.g.
    from a target network (default: values[1:]). The next-state values are detached (semi-gradient, E16).
    Returns (K, B).
    """
    successors = values[1:] if next_values is None else next_values
    successors = torch.cat([successors.detach(), terminal_values.unsqueeze(0)], 0)
    return successors - values + (running_rewards - q_values) * dt
