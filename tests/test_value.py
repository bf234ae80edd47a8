"""distq.maths.value: TD errors (E15) against a loop, the semi-gradient detach, the exact terminal condition (E12),
and the entropy baseline c(tau) against closed forms and a numerical integral."""
import math

import numpy as np
import pytest
import torch

from distq.backends.build import build_value
from distq.maths.value import td_errors
from distq.setup.config import config_from_dict

T = 5.0
BETA_MIN, BETA_MAX = 0.1, 20.0
TAUS = [0.0, 0.123, 1.0, 2.5, 3.77, 4.75, 4.999]



def _config(schedule="ou", theta=5.0, beta=0.0, seed=0):
    return config_from_dict({"seed": seed, "sde": {"schedule": schedule, "T": T, "dt": 0.25, "beta_min": BETA_MIN,
                                                  "beta_max": BETA_MAX},
                             "model": {"hidden": 16}, "train": {"temperature": theta, "beta": beta}})


def _points(n=100, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([1.0, -1.0][:d]) + 0.5 * torch.randn(n, d, generator=gen)


def _first_coordinate(x):
    return x[:, 0].clone()


def _td_loop(values, terminal, rewards, q, dt):
    K, B = values.shape
    out = torch.empty(K, B, dtype=values.dtype)
    for k in range(K):
        for b in range(B):
            nxt = values[k + 1, b] if k + 1 < K else terminal[b]
            out[k, b] = nxt - values[k, b] + (rewards[k, b] - q[k, b]) * dt
    return out


def _inputs(K=5, B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((K, B), (B,), (K, B), (K, B))]


def test_td_errors_match_loop():
    values, terminal, rewards, q = _inputs()
    got = td_errors(values, terminal, rewards, q, 0.25)
    assert got.shape == (5, 4)
    assert torch.allclose(got, _td_loop(values, terminal, rewards, q, 0.25), rtol=1e-12, atol=1e-12)


def test_td_errors_single_step():
    values, terminal, rewards, q = _inputs(K=1, B=3)
    got = td_errors(values, terminal, rewards, q, 5.0)
    assert torch.allclose(got[0], terminal - values[0] + (rewards[0] - q[0]) * 5.0)


def test_terminal_row_uses_terminal_values():
    values, h, rewards, q = _inputs()
    beta = 3.0
    got = td_errors(values, beta * h, rewards, q, 0.25)
    assert torch.allclose(got[-1], beta * h - values[-1] + (rewards[-1] - q[-1]) * 0.25)
    bumped = td_errors(values, beta * h + 1.0, rewards, q, 0.25)
    assert torch.allclose(bumped[-1] - got[-1], torch.ones(4, dtype=torch.float64))
    assert torch.equal(bumped[:-1], got[:-1])


def test_next_values_are_detached():
    values, terminal, rewards, q = _inputs()
    values.requires_grad_(True)
    td_errors(values, terminal, rewards, q, 0.25).sum().backward()
    # Only the -J_phi(tau_k, Y_k) term carries gradient: d(sum delta)/d values = -1 everywhere (not 0 for k >= 1).
    assert torch.equal(values.grad, -torch.ones_like(values))


def test_gradient_weights_by_own_delta():
    values, terminal, rewards, q = _inputs()
    values.requires_grad_(True)
    delta = td_errors(values, terminal, rewards, q, 0.25)
    (0.5 * delta.square().sum()).backward()
    assert torch.allclose(values.grad, -delta.detach())


def _baseline_closed_form(theta, d, g2, tau):
    return (T - tau) * (theta * d / 2) * math.log(2 * math.pi * theta / g2)


@pytest.mark.parametrize("schedule, g2", [("ou", 2.0), ("ve", 1.0)])
@pytest.mark.parametrize("theta", [0.1, 5.0])
@pytest.mark.parametrize("d", [1, 2])
def test_baseline_constant_g_closed_form(schedule, g2, theta, d):
    value = build_value(_config(schedule, theta), _points(d=d), _first_coordinate)
    tau = torch.tensor(TAUS)
    expected = torch.tensor([_baseline_closed_form(theta, d, g2, t) for t in TAUS])
    got = value.baseline(tau)
    assert got.shape == (len(TAUS),)
    assert torch.allclose(got.double(), expected.double(), rtol=1e-5, atol=1e-5)
    assert float(value.baseline(torch.tensor(T))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("theta", [0.1, 5.0])
def test_baseline_vp_numerical_integral(theta):
    d = 2
    value = build_value(_config("vp", theta), _points(d=d), _first_coordinate)
    got = value.baseline(torch.tensor(TAUS)).double().numpy()
    for tau, c in zip(TAUS, got):
        s = np.linspace(tau, T, 200001)
        beta = BETA_MIN + (BETA_MAX - BETA_MIN) * (T - s) / T  # g^2 at forward time T - s
        rate = 0.5 * theta * d * np.log(2 * math.pi * theta / beta)
        expected = float(np.sum(0.5 * (rate[1:] + rate[:-1]) * np.diff(s)))
        # distq tabulates c on 1025 nodes: ~1e-4 theta of trapezoid error from log beta's curvature near t = 0.
        assert c == pytest.approx(expected, rel=1e-4, abs=5e-4 * theta), tau


@pytest.mark.parametrize("schedule", ["ou", "ve", "vp"])
def test_fresh_value_is_baseline_plus_offset(schedule):
    beta, theta = 2.0, 5.0
    points = _points()
    value = build_value(_config(schedule, theta, beta), points, _first_coordinate)
    offset = beta * float(points[:, 0].double().mean())
    gen = torch.Generator().manual_seed(1)
    K, B = len(TAUS), 6
    tau = torch.tensor(TAUS).unsqueeze(1)
    y = 3 * torch.randn(K, B, 2, generator=gen)
    with torch.no_grad():
        got = value(tau, y)
        baseline = value.baseline(tau)
    assert got.shape == (K, B)
    assert torch.allclose(got, (baseline + offset).expand(K, B), rtol=1e-5, atol=1e-5)
    if schedule != "vp":
        g2 = 2.0 if schedule == "ou" else 1.0
        closed = torch.tensor([_baseline_closed_form(theta, 2, g2, t) + offset for t in TAUS]).unsqueeze(1)
        assert torch.allclose(got.double(), closed.expand(K, B).double(), rtol=1e-5, atol=1e-4)


def test_value_broadcast_over_steps_equals_per_step_calls():
    value = build_value(_config(beta=1.0), _points(), _first_coordinate)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in value.net[-1].parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    tau = (torch.arange(4) * 1.25).unsqueeze(1)
    y = torch.randn(4, 5, 2, generator=gen)
    with torch.no_grad():
        together = value(tau, y)
        apart = torch.stack([value(tau[k, 0], y[k]) for k in range(4)])
    assert together.shape == (4, 5) and together.std() > 0
    assert torch.allclose(together, apart, rtol=1e-5, atol=1e-5)


def test_conditional_value_scale_uses_h_of_each_point_and_its_condition():
    """offset = beta mean h(x0_i, c_i), scale = 1 + beta std h(x0_i, c_i); here h(x, c) = c with labels 0, 1, 1, 1."""
    from distq.problems.rewards import Reward

    labels = torch.tensor([0, 1, 1, 1] * 25)
    value = build_value(_config(beta=2.0), _points(), Reward(lambda x, c: c.float(), "c", (0, 1)), labels)
    assert value.classes == 2
    assert float(value.offset) == pytest.approx(2.0 * 0.75)
    assert float(value.scale) == pytest.approx(1.0 + 2.0 * float(torch.tensor([0.0, 1, 1, 1] * 25).std()))


def _prior_config(beta, bandwidth=0.0):
    return config_from_dict({"sde": {"schedule": "ou", "T": T, "dt": 0.25}, "ratio": {"bandwidth": bandwidth},
                             "model": {"hidden": 16, "value_prior": "posterior_reward"},
                             "train": {"temperature": 5.0, "beta": beta}})


@pytest.mark.parametrize("bandwidth", [0.0, 0.3])
def test_reward_prior_is_the_optimal_value_s_state_dependence_for_gaussian_data_and_linear_reward(bandwidth):
    """Data N(m, s^2 I), h(x) = c.x: J*(tau, y) = log E[exp(beta c.X_0) | X_t = y] = beta c.E[X_0 | y] + const, with
    E[X_0 | y] = m + mu v / (mu^2 v + sigma^2) (y - mu m), v = s^2 + h^2 for the data smoothed by N(0, h^2 I). A fresh
    network outputs 0, so J_phi is the baseline plus the prior: its y-dependence and grad_y must be J*'s."""
    beta, std, m, c = 1.5, 0.5, torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    points = m + std * torch.randn(20000, 2, generator=gen)
    value = build_value(_prior_config(beta, bandwidth), points, lambda x: x @ c)
    assert float(value.offset) == 0.0
    tau = torch.tensor([[0.5], [2.5], [4.75]])
    t = T - tau
    mu, sigma2 = torch.exp(-t), 1 - torch.exp(-2 * t)
    variance = std**2 + bandwidth**2
    # states where the process is: the noised data's law N(mu m, (mu^2 v + sigma^2) I)
    y = (mu.unsqueeze(-1) * m + (mu**2 * variance + sigma2).sqrt().unsqueeze(-1)
         * torch.randn(3, 64, 2, generator=gen)).requires_grad_(True)
    got = value(tau, y)
    gradient, = torch.autograd.grad(got.sum(), y)
    gain = (mu * variance / (mu**2 * variance + sigma2)).unsqueeze(-1)  # (3, 1, 1)
    exact = beta * (m + gain * (y.detach() - mu.unsqueeze(-1) * m)) @ c
    with torch.no_grad():
        assert torch.allclose(got - value.baseline(tau), exact, atol=0.06)
    exact_gradient = (beta * gain * c).expand_as(gradient)
    # Monte Carlo error of 20,000 points: small on the average over queries, a few 0.01 per query near the data
    assert torch.allclose(gradient.mean(1), exact_gradient.mean(1), rtol=0.05, atol=1e-3)
    assert torch.allclose(gradient, exact_gradient, rtol=0.2, atol=1e-3)


def test_reward_prior_is_off_at_beta_zero_and_its_data_are_not_saved():
    points = _points()
    assert build_value(_prior_config(0.0), points, _first_coordinate).prior is None
    value = build_value(_prior_config(1.0), points, _first_coordinate)
    assert value.prior is not None
    assert value.prior.data.shape == points.shape
    assert all(v.shape != points.shape for v in value.state_dict().values())  # checkpoints stay data-free
    assert not any(key.startswith("prior") for key in value.state_dict())


def test_td_errors_bootstrap_from_given_next_values():
    values, terminal, rewards, q = _inputs()
    next_values = torch.randn(4, 4, dtype=torch.float64)
    got = td_errors(values, terminal, rewards, q, 0.25, next_values)
    for k in range(5):
        nxt = next_values[k] if k < 4 else terminal
        assert torch.allclose(got[k], nxt - values[k] + (rewards[k] - q[k]) * 0.25)
