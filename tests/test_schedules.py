"""distq.maths.schedules: mu_t and sigma_t^2 against a numerical integral of (E2), the time grid, the prior."""
import math

import numpy as np
import pytest
import torch

from distq.maths.schedules import make_schedule, prior_std, time_grid
from distq.setup.config import SDEConfig

T = 5.0
BETA_MIN, BETA_MAX = 0.1, 20.0
TIMES = [0.01, 0.1, 0.5, 1.0, 2.5, 4.0, 5.0]


def _f_g2(name):
    """f(t) and g(t)^2 of algorithm.md section 1, written out independently of distq."""
    if name == "ou":
        return (lambda t: np.ones_like(t)), (lambda t: np.full_like(t, 2.0))
    if name == "ve":
        return (lambda t: np.zeros_like(t)), (lambda t: np.ones_like(t))
    beta = lambda t: BETA_MIN + (BETA_MAX - BETA_MIN) * t / T  # noqa: E731
    return (lambda t: 0.5 * beta(t)), beta


def _cumtrapz(y, x):
    return np.concatenate([[0.0], np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(x))])


def _trapz(y, x):
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def _integral_e2(name, t, nodes=100001):
    """(E2) by trapezoid quadrature (the vp integrand decays at rate beta_max ~ 20 per unit s, hence the fine grid):
    mu_t = exp(-int_0^t f), sigma_t^2 = int_0^t exp(-2 int_s^t f) g(s)^2 ds."""
    f, g2 = _f_g2(name)
    s = np.linspace(0.0, t, nodes)
    F = _cumtrapz(f(s), s)
    mu = math.exp(-F[-1])
    sigma2 = _trapz(np.exp(-2.0 * (F[-1] - F)) * g2(s), s)
    return mu, sigma2


def _schedule(name):
    return make_schedule(SDEConfig(schedule=name, T=T, beta_min=BETA_MIN, beta_max=BETA_MAX))


def _at(fn, t):
    return float(fn(torch.tensor(t, dtype=torch.float64)))


@pytest.mark.parametrize("name", ["ou", "ve", "vp"])
@pytest.mark.parametrize("t", TIMES)
def test_mu_sigma2_match_numerical_integral(name, t):
    schedule = _schedule(name)
    mu, sigma2 = _integral_e2(name, t)
    assert _at(schedule.mu, t) == pytest.approx(mu, rel=1e-7, abs=1e-300)
    assert _at(schedule.sigma2, t) == pytest.approx(sigma2, rel=1e-6)


@pytest.mark.parametrize("name", ["ou", "ve", "vp"])
def test_f_g2_match_definitions(name):
    schedule = _schedule(name)
    f, g2 = _f_g2(name)
    t = np.array(TIMES)
    tt = torch.tensor(t, dtype=torch.float64)
    np.testing.assert_allclose(schedule.f(tt).numpy(), f(t), rtol=1e-12)
    np.testing.assert_allclose(schedule.g2(tt).numpy(), g2(t), rtol=1e-12)


@pytest.mark.parametrize("name", ["ou", "ve", "vp"])
def test_schedule_at_zero_is_identity(name):
    schedule = _schedule(name)
    assert _at(schedule.mu, 0.0) == 1.0 and _at(schedule.sigma2, 0.0) == 0.0


def test_ou_and_ve_closed_forms():
    ou, ve = _schedule("ou"), _schedule("ve")
    for t in TIMES:
        assert _at(ou.mu, t) == pytest.approx(math.exp(-t), rel=1e-12)
        assert _at(ou.sigma2, t) == pytest.approx(1 - math.exp(-2 * t), rel=1e-12)
        assert _at(ve.mu, t) == 1.0 and _at(ve.sigma2, t) == pytest.approx(t, rel=1e-12)


def test_sigma2_small_t_has_relative_accuracy():
    # sigma_t^2 ~ 2t for ou as t -> 0; a naive 1 - exp(-2t) loses all digits at t = 1e-9.
    ou = _schedule("ou")
    assert _at(ou.sigma2, 1e-9) == pytest.approx(2e-9, rel=1e-6)


@pytest.mark.parametrize("name", ["ou", "ve", "vp"])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_time_grid(name, steps):
    schedule = _schedule(name)
    grid = time_grid(schedule, T, steps)
    dt = T / steps
    assert grid.num_steps == steps and grid.T == T
    for key in ("dt", "tau", "t", "f", "g2", "mu", "sigma2", "mu_next", "sigma2_next"):
        value = getattr(grid, key)
        assert value.shape == (steps,) and value.dtype == torch.float32, key
    k = np.arange(steps)
    np.testing.assert_allclose(grid.dt.numpy(), np.full(steps, dt), rtol=1e-6)
    np.testing.assert_allclose(grid.tau.numpy(), k * dt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grid.t.numpy(), T - k * dt, rtol=1e-6)
    assert float(grid.t.min()) >= dt * (1 - 1e-6)
    f, g2 = _f_g2(name)
    t = T - k * dt
    np.testing.assert_allclose(grid.f.numpy(), f(t), rtol=1e-6)
    np.testing.assert_allclose(grid.g2.numpy(), g2(t), rtol=1e-6)
    now = [_integral_e2(name, ti) for ti in t]
    after = [_integral_e2(name, ti - dt) if ti - dt > 0 else (1.0, 0.0) for ti in t]
    np.testing.assert_allclose(grid.mu.numpy(), [m for m, _ in now], rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(grid.sigma2.numpy(), [s for _, s in now], rtol=1e-5)
    np.testing.assert_allclose(grid.mu_next.numpy(), [m for m, _ in after], rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(grid.sigma2_next.numpy(), [s for _, s in after], rtol=1e-5, atol=1e-7)
    assert float(grid.sigma2_next[-1]) == 0.0 and float(grid.mu_next[-1]) == 1.0
    assert float(grid.sigma2.min()) > 0


@pytest.mark.parametrize("name", ["ou", "vp"])
@pytest.mark.parametrize("power", [0.5, 2.0, 3.0])
def test_power_grid_times_and_constants(name, power):
    steps = 20
    grid = time_grid(_schedule(name), T, steps, power)
    t = T * ((steps - np.arange(steps)) / steps) ** power
    t_next = T * ((steps - np.arange(1, steps + 1)) / steps) ** power
    np.testing.assert_allclose(grid.t.numpy(), t, rtol=1e-6)
    np.testing.assert_allclose(grid.tau.numpy(), T - t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grid.dt.numpy(), t - t_next, rtol=1e-5)
    assert float(grid.dt.double().sum()) == pytest.approx(T, rel=1e-6)
    # power > 1: steps shrink towards the data, the last noise level is T / K^power
    assert bool((grid.dt[1:] < grid.dt[:-1]).all()) == (power > 1)
    assert float(grid.t[-1]) == pytest.approx(T / steps**power, rel=1e-6)
    now = [_integral_e2(name, ti) for ti in t]
    after = [_integral_e2(name, ti) if ti > 0 else (1.0, 0.0) for ti in t_next]
    np.testing.assert_allclose(grid.sigma2.numpy(), [s for _, s in now], rtol=1e-5)
    np.testing.assert_allclose(grid.mu_next.numpy(), [m for m, _ in after], rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(grid.sigma2_next.numpy(), [s for _, s in after], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T_, steps", [(1.0, 3), (1.0, 6), (1.0, 100)])
def test_last_sigma2_next_is_exactly_zero_for_any_horizon(T_, steps):
    for name in ("ou", "ve"):
        grid = time_grid(_schedule(name), T_, steps)
        assert float(grid.sigma2_next[-1]) == 0.0 and float(grid.mu_next[-1]) == 1.0


@pytest.mark.parametrize("name", ["ou", "ve", "vp"])
def test_prior_std_is_sigma_T(name):
    _, sigma2 = _integral_e2(name, T)
    assert prior_std(_schedule(name), T) == pytest.approx(math.sqrt(sigma2), rel=1e-6)


def test_prior_std_closed_forms():
    assert prior_std(_schedule("ou"), 5.0) == pytest.approx(math.sqrt(1 - math.exp(-10)), rel=1e-12)
    assert prior_std(_schedule("ve"), 5.0) == pytest.approx(math.sqrt(5.0), rel=1e-12)
