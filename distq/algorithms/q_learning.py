"""Steps 2-3 of Algorithm 1: TD errors (E15) and the semi-gradient actor-critic update (E16), as the Learner's
objective (distq.algorithms.learner).

Minimising L = 1/2 sum_k delta_k^2 (mean over the batch) with next-state values and actions detached gives exactly
the semi-gradients of (E16): -dL/dphi = sum_k delta_k grad J_phi(tau_k, Y_k) and
-dL/dpsi = sum_k dt_k delta_k grad q_psi(tau_k, Y_k, a_k) (a uniform dt is absorbed in the learning rate).
Each network's gradient flows only through its own output (q or J), so the two halves can also run in two
processes (distq.backends.two_process) on the same numbers, with the functions below. train.policy_gradient =
rao_blackwell keeps the TD loss for the value network and gives the policy the Rao-Blackwellised surrogate
(distq.maths.policy.rao_blackwell_surrogate).
"""
from __future__ import annotations

from typing import Optional

import torch

from distq.algorithms.batch import Trajectories
from distq.algorithms.learner import NETWORKS, Learner, batch_mean, terminal_means, terminal_sums
from distq.maths.policy import q_value, rao_blackwell_surrogate
from distq.maths.value import td_errors

REMEDY = "try smaller train.lr_policy / train.lr_value or set train.grad_clip"


def policy_means(learner: Learner, batch: Trajectories) -> torch.Tensor:
    """mu_psi(tau_k, Y_k) (E10) of a batch, (K, B, d), with the policy's graph."""
    return learner.policy(learner.grid.tau.unsqueeze(1), batch.states, batch.conditions)


def q_values(learner: Learner, batch: Trajectories, means: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q_psi(tau_k, Y_k, a_k) (E11) of a batch, (K, B), with the policy's graph (through `means` if given)."""
    means = policy_means(learner, batch) if means is None else means
    return q_value(batch.actions, means, learner.grid.g2.unsqueeze(1), learner.config.temperature)


def values(learner: Learner, batch: Trajectories) -> torch.Tensor:
    """J_phi(tau_k, Y_k) of a batch, (K, B), with the value network's graph."""
    return learner.value(learner.grid.tau.unsqueeze(1), batch.states, batch.conditions)


def values_and_target_values(learner: Learner, batch: Trajectories) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """J_phi(tau_k, Y_k) (K, B) with its graph, and the target network's J(tau_{k+1}, Y_{k+1}) (K - 1, B), or None
    without a target; the parameter-free part of J (the reward prior's O(N d) per state) is computed once."""
    if learner.target is None:
        return values(learner, batch), None
    tau = learner.grid.tau.unsqueeze(1)
    fixed = learner.value.fixed_part(tau, batch.states, batch.conditions)
    with torch.no_grad():
        target_values = learner.target(tau[1:], batch.states[1:], batch.conditions, fixed[1:])
    return learner.value(tau, batch.states, batch.conditions, fixed), target_values


def td_loss(learner: Learner, values: torch.Tensor, q: torch.Tensor, batch: Trajectories,
            target_values: Optional[torch.Tensor] = None, total: Optional[int] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """1/2 sum_k delta_k^2 averaged over the batch, and the TD errors delta (K, B) (E15), bootstrapping from
    `target_values` (K - 1, B) if given, else from `values`. `total`: the batch is part of one of `total`
    trajectories (data-parallel training), and the sum over its trajectories is divided by that."""
    delta = td_errors(values, learner.config.beta * batch.terminal_rewards, batch.running_rewards, q,
                      learner.grid.dt.unsqueeze(1), target_values)
    loss = batch_mean(0.5 * delta.square(), total or batch.batch_size)
    learner.check_loss(loss, "TD loss", REMEDY)
    return loss, delta


def loss(learner: Learner, batch: Trajectories, total: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss with both networks' graphs, and delta (K, B): the TD loss (train.policy_gradient = td), or the
    TD loss for the value network plus the policy's Rao-Blackwellised surrogate (rao_blackwell). `total`: as in
    td_loss."""
    current, target_values = values_and_target_values(learner, batch)
    if learner.config.policy_gradient == "td":
        return td_loss(learner, current, q_values(learner, batch), batch, target_values, total)
    means = policy_means(learner, batch)
    q = q_values(learner, batch, means)
    value_loss, delta = td_loss(learner, current, q.detach(), batch, target_values, total)
    grid = learner.grid
    surrogate = rao_blackwell_surrogate(q, means, regression_targets(learner, batch), last_advantage(learner, batch),
                                        grid.g2.unsqueeze(1), grid.dt.unsqueeze(1), learner.config.temperature)
    return value_loss + batch_mean(surrogate, total or batch.batch_size), delta


def regression_targets(learner: Learner, batch: Trajectories) -> torch.Tensor:
    """s_hat + (gain_k / (g^2 dt)) grad_y J_phi(tau_{k+1}, Y'_{k+1}) at the mean action's successors Y' (K, B, d)
    (J of the target network if train.target_rate > 0), detached; the score alone at the last step
    (distq.maths.policy.rao_blackwell_surrogate). The gains dY_{k+1} / da_k are the batch's sampler's
    (QLearning.action_gains)."""
    grid = learner.grid
    successors = batch.mean_successors[:-1].clone().requires_grad_(True)  # rollouts give inference tensors
    with torch.enable_grad():
        critic = learner.value if learner.target is None else learner.target
        values = critic(grid.tau[1:].unsqueeze(1), successors, batch.conditions)
        gradient, = torch.autograd.grad(values.sum(), successors)
    # gain_k / (g^2 dt) of the steps before the last, shaped to scale grad J (K - 1, 1, 1)
    scales = (learner.objective.action_gains.to(learner.device) / (grid.g2 * grid.dt))[:-1].view(-1, 1, 1)
    return batch.ratio_scores + torch.cat([scales * gradient, torch.zeros_like(gradient[:1])])


def last_advantage(learner: Learner, batch: Trajectories) -> torch.Tensor:
    """beta [h(Y_K) - h(Y'_K)] at the last step, 0 before it (K, B)."""
    advantage = torch.zeros_like(batch.running_rewards)
    advantage[-1] = learner.config.beta * (batch.terminal_rewards - batch.mean_terminal_rewards)
    return advantage


def metric_sums(learner: Learner, delta: torch.Tensor, batch: Trajectories) -> torch.Tensor:
    """Sums over the batch's trajectories (4 + R,): 1/2 sum_k delta_k^2, sum_k |delta_k|, h(Y_K),
    sum_k r_hat_k dt_k, then each listed reward's h_i(Y_K) (R = len(reward_names), 0 for a single reward)."""
    delta = delta.detach()
    terminal = terminal_sums(batch, learner.reward_names)
    return torch.cat([torch.stack([0.5 * delta.square().sum(), delta.abs().sum()]), terminal[:1],
                      (batch.running_rewards * learner.grid.dt.unsqueeze(1)).sum().reshape(1), terminal[1:]])


def metrics_from_sums(learner: Learner, sums: list[float], total: int) -> dict[str, float]:
    """The loss and reward metrics of an update on `total` trajectories from their metric_sums."""
    td, td_abs, terminal, running, *parts = sums
    return {
        "loss/td": td / total,
        "td/abs_mean": td_abs / (total * learner.grid.num_steps),
        **terminal_means(terminal / total, [part / total for part in parts], learner.reward_names),
        "reward/running_mean": running / total,
    }


class QLearning:
    """Algorithm 1's objective (train.algorithm qlearning and ct_finetune): the TD loss of both networks, or with
    train.policy_gradient = rao_blackwell the TD loss of the value network and the policy's surrogate."""

    networks = NETWORKS
    diverged = ("loss", REMEDY)

    def __init__(self, action_gains: Optional[torch.Tensor] = None):
        """action_gains: dY_{k+1} / da_k (K,) of the sampler (distq.maths.samplers.action_gains), for
        rao_blackwell."""
        self.action_gains = action_gains

    def sums_size(self, learner: Learner) -> int:
        return 4 + len(learner.reward_names)

    def loss(self, learner: Learner, batch: Trajectories, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        value, delta = loss(learner, batch, total)
        return value, metric_sums(learner, delta, batch)

    def metrics(self, learner: Learner, sums: list[float], total: int) -> dict[str, float]:
        return metrics_from_sums(learner, sums, total)
