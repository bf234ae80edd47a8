"""Denoising score matching (train.algorithm = dsm): the plain pretrainer distq's q-learning is compared with.

The policy mean mu_psi(tau, y) (E10), with the same network and preconditioning, regresses the conditional score
of forward-noised training data (Vincent 2011): for x0 from the data and each step t_k of the run's grid,
Y_k = mu_k x0 + sigma_k xi (E1-E2) with target grad log p_t(Y_k | x0) = -xi / sigma_k, whose regression function is
the score of p_t. Step k is weighted by sigma_k^2 (Song et al. 2021) so every step's residual is O(1):
L = 1/2 sum_k sigma_k^2 |mu_psi(tau_k, Y_k) - target_k|^2, averaged over the batch. No reward, no ratio estimator and
no reverse-process rollout: a dsm run is a pretrained model for --init, like a beta = 0 q-learning run, made the
usual way.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from distq.devices import to_device
from distq.learner import Learner, TrainingDiverged
from distq.rollout import Chunk, Rollout, Trajectories

POLICY = ("policy",)


def noised_data(x0: torch.Tensor, mu: torch.Tensor, sigma2: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-noised copies of data x0 (B, d) at K times (E1-E2): states mu_k x0 + sigma_k xi (K, B, d) and their
    conditional scores -xi / sigma_k (K, B, d); mu, sigma2: (K,), noise xi: (K, B, d)."""
    sigma = sigma2.sqrt().view(-1, 1, 1)
    return torch.addcmul(mu.view(-1, 1, 1) * x0, sigma, noise), -noise / sigma


def denoising_loss(means: torch.Tensor, targets: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """1/2 sum_k sigma_k^2 |mu_psi - target|^2, averaged over the batch; means, targets (K, B, d), sigma2 (K,)."""
    return 0.5 * (sigma2.view(-1, 1) * (means - targets).pow(2).sum(-1)).sum(0).mean()


class DenoisingRollout(Rollout):
    """A Rollout whose training batches are noised data: `states` Y_k (K, B, d), `actions` the regression targets,
    `final_states` the clean x0 and `terminal_rewards` h(x0). Evaluation samples (generate) run the reverse process
    as for any run."""

    def __init__(self, *args, labels: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(*args, labels=labels, **kwargs)
        self.labels = to_device(labels, self.device)

    @torch.inference_mode()
    def run(self, chunks: Sequence[Chunk], rewards: Optional[bool] = None,
            on_state: Optional[Callable[[int, torch.Tensor], None]] = None) -> Trajectories:
        """The batch of `chunks`: each chunk's generator draws its data rows, then its noise (K, size, d), on the CPU
        (the same numbers on every device); the terminal rewards are computed on the CPU too."""
        data, K = self.ratio.data, self.grid.num_steps
        rows, noise = [], []
        for seed, size in chunks:
            gen = torch.Generator().manual_seed(seed)
            rows.append(torch.randint(data.shape[0], (size,), generator=gen))
            noise.append(torch.randn(K, size, self.dim, generator=gen))
        index = to_device(torch.cat(rows), self.device)
        x0 = data[index]
        states, targets = noised_data(x0, self.grid.mu, self.grid.sigma2, to_device(torch.cat(noise, 1), self.device))
        conditions = self.labels[index] if self.labels is not None else None
        terminal, parts = self.terminal_rewards_by_part(x0, conditions)
        return Trajectories(states, targets, None, x0, terminal, conditions, terminal_reward_parts=parts)


class DenoisingLearner(Learner):
    """dsm: a Learner of the policy mean alone (Adam, schedule and clipping as Algorithm 1's) on denoising_loss."""

    def update_on_device(self, batch: Trajectories) -> dict[str, float]:
        start = time.perf_counter()
        means = self.policy(self.grid.tau.unsqueeze(1), batch.states, batch.conditions)
        loss = denoising_loss(means, batch.actions, self.grid.sigma2)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"denoising loss became {loss.item()} at update {self.updates + 1}; "
                                   "try a smaller train.lr_policy or set train.grad_clip")
        norms = self.descend(loss, POLICY)
        self.updates += 1
        return {"loss/dsm": float(loss.detach()), **self.batch_terminal_means(batch),
                "grad_norm/policy": norms["policy"], "lr/policy": self.schedulers["policy"].get_last_lr()[0],
                "time/update_s": time.perf_counter() - start}
