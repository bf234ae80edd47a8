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
from typing import Optional

import torch
from torch import nn

from distq.maths.ratio import smoothed_variance
from distq.maths.schedules import Schedule

REFERENCE = "reference."
"""Prefix of a pretrained reference policy's entries among broadcast policy weights (distq.algorithms.learner)."""


class MLP(nn.Sequential):
    """Paper Table 1: Linear -> Tanh -> Linear -> ReLU -> Linear, computed with the Tanh folded into the weights.

    tanh(W1 x + b1) = 2 sigmoid(2 W1 x + 2 b1) - 1, and W2 (2 s - 1) + b2 = (2 W2) s + (b2 - W2 1), so the forward
    pass is addmm, sigmoid, addmm, relu, addmm on the batch: the same function and parameters (and state-dict
    keys) as the plain Sequential, without three elementwise passes forward and two backward over the hidden layer
    (torch's CPU sigmoid kernel is also several times faster than its tanh). The Tanh and ReLU modules only keep
    the paper's layer layout; forward does not call them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second, _, last = self
        hidden = torch.sigmoid(nn.functional.linear(x, first.weight * 2.0, first.bias * 2.0))
        hidden = torch.relu(nn.functional.linear(hidden, second.weight * 2.0, second.bias - second.weight.sum(1)))
        return nn.functional.linear(hidden, last.weight, last.bias)


def mlp(in_dim: int, hidden: int, out_dim: int, zero_last: bool) -> MLP:
    """Paper Table 1 network (see MLP)."""
    net = MLP(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
    if zero_last:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


class Preconditioner(nn.Module):
    """Per-time affine maps around the network: its input c_in (y - mu_t m) and the mean it implies.

    The mean is linear in the network output, mu_psi = out_y * y + out_net * net + out_shift, with
    out_y = (mu_t c_skip - 1) / sigma_t^2, out_net = mu_t c_out / sigma_t^2, out_shift = mu_t (1 - mu_t c_skip) m / sigma_t^2.
    The coefficients depend on tau only, so a rollout computes them once per grid step.
    """

    def __init__(self, schedule: Schedule, T: float, data_mean: torch.Tensor, data_scale: float, enabled: bool,
                 bandwidth: float = 0.0):
        """bandwidth h > 0 (ratio.bandwidth): sigma_t^2 + mu_t^2 h^2 stands for sigma_t^2, as in the score of the
        smoothed data that the ratio estimator then targets (distq.maths.ratio.smoothed_variance)."""
        super().__init__()
        self.schedule, self.T, self.enabled, self.bandwidth = schedule, T, enabled, bandwidth
        self.register_buffer("data_mean", data_mean.float().clone())
        self.register_buffer("data_scale", torch.tensor(float(data_scale)))

    def coefficients(self, tau: torch.Tensor) -> dict[str, torch.Tensor]:
        """tau: any shape (...) -> coefficients broadcastable against states (..., B?, d) as (..., 1) or (..., d)."""
        tau = tau.unsqueeze(-1)
        time = tau / self.T
        if not self.enabled:
            zero = torch.zeros_like(tau)
            return {"time": time, "in_scale": torch.ones_like(tau), "in_shift": zero, "out_y": zero,
                    "out_net": torch.ones_like(tau), "out_shift": zero}
        t = self.T - tau
        mu, s2, m = self.schedule.mu(t), self.data_scale.square(), self.data_mean
        sigma2 = smoothed_variance(mu, self.schedule.sigma2(t), self.bandwidth)
        var = mu.square() * s2 + sigma2
        c_in, c_skip, c_out = var.rsqrt(), mu * s2 / var, (s2 * sigma2 / var).sqrt()
        return {"time": time, "in_scale": c_in, "in_shift": -mu * c_in * m, "out_y": (mu * c_skip - 1) / sigma2,
                "out_net": mu * c_out / sigma2, "out_shift": mu * (1 - mu * c_skip) * m / sigma2}

    def features(self, coef: dict[str, torch.Tensor], y: torch.Tensor, embedding: "TimeEmbedding",
                 condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Network input (..., d + E [+ C]): the normalised state, the time embedding of tau / T, and the condition's
        one-hot code (condition: (B,) one-hot rows (B, C) broadcast over the leading dimensions of y (..., B, d))."""
        normalised = torch.addcmul(coef["in_shift"], y, coef["in_scale"])
        time = embedding(coef["time"])
        parts = [normalised, time.expand(*y.shape[:-1], time.shape[-1])]
        if condition is not None:
            parts.append(condition.expand(*y.shape[:-1], condition.shape[-1]))
        return torch.cat(parts, -1)


class TimeEmbedding(nn.Module):
    """tau / T (..., 1) -> (..., E): itself (E = 1, the paper), with sin and cos of F learned frequencies
    (E = 1 + 2F; initialised at pi, 2 pi, ..., F pi, a Fourier basis on [0, 1] the network then tunes)."""

    def __init__(self, frequencies: int = 0):
        super().__init__()
        self.size = 1 + 2 * frequencies
        self.frequencies = nn.Parameter(math.pi * torch.arange(1.0, frequencies + 1)) if frequencies else None

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        if self.frequencies is None:
            return time
        phase = time * self.frequencies
        return torch.cat([time, torch.sin(phase), torch.cos(phase)], -1)


class PolicyMean(nn.Module):
    """mu_psi(tau, y), the mean of the Gaussian policy (E10); tau broadcastable to y.shape[:-1], y: (..., d)."""

    def __init__(self, dim: int, hidden: int, preconditioner: Preconditioner, classes: int = 0,
                 time_frequencies: int = 0):
        """classes C > 0: conditional (Algorithm 2), the condition enters as a one-hot input. time_frequencies:
        of the network's own TimeEmbedding."""
        super().__init__()
        self.pre, self.classes, self.time = preconditioner, classes, TimeEmbedding(time_frequencies)
        self.net = mlp(dim + self.time.size + classes, hidden, dim, zero_last=preconditioner.enabled)

    def forward(self, tau: torch.Tensor, y: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """condition: (B,) condition indices of the B trajectories (conditional networks only)."""
        return self.mean(self.pre.coefficients(tau), y, one_hot(condition, self.classes))

    def mean(self, coef: dict[str, torch.Tensor], y: torch.Tensor, code: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mu_psi from precomputed Preconditioner.coefficients; y: (..., d), code: one-hot (B, C) -> (..., d)."""
        out = self.net(self.pre.features(coef, y, self.time, code))
        return torch.addcmul(coef["out_shift"], y, coef["out_y"]).addcmul_(out, coef["out_net"])


class StepMeans:
    """mu_psi at the grid steps of a rollout, with the preconditioner and the Tanh folded into the weights.

    The same function as PolicyMean.mean at tau_k (to float rounding) in half the kernel calls, which is most of a
    rollout step's cost at small batches: with x = c_in (y - mu_t m) and tanh(u) = 2 sigmoid(2u) - 1,
    layer 1 becomes (2 c_in W1_y) y + 2 (W1_y in_shift + W1_tau e(tau) + b1) (e the time embedding), layer 2
    takes sigmoid outputs with weights 2 W2 and bias b2 - W2 1, and the output map
    out_y y + out_shift + out_net (W3 h + b3) is one addmm plus out_y y. Built from the current weights (no autograd); rebuild after every update.
    """

    def __init__(self, policy: "PolicyMean", coef: dict[str, torch.Tensor], condition: Optional[torch.Tensor] = None):
        """coef: Preconditioner.coefficients of the K grid taus (K,) -> entries (K, 1) or (K, d); condition: (B,)
        indices of a conditional policy's trajectories (their one-hot inputs become a per-row bias of layer 1)."""
        first, _, second, _, last = policy.net
        dim = last.out_features
        embedding = policy.time(coef["time"])  # (K, E)
        inputs = dim + embedding.shape[-1]
        w1_state, w1_time = first.weight[:, :dim], first.weight[:, dim:inputs]
        code = one_hot(condition, policy.classes)
        self.condition_bias = None if code is None else 2 * code @ first.weight[:, inputs:].T  # (B, H)
        in_shift = coef["in_shift"].expand(-1, dim)
        self.weight1 = (2 * coef["in_scale"].unsqueeze(-1) * w1_state.T).contiguous()  # (K, d, H)
        self.bias1 = 2 * (in_shift @ w1_state.T + embedding @ w1_time.T + first.bias)  # (K, H)
        self.weight2 = (2 * second.weight.T).contiguous()  # (H, H)
        self.bias2 = second.bias - second.weight.sum(1)
        self.weight3 = (coef["out_net"].unsqueeze(-1) * last.weight.T).contiguous()  # (K, H, d)
        self.bias3 = coef["out_shift"].expand(-1, dim) + coef["out_net"] * last.bias  # (K, d)
        self.out_y = coef["out_y"].squeeze(-1).tolist()

    def __call__(self, k: int, y: torch.Tensor) -> torch.Tensor:
        """mu_psi(tau_k, y) for y (B, d) -> (B, d)."""
        bias = self.bias1[k] if self.condition_bias is None else self.condition_bias + self.bias1[k]
        hidden = torch.sigmoid_(torch.addmm(bias, y, self.weight1[k]))
        hidden = torch.relu_(torch.addmm(self.bias2, hidden, self.weight2))
        return torch.addmm(self.bias3[k], hidden, self.weight3[k]).add_(y, alpha=self.out_y[k])


def one_hot(condition: Optional[torch.Tensor], classes: int) -> Optional[torch.Tensor]:
    """(B,) condition indices -> (B, C) float one-hot rows; None for unconditional networks (classes = 0)."""
    if classes == 0:
        return None
    if condition is None:
        raise ValueError("a conditional network needs the trajectories' conditions")
    return torch.nn.functional.one_hot(condition, classes).float()


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


def rao_blackwell_surrogate(q: torch.Tensor, mean: torch.Tensor, target: torch.Tensor, advantage: torch.Tensor,
                            g2: torch.Tensor, dt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-step policy loss dt [(theta g^2 dt / 2)|target - mu_psi|^2 - A q_psi] whose psi-gradient has (to first
    order in dt) the expectation of the (E16) policy step -dt delta grad q_psi over the action noise.

    q: q_psi(tau_k, Y_k, a_k) (E11), mean: mu_psi(tau_k, Y_k), both with psi's graph; target: s_hat(t_k, Y_k) (E13)
    + (gain_k / (g^2 dt)) grad_y J(tau_{k+1}, Y'_{k+1}) (Y' the successor under the mean action, with the same
    Brownian noise; gain_k = dY_{k+1} / da_k, g^2 dt for sde; the reward term left out at the last step) and
    advantage: 0, or at the last step beta [h(Y_K) - h(Y'_K)]; both detached. q, advantage: (K, B); mean, target:
    (K, B, d); g2, dt broadcastable to (K, B). -> (K, B).

    With a = mu + xi, xi ~ N(0, theta / g^2 I), grad q = g^2 xi grad mu, and delta's running part
    (r_hat - q) dt = [-(g^2/2)|s - mu|^2 + g^2 (s - mu).xi + c] dt (the |xi|^2 terms cancel) averages to
    theta g^2 dt^2 (s - mu) grad mu. Its value part J(Y_{k+1}) - J(Y_k), less what does not depend on xi
    (J(Y'_{k+1}) - J(Y_k)), is gain_k xi.grad J(Y'_{k+1}) to first order, which averages to
    theta gain_k dt grad J grad mu. Together: minus the gradient of the regression of mu_psi on the target above,
    the optimal policy's mean (score plus value gradient) with no sampled xi and so no noise growing with d. At the
    last step h may be non-differentiable, and the sampled advantage stands in (still unbiased).
    """
    regression = 0.5 * temperature * g2 * dt * (target - mean).pow(2).sum(-1)
    return (regression - advantage * q) * dt


def policy_log_density(action: torch.Tensor, mean: torch.Tensor, g2: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi_psi(a | tau, y) = q_psi / theta (E10-E11); -> (...)."""
    return q_value(action, mean, g2, temperature) / temperature
