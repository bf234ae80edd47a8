"""distq.maths.samplers: each step against its formula on hand inputs, and the reverse process driven by the exact
Gaussian score landing on the data law (error shrinking with the number of steps)."""
import math

import pytest
import torch

from distq.maths.samplers import (SAMPLERS, action_gains, ddim_step, dpmpp_2m_step, is_stochastic, ode_euler_step,
                                  sde_step)
from distq.maths.schedules import OUSchedule, TimeGrid, prior_std, time_grid

T = 5.0
N_SAMPLES = 50000
D = 2


def _hand_grid():
    """Two steps with made-up constants (not a real schedule), so every term of each formula is visible."""
    return TimeGrid(T=1.0, dt=torch.tensor([0.5, 0.5]), tau=torch.tensor([0.0, 0.5]), t=torch.tensor([1.0, 0.5]),
                    f=torch.tensor([0.5, 1.0]), g2=torch.tensor([3.0, 2.0]), mu=torch.tensor([0.6, 0.8]),
                    sigma2=torch.tensor([0.64, 0.36]), mu_next=torch.tensor([0.8, 1.0]),
                    sigma2_next=torch.tensor([0.36, 0.0]))


Y = torch.tensor([[1.0, -2.0]])
A = torch.tensor([[0.5, 1.0]])
XI = torch.tensor([[1.0, 0.0]])


def test_sde_step_hand_values():
    # Y + [f Y + g^2 a] dt + g sqrt(dt) xi with f = 0.5, g^2 = 3, dt = 0.5.
    expected = torch.tensor([[1.0 + 0.25 + 0.75 + math.sqrt(1.5), -2.0 - 0.5 + 1.5]])
    assert torch.allclose(sde_step(_hand_grid(), 0, Y, A, XI), expected)
    # Step 1: f = 1, g^2 = 2.
    expected = torch.tensor([[1.0 + 0.5 + 0.5 + 1.0, -2.0 - 1.0 + 1.0]])
    assert torch.allclose(sde_step(_hand_grid(), 1, Y, A, XI), expected)


def test_ode_euler_step_hand_values():
    # Y + [f Y + (g^2 / 2) a] dt.
    expected = torch.tensor([[1.0 + 0.25 + 0.375, -2.0 - 0.5 + 0.75]])
    assert torch.allclose(ode_euler_step(_hand_grid(), 0, Y, A, None), expected)
    assert torch.allclose(ode_euler_step(_hand_grid(), 0, Y, A, XI), expected)  # noise is ignored


def test_ddim_step_hand_values():
    # x0_hat = (Y + sigma^2 a) / mu = (1 + 0.32, -2 + 0.64) / 0.6; Y' = mu' x0_hat + sigma' (-sigma a).
    x0_hat = torch.tensor([[1.32 / 0.6, -1.36 / 0.6]])
    expected = 0.8 * x0_hat - 0.6 * 0.8 * A
    assert torch.allclose(ddim_step(_hand_grid(), 0, Y, A, None), expected)


def test_action_gains_are_the_steps_derivatives_in_the_action():
    """dY_{k+1} / da_k: sde g^2 dt, ode_euler g^2 dt / 2, ddim sigma^2 mu' / mu - sigma sigma' (hand grid)."""
    grid = _hand_grid()
    assert torch.allclose(action_gains(grid, "sde"), torch.tensor([1.5, 1.0]))
    assert torch.allclose(action_gains(grid, "ode_euler"), torch.tensor([0.75, 0.5]))
    assert torch.allclose(action_gains(grid, "ddim"), torch.tensor([0.64 * 0.8 / 0.6 - 0.8 * 0.6, 0.36 / 0.8]))


def test_ddim_last_step_returns_x0_hat():
    x0_hat = (Y + 0.36 * A) / 0.8
    assert torch.allclose(ddim_step(_hand_grid(), 1, Y, A, None), x0_hat)
    grid = time_grid(OUSchedule(), T, 10)
    gen = torch.Generator().manual_seed(0)
    y, a = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    t = T / 10  # last step: forward time dt
    expected = (y + (1 - math.exp(-2 * t)) * a) / math.exp(-t)
    assert torch.allclose(ddim_step(grid, 9, y, a, None), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sde", "ode_euler", "ddim"])
def test_steps_do_not_modify_inputs(name):
    y, a, xi = Y.clone(), A.clone(), XI.clone()
    SAMPLERS[name](_hand_grid(), 0, y, a, xi)
    assert torch.equal(y, Y) and torch.equal(a, A) and torch.equal(xi, XI)


def test_registry_and_stochasticity():
    assert SAMPLERS == {"sde": sde_step, "ode_euler": ode_euler_step, "ddim": ddim_step}
    assert is_stochastic("sde") and not is_stochastic("ode_euler") and not is_stochastic("ddim")


def _run_exact_score(sampler, steps, data_std, seed=0):
    """Reverse process from the prior with a_k = exact score of N(0, s^2 I) data under ou:
    grad log p_t(y) = -y / (e^{-2t} s^2 + 1 - e^{-2t}). Returns the variance ratio Var(Y_K) / s^2."""
    schedule = OUSchedule()
    grid = time_grid(schedule, T, steps)
    gen = torch.Generator().manual_seed(seed)
    y = prior_std(schedule, T) * torch.randn(N_SAMPLES, D, generator=gen, dtype=torch.float64)
    for k in range(steps):
        t = T - k * T / steps
        action = -y / (math.exp(-2 * t) * data_std**2 + 1 - math.exp(-2 * t))
        noise = torch.randn(N_SAMPLES, D, generator=gen, dtype=torch.float64) if is_stochastic(sampler) else None
        y = SAMPLERS[sampler](grid, k, y, action, noise)
    assert torch.isfinite(y).all()
    assert y.mean(0).abs().max() < 4 * data_std / math.sqrt(N_SAMPLES) + 0.01
    return float(y.var(0).mean()) / data_std**2


def _tolerance(steps, data_std):
    # First-order schemes: error O(dt / s^2) (for ddim the last step returns E[X_0 | Y], of variance
    # s^2 * s^2 / (s^2 + sigma_dt^2) ~ s^2 (1 - 2 dt / s^2)); plus 4 Monte Carlo standard errors of a variance.
    return 3 * (T / steps) / min(data_std**2, 1.0) + 4 * math.sqrt(2 / (N_SAMPLES * D))


@pytest.mark.parametrize("sampler", ["ode_euler", "ddim"])
@pytest.mark.parametrize("data_std", [0.5, 2.0])
def test_deterministic_samplers_reach_data_variance(sampler, data_std):
    coarse = abs(_run_exact_score(sampler, 50, data_std) - 1)
    fine = abs(_run_exact_score(sampler, 200, data_std) - 1)
    assert fine < _tolerance(200, data_std)
    assert fine < 0.5 * coarse


@pytest.mark.parametrize("data_std", [0.5, 2.0])
def test_sde_sampler_reaches_data_variance(data_std):
    coarse = abs(_run_exact_score("sde", 50, data_std) - 1)
    fine = abs(_run_exact_score("sde", 500, data_std) - 1)
    assert fine < _tolerance(500, data_std)
    assert fine < 0.5 * coarse


def _flow_errors(steps: int, samplers: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Gaussian data N(m, s^2 I): the fresh preconditioned policy is its exact score at every t (tests/test_policy.py),
    so the probability-flow ODE maps the prior exactly onto N(m, s^2 I). Per sampler, at `steps` steps on grid power
    2: the largest relative error of the samples' spread and absolute error of their mean."""
    from distq.backends.build import build_rollout, data_statistics
    from distq.setup.config import config_from_dict

    config = config_from_dict({"data": {"source": "gaussian", "mean": [2.0, -1.0], "std": 0.5},
                               "sde": {"dt": T / steps, "grid_power": 2.0}, "train": {"processes": 1}})
    points = 2.0 + 0.5 * torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    mean, scale = data_statistics(points)
    rollout = build_rollout(config, points, terminal_reward=None)
    errors = {}
    for sampler in samplers:
        samples = rollout.generate(20000, torch.Generator().manual_seed(1), sampler=sampler)
        errors[sampler] = (float((samples.std(0) / scale - 1).abs().max()), float((samples.mean(0) - mean).abs().max()))
    return errors


def test_heun_is_closer_than_euler_to_the_exact_probability_flow():
    """At 10 steps Heun's spread and mean are much closer to the data law than Euler's (its last step is Euler's: no
    score at t = 0)."""
    errors = _flow_errors(10, ("ode_euler", "heun"))
    assert errors["heun"][0] < 0.5 * errors["ode_euler"][0] and errors["heun"][0] < 0.05, errors
    assert errors["heun"][1] < 0.05, errors


def _hand_grid3():
    """Three steps of a variance-preserving-like schedule (mu^2 + sigma^2 != 1 is fine for the formula)."""
    return TimeGrid(T=1.0, dt=torch.tensor([0.4, 0.3, 0.3]), tau=torch.tensor([0.0, 0.4, 0.7]),
                    t=torch.tensor([1.0, 0.6, 0.3]), f=torch.zeros(3), g2=torch.ones(3),
                    mu=torch.tensor([0.6, 0.8, 0.9]), sigma2=torch.tensor([0.64, 0.36, 0.19]),
                    mu_next=torch.tensor([0.8, 0.9, 1.0]), sigma2_next=torch.tensor([0.36, 0.19, 0.0]))


def test_dpmpp_2m_is_ddim_at_first_order_and_extrapolates_x0_in_log_snr():
    """Y' = (sigma' / sigma) Y + mu' (1 - e^{-h}) D, h the step in lambda = log(mu / sigma) (Lu et al. 2022): D = x0_hat
    at the first step (ddim), x0_hat linearly extrapolated in lambda from the previous step's to the step's middle
    after it, and x0_hat itself into t = 0."""
    grid, previous = _hand_grid3(), torch.tensor([[0.3, 0.7]])
    first, x0_first = dpmpp_2m_step(grid, 0, Y, A, None)
    assert torch.allclose(first, ddim_step(grid, 0, Y, A, None)) and torch.allclose(x0_first, (Y + 0.64 * A) / 0.6)
    lam = lambda mu, sigma2: math.log(mu / math.sqrt(sigma2))  # noqa: E731
    h, h_before = lam(0.9, 0.19) - lam(0.8, 0.36), lam(0.8, 0.36) - lam(0.6, 0.64)
    x0_hat = (Y + 0.36 * A) / 0.8
    direction = x0_hat + (x0_hat - previous) * (h / 2) / h_before
    second, passed_on = dpmpp_2m_step(grid, 1, Y, A, previous)
    assert torch.allclose(second, math.sqrt(0.19 / 0.36) * Y + 0.9 * (1 - math.exp(-h)) * direction)
    assert torch.allclose(passed_on, x0_hat)
    last, _ = dpmpp_2m_step(grid, 2, Y, A, previous)
    assert torch.allclose(last, (Y + 0.19 * A) / 0.9)


def test_dpmpp_2m_converges_at_second_order_where_ddim_converges_at_first():
    """Doubling the steps from 10 to 20 cuts ddim's spread error about 2x and DPM-Solver++(2M)'s more than 3x, at one
    action per step each; at 20 steps it is several times closer."""
    coarse, fine = _flow_errors(10, ("ddim", "dpmpp_2m")), _flow_errors(20, ("ddim", "dpmpp_2m"))
    assert coarse["ddim"][0] / fine["ddim"][0] < 2.5 and coarse["dpmpp_2m"][0] / fine["dpmpp_2m"][0] > 3, (coarse, fine)
    assert fine["dpmpp_2m"][0] < 0.4 * fine["ddim"][0] and fine["dpmpp_2m"][1] < 0.02, fine
