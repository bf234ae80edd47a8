"""distq.maths.policy: the policy density (E10-E11) normalises, matches torch's Normal, and the preconditioned mean
starts at the exact Gaussian score (algorithm.md section 13)."""
import math

import numpy as np
import pytest
import torch

from distq.backends.build import build_policy, data_statistics
from distq.maths.policy import (StepMeans, TimeEmbedding, action_std, mlp, policy_log_density, q_value,
                                rao_blackwell_surrogate)
from distq.maths.ratio import running_reward
from distq.setup.config import config_from_dict

T = 5.0
BETA_MIN, BETA_MAX = 0.1, 20.0



def _closed_form(schedule, t):
    """mu_t, sigma_t^2 of (E2) for the three schedules of algorithm.md section 1."""
    if schedule == "ou":
        return math.exp(-t), 1 - math.exp(-2 * t)
    if schedule == "ve":
        return 1.0, t
    integral = BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2 / T
    return math.exp(-0.5 * integral), 1 - math.exp(-integral)


def _config(schedule="ou", precondition="edm", hidden=16, seed=0, time_frequencies=0):
    return config_from_dict({"seed": seed, "sde": {"schedule": schedule, "T": T, "dt": 0.5, "beta_min": BETA_MIN,
                                                  "beta_max": BETA_MAX},
                             "model": {"hidden": hidden, "precondition": precondition,
                                       "time_frequencies": time_frequencies}})


def _gaussian_points(n=300, mean=(1.0, -2.0), std=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(mean) + std * torch.randn(n, len(mean), generator=gen)


def _randomise_last_layer(policy, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.net[-1].parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("g2", [0.1, 2.0, 20.0])
@pytest.mark.parametrize("theta", [0.05, 1.0, 5.0])
def test_policy_density_normalises_1d(g2, theta):
    mean = 0.7
    std = math.sqrt(theta / g2)
    a = torch.linspace(mean - 12 * std, mean + 12 * std, 20001, dtype=torch.float64).unsqueeze(-1)
    q = q_value(a, torch.full_like(a, mean), torch.tensor(g2, dtype=torch.float64), theta)
    density = torch.exp(q / theta).numpy()
    mass = np.sum(0.5 * (density[1:] + density[:-1]) * np.diff(a[:, 0].numpy()))
    assert mass == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("g2, theta", [(0.1, 5.0), (2.0, 1.0), (20.0, 0.05)])
def test_policy_density_normalises_2d(g2, theta):
    mean = torch.tensor([0.3, -1.2], dtype=torch.float64)
    std = math.sqrt(theta / g2)
    u = torch.linspace(-10 * std, 10 * std, 801, dtype=torch.float64)
    a = torch.stack(torch.meshgrid(u + mean[0], u + mean[1], indexing="ij"), -1)
    density = torch.exp(q_value(a, mean, torch.tensor(g2, dtype=torch.float64), theta) / theta).numpy()
    h = float(u[1] - u[0])
    weights = np.ones(801)
    weights[[0, -1]] = 0.5
    mass = h * h * weights @ density @ weights
    assert mass == pytest.approx(1.0, abs=1e-8)


def test_log_density_equals_torch_normal():
    gen = torch.Generator().manual_seed(0)
    K, B, d, theta = 4, 5, 3, 0.7
    g2 = torch.tensor([0.2, 1.0, 2.0, 9.0]).unsqueeze(1)
    mean = torch.randn(K, B, d, generator=gen)
    action = mean + torch.randn(K, B, d, generator=gen)
    expected = torch.distributions.Normal(mean, (theta / g2).sqrt().unsqueeze(-1)).log_prob(action).sum(-1)
    got = policy_log_density(action, mean, g2, theta)
    assert got.shape == (K, B)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q_value(action, mean, g2, theta), theta * expected, rtol=1e-5, atol=1e-5)


def test_action_std():
    g2 = torch.tensor([0.5, 2.0, 8.0])
    assert torch.allclose(action_std(g2, 2.0), torch.tensor([2.0, 1.0, 0.5]))


def test_data_statistics_match_numpy():
    points = _gaussian_points(seed=3)
    mean, scale = data_statistics(points)
    x = points.double().numpy()
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-6)
    assert scale == pytest.approx(math.sqrt(((x - x.mean(0)) ** 2).mean()), rel=1e-6)


@pytest.mark.parametrize("schedule", ["ou", "ve", "vp"])
def test_fresh_edm_policy_is_exact_gaussian_score(schedule):
    points = _gaussian_points()
    x = points.double().numpy()
    m_hat = torch.tensor(x.mean(0))
    s_hat = math.sqrt(((x - x.mean(0)) ** 2).mean())
    policy = build_policy(_config(schedule), points)
    gen = torch.Generator().manual_seed(5)
    for tau in [0.0, 1.0, 2.5, 4.0, 4.5, 4.9]:
        mu, sigma2 = _closed_form(schedule, T - tau)
        var = mu**2 * s_hat**2 + sigma2
        y = mu * m_hat + math.sqrt(var) * torch.randn(7, 2, generator=gen, dtype=torch.float64)
        expected = -(y - mu * m_hat) / var  # score of N(mu m, (mu^2 s^2 + sigma^2) I)
        with torch.no_grad():
            got = policy(torch.tensor(tau), y.float()).double()
        assert got.shape == (7, 2)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), tau


def test_fresh_edm_policy_with_bandwidth_is_the_smoothed_gaussian_score():
    """ratio.bandwidth h: the untrained mean is the score of the data law smoothed by N(0, h^2 I), the law the
    ratio estimator then targets: N(mu m, (mu^2 (s^2 + h^2) + sigma^2) I) for Gaussian data."""
    points, h = _gaussian_points(), 0.6
    x = points.double().numpy()
    m_hat, s2_hat = torch.tensor(x.mean(0)), ((x - x.mean(0)) ** 2).mean()
    config = config_from_dict({**_config().to_dict(), "ratio": {"bandwidth": h}})
    policy = build_policy(config, points)
    gen = torch.Generator().manual_seed(5)
    for tau in [0.0, 2.5, 4.9, 4.99]:
        mu, sigma2 = _closed_form("ou", T - tau)
        var = mu**2 * (s2_hat + h * h) + sigma2
        y = mu * m_hat + math.sqrt(var) * torch.randn(7, 2, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            got = policy(torch.tensor(tau), y.float()).double()
        expected = -(y - mu * m_hat) / var
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), tau


def test_fresh_edm_policy_scalar_and_vector_tau_agree():
    points = _gaussian_points()
    policy = build_policy(_config(), points)
    _randomise_last_layer(policy)
    y = _gaussian_points(6, seed=2)
    tau = torch.full((6,), 1.5)
    with torch.no_grad():
        assert torch.allclose(policy(tau, y), policy(torch.tensor(1.5), y), rtol=1e-6, atol=1e-6)


def test_none_precondition_returns_raw_network_output():
    points = _gaussian_points()
    policy = build_policy(_config(precondition="none"), points)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4, 2, generator=gen)
    tau = torch.tensor([0.0, 2.0, 4.5]).unsqueeze(1)
    with torch.no_grad():
        out = policy(tau, y)
        raw = policy.net(torch.cat([y, (tau / T).unsqueeze(-1).expand(3, 4, 1)], -1))
    assert out.shape == (3, 4, 2)
    assert torch.allclose(out, raw, rtol=1e-6, atol=1e-6)
    assert out.abs().max() > 0  # the plain network is not zero-initialised


def test_build_policy_is_seeded():
    points = _gaussian_points()
    a, b, c = (build_policy(_config(precondition="none", seed=s), points) for s in (0, 0, 1))
    y = _gaussian_points(5, seed=9)
    tau = torch.tensor(1.0)
    with torch.no_grad():
        assert torch.equal(a(tau, y), b(tau, y)) and not torch.equal(a(tau, y), c(tau, y))


@pytest.mark.parametrize("precondition", ["edm", "none"])
def test_broadcast_over_steps_equals_per_step_calls(precondition):
    points = _gaussian_points()
    policy = build_policy(_config(precondition=precondition), points)
    _randomise_last_layer(policy)
    K, B = 6, 5
    gen = torch.Generator().manual_seed(4)
    tau = (torch.arange(K) * 0.8).unsqueeze(1)
    y = 2 * torch.randn(K, B, 2, generator=gen)
    with torch.no_grad():
        together = policy(tau, y)
        apart = torch.stack([policy(tau[k, 0], y[k]) for k in range(K)])
    assert together.shape == (K, B, 2)
    assert torch.allclose(together, apart, rtol=1e-5, atol=1e-5)


def test_mlp_equals_the_plain_tanh_network():
    """The folded forward (sigmoid form of tanh) against torch's own Linear-Tanh-Linear-ReLU-Linear, value and grads."""
    torch.manual_seed(3)
    net = mlp(3, 16, 2, zero_last=False)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2))
    plain.load_state_dict(net.state_dict())
    x = 2 * torch.randn(50, 3)
    for model in (net, plain):
        model(x).pow(3).sum().backward()
    assert torch.allclose(net(x), plain(x), rtol=1e-5, atol=1e-6)
    for folded, reference in zip(net.parameters(), plain.parameters()):
        assert torch.allclose(folded.grad, reference.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precondition, frequencies", [("edm", 0), ("none", 0), ("edm", 3)])
def test_step_means_equal_the_policy_mean_at_each_step(precondition, frequencies):
    """The rollout's folded per-step mean against PolicyMean.forward, with every layer (and the learned time
    frequencies) randomised."""
    points = _gaussian_points()
    policy = build_policy(_config(precondition=precondition, time_frequencies=frequencies), points)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    tau = torch.arange(10) * 0.5
    means = StepMeans(policy, policy.pre.coefficients(tau))
    y = 2 * torch.randn(7, 2, generator=gen)
    with torch.no_grad():
        for k in range(10):
            expected = policy(tau[k], y)
            assert torch.allclose(means(k, y), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_rao_blackwell_surrogate_is_the_expected_sampled_policy_gradient():
    """Running part: over 400,000 actions a ~ pi (E10), the sampled (E16) loss gradient -(r_hat - q) dt^2 grad_mu q
    averages to the closed form theta g^2 dt^2 (mu - s), which the surrogate's gradient is exactly (advantage 0).
    Value part: the surrogate's gradient is -A dt grad_mu q = -A dt g^2 (a - mu) per action."""
    gen = torch.Generator().manual_seed(0)
    g2, dt, theta, n = 1.7, 0.3, 0.8, 400_000
    mean, score = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    actions = mean + math.sqrt(theta / g2) * torch.randn(n, 3, generator=gen)
    closed_form = theta * g2 * dt**2 * (mean - score)

    mu = mean.expand(n, 3).clone().requires_grad_(True)
    q = q_value(actions, mu, torch.tensor(g2), theta)
    td_loss = -((running_reward(score, actions, g2) - q).detach() * dt * q * dt).sum()
    sampled = torch.autograd.grad(td_loss, mu)[0].double()
    stderr = sampled.std(0) / math.sqrt(n)
    assert ((sampled.mean(0) - closed_form).abs() < 4 * stderr).all()
    assert (closed_form.abs() > 20 * stderr).all()  # the check has the power to see it

    advantage = torch.randn(n, generator=gen)
    mu = mean.expand(n, 3).clone().requires_grad_(True)
    surrogate = rao_blackwell_surrogate(q_value(actions, mu, torch.tensor(g2), theta), mu, score.expand(n, 3),
                                        advantage, torch.tensor(g2), torch.tensor(dt), theta)
    gradient = torch.autograd.grad(surrogate.sum(), mu)[0]
    expected = closed_form - (advantage * dt * g2).unsqueeze(-1) * (actions - mean)
    assert torch.allclose(gradient, expected, atol=1e-5)


def test_time_embedding_is_tau_alone_or_its_learned_fourier_features():
    time = torch.tensor([[0.0], [0.25], [1.0]])
    assert torch.equal(TimeEmbedding(0)(time), time) and TimeEmbedding(0).size == 1
    embedding = TimeEmbedding(2)
    expected = torch.cat([time, torch.sin(math.pi * time), torch.sin(2 * math.pi * time),
                          torch.cos(math.pi * time), torch.cos(2 * math.pi * time)], -1)
    assert embedding.size == 5 and torch.allclose(embedding(time), expected, atol=1e-6)
    embedding(time).sum().backward()
    assert embedding.frequencies.grad.abs().min() > 0  # learned: the frequencies get gradients


def test_default_networks_keep_the_paper_s_parameters():
    """time_frequencies = 0 adds no parameter: old checkpoints load, and the fresh weights are as before."""
    points = _gaussian_points()
    plain, fourier = build_policy(_config(), points), build_policy(_config(time_frequencies=4), points)
    assert set(plain.state_dict()) == {"pre.data_mean", "pre.data_scale", *(f"net.{i}.{w}" for i in (0, 2, 4)
                                                                          for w in ("weight", "bias"))}
    assert fourier.net[0].in_features == plain.net[0].in_features + 8 and "time.frequencies" in fourier.state_dict()
