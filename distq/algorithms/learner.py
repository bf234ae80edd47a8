"""Steps 2-3 of Algorithm 1: TD errors (E15) and the semi-gradient actor-critic update (E16) with Adam.

Minimising L = 1/2 sum_k delta_k^2 (mean over the batch) with next-state values and actions detached gives exactly
the semi-gradients of (E16): -dL/dphi = sum_k delta_k grad J_phi(tau_k, Y_k) and
-dL/dpsi = sum_k dt_k delta_k grad q_psi(tau_k, Y_k, a_k) (a uniform dt is absorbed in the learning rate).
Each network's gradient flows only through its own output (q or J), so the two halves can also run in two
processes (distq.backends.two_process) on the same numbers. With train.target_rate > 0 the next-state values come from a
Polyak-averaged copy of the value network instead (a target network, as in DQN); with train.ema_rate > 0 a
Polyak average of the policy network is what the run deploys (evaluation, sampling, train.init). The learner returns
metrics and never logs.

The learner computes on its own device (train.device): batches move there in `update`, the one hand-off from the
rollouts; the weights and states it hands out are CPU tensors (distq.setup.devices).

Over 300 lines: Algorithm 1's update together with what every algorithm's update shares (optimisers, learning-rate
schedules, clipping, the moving-average policy, the target network, the update's end and its metrics), which the
policy-gradient and dsm learners inherit rather than copy.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

from distq.algorithms.batch import Trajectories
from distq.errors import DistqError
from distq.maths.policy import REFERENCE, PolicyMean, q_value, rao_blackwell_surrogate
from distq.maths.schedules import TimeGrid
from distq.maths.value import ValueNet, td_errors
from distq.setup.config import TrainConfig
from distq.setup.devices import CPU, to_device

NETWORKS = ("policy", "value")
POLICY_COPIES = ("policy", "reference", "policy_average")
"""Learner-state entries holding policy-mean weights: the trained policy, dpok's reference, the moving average."""


Reduce = Callable[[list[torch.Tensor]], None]
"""Sums each tensor over the data-parallel replicas, in place (distq.backends.data_parallel)."""

TERMINAL_MEAN = "reward/terminal_mean"
"""The batch's mean terminal reward h(Y_K); with a list reward.fn, TERMINAL_MEAN/<name> is each h_i's."""


def terminal_means(terminal: float, parts: Sequence[float], names: tuple[str, ...]) -> dict[str, float]:
    """The metrics of a batch's mean h(Y_K) and, for a list reward.fn with entries `names`, the means of each h_i."""
    return {TERMINAL_MEAN: terminal, **{f"{TERMINAL_MEAN}/{name}": part for name, part in zip(names, parts)}}


def _batch_mean(per_step: torch.Tensor, total: int) -> torch.Tensor:
    """sum_k over steps, summed over the trajectories (K, B) and divided by `total`: the batch mean when total = B,
    a replica's share of it in data-parallel training."""
    return per_step.sum() / total


class TrainingDiverged(DistqError):
    """The loss or the parameters became NaN or infinite."""


def polyak_average(average: torch.nn.Module, current: torch.nn.Module, rate: float) -> None:
    """Move every parameter of `average` the fraction `rate` of the way to the same parameter of `current`."""
    with torch.no_grad():
        for mean, param in zip(average.parameters(), current.parameters()):
            mean.lerp_(param, rate)


def deployed_policy(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The policy-mean weights to generate with from a learner state (a checkpoint's "learner"): the moving average
    with train.ema_rate > 0, else the trained weights."""
    return state.get("policy_average", state["policy"])


def with_initial_policy(state: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`state` (a learner state) with each policy copy it holds set to `weights` (train.init's pretrained policy);
    the value network and the optimisers keep theirs."""
    return {**state, **{name: weights for name in POLICY_COPIES if name in state}}


def _lr_lambda(schedule: str, total: int):
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return lambda step: 1.0


class Learner:
    """The central learner: owns the policy-mean and value networks and their Adam optimisers."""

    def __init__(self, policy: PolicyMean, value: Optional[ValueNet], grid: TimeGrid, config: TrainConfig,
                 reference: Optional[PolicyMean] = None, device: torch.device = CPU,
                 action_gains: Optional[torch.Tensor] = None, reward_names: tuple[str, ...] = ()):
        """value None: a learner of the policy alone (the policy-gradient baselines, distq.algorithms.policy_gradient).
        reference: a frozen pretrained policy mean (ct_finetune, dpok), loaded and saved with the learner's state and
        broadcast with the weights. device: where the networks (moved there), the grid and the optimiser state live.
        action_gains: dY_{k+1} / da_k (K,) of the sampler (distq.maths.samplers.action_gains), for rao_blackwell.
        reward_names: the entries of a list reward.fn (RewardConfig.names): the metrics then carry each one's batch
        mean, from the batches' terminal_reward_parts (TERMINAL_MEAN/<name>)."""
        self.device, self.config, self.grid = device, config, to_device(grid, device)
        self.reward_names = reward_names
        self.policy, self.value = to_device(policy, device), to_device(value, device)
        self.reference = to_device(reference, device).requires_grad_(False) if reference is not None else None
        # gain_k / (g^2 dt) of the steps before the last, shaped to scale grad J (K - 1, 1, 1)
        self.value_gradient_scales = (None if action_gains is None else
                                      (action_gains.to(device) / (self.grid.g2 * self.grid.dt))[:-1].view(-1, 1, 1))
        self.networks = {"policy": self.policy, "value": self.value} if value is not None else {"policy": self.policy}
        rates = {"policy": config.lr_policy, "value": config.lr_value}
        # fused: one kernel for all parameters, ~7x cheaper per step than the default loop on CPU
        self.optimizers = {name: torch.optim.Adam(net.parameters(), lr=rates[name], fused=True)
                           for name, net in self.networks.items()}
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.lr_schedule, config.episodes))
                           for name, opt in self.optimizers.items()}
        self.updates = 0
        # the target shares the value network's prior (and its copy of the data) rather than copying it
        self.target = (None if value is None or config.target_rate == 0 else
                       copy.deepcopy(self.value, {id(self.value.prior): self.value.prior}).requires_grad_(False))
        self.average = copy.deepcopy(self.policy).requires_grad_(False) if config.ema_rate > 0 else None

    def policy_means(self, batch: Trajectories) -> torch.Tensor:
        """mu_psi(tau_k, Y_k) (E10) of a batch, (K, B, d), with the policy's graph."""
        return self.policy(self.grid.tau.unsqueeze(1), batch.states, batch.conditions)

    def q_values(self, batch: Trajectories, means: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q_psi(tau_k, Y_k, a_k) (E11) of a batch, (K, B), with the policy's graph (through `means` if given)."""
        means = self.policy_means(batch) if means is None else means
        return q_value(batch.actions, means, self.grid.g2.unsqueeze(1), self.config.temperature)

    def values(self, batch: Trajectories) -> torch.Tensor:
        """J_phi(tau_k, Y_k) of a batch, (K, B), with the value network's graph."""
        return self.value(self.grid.tau.unsqueeze(1), batch.states, batch.conditions)

    def values_and_target_values(self, batch: Trajectories) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """J_phi(tau_k, Y_k) (K, B) with its graph, and the target network's J(tau_{k+1}, Y_{k+1}) (K - 1, B), or None
        without a target; the parameter-free part of J (the reward prior's O(N d) per state) is computed once."""
        if self.target is None:
            return self.values(batch), None
        tau = self.grid.tau.unsqueeze(1)
        fixed = self.value.fixed_part(tau, batch.states, batch.conditions)
        with torch.no_grad():
            target_values = self.target(tau[1:], batch.states[1:], batch.conditions, fixed[1:])
        return self.value(tau, batch.states, batch.conditions, fixed), target_values

    def td_loss(self, values: torch.Tensor, q: torch.Tensor, batch: Trajectories,
                target_values: Optional[torch.Tensor] = None, total: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """1/2 sum_k delta_k^2 averaged over the batch, and the TD errors delta (K, B) (E15), bootstrapping from
        `target_values` (K - 1, B) if given, else from `values`. `total`: the batch is part of one of `total`
        trajectories (data-parallel training), and the sum over its trajectories is divided by that."""
        delta = td_errors(values, self.config.beta * batch.terminal_rewards, batch.running_rewards, q,
                          self.grid.dt.unsqueeze(1), target_values)
        loss = _batch_mean(0.5 * delta.square(), total or batch.batch_size)
        self.check_loss(loss, "TD loss", "try smaller train.lr_policy / train.lr_value or set train.grad_clip")
        return loss, delta

    def loss(self, batch: Trajectories, total: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss with both networks' graphs, and delta (K, B): the TD loss (train.policy_gradient = td), or the
        TD loss for the value network plus the policy's Rao-Blackwellised surrogate (rao_blackwell). `total`: as in
        td_loss."""
        values, target_values = self.values_and_target_values(batch)
        if self.config.policy_gradient == "td":
            return self.td_loss(values, self.q_values(batch), batch, target_values, total)
        means = self.policy_means(batch)
        q = self.q_values(batch, means)
        value_loss, delta = self.td_loss(values, q.detach(), batch, target_values, total)
        surrogate = rao_blackwell_surrogate(q, means, self.regression_targets(batch), self.last_advantage(batch),
                                            self.grid.g2.unsqueeze(1), self.grid.dt.unsqueeze(1),
                                            self.config.temperature)
        return value_loss + _batch_mean(surrogate, total or batch.batch_size), delta

    def regression_targets(self, batch: Trajectories) -> torch.Tensor:
        """s_hat + (gain_k / (g^2 dt)) grad_y J_phi(tau_{k+1}, Y'_{k+1}) at the mean action's successors Y' (K, B, d)
        (J of the target network if train.target_rate > 0), detached; the score alone at the last step
        (distq.maths.policy.rao_blackwell_surrogate)."""
        successors = batch.mean_successors[:-1].clone().requires_grad_(True)  # rollouts give inference tensors
        with torch.enable_grad():
            critic = self.value if self.target is None else self.target
            values = critic(self.grid.tau[1:].unsqueeze(1), successors, batch.conditions)
            gradient, = torch.autograd.grad(values.sum(), successors)
        return batch.ratio_scores + torch.cat([self.value_gradient_scales * gradient, torch.zeros_like(gradient[:1])])

    def last_advantage(self, batch: Trajectories) -> torch.Tensor:
        """beta [h(Y_K) - h(Y'_K)] at the last step, 0 before it (K, B)."""
        advantage = torch.zeros_like(batch.running_rewards)
        advantage[-1] = self.config.beta * (batch.terminal_rewards - batch.mean_terminal_rewards)
        return advantage

    def descend(self, loss: torch.Tensor, names: tuple[str, ...] = NETWORKS, schedule: bool = True) -> dict[str, float]:
        """Backpropagate `loss` and take one clipped Adam step on the networks `names` (and, with `schedule`, one
        step of their learning-rate schedules); returns their grad norms."""
        self.backward(loss, names)
        return self.step(names, schedule)

    def backward(self, loss: torch.Tensor, names: tuple[str, ...] = NETWORKS) -> None:
        """The gradients of `loss` in the networks `names` (their previous gradients dropped)."""
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()

    def gradients(self, names: tuple[str, ...] = NETWORKS) -> list[torch.Tensor]:
        """The gradient of every parameter of the networks `names`, in a fixed order (zeros where none flowed)."""
        for param in (p for name in names for p in self.networks[name].parameters()):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        return [p.grad for name in names for p in self.networks[name].parameters()]

    def step(self, names: tuple[str, ...] = NETWORKS, schedule: bool = True) -> dict[str, float]:
        """One clipped Adam step on the networks `names` with their gradients (and, with `schedule`, one step of
        their learning-rate schedules); returns their grad norms."""
        clip = self.config.grad_clip or math.inf
        norms = {name: float(torch.nn.utils.clip_grad_norm_(self.networks[name].parameters(), clip, foreach=True))
                 for name in names}
        if not all(math.isfinite(n) for n in norms.values()):
            raise TrainingDiverged(f"gradients became non-finite at update {self.updates + 1}; "
                                   "try smaller learning rates or set train.grad_clip")
        for name in names:
            self.optimizers[name].step()
            if schedule:
                self.schedulers[name].step()
        if self.average is not None and "policy" in names:
            polyak_average(self.average, self.policy, self.config.ema_rate)
        return norms

    def update(self, batch: Trajectories) -> dict[str, float]:
        """One update on a batch from a rollout on any device; returns namespaced metrics. The hand-off: the one place
        where a batch moves to the learner's device."""
        return self.update_on_device(to_device(batch, self.device))

    def update_on_device(self, batch: Trajectories, total: Optional[int] = None,
                         reduce: Optional[Reduce] = None) -> dict[str, float]:
        """One semi-gradient step (E16) on a batch on the learner's device; returns namespaced metrics.

        Data-parallel training (distq.backends.data_parallel): `batch` is this replica's part of a batch of `total` trajectories, and
        reduce(tensors) sums the tensors over the replicas in place. The loss divides its sums by `total`, so the
        summed gradients and metric sums are the whole batch's, and every replica clips and steps on the same
        numbers."""
        start = time.perf_counter()
        total = batch.batch_size if total is None else total
        loss, delta = self.loss(batch, total)
        sums = self.metric_sums(delta, batch)
        self.backward(loss)
        if reduce is not None:
            reduce([*self.gradients(), sums])
        norms = self.step()
        if self.target is not None:
            polyak_average(self.target, self.value, self.config.target_rate)
        return {**self.metrics_from_sums(sums, total), **self.end_update(norms, start)}

    @property
    def metric_sums_size(self) -> int:
        """The length of metric_sums' vector."""
        return 4 + len(self.reward_names)

    def metric_sums(self, delta: torch.Tensor, batch: Trajectories) -> torch.Tensor:
        """Sums over the batch's trajectories (4 + R,): 1/2 sum_k delta_k^2, sum_k |delta_k|, h(Y_K),
        sum_k r_hat_k dt_k, then each listed reward's h_i(Y_K) (R = len(reward_names), 0 for a single reward)."""
        delta = delta.detach()
        sums = torch.stack([0.5 * delta.square().sum(), delta.abs().sum(), batch.terminal_rewards.sum(),
                            (batch.running_rewards * self.grid.dt.unsqueeze(1)).sum()])
        return torch.cat([sums, batch.terminal_reward_parts.sum(0)]) if self.reward_names else sums

    def metrics_from_sums(self, sums: torch.Tensor, total: int) -> dict[str, float]:
        """The loss and reward metrics of an update on `total` trajectories from their metric_sums."""
        td, td_abs, terminal, running, *parts = sums.tolist()
        return {
            "loss/td": td / total,
            "td/abs_mean": td_abs / (total * self.grid.num_steps),
            **terminal_means(terminal / total, [part / total for part in parts], self.reward_names),
            "reward/running_mean": running / total,
        }

    def check_loss(self, loss: torch.Tensor, what: str, remedy: str) -> None:
        """TrainingDiverged naming the update when the loss `what` is NaN or inf, before any step; remedy: what to
        try."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{what} became {loss.item()} at update {self.updates + 1}; {remedy}")

    def end_update(self, norms: dict[str, float], start: float) -> dict[str, float]:
        """The end every algorithm's update shares: the update is counted, and each stepped network's grad norm, the
        policy's learning rate and the time since perf_counter() = start are its metrics."""
        self.updates += 1
        return {**{f"grad_norm/{name}": norm for name, norm in norms.items()},
                "lr/policy": self.schedulers["policy"].get_last_lr()[0], "time/update_s": time.perf_counter() - start}

    def batch_terminal_means(self, batch: Trajectories) -> dict[str, float]:
        """terminal_means of a whole batch (the learners that compute their metrics without metric_sums)."""
        parts = batch.terminal_reward_parts.mean(0).tolist() if self.reward_names else []
        return terminal_means(float(batch.terminal_rewards.mean()), parts, self.reward_names)

    def policy_weights(self, deployed: bool = False) -> dict[str, torch.Tensor]:
        """The policy-mean weights to broadcast to rollouts (with the reference's, prefixed REFERENCE, if any), as CPU
        tensors (a rollout's load_state_dict copies them onto its device); `deployed`: the moving average's, if
        train.ema_rate > 0 (what the run evaluates with)."""
        weights = (self.average if deployed and self.average is not None else self.policy).state_dict()
        if self.reference is not None:
            weights.update({REFERENCE + k: v for k, v in self.reference.state_dict().items()})
        return to_device(weights, CPU)

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, schedules and the update count, as CPU tensors (checkpoints load anywhere)."""
        state = {**{name: net.state_dict() for name, net in self.networks.items()}, "updates": self.updates,
                 "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                 "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()}}
        if self.reference is not None:
            state["reference"] = self.reference.state_dict()
        if self.target is not None:
            state["target"] = self.target.state_dict()
        if self.average is not None:
            state["policy_average"] = self.average.state_dict()
        return to_device(state, CPU)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state_dict from any device (a checkpoint's CPU tensors) onto the learner's device."""
        state = to_device(state, self.device)
        for name, net in self.networks.items():
            net.load_state_dict(state[name])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        if self.average is not None:
            self.average.load_state_dict(state["policy_average"])
        self.updates = state["updates"]
        for name in self.optimizers:
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
