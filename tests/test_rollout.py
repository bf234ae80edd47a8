"""distq.backends.rollout: Trajectories shapes, determinism, chunk splitting (worker-count independence), the stored
running rewards (E14) and transitions (E5), and generation."""
import copy
import math

import pytest
import torch

from distq.algorithms.batch import Trajectories, episode_chunks
from distq.backends.build import build_rollout, make_grid
from distq.maths.ratio import ratio_score, running_reward
from distq.maths.samplers import SAMPLERS
from distq.problems.rewards import Reward
from distq.setup.config import config_from_dict

T, DT, D = 5.0, 0.5, 2
K = int(T / DT)


def _config(sampler="sde", minibatch=None, eps=0.0, precondition="edm", batch_size=12, chunk_size=5):
    return config_from_dict({
        "seed": 3,
        "data": {"source": "gaussian", "mean": [1.0, -1.0], "std": 0.7},
        "reward": {"fn": "linear", "coef": [1.0, 0.5]},
        "sde": {"T": T, "dt": DT, "sampler": sampler},
        "ratio": {"eps": eps, "minibatch": minibatch},
        "model": {"hidden": 16, "precondition": precondition},
        "train": {"batch_size": batch_size, "chunk_size": chunk_size, "temperature": 0.5},
    })


def _points(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([1.0, -1.0]) + 0.7 * torch.randn(n, D, generator=gen)


def _reward(x):
    return x @ torch.tensor([1.0, 0.5])


def _rollout(config, points=None, perturb=True):
    points = _points() if points is None else points
    rollout = build_rollout(config, points, _reward)
    if perturb:  # a non-trivial network, so the policy mean depends on its weights
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in rollout.policy.net[-1].parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return rollout


def _fields(batch):
    return (batch.states, batch.actions, batch.running_rewards, batch.final_states, batch.terminal_rewards)


def _assert_equal(a, b):
    for x, y in zip(_fields(a), _fields(b)):
        assert torch.equal(x, y)


def _ou(t):
    return math.exp(-t), 1 - math.exp(-2 * t)


@pytest.mark.parametrize("sampler", ["sde", "ode_euler", "ddim"])
def test_shapes(sampler):
    config = _config(sampler)
    chunks = episode_chunks(config.seed, 1, config.train.batch_size, config.train.chunk_size)
    batch = _rollout(config).run(chunks)
    B = config.train.batch_size
    assert batch.states.shape == (K, B, D) and batch.actions.shape == (K, B, D)
    assert batch.running_rewards.shape == (K, B)
    assert batch.final_states.shape == (B, D) and batch.terminal_rewards.shape == (B,)
    assert batch.batch_size == B
    for x in _fields(batch):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_episode_chunks():
    chunks = episode_chunks(0, 5, 12, 5)
    assert [size for _, size in chunks] == [5, 5, 2]
    assert episode_chunks(0, 5, 10, 5) == episode_chunks(0, 5, 10, 5)
    assert [size for _, size in episode_chunks(0, 5, 10, 5)] == [5, 5]
    assert [size for _, size in episode_chunks(0, 5, 3, 100)] == [3]
    for batch_size, chunk_size in [(300, 100), (301, 100), (7, 1), (2, 3), (1000, 64)]:
        sizes = [size for _, size in episode_chunks(1, 2, batch_size, chunk_size)]
        assert sum(sizes) == batch_size and max(sizes) <= chunk_size and min(sizes) >= 1
    seeds = [seed for seed, _ in episode_chunks(0, 1, 1000, 10)]
    assert len(set(seeds)) == len(seeds)
    others = {seed for episode in (2, 3) for seed, _ in episode_chunks(0, episode, 1000, 10)}
    others |= {seed for seed, _ in episode_chunks(1, 1, 1000, 10)}
    assert not others & set(seeds)


@pytest.mark.parametrize("sampler, minibatch", [("sde", None), ("sde", 8), ("ode_euler", None), ("ddim", 8)])
def test_same_chunks_same_trajectories(sampler, minibatch):
    config = _config(sampler, minibatch)
    chunks = episode_chunks(config.seed, 4, config.train.batch_size, config.train.chunk_size)
    rollout = _rollout(config)
    _assert_equal(rollout.run(chunks), rollout.run(chunks))
    _assert_equal(rollout.run(chunks), _rollout(config).run(chunks))  # a fresh copy, as on another worker
    other = rollout.run(episode_chunks(config.seed, 5, config.train.batch_size, config.train.chunk_size))
    assert not torch.equal(other.states, rollout.run(chunks).states)


@pytest.mark.parametrize("sampler, minibatch", [("sde", None), ("sde", 8), ("ode_euler", None), ("ddim", 8)])
def test_split_chunks_concat_equals_one_call(sampler, minibatch):
    config = _config(sampler, minibatch)
    chunks = episode_chunks(config.seed, 2, config.train.batch_size, config.train.chunk_size)
    rollout = _rollout(config)
    whole = rollout.run(chunks)
    for split in (1, 2):
        parts = [rollout.run(chunks[:split]), _rollout(config).run(chunks[split:])]
        joined = Trajectories.concat(parts)
        assert joined.batch_size == config.train.batch_size
        for x, y in zip(_fields(joined), _fields(whole)):
            # Row-wise maths; allow only float rounding from batch-size-dependent matmul kernels.
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)


def test_concat_single_part_and_order():
    config = _config()
    rollout = _rollout(config)
    a, b = rollout.run([(1, 3)]), rollout.run([(2, 4)])
    assert Trajectories.concat([a]) is a
    joined = Trajectories.concat([a, b])
    assert torch.equal(joined.states[:, :3], a.states) and torch.equal(joined.states[:, 3:], b.states)
    assert torch.equal(joined.terminal_rewards, torch.cat([a.terminal_rewards, b.terminal_rewards]))


@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("sampler", ["sde", "ddim"])
def test_running_rewards_recomputed_from_states_and_actions(eps, sampler):
    config = _config(sampler, eps=eps)
    points = _points()
    batch = _rollout(config, points).run(episode_chunks(config.seed, 1, 12, 5))
    for k in range(K):
        mu, sigma2 = _ou(T - k * DT)
        score = ratio_score(batch.states[k].double(), points.double(), mu, sigma2, eps)
        expected = running_reward(score, batch.actions[k].double(), 2.0)  # ou: g^2 = 2
        assert torch.allclose(batch.running_rewards[k].double(), expected, rtol=1e-4, atol=1e-4), k
    assert torch.allclose(batch.terminal_rewards, _reward(batch.final_states), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ode_euler", "ddim"])
def test_stored_transitions_follow_the_sampler(sampler):
    config = _config(sampler)
    batch = _rollout(config).run(episode_chunks(config.seed, 1, 12, 5))
    grid = make_grid(config)
    nxt = torch.cat([batch.states[1:], batch.final_states.unsqueeze(0)])
    for k in range(K):
        expected = SAMPLERS[sampler](grid, k, batch.states[k], batch.actions[k], None)
        assert torch.allclose(nxt[k], expected, rtol=1e-5, atol=1e-5), k


def test_start_and_actions_have_the_policy_law():
    config = _config("sde", batch_size=400, chunk_size=100)
    rollout = _rollout(config)
    batch = rollout.run(episode_chunks(config.seed, 1, 400, 100))
    n = batch.states[0].numel()
    # Y_0 ~ N(0, sigma_T^2 I) (E4); a_k ~ N(mu_psi(tau_k, Y_k), theta / g^2 I) (E10), theta = 0.5, g^2 = 2.
    assert abs(float(batch.states[0].var()) / _ou(T)[1] - 1) < 4 * math.sqrt(2 / n)
    assert abs(float(batch.states[0].mean())) < 4 * math.sqrt(1 / n)
    tau = make_grid(config).tau.unsqueeze(1)
    with torch.no_grad():
        means = rollout.policy(tau, batch.states)
    z = (batch.actions - means) / math.sqrt(0.5 / 2.0)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / z.numel()) and abs(float(z.mean())) < 4 / math.sqrt(z.numel())


def test_set_weights_matches_shared_policy():
    config = _config()
    source = _rollout(config)
    target = _rollout(config, perturb=False)
    chunks = episode_chunks(config.seed, 1, 12, 5)
    assert not torch.equal(source.run(chunks).actions, target.run(chunks).actions)
    target.set_weights(copy.deepcopy(source.policy.state_dict()))
    _assert_equal(source.run(chunks), target.run(chunks))


@pytest.mark.parametrize("sampler", ["sde", "ode_euler", "ddim"])
def test_generate_shape_and_determinism(sampler):
    rollout = _rollout(_config(sampler))
    a = rollout.generate(50, torch.Generator().manual_seed(0))
    b = rollout.generate(50, torch.Generator().manual_seed(0))
    c = rollout.generate(50, torch.Generator().manual_seed(1))
    assert a.shape == (50, D) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_with_other_grid_and_sampler():
    config = _config("sde")
    rollout = _rollout(config)
    grid = make_grid(config, 4)
    assert grid.num_steps == 4
    a = rollout.generate(20, torch.Generator().manual_seed(0), grid=grid, sampler="ode_euler")
    b = rollout.generate(20, torch.Generator().manual_seed(0), grid=grid, sampler="ode_euler")
    assert a.shape == (20, D) and torch.equal(a, b)
    assert not torch.equal(a, rollout.generate(20, torch.Generator().manual_seed(0)))


def test_generate_with_fresh_edm_policy_recovers_gaussian_data():
    # A fresh edm policy is the exact score of N(m_hat, s_hat^2 I) (policy docstring), so the mean-action reverse
    # process lands on that law up to the sampler's O(dt) error: small at 200 steps, and shrinking from 50 steps.
    config = _config("ode_euler")
    points = _points(2000, seed=5)
    rollout = _rollout(config, points, perturb=False)
    m_hat = points.double().mean(0)
    s2_hat = float((points.double() - m_hat).pow(2).mean())
    errors = {}
    for steps in (50, 200):
        x = rollout.generate(20000, torch.Generator().manual_seed(0), grid=make_grid(config, steps)).double()
        errors[steps] = (float((x.mean(0) - m_hat).abs().max()), float((x.var(0) / s2_hat - 1).abs().max()))
        assert abs(float(torch.corrcoef(x.T)[0, 1])) < 0.03
    mc_mean = 4 * math.sqrt(s2_hat / 20000)
    assert errors[200][0] < mc_mean + T / 200 and errors[200][1] < 0.06
    assert errors[200][1] < 0.5 * errors[50][1]


def test_conditional_rollout_uses_each_condition_data_and_shares():
    """Algorithm 2: trajectories draw conditions in the data's shares, each running reward (E14) uses the ratio
    score (E13) of its own condition's points only, and a reward h(y, c) gets each trajectory's condition value."""
    config = _config(batch_size=400, chunk_size=100)
    points = _points(90)
    labels = torch.tensor([0] * 30 + [1] * 60)
    reward = Reward(lambda x, c: x[:, 0] + c, "offset", condition_values=(10, 20))
    rollout = build_rollout(config, points, reward, labels=labels)
    with torch.no_grad():
        rollout.policy.net[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    batch = rollout.run(episode_chunks(config.seed, 1, 400, 100))
    assert abs(float((batch.conditions == 1).float().mean()) - 2 / 3) < 0.08
    grid, k = rollout.grid, 4
    for condition, own in ((0, points[:30]), (1, points[30:])):
        rows = batch.conditions == condition
        score = ratio_score(batch.states[k][rows], own, float(grid.mu[k]), float(grid.sigma2[k]))
        expected = running_reward(score, batch.actions[k][rows], float(grid.g2[k]))
        assert torch.allclose(batch.running_rewards[k][rows], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch.terminal_rewards, batch.final_states[:, 0] + torch.tensor([10.0, 20.0])[batch.conditions])
    again = rollout.run(episode_chunks(config.seed, 1, 400, 100))
    assert torch.equal(again.conditions, batch.conditions) and torch.equal(again.states, batch.states)


def test_conditional_minibatches_are_drawn_per_chunk_from_each_condition_s_data():
    """ratio.minibatch m in a conditional run: a condition with N_c <= m uses all its points (exact), a larger one a
    fresh m-subset of its own points per chunk and step; a batch equals its chunks generated apart (as on workers)."""
    config = _config(minibatch=40, batch_size=40, chunk_size=10)
    points, labels = _points(90), torch.tensor([0] * 30 + [1] * 60)
    rollout = build_rollout(config, points, Reward(_reward, "linear", (0, 1)), labels=labels)
    chunks = episode_chunks(config.seed, 1, 40, 10)
    batch = rollout.run(chunks)
    subsets, conditions = rollout.ratio_draws(chunks)
    assert torch.equal(conditions, batch.conditions)
    grid, k = rollout.grid, 5
    for i, rows in enumerate(torch.arange(40).split(10)):
        assert subsets[i][k][0] is None and subsets[i][k][1].shape == (40,)
        for c, own in ((0, points[:30]), (1, points[30:][subsets[i][k][1]])):
            mine = rows[batch.conditions[rows] == c]
            score = ratio_score(batch.states[k][mine], own, float(grid.mu[k]), float(grid.sigma2[k]))
            expected = running_reward(score, batch.actions[k][mine], float(grid.g2[k]))
            assert torch.allclose(batch.running_rewards[k][mine], expected, rtol=1e-5, atol=1e-5)
    apart = Trajectories.concat([rollout.run(chunks[:1]), rollout.run(chunks[1:])])
    assert torch.equal(apart.conditions, batch.conditions)
    assert torch.allclose(apart.running_rewards, batch.running_rewards, rtol=1e-6, atol=1e-6)
