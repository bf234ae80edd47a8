"""Ratio estimator of the score from data samples (E13) and the running reward it defines (E14).

With data x0_1..x0_N, grad log p_t(x) = (-x + mu_t E[X_0 | X_t = x]) / sigma_t^2 and the posterior mean is a
weighted average of the data with weights w_i(x) proportional to N(x; mu_t x0_i, sigma_t^2 I).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def ratio_weights(x: torch.Tensor, data: torch.Tensor, mu: float, sigma2: float, eps: float = 0.0,
                  data_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weights w_i(x) of (E13); x: (B, d) at forward time t, data: (N, d), scalars mu = mu_t, sigma2 = sigma_t^2.

    eps = 0: a softmax of the Gaussian log-densities (log-sum-exp, no guard needed).
    eps > 0: the paper's form p_i / max(sum_j p_j, N eps) with the normalised densities p_i.
    Returns (B, N); rows sum to 1 (or less, where the eps floor binds).
    """
    if data_sq is None:
        data_sq = data.pow(2).sum(-1)
    # -|x - mu x0|^2 / (2 sigma2) without the |x|^2 term, which is constant across i (one fused addmm).
    logits = torch.addmm(data_sq.mul(-0.5 * mu * mu / sigma2).unsqueeze(0), x, data.T, alpha=mu / sigma2)
    if eps == 0.0:
        return torch.softmax(logits, dim=-1)
    dim = x.shape[-1]
    log_density = logits - (0.5 / sigma2) * x.pow(2).sum(-1, keepdim=True) - 0.5 * dim * math.log(2 * math.pi * sigma2)
    log_norm = torch.logsumexp(log_density, dim=-1, keepdim=True).clamp_min(math.log(data.shape[0] * eps))
    return torch.exp(log_density - log_norm)


def ratio_score(x: torch.Tensor, data: torch.Tensor, mu: float, sigma2: float, eps: float = 0.0,
                data_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s_hat(t, x) = (-x + mu_t sum_i w_i(x) x0_i) / sigma_t^2 (E13, paper (18)); x: (B, d), data: (N, d) -> (B, d)."""
    weights = ratio_weights(x, data, mu, sigma2, eps, data_sq)
    return torch.addmm(x, weights, data, beta=-1.0, alpha=mu).div_(sigma2)


def running_reward(score: torch.Tensor, action: torch.Tensor, g2) -> torch.Tensor:
    """r_hat = -(g^2 / 2) |s_hat - a|^2 (E14, paper (19)); score, action: (..., d) -> (...); g2 a float or
    a tensor broadcastable to (...)."""
    return (score - action).pow(2).sum(-1).mul(-0.5 * g2)


class RatioEstimator:
    """(E13) over a fixed data set, with optional random data minibatches of size `minibatch` per call."""

    def __init__(self, data: torch.Tensor, eps: float = 0.0, minibatch: Optional[int] = None):
        self.data = data
        self.data_sq = data.pow(2).sum(-1)
        self.eps = eps
        self.minibatch = minibatch if minibatch is not None and minibatch < data.shape[0] else None

    def subset(self, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Indices of a fresh random minibatch (m,), or None when all data are used."""
        if self.minibatch is None:
            return None
        return torch.randperm(self.data.shape[0], generator=generator)[: self.minibatch]

    def score(self, x: torch.Tensor, mu: float, sigma2: float, subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s_hat(t, x) for x: (B, d) using all data or the rows `subset`; -> (B, d)."""
        if subset is None:
            return ratio_score(x, self.data, mu, sigma2, self.eps, self.data_sq)
        return ratio_score(x, self.data[subset], mu, sigma2, self.eps, self.data_sq[subset])
