"""distq.rllib_env: the reverse process as a gymnasium environment passes gymnasium's checker, its rewards are
(E14) dt plus beta h at the end, and RLlib's PPO trains on it (slow)."""
import math

import gymnasium
import numpy as np
import pytest
import torch

from distq.ratio import ratio_score
from distq.rllib_env import ENV_NAME, ReverseDiffusionEnv

TINY = {"seed": 2, "data": {"source": "gaussian", "mean": [1.0, -1.0], "std": 1.0, "n_samples": 200},
        "reward": {"fn": "linear", "coef": [1.0, 0.0]}, "sde": {"T": 5.0, "dt": 0.5}, "train": {"beta": 2.0}}


def test_env_passes_gymnasium_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(ReverseDiffusionEnv(TINY), skip_render_check=True)


def test_rewards_are_the_running_reward_and_the_terminal_reward():
    """Each step's reward is -(g^2 / 2)|s_hat(Y_k) - a_k|^2 dt, from the ratio score of the data at the observed
    state; the last adds beta h(Y_K) = beta * x0 of the final observation."""
    env = ReverseDiffusionEnv(TINY)
    observation, _ = env.reset(seed=0)
    rng, grid, data = np.random.default_rng(1), env.grid, env.ratio.data
    for k in range(grid.num_steps):
        assert math.isclose(observation[0], float(grid.tau[k]) / 5.0, rel_tol=1e-6)
        y = torch.from_numpy(observation[1:]).reshape(1, 2)
        action = rng.normal(size=2).astype(np.float32)
        score = ratio_score(y, data, float(grid.mu[k]), float(grid.sigma2[k]))
        expected = -0.5 * float(grid.g2[k]) * float((score[0] - torch.from_numpy(action)).pow(2).sum()) * float(grid.dt[k])
        observation, reward, terminated, truncated, _ = env.step(action)
        if terminated:
            expected += 2.0 * float(observation[1])
        assert math.isclose(reward, expected, rel_tol=1e-4, abs_tol=1e-5)
        assert terminated == (k == grid.num_steps - 1) and not truncated


@pytest.mark.slow
@pytest.mark.ray
def test_rllib_ppo_trains_on_the_env(ray_session):
    from ray.rllib.algorithms.ppo import PPOConfig

    from distq.rllib_env import register

    assert register() == ENV_NAME
    config = (PPOConfig().environment(ENV_NAME, env_config=TINY)
              .env_runners(num_env_runners=0, rollout_fragment_length=100)
              .training(train_batch_size_per_learner=200, minibatch_size=100, num_epochs=1)
              .debugging(seed=0))
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    returns = [r["env_runners"]["episode_return_mean"] for r in results]
    assert all(np.isfinite(returns)) and results[-1]["env_runners"]["num_env_steps_sampled_lifetime"] >= 400
