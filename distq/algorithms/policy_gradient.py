"""The baselines of algorithm.md section 10 on distq's discretised process, networks and evaluation: DDPO with the
score-function gradient (ddpo_sf) or clipped importance sampling (ddpo_is), and DPOK (ddpo_sf plus a per-step KL
to the pretrained policy).

Each grid step is an MDP step whose action a_k ~ pi_psi(. | tau_k, Y_k) (E10) drives the transition (E5); the
return is the terminal reward beta h(Y_K) alone: no ratio estimator, no critic. DDPO normalises the rewards per
batch (advantages (h - mean) / std); DPOK keeps their scale, so its KL weight means the same at every beta.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from distq.algorithms.batch import Trajectories
from distq.algorithms.learner import Learner
from distq.maths.policy import PolicyMean, policy_log_density
from distq.maths.schedules import TimeGrid
from distq.setup.config import TrainConfig
from distq.setup.devices import CPU

POLICY = ("policy",)
REMEDY = "try a smaller train.lr_policy or set train.grad_clip"


def policy_kl(mean: torch.Tensor, reference_mean: torch.Tensor, g2: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(pi_psi || pi_ref) of two Gaussian policies (E10) with the same covariance theta / g^2 I:
    g^2 |mu - mu_ref|^2 / (2 theta); means (..., d), g2 broadcastable to (...) -> (...)."""
    return (mean - reference_mean).pow(2).sum(-1) * g2 / (2 * temperature)


def normalised_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """DDPO's per-batch reward normalisation (h - mean h) / std h; rewards (B,) -> (B,)."""
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """The clipped importance-sampling objective per step (PPO's), to maximise; log_ratio (K, B) of new over
    behaviour policy, advantages (B,) -> (K, B). At log_ratio = 0 its gradient is the score-function one."""
    ratio = log_ratio.exp()
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


class PolicyGradientLearner(Learner):
    """ddpo_sf, ddpo_is and dpok: a Learner of the policy mean alone (Adam, schedule and clipping as Algorithm 1's),
    with a frozen copy of the pretrained policy as dpok's reference."""

    def __init__(self, policy: PolicyMean, grid: TimeGrid, config: TrainConfig,
                 reference: Optional[PolicyMean] = None, device: torch.device = CPU, reward_names: tuple[str, ...] = ()):
        super().__init__(policy, None, grid, config, reference, device, reward_names=reward_names)

    def log_densities(self, batch: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_psi(a_k | tau_k, Y_k) (K, B) with the policy's graph, and the means (K, B, d)."""
        means = self.policy(self.grid.tau.unsqueeze(1), batch.states, batch.conditions)
        return policy_log_density(batch.actions, means, self.grid.g2.unsqueeze(1), self.config.temperature), means

    def update_on_device(self, batch: Trajectories) -> dict[str, float]:
        """One policy-gradient update (ddpo_is: `inner_steps` of them) on a batch on the learner's device; returns
        namespaced metrics."""
        start, config = time.perf_counter(), self.config
        rewards = config.beta * batch.terminal_rewards
        metrics: dict[str, float] = {}
        if config.algorithm == "dpok":
            log_density, means = self.log_densities(batch)
            with torch.no_grad():
                reference = self.reference(self.grid.tau.unsqueeze(1), batch.states, batch.conditions)
            kl = policy_kl(means, reference, self.grid.g2.unsqueeze(1), config.temperature).sum(0).mean()
            loss = -(log_density.sum(0) * (rewards - rewards.mean())).mean() + config.kl_weight * kl
            metrics["kl/reference"] = float(kl.detach())
        elif config.algorithm == "ddpo_sf":
            loss = -(self.log_densities(batch)[0].sum(0) * normalised_advantages(rewards)).mean()
        else:
            advantages, behaviour = normalised_advantages(rewards), None
            for step in range(config.inner_steps):
                log_density = self.log_densities(batch)[0]
                if behaviour is None:  # the rollout's policy: these weights, before any inner step
                    behaviour = log_density.detach()
                loss = -clipped_surrogate(log_density - behaviour, advantages, config.is_clip).sum(0).mean()
                if step < config.inner_steps - 1:
                    self.check_loss(loss, "policy-gradient loss", REMEDY)
                    self.descend(loss, POLICY, schedule=False)
            metrics["is/clipped_fraction"] = float(((log_density.detach() - behaviour).exp() - 1).abs()
                                                   .gt(config.is_clip).float().mean())
        self.check_loss(loss, "policy-gradient loss", REMEDY)
        norms = self.descend(loss, POLICY)
        return {"loss/policy_gradient": float(loss.detach()), **self.batch_terminal_means(batch), **metrics,
                **self.end_update(norms, start)}
