"""Denoising score matching (train.algorithm = dsm): the plain pretrainer distq's q-learning is compared with.

The policy mean mu_psi(tau, y) (E10), with the same network and preconditioning, regresses the conditional score
of forward-noised training data (Vincent 2011): for x0 from the data and each step t_k of the run's grid,
Y_k = mu_k x0 + sigma_k xi (E1-E2) with target grad log p_t(Y_k | x0) = -xi / sigma_k, whose regression function is
the score of p_t. Step k is weighted by sigma_k^2 (Song et al. 2021) so every step's residual is O(1):
L = 1/2 sum_k sigma_k^2 |mu_psi(tau_k, Y_k) - target_k|^2, averaged over the batch. No reward, no ratio estimator and
no reverse-process rollout: a dsm run is a pretrained model for --init, like a beta = 0 q-learning run, made the
usual way.

With train.beta > 0 (weighted dsm, reward-weighted regression) the rows are drawn with the self-normalised weights
w_i = exp(beta h(x0_i)) / sum_j exp(beta h(x0_j)) instead of uniformly: the regression function is then the score of
the forward-noised tilt (E7) of the empirical law, the action of Algorithm 1's perfect learner
(distq.maths.ratio.tilted_ratio_score), learned without RL. Rows are drawn by weight, with replacement, rather than
uniformly with the loss weighted by N w_i: uniform rows spend the batch on points of little weight, and the batch
gradient's variance grew by about N / ESS with loss weights (measured on the Swiss roll, rectangle reward, B = 300:
1.1x / 1.6x / 2.1x at beta = 1 / 2.25 / 4); drawn rows also keep the loss at plain dsm's scale for Adam.

With ratio.bandwidth h > 0 dsm learns the law the ratio estimator and the perfect learner use, the data smoothed by
N(0, h^2 I): Y_k = mu_k x0 + s_k xi with s_k^2 = sigma_k^2 + mu_k^2 h^2 (distq.maths.ratio.smoothed_variance) and target
-xi / s_k, the conditional score given the point x0 (rather than given a smoothed draw x0 + h eta: the same regression
function, less variance). Weighted dsm's optimum is then the perfect learner's action at any bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distq.algorithms.batch import Trajectories
from distq.algorithms.learner import POLICY, Learner, terminal_means, terminal_sums
from distq.errors import DistqError
from distq.maths.ratio import smoothed_variance


def noised_data(x0: torch.Tensor, mu: torch.Tensor, sigma2: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-noised copies of data x0 (B, d) at K times (E1-E2): states mu_k x0 + sigma_k xi (K, B, d) and their
    conditional scores -xi / sigma_k (K, B, d); mu, sigma2: (K,) (sigma2 the smoothed variance with a bandwidth),
    noise xi: (K, B, d)."""
    sigma = sigma2.sqrt().view(-1, 1, 1)
    return torch.addcmul(mu.view(-1, 1, 1) * x0, sigma, noise), -noise / sigma


def denoising_loss(means: torch.Tensor, targets: torch.Tensor, sigma2: torch.Tensor, total: int) -> torch.Tensor:
    """1/2 sum_k sigma_k^2 |mu_psi - target|^2, summed over the B rows and divided by `total` (B for the batch mean, a
    data-parallel replica's share of it otherwise); means, targets (K, B, d), sigma2 (K,)."""
    return 0.5 * (sigma2.view(-1, 1) * (means - targets).pow(2).sum(-1)).sum() / total


def group_max(values: torch.Tensor, groups: torch.Tensor, classes: int) -> torch.Tensor:
    """Each row's group maximum: values, groups (N,) with groups in 0..classes-1 -> (N,)."""
    return values.new_full((classes,), -torch.inf).scatter_reduce(0, groups, values, "amax")[groups]


def tilt_weights(log_tilt: torch.Tensor, groups: torch.Tensor, classes: int) -> torch.Tensor:
    """Self-normalised weights of the tilt (E7) of the empirical law, within each group (condition) of the data:
    w_i = exp(l_i) / sum_{j: g_j = g_i} exp(l_j) with log-weights l_i = beta h(x0_i); log_tilt, groups (N,) with
    groups in 0..classes-1 -> (N,), summing to 1 over each group. Each group's largest l is subtracted first
    (log-sum-exp), so exp cannot overflow however large beta h is."""
    shifted = (log_tilt - group_max(log_tilt, groups, classes)).exp()
    return shifted / shifted.new_zeros(classes).index_add(0, groups, shifted)[groups]


def effective_sample_sizes(weights: torch.Tensor, groups: torch.Tensor, classes: int) -> torch.Tensor:
    """Kish's effective sample size 1 / sum_i w_i^2 of each group's weights (N,) (each group's summing to 1), groups
    (N,) -> (classes,): from 1 (all weight on one point) to the group's size (equal weights)."""
    return 1.0 / weights.new_zeros(classes).index_add(0, groups, weights.square())


@dataclass(frozen=True)
class DataTilt:
    """The data of a weighted dsm run: `probabilities` (N,) float64, each row's chance of being drawn (its weight
    within its condition times the condition's share of the data, so conditions keep their shares), or None when
    every row's weight is equal (then rows are drawn exactly as plain dsm's); `ess` (C,) the effective sample size of
    each condition's weights and `sizes` (C,) its number of rows (C = 1 unconditionally)."""

    probabilities: Optional[torch.Tensor]
    ess: torch.Tensor
    sizes: torch.Tensor


def data_tilt(rewards: torch.Tensor, beta: float, labels: Optional[torch.Tensor] = None) -> DataTilt:
    """The tilt (E7) of the data by exp(beta h) within each condition: rewards h(x0_i) (or h(x0_i, c_i)) (N,), the
    rows' condition indices labels (N,) in conditional runs (Algorithm 2), on the CPU."""
    log_tilt = beta * rewards.double()
    if not torch.isfinite(log_tilt).all():
        raise DistqError(f"train.beta={beta:g} times reward.fn's values on the data overflows (beta h up to "
                         f"{float(rewards.abs().max()) * beta:g}); lower train.beta or rescale h")
    groups = labels if labels is not None else torch.zeros_like(log_tilt, dtype=torch.long)
    classes = int(groups.max()) + 1
    weights = tilt_weights(log_tilt, groups, classes)
    sizes = torch.bincount(groups, minlength=classes)
    shares = sizes.double() / groups.shape[0]
    # equal weights within every condition are uniform rows overall: keep plain dsm's draw, bit for bit
    uniform = torch.equal(log_tilt, group_max(log_tilt, groups, classes))
    probabilities = None if uniform else weights * shares[groups]
    return DataTilt(probabilities, effective_sample_sizes(weights, groups, classes), sizes)


MAX_ROWS = 1 << 24
"""torch.multinomial draws from at most 2^24 categories: weighted dsm's limit on the number of training points."""


def data_rows(n: int, size: int, generator: torch.Generator, probabilities: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """`size` row indices (size,) of n data rows: drawn with replacement by `probabilities` (n,), else uniformly."""
    if probabilities is None:
        return torch.randint(n, (size,), generator=generator)
    return torch.multinomial(probabilities, size, replacement=True, generator=generator)


class Denoising:
    """dsm as the Learner's objective (distq.algorithms.learner): the policy mean alone on denoising_loss, with
    Algorithm 1's Adam, schedule and clipping."""

    networks = POLICY
    diverged = ("denoising loss", "try a smaller train.lr_policy or set train.grad_clip")

    def __init__(self, bandwidth: float = 0.0):
        """bandwidth: ratio.bandwidth; each step's loss is weighted by its targets' variance s_k^2."""
        self.bandwidth = bandwidth

    def sums_size(self, learner: Learner) -> int:
        """The loss, sum h(x0), each listed reward's sum."""
        return 2 + len(learner.reward_names)

    def loss(self, learner: Learner, batch: Trajectories, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        grid = learner.grid
        means = learner.policy(grid.tau.unsqueeze(1), batch.states, batch.conditions)
        loss = denoising_loss(means, batch.actions, smoothed_variance(grid.mu, grid.sigma2, self.bandwidth), total)
        return loss, torch.cat([loss.detach().reshape(1), terminal_sums(batch, learner.reward_names)])

    def metrics(self, learner: Learner, sums: list[float], total: int) -> dict[str, float]:
        loss_sum, terminal, *part_sums = sums
        return {"loss/dsm": loss_sum, **terminal_means(terminal / total, [part / total for part in part_sums],
                                                        learner.reward_names)}
