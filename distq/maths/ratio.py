"""Ratio estimator of the score from data samples (E13) and the running reward it defines (E14).

With data x0_1..x0_N, grad log p_t(x) = (-x + mu_t E[X_0 | X_t = x]) / sigma_t^2 and the posterior mean is a
weighted average of the data with weights w_i(x) proportional to N(x; mu_t x0_i, sigma_t^2 I).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from distq.setup.config import RatioConfig


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


def posterior_means(x: torch.Tensor, data: torch.Tensor, mu: torch.Tensor, sigma2: torch.Tensor,
                    labels: Optional[torch.Tensor] = None, conditions: Optional[torch.Tensor] = None,
                    chunk_elements: int = 1 << 24) -> torch.Tensor:
    """E[X_0 | X_t = x] = sum_i w_i(x) x0_i of (E13), each query at its own time: x (M, d), mu, sigma2 (M,) -> (M, d).

    labels (N,) and conditions (M,): only the data points of a query's own condition enter its weights (a conditional
    run). Differentiable in x; computed in row chunks of at most chunk_elements weights.
    """
    rows = max(1, chunk_elements // data.shape[0])
    data_sq = data.pow(2).sum(-1)
    means = []
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        scale = (mu[part] / sigma2[part]).unsqueeze(1)
        logits = scale * (x[part] @ data.T) - 0.5 * scale * mu[part].unsqueeze(1) * data_sq
        if labels is not None:
            logits = logits.masked_fill(conditions[part].unsqueeze(1) != labels, -math.inf)
        means.append(torch.softmax(logits, dim=-1) @ data)
    return torch.cat(means) if means else x.new_zeros(x.shape)


def smoothed_variance(mu: float, sigma2: float, bandwidth: float) -> float:
    """Kernel variance sigma_t^2 + mu_t^2 h^2 of (E13) for the data smoothed by N(0, h^2 I): then (E13) is the exact
    score of the forward marginal of that kernel density estimate, and h floors the kernels' width at small t,
    where the plain estimator collapses onto the N training points (algorithm.md section 13)."""
    return sigma2 + mu * mu * bandwidth * bandwidth


def tilted_ratio_score(x: torch.Tensor, data: torch.Tensor, mu: float, sigma2: float,
                       log_weights: torch.Tensor) -> torch.Tensor:
    """(E13) for the reweighted empirical law sum_i pi_i delta_{x0_i}, log pi_i = log_weights (N,) up to a constant;
    x: (B, d), data: (N, d) -> (B, d). With log_weights = beta h(x0_i) it is the exact score of the data's tilt (E7),
    the action of a perfect learner of Algorithm 1 (its value gradient included), a floor for any learned policy."""
    logits = torch.addmm((data.pow(2).sum(-1).mul(-0.5 * mu * mu / sigma2) + log_weights).unsqueeze(0), x, data.T,
                         alpha=mu / sigma2)
    return torch.addmm(x, torch.softmax(logits, dim=-1), data, beta=-1.0, alpha=mu).div_(sigma2)


def running_reward(score: torch.Tensor, action: torch.Tensor, g2) -> torch.Tensor:
    """r_hat = -(g^2 / 2) |s_hat - a|^2 (E14, paper (19)); score, action: (..., d) -> (...); g2 a float or
    a tensor broadcastable to (...)."""
    return (score - action).pow(2).sum(-1).mul(-0.5 * g2)


def knn_ratio_score(x: torch.Tensor, data: torch.Tensor, mu: float, sigma2: float, k: int,
                    data_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E13) with the weights restricted to the k data points nearest to x / mu_t (the k largest kernels) and
    renormalised over them; x: (B, d), data: (N, d) -> (B, d). Exact when k >= N; otherwise it drops the weight
    of the other N - k points, a bias that is small once they carry little mass (small t, or high d)."""
    if data_sq is None:
        data_sq = data.pow(2).sum(-1)
    if k >= data.shape[0]:
        return ratio_score(x, data, mu, sigma2, 0.0, data_sq)
    logits = torch.addmm(data_sq.mul(-0.5 * mu * mu / sigma2).unsqueeze(0), x, data.T, alpha=mu / sigma2)
    top, index = logits.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    posterior = torch.einsum("bk,bkd->bd", weights, data[index])
    return (posterior * mu - x) / sigma2


AUTO_EXACT_MAX_N = 4096
"""auto: up to this many data points the exact estimator is cheap enough (B N d per step)."""
AUTO_EXACT_MIN_DIM = 16
"""auto: from this dimension on exact at any N: a minibatch's running reward is badly biased at small t there
(benchmarks/ratio.json: -1.2 relative at m = 1024, t = 0.1, d = 16), and knn, as accurate, costs more than exact."""
DEFAULT_MINIBATCH = 1024


def choose_method(method: str, n: int, dim: int, minibatch: Optional[int]) -> str:
    """The ratio.method rule for `auto` (see config.RatioConfig); other methods are returned as given.

    Measured (scripts/bench.py ratio): minibatch (m = 1024) is 8-20x cheaper than exact at N = 10,000 with small bias in low d;
    knn is exact's cost plus a top-k (no cheaper on CPU) and accurate only once k covers the kernel's mass (high
    d or small t), so auto never picks it."""
    if method != "auto":
        return method
    if minibatch is not None:
        return "minibatch"
    return "exact" if n <= AUTO_EXACT_MAX_N or dim >= AUTO_EXACT_MIN_DIM else "minibatch"


def distinct_rows(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """m distinct row indices drawn uniformly from range(n) (a uniform random m-subset), (m,), in O(m log m) whatever
    n: a permutation of all n rows per step made a minibatch cost O(N). For m > n / 4 a permutation is O(m) anyway;
    below, draws with replacement are deduplicated and topped up (expected duplicates m^2 / 2n < m / 8)."""
    if 4 * m > n:
        return torch.randperm(n, generator=generator)[:m]
    rows = torch.randint(n, (m,), generator=generator)
    while True:
        rows = torch.unique(rows)
        if rows.shape[0] == m:
            return rows
        rows = torch.cat([rows, torch.randint(n, (m - rows.shape[0],), generator=generator)])


class RatioEstimator:
    """(E13) over a fixed data set, with all N points, random data minibatches of size `minibatch` per call, or
    each query's `knn` nearest points; of the data smoothed by N(0, bandwidth^2 I) if bandwidth > 0."""

    def __init__(self, data: torch.Tensor, eps: float = 0.0, minibatch: Optional[int] = None,
                 knn: Optional[int] = None, bandwidth: float = 0.0):
        self.data = data
        self.data_sq = data.pow(2).sum(-1)
        self.eps, self.bandwidth = eps, bandwidth
        self.minibatch = minibatch if minibatch is not None and minibatch < data.shape[0] else None
        self.knn = knn if knn is not None and knn < data.shape[0] else None

    @classmethod
    def from_config(cls, data: torch.Tensor, config: "RatioConfig") -> "RatioEstimator":
        """The estimator of a RatioConfig (`ratio.method` resolved by choose_method)."""
        method = choose_method(config.method, data.shape[0], data.shape[1], config.minibatch)
        return cls(data, config.eps, minibatch=(config.minibatch or DEFAULT_MINIBATCH) if method == "minibatch"
                   else None, knn=config.knn if method == "knn" else None, bandwidth=config.bandwidth)

    def restricted(self, rows: torch.Tensor) -> "RatioEstimator":
        """The same estimator (method, eps, bandwidth) over the data rows `rows` only (one condition's data); a
        minibatch or knn size that covers those rows makes it exact there."""
        return RatioEstimator(self.data[rows], self.eps, self.minibatch, self.knn, self.bandwidth)

    def per_condition(self, labels: torch.Tensor, classes: int) -> list["RatioEstimator"]:
        """One restricted estimator per condition 0..C-1 (C = classes), over the rows whose label (N,) is that
        condition: the ratio score (E13) of a conditional run (Algorithm 2)."""
        return [self.restricted(labels == c) for c in range(classes)]

    def subset(self, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Indices of a fresh random minibatch (m,), or None when all data are used."""
        if self.minibatch is None:
            return None
        return distinct_rows(self.data.shape[0], self.minibatch, generator)

    def score(self, x: torch.Tensor, mu: float, sigma2: float, subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s_hat(t, x) for x: (B, d) using all data or the rows `subset`; -> (B, d)."""
        sigma2 = smoothed_variance(mu, sigma2, self.bandwidth)
        if subset is None:
            if self.knn is not None:
                return knn_ratio_score(x, self.data, mu, sigma2, self.knn, self.data_sq)
            return ratio_score(x, self.data, mu, sigma2, self.eps, self.data_sq)
        return ratio_score(x, self.data[subset], mu, sigma2, self.eps, self.data_sq[subset])
