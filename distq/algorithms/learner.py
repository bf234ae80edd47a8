"""The one Learner every algorithm trains with; an algorithm is an Objective: the networks it trains and its loss.

The Learner owns the policy-mean network (and the value network, dpok's frozen reference, the target network and
the moving-average policy where the algorithm has them), their Adam optimisers, learning-rate schedules and
clipping, and the end of every update (the NaN check, the step, the target's Polyak step, the update count and
the metrics). The objectives: Algorithm 1's TD / Rao-Blackwellised q-learning (distq.algorithms.q_learning), the
policy-gradient baselines (distq.algorithms.policy_gradient), denoising score matching (distq.algorithms.dsm).

With train.target_rate > 0 the next-state values come from a Polyak-averaged copy of the value network (a target
network, as in DQN); with train.ema_rate > 0 a Polyak average of the policy network is what the run deploys
(evaluation, sampling, train.init). The learner returns metrics and never logs.

The learner computes on its own device (train.device): batches move there in `update`, the one hand-off from the
rollouts; the weights and states it hands out are CPU tensors (distq.setup.devices).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from distq.algorithms.batch import Trajectories
from distq.errors import DistqError
from distq.maths.policy import REFERENCE, PolicyMean
from distq.maths.schedules import TimeGrid
from distq.maths.value import ValueNet
from distq.setup.config import TrainConfig
from distq.setup.devices import CPU, to_device

NETWORKS = ("policy", "value")
POLICY = ("policy",)
POLICY_COPIES = ("policy", "reference", "policy_average")
"""Learner-state entries holding policy-mean weights: the trained policy, dpok's reference, the moving average."""


Reduce = Callable[[list[torch.Tensor]], None]
"""Sums each tensor over the data-parallel replicas, in place (distq.backends.data_parallel)."""

TERMINAL_MEAN = "reward/terminal_mean"
"""The batch's mean terminal reward h(Y_K); with a list reward.fn, TERMINAL_MEAN/<name> is each h_i's."""


def terminal_means(terminal: float, parts: Sequence[float], names: tuple[str, ...]) -> dict[str, float]:
    """The metrics of a batch's mean h(Y_K) and, for a list reward.fn with entries `names`, the means of each h_i."""
    return {TERMINAL_MEAN: terminal, **{f"{TERMINAL_MEAN}/{name}": part for name, part in zip(names, parts)}}


def terminal_sums(batch: Trajectories, names: tuple[str, ...]) -> torch.Tensor:
    """sum h(Y_K) over the batch's trajectories, then each listed reward's sum (1 + len(names),)."""
    total = batch.terminal_rewards.sum().reshape(1)
    return torch.cat([total, batch.terminal_reward_parts.sum(0)]) if names else total


def batch_mean(per_step: torch.Tensor, total: int) -> torch.Tensor:
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


class Objective(Protocol):
    """An algorithm as the Learner sees it."""

    networks: tuple[str, ...]
    """The networks its loss trains (NETWORKS or POLICY)."""
    diverged: tuple[str, str]
    """(the loss's name, what to try) for TrainingDiverged."""

    def sums_size(self, learner: Learner) -> int:
        """The length of loss()'s metric sums."""

    def loss(self, learner: Learner, batch: Trajectories, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss with the graphs of `networks`, and the batch's metric sums (sums_size,), detached. The batch is
        part of one of `total` trajectories (data-parallel training): sums over its trajectories are divided by
        `total`, so the replicas' summed gradients and metric sums are the whole batch's."""

    def metrics(self, learner: Learner, sums: list[float], total: int) -> dict[str, float]:
        """The update's namespaced metrics from the metric sums of `total` trajectories."""


class Learner:
    """The central learner: the networks, their optimisers and the update's end; `objective` says what it learns."""

    def __init__(self, policy: PolicyMean, value: Optional[ValueNet], grid: TimeGrid, config: TrainConfig,
                 objective: Objective, reference: Optional[PolicyMean] = None, device: torch.device = CPU,
                 reward_names: tuple[str, ...] = ()):
        """value: the value network (q-learning), None for the objectives of the policy alone. reference: a frozen
        pretrained policy mean (ct_finetune, dpok), loaded and saved with the learner's state and broadcast with the
        weights. device: where the networks (moved there), the grid and the optimiser state live. reward_names: the
        entries of a list reward.fn (RewardConfig.names): the metrics then carry each one's batch mean, from the
        batches' terminal_reward_parts (TERMINAL_MEAN/<name>)."""
        self.device, self.config, self.grid = device, config, to_device(grid, device)
        self.objective, self.reward_names = objective, reward_names
        self.policy, self.value = to_device(policy, device), to_device(value, device)
        self.reference = to_device(reference, device).requires_grad_(False) if reference is not None else None
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

    def update(self, batch: Trajectories) -> dict[str, float]:
        """One update on a batch from a rollout on any device; returns namespaced metrics. The hand-off: the one place
        where a batch moves to the learner's device."""
        return self.update_on_device(to_device(batch, self.device))

    def update_on_device(self, batch: Trajectories, total: Optional[int] = None,
                         reduce: Optional[Reduce] = None) -> dict[str, float]:
        """One step of the objective's loss on a batch on the learner's device; returns namespaced metrics.

        Data-parallel training (distq.backends.data_parallel): `batch` is this replica's part of a batch of `total`
        trajectories, and reduce(tensors) sums the tensors over the replicas in place, so every replica clips and
        steps on the same numbers."""
        start = time.perf_counter()
        total = batch.batch_size if total is None else total
        names = self.objective.networks
        loss, sums = self.objective.loss(self, batch, total)
        self.check_loss(loss, *self.objective.diverged)
        self.backward(loss, names)
        if reduce is not None:
            reduce([*self.gradients(names), sums])
        norms = self.step(names)
        if self.target is not None:
            polyak_average(self.target, self.value, self.config.target_rate)
        return {**self.objective.metrics(self, sums.tolist(), total), **self.end_update(norms, start)}

    @property
    def metric_sums_size(self) -> int:
        """The length of the objective's metric sums (what data-parallel replicas reduce besides gradients)."""
        return self.objective.sums_size(self)

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
