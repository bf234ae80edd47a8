"""Assembles the schedule, networks, rollout and learner of a run from its Config.

Rollouts and the learner are built separately from the same inputs so that a rollout can live in another
process (a Ray actor) with its own copy of the policy-mean network. Networks are initialised on the CPU (the same
weights for every device) and then moved to the device of train.device (learner) or parallel.rollout_device.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from distq.algorithms.dsm import MAX_ROWS, DataTilt, Denoising, data_tilt
from distq.algorithms.learner import Learner
from distq.algorithms.q_learning import QLearning
from distq.backends.rollout import DenoisingRollout, Rollout
from distq.errors import DistqError
from distq.maths.policy import PolicyMean, Preconditioner
from distq.maths.ratio import RatioEstimator
from distq.maths.samplers import action_gains
from distq.maths.schedules import TimeGrid, make_schedule, prior_std, time_grid
from distq.maths.value import RewardPrior, ValueNet
from distq.setup.config import PRETRAINED_ALGORITHMS, Q_LEARNING_ALGORITHMS, Config
from distq.setup.devices import CPU, resolve_device, to_device

Reward = Callable[..., torch.Tensor]
"""h(x) (B, d) -> (B,), called as h(x, conditions) with condition indices (B,) in conditional runs (rewards.Reward)."""


def data_statistics(points: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-coordinate mean (d,) and one overall spread s (root mean per-coordinate variance) of the data (N, d)."""
    mean = points.mean(0)
    scale = float((points - mean).pow(2).mean().sqrt())
    return mean, max(scale, 1e-6)


def make_grid(config: Config, num_steps: Optional[int] = None) -> TimeGrid:
    """The time grid of the run (or of `num_steps` steps of the same shape over the same horizon, for sampling)."""
    return time_grid(make_schedule(config.sde), config.sde.T, num_steps or config.sde.num_steps, config.sde.grid_power)


def _preconditioner(config: Config, points: torch.Tensor) -> Preconditioner:
    mean, scale = data_statistics(points)
    return Preconditioner(make_schedule(config.sde), config.sde.T, mean, scale,
                          enabled=config.model.precondition == "edm", bandwidth=config.ratio.bandwidth)


def build_policy(config: Config, points: torch.Tensor, classes: int = 0) -> PolicyMean:
    """A fresh policy-mean network mu_psi (E10), seeded by config.seed; conditional on C = classes > 0 conditions."""
    torch.manual_seed(config.seed)
    return PolicyMean(points.shape[1], config.model.hidden, _preconditioner(config, points), classes,
                      config.model.time_frequencies)


def class_count(labels: Optional[torch.Tensor]) -> int:
    """Number of conditions C of the data's condition indices (N,) (every condition has points), 0 without labels."""
    return int(labels.max()) + 1 if labels is not None else 0


def build_value(config: Config, points: torch.Tensor, terminal_reward: Reward,
                labels: Optional[torch.Tensor] = None) -> ValueNet:
    """A fresh value network J_phi (E12) whose output is put at the scale of beta h on the data (h(x0, c) with the
    points' condition `labels` in conditional runs, whose network takes the condition), with model.value_prior's
    known part when beta > 0."""
    torch.manual_seed(config.seed + 1)
    beta, pre = config.train.beta, _preconditioner(config, points)
    rewards = terminal_reward(points) if labels is None else terminal_reward(points, labels)
    prior = (RewardPrior(points, pre, beta, terminal_reward, labels)
             if config.model.value_prior == "posterior_reward" and beta > 0 else None)
    return ValueNet(points.shape[1], config.model.hidden, pre, config.train.temperature,
                    offset=0.0 if prior is not None else beta * float(rewards.mean()),
                    scale=1.0 + beta * float(rewards.std()), classes=class_count(labels),
                    time_frequencies=config.model.time_frequencies, prior=prior)


def build_reference(config: Config, points: torch.Tensor, classes: int = 0) -> Optional[PolicyMean]:
    """The pretrained policy's placeholder (ct_finetune, dpok; its weights come from train.init), else None."""
    return build_policy(config, points, classes) if config.train.algorithm in PRETRAINED_ALGORITHMS else None


def learner_device(config: Config) -> torch.device:
    """The learner's device in this process (DistqError if train.device is cuda and there is none)."""
    return resolve_device(config.train.device, "train.device")


def rollout_device(config: Config) -> torch.device:
    """The rollouts' device in this process (DistqError if parallel.rollout_device is cuda and there is none)."""
    return resolve_device(config.parallel.rollout_device, "parallel.rollout_device")


def build_tilt(config: Config, points: torch.Tensor, terminal_reward: Reward,
               labels: Optional[torch.Tensor] = None) -> Optional[DataTilt]:
    """Weighted dsm's tilt of the training points (N, d) by exp(beta h(x0)) (h(x0, c) with the points' condition
    `labels` (N,)), h evaluated once on all of them in the run's coordinates; None unless train.algorithm is dsm and
    train.beta > 0."""
    beta, n = config.train.beta, points.shape[0]
    if config.train.algorithm != "dsm" or beta == 0:
        return None
    if n > MAX_ROWS:
        raise DistqError(f"train.beta={beta:g} with train.algorithm dsm draws rows by weight, for at most "
                         f"{MAX_ROWS:,} training points; the data have {n:,} (use train.beta 0 or fewer rows)")
    inputs = (points,) if labels is None else (points, labels)
    try:
        rewards = terminal_reward(*to_device(inputs, CPU))
    except DistqError as err:
        raise DistqError(f"{err} (weighted dsm, train.beta={beta:g}, weights all {n} training points by "
                         "exp(beta h))") from None
    return data_tilt(rewards, beta, to_device(labels, CPU))


def build_rollout(config: Config, points: torch.Tensor, terminal_reward: Reward,
                  policy: Optional[PolicyMean] = None, reference: Optional[PolicyMean] = None,
                  labels: Optional[torch.Tensor] = None, classes: int = 0,
                  device: Optional[torch.device] = None, tilt: Optional[DataTilt] = None) -> Rollout:
    """A rollout over `points` (for dsm, of noised data points) on `device` (default: parallel.rollout_device); it
    shares `policy` (in-process, on the same device) or builds its own copy, and for ct_finetune the pretrained
    `reference` likewise. Conditional runs give the points' condition `labels` (or, to generate only, the number
    of `classes`). A dsm rollout that trains a weighted dsm run draws its rows by `tilt` (build_tilt); rollouts
    that only generate need none."""
    device = rollout_device(config) if device is None else device
    classes = classes or class_count(labels)
    policy = policy if policy is not None else build_policy(config, points, classes)
    algorithm = config.train.algorithm
    if algorithm == "ct_finetune" and reference is None:
        reference = build_reference(config, points, classes)
    kind, extra = (DenoisingRollout, {"tilt": tilt}) if algorithm == "dsm" else (Rollout, {})
    return kind(policy, make_grid(config), config.sde.sampler,
                RatioEstimator.from_config(to_device(points, device), config.ratio), terminal_reward,
                config.train.temperature, prior_std(make_schedule(config.sde), config.sde.T),
                running_rewards=algorithm in Q_LEARNING_ALGORITHMS,
                reference=reference if algorithm == "ct_finetune" else None, labels=labels, device=device,
                rao_blackwell=config.train.policy_gradient == "rao_blackwell", **extra)


def listed_reward_names(config: Config) -> tuple[str, ...]:
    """The names of a list reward.fn's entries (RewardConfig.names) in the per-reward metrics; () for one reward."""
    return config.reward.names if isinstance(config.reward.fn, tuple) else ()


def build_learner(config: Config, points: torch.Tensor, terminal_reward: Reward,
                  labels: Optional[torch.Tensor] = None, reward_names: Optional[tuple[str, ...]] = None) -> Learner:
    """The central learner with fresh networks on train.device: Algorithm 1's, or a baseline's (distq.algorithms.policy_gradient) by
    train.algorithm; conditional on the points' condition `labels` (N,) if given. reward_names: the metrics' names
    of a list reward.fn's entries (default listed_reward_names(config)); actors, whose config names reward files by
    their absolute paths (distq.backends.ray_actors.portable_config), get the driver's, so every backend's columns match."""
    device, classes = learner_device(config), class_count(labels)
    policy, reference = build_policy(config, points, classes), build_reference(config, points, classes)
    names = listed_reward_names(config) if reward_names is None else reward_names
    grid, value = make_grid(config), None
    if config.train.algorithm == "dsm":
        objective = Denoising(config.ratio.bandwidth)
    elif config.train.algorithm not in Q_LEARNING_ALGORITHMS:
        from distq.algorithms.policy_gradient import PolicyGradient

        objective = PolicyGradient()
    else:
        objective = QLearning(action_gains(grid, config.sde.sampler)
                              if config.train.policy_gradient == "rao_blackwell" else None)
        value = build_value(config, points, terminal_reward, labels)
    return Learner(policy, value, grid, config.train, objective, reference, device, names)
