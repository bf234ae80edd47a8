"""The controlled reverse process (E5) as a gymnasium environment, so RLlib's algorithms (PPO, SAC, ...) run on it
as a further baseline, and so distq's batched rollouts have a reference for their speed (scripts/bench.py rllib).

One episode is one trajectory over the K grid steps. Observation (tau_k / T, Y_k), action the score a_k (d,),
reward r_hat_k dt (E14, with the ratio-estimated score E13 at Y_k) at every step, plus beta h(Y_K) at the last.
The entropy term of (E8) is left to the algorithm's own entropy regularisation.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium
import numpy as np
import torch

from distq.components import make_grid
from distq.config import Config, config_from_dict
from distq.data import load_dataset
from distq.ratio import RatioEstimator, running_reward
from distq.rewards import load_reward
from distq.samplers import SAMPLERS, is_stochastic
from distq.schedules import make_schedule, prior_std

ENV_NAME = "distq-reverse-diffusion"


class ReverseDiffusionEnv(gymnasium.Env):
    """env_config: a distq config as a nested dict (the YAML layout; {} = the defaults)."""

    metadata = {"render_modes": []}

    def __init__(self, env_config: Optional[dict[str, Any]] = None):
        config: Config = config_from_dict(dict(env_config or {}))
        dataset = load_dataset(config.data, config.seed)
        self.terminal_reward = load_reward(config.reward, dataset.points[:8])
        self.ratio = RatioEstimator.from_config(dataset.points, config.ratio)
        self.grid, self.beta, self.T = make_grid(config), config.train.beta, config.sde.T
        self.step_fn, self.stochastic = SAMPLERS[config.sde.sampler], is_stochastic(config.sde.sampler)
        self.prior_std, self.dim = prior_std(make_schedule(config.sde), config.sde.T), dataset.dim
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (self.dim + 1,), np.float32)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, (self.dim,), np.float32)
        self.k, self.y = 0, torch.zeros(1, self.dim)

    def _observation(self) -> np.ndarray:
        tau = self.grid.tau[self.k] if self.k < self.grid.num_steps else torch.tensor(self.T)
        return np.concatenate([[float(tau) / self.T], self.y[0].numpy()]).astype(np.float32)

    def _normal(self) -> torch.Tensor:
        return torch.from_numpy(self.np_random.standard_normal((1, self.dim)).astype(np.float32))

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.k, self.y = 0, self._normal() * self.prior_std
        return self._observation(), {}

    def step(self, action):
        k, grid = self.k, self.grid
        action = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(1, self.dim))
        subset = None
        if self.ratio.minibatch is not None:
            subset = self.ratio.subset(torch.Generator().manual_seed(int(self.np_random.integers(2**31))))
        score = self.ratio.score(self.y, float(grid.mu[k]), float(grid.sigma2[k]), subset)
        reward = float(running_reward(score, action, float(grid.g2[k]))[0]) * float(grid.dt[k])
        self.y = self.step_fn(grid, k, self.y, action, self._normal() if self.stochastic else None)
        self.k += 1
        terminated = self.k == grid.num_steps
        if terminated:
            reward += self.beta * float(self.terminal_reward(self.y)[0])
        return self._observation(), reward, terminated, False, {}


def register() -> str:
    """Register the environment with Ray Tune / RLlib under ENV_NAME (the env_config is a distq config dict)."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, ReverseDiffusionEnv)
    return ENV_NAME
