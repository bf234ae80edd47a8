"""The baselines of algorithm.md section 10 on distq's discretised process, networks and evaluation: DDPO with the
score-function gradient (ddpo_sf) or clipped importance sampling (ddpo_is), and DPOK (ddpo_sf plus a per-step KL
to the pretrained policy).

Each grid step is an MDP step whose action a_k ~ pi_psi(. | tau_k, Y_k) (E10) drives the transition (E5); the
return is the terminal reward beta h(Y_K) alone: no ratio estimator, no critic. DDPO normalises the rewards per
batch (advantages (h - mean) / std); DPOK keeps their scale, so its KL weight means the same at every beta.
"""
from __future__ import annotations

import torch

from distq.algorithms.batch import Trajectories
from distq.algorithms.learner import POLICY, Learner, terminal_means, terminal_sums
from distq.maths.policy import policy_log_density

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


class PolicyGradient:
    """ddpo_sf, ddpo_is and dpok as the Learner's objective (distq.algorithms.learner): the policy mean alone, with
    Algorithm 1's Adam, schedule and clipping, and a frozen copy of the pretrained policy as dpok's reference."""

    networks = POLICY
    diverged = ("policy-gradient loss", REMEDY)

    def sums_size(self, learner: Learner) -> int:
        """The loss (times the batch size), sum h(Y_K), each listed reward's sum, then dpok's KL to the reference
        or ddpo_is's clipped fraction (times the batch size)."""
        return 3 + len(learner.reward_names)

    def loss(self, learner: Learner, batch: Trajectories, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy-gradient loss (ddpo_is: of its last inner step, after the `inner_steps - 1` before it) and the
        metric sums."""
        config = learner.config
        rewards = config.beta * batch.terminal_rewards
        if config.algorithm == "dpok":
            log_density, means = log_densities(learner, batch)
            with torch.no_grad():
                reference = learner.reference(learner.grid.tau.unsqueeze(1), batch.states, batch.conditions)
            kl = policy_kl(means, reference, learner.grid.g2.unsqueeze(1), config.temperature).sum(0).mean()
            loss = -(log_density.sum(0) * (rewards - rewards.mean())).mean() + config.kl_weight * kl
            extra = kl.detach()
        elif config.algorithm == "ddpo_sf":
            loss = -(log_densities(learner, batch)[0].sum(0) * normalised_advantages(rewards)).mean()
            extra = loss.new_zeros(())
        else:
            advantages, behaviour = normalised_advantages(rewards), None
            for step in range(config.inner_steps):
                log_density = log_densities(learner, batch)[0]
                if behaviour is None:  # the rollout's policy: these weights, before any inner step
                    behaviour = log_density.detach()
                loss = -clipped_surrogate(log_density - behaviour, advantages, config.is_clip).sum(0).mean()
                if step < config.inner_steps - 1:
                    learner.check_loss(loss, *self.diverged)
                    learner.descend(loss, POLICY, schedule=False)
            extra = ((log_density.detach() - behaviour).exp() - 1).abs().gt(config.is_clip).float().mean()
        sums = torch.cat([(loss.detach() * total).reshape(1), terminal_sums(batch, learner.reward_names),
                          (extra * total).reshape(1)])
        return loss, sums

    def metrics(self, learner: Learner, sums: list[float], total: int) -> dict[str, float]:
        loss, terminal, *parts, extra = sums
        metrics = {"loss/policy_gradient": loss / total,
                   **terminal_means(terminal / total, [part / total for part in parts], learner.reward_names)}
        if learner.config.algorithm == "dpok":
            metrics["kl/reference"] = extra / total
        elif learner.config.algorithm == "ddpo_is":
            metrics["is/clipped_fraction"] = extra / total
        return metrics


def log_densities(learner: Learner, batch: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_psi(a_k | tau_k, Y_k) (K, B) with the policy's graph, and the means (K, B, d)."""
    means = learner.policy(learner.grid.tau.unsqueeze(1), batch.states, batch.conditions)
    return policy_log_density(batch.actions, means, learner.grid.g2.unsqueeze(1), learner.config.temperature), means
