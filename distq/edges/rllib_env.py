"""The controlled reverse process (E5) as a gymnasium environment, so RLlib's algorithms (PPO, SAC, ...) run on it
as a further baseline, and so distq's batched rollouts have a reference for their speed (scripts/bench.py rllib).

One episode is one trajectory over the K grid steps. Observation (tau_k / T, Y_k), action the score a_k (d,),
reward r_hat_k dt (E14, with the ratio-estimated score E13 at Y_k) at every step, plus beta h(Y_K) at the last.
The entropy term of (E8) is left to the algorithm's own entropy regularisation.

Conditional configs (data.condition, Algorithm 2): each episode draws its condition c at reset, in the data's
shares, from the env's np_random; the observation ends with c's one-hot code (C more entries), the ratio score
uses only c's points, and the terminal reward is h(Y_K, c). Unconditional episodes draw nothing more.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium
import numpy as np
import torch

from distq.backends.build import make_grid
from distq.maths.ratio import RatioEstimator, running_reward
from distq.maths.samplers import SAMPLERS, is_stochastic
from distq.maths.schedules import make_schedule, prior_std
from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.setup.config import Config, config_from_dict

ENV_NAME = "distq-reverse-diffusion"


class ReverseDiffusionEnv(gymnasium.Env):
    """env_config: a distq config as a nested dict (the YAML layout; {} = the defaults)."""

    metadata = {"render_modes": []}

    def __init__(self, env_config: Optional[dict[str, Any]] = None):
        config: Config = config_from_dict(dict(env_config or {}))
        dataset = load_dataset(config.data, config.seed)
        self.terminal_reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values,
                                           dataset.standardization)
        self.ratio = RatioEstimator.from_config(dataset.points, config.ratio)
        self.grid, self.beta, self.T = make_grid(config), config.train.beta, config.sde.T
        self.step_fn, self.stochastic = SAMPLERS[config.sde.sampler], is_stochastic(config.sde.sampler)
        self.prior_std = prior_std(make_schedule(config.sde), config.sde.T)
        self.dim, self.classes = dataset.dim, dataset.classes
        if self.classes:
            self.class_ratios = self.ratio.per_condition(dataset.labels, self.classes)
            shares = dataset.class_probabilities().double().numpy()
            self.class_probs = shares / shares.sum()  # numpy's choice wants float64 probabilities summing to 1
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (self.dim + 1 + self.classes,), np.float32)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, (self.dim,), np.float32)
        self.k, self.y, self.condition = 0, torch.zeros(1, self.dim), None

    def _observation(self) -> np.ndarray:
        """(tau_k / T, Y_k, one-hot of the condition (C,) in conditional configs) as float32 (1 + d + C,)."""
        tau = self.grid.tau[self.k] if self.k < self.grid.num_steps else torch.tensor(self.T)
        code = np.eye(self.classes)[self.condition] if self.classes else []
        return np.concatenate([[float(tau) / self.T], self.y[0].numpy(), code]).astype(np.float32)

    def _normal(self) -> torch.Tensor:
        return torch.from_numpy(self.np_random.standard_normal((1, self.dim)).astype(np.float32))

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.k, self.y = 0, self._normal() * self.prior_std
        if self.classes:  # drawn after Y_0: unconditional configs keep their streams
            self.condition = int(self.np_random.choice(self.classes, p=self.class_probs))
        return self._observation(), {}

    def _estimator(self) -> RatioEstimator:
        """The ratio estimator of this episode: the data's, or its condition's own points'."""
        return self.class_ratios[self.condition] if self.classes else self.ratio

    def _terminal_reward(self) -> float:
        """h(Y_K), or h(Y_K, c) with the episode's condition."""
        conditions = torch.tensor([self.condition]) if self.classes else None
        return float(self.terminal_reward(self.y, conditions)[0])

    def step(self, action):
        k, grid, ratio = self.k, self.grid, self._estimator()
        action = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(1, self.dim))
        subset = None
        if ratio.minibatch is not None:
            subset = ratio.subset(torch.Generator().manual_seed(int(self.np_random.integers(2**31))))
        score = ratio.score(self.y, float(grid.mu[k]), float(grid.sigma2[k]), subset)
        reward = float(running_reward(score, action, float(grid.g2[k]))[0]) * float(grid.dt[k])
        self.y = self.step_fn(grid, k, self.y, action, self._normal() if self.stochastic else None)
        self.k += 1
        terminated = self.k == grid.num_steps
        if terminated:
            reward += self.beta * self._terminal_reward()
        return self._observation(), reward, terminated, False, {}


def register() -> str:
    """Register the environment with Ray Tune / RLlib under ENV_NAME (the env_config is a distq config dict)."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, ReverseDiffusionEnv)
    return ENV_NAME
