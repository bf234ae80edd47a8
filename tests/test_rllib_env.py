"""distq.edges.rllib_env: the reverse process as a gymnasium environment passes gymnasium's checker, its rewards are
(E14) dt plus beta h at the end, and RLlib's PPO trains on it (slow); conditional configs (Algorithm 2) draw the
episode's condition in the data's shares, show its one-hot code, score with its own points and reward h(y, c)."""
import math

import numpy as np
import pytest
import torch

from distq.edges.rllib_env import ENV_NAME, ReverseDiffusionEnv
from distq.maths.ratio import ratio_score
from distq.problems.data import load_dataset
from distq.setup.config import config_from_dict

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


# ---- conditional configs (Algorithm 2) ------------------------------------------------------------------------

def _conditional(tmp_path) -> dict:
    """The Swiss roll cut into 3 conditions (values 0, 1, 2), with the conditional reward h(x, c) = x_0 + 10 c."""
    (tmp_path / "reward.py").write_text("def h(x, c):\n    return x[:, 0] + 10.0 * c\n")
    return {"seed": 3, "data": {"source": "swiss_roll", "n_samples": 150, "condition": "label", "classes": 3},
            "reward": {"fn": f"{tmp_path / 'reward.py'}:h"}, "sde": {"T": 5.0, "dt": 0.5}, "train": {"beta": 0.5}}


def _posterior_score(y: np.ndarray, points: np.ndarray, mu: float, sigma2: float) -> np.ndarray:
    """(E13) by hand in float64: (-y + mu sum_i w_i x0_i) / sigma2, w = softmax_i(-|y - mu x0_i|^2 / (2 sigma2))."""
    logits = -((y - mu * points) ** 2).sum(1) / (2 * sigma2)
    weights = np.exp(logits - logits.max())
    return (-y + mu * (weights / weights.sum()) @ points) / sigma2


def test_conditional_env_passes_gymnasium_checker(tmp_path):
    from gymnasium.utils.env_checker import check_env

    env = ReverseDiffusionEnv(_conditional(tmp_path))
    assert env.observation_space.shape == (1 + 2 + 3,)
    check_env(env, skip_render_check=True)


def test_conditions_are_drawn_in_the_data_shares_and_shown_one_hot(tmp_path):
    config = _conditional(tmp_path)
    env = ReverseDiffusionEnv(config)
    labels = load_dataset(config_from_dict(config).data, 3).labels.numpy()
    codes = np.stack([env.reset(seed=s)[0][3:] for s in range(3000)])
    assert set(codes.sum(1)) == {1.0} and set(np.unique(codes)) == {0.0, 1.0}
    shares = np.bincount(labels, minlength=3) / labels.size
    assert np.allclose(codes.mean(0), shares, atol=0.03), (codes.mean(0), shares)
    assert np.array_equal(env.reset(seed=7)[0], env.reset(seed=7)[0])


def test_conditional_rewards_use_the_condition_s_own_points_and_h_of_y_and_c(tmp_path):
    """For each condition (read off the one-hot), every step's reward is -(g^2 / 2)|s_hat_c(Y_k) - a_k|^2 dt with
    the score (E13) of that condition's points only, computed by hand, and the last adds beta (x_0 + 10 c)."""
    config = _conditional(tmp_path)
    env = ReverseDiffusionEnv(config)
    dataset = load_dataset(config_from_dict(config).data, 3)
    points, labels, grid = dataset.points.double().numpy(), dataset.labels.numpy(), env.grid
    rng, seen, differs = np.random.default_rng(1), set(), []
    for seed in range(12):
        observation, _ = env.reset(seed=seed)
        condition = int(np.argmax(observation[3:]))
        seen.add(condition)
        for k in range(grid.num_steps):
            y, action = observation[1:3].astype(np.float64), rng.normal(size=2).astype(np.float32)
            mu, sigma2 = float(grid.mu[k]), float(grid.sigma2[k])
            score = _posterior_score(y, points[labels == condition], mu, sigma2)
            expected = -0.5 * float(grid.g2[k]) * float(((score - action) ** 2).sum()) * float(grid.dt[k])
            everyone = _posterior_score(y, points, mu, sigma2)
            differs.append(not np.allclose(everyone, score, rtol=1e-2, atol=1e-2))
            observation, reward, terminated, _, _ = env.step(action)
            assert np.array_equal(observation[3:], np.eye(3)[condition])
            if terminated:
                expected += 0.5 * (float(observation[1]) + 10.0 * condition)
            assert math.isclose(reward, expected, rel_tol=1e-4, abs_tol=1e-4), (seed, k, reward, expected)
    assert seen == {0, 1, 2}
    assert sum(differs) > len(differs) / 4  # all the points' score is another one: the check can tell them apart


@pytest.mark.slow
@pytest.mark.ray
def test_rllib_ppo_trains_on_the_env(ray_session):
    from ray.rllib.algorithms.ppo import PPOConfig

    from distq.edges.rllib_env import register

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
