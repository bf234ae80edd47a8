"""kNN KL against closed-form Gaussian KLs and a brute-force loop; CI formula and coverage; evaluate_samples."""
import math

import pytest
import torch

from distq.errors import DistqError
from distq.maths.metrics import evaluate_samples, knn_kl, mean_ci95

# At n = m = 3000 one k=1 estimate has a seed-to-seed std of about 0.035-0.05 (measured, 1D and 2D below);
# averaging 4 seeds gives ~0.02, so 0.1 leaves room for ~4 sigma plus the estimator's small finite-n bias.
N = 3000
SEEDS = 4
TOL = 0.1


def gaussian_kl(mu_p, cov_p, mu_q, cov_q) -> float:
    """Closed form KL(N(mu_p, cov_p) || N(mu_q, cov_q))."""
    d = mu_p.numel()
    cov_q_inv = torch.linalg.inv(cov_q)
    diff = mu_q - mu_p
    return 0.5 * float(
        torch.trace(cov_q_inv @ cov_p) + diff @ cov_q_inv @ diff - d + torch.logdet(cov_q) - torch.logdet(cov_p)
    )


def averaged_estimate(mu_p, cov_p, mu_q, cov_q, k: int) -> float:
    chol_p, chol_q = torch.linalg.cholesky(cov_p), torch.linalg.cholesky(cov_q)
    estimates = []
    for seed in range(SEEDS):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, mu_p.numel(), generator=g, dtype=torch.float64) @ chol_p.T + mu_p
        y = torch.randn(N, mu_q.numel(), generator=g, dtype=torch.float64) @ chol_q.T + mu_q
        estimates.append(knn_kl(x, y, k))
    return sum(estimates) / SEEDS


def brute_force_knn_kl(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    n, d = x.shape
    total = 0.0
    for i in range(n):
        rho = sorted(math.dist(x[i].tolist(), x[j].tolist()) for j in range(n) if j != i)[k - 1]
        nu = sorted(math.dist(x[i].tolist(), y[j].tolist()) for j in range(y.shape[0]))[k - 1]
        total += math.log(nu / rho)
    return d / n * total + math.log(y.shape[0] / (n - 1))


@pytest.mark.parametrize("k", [1, 5])
def test_knn_kl_1d_unit_gaussians_shifted_by_one(k):
    one = torch.ones(1, 1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert averaged_estimate(zero, one, zero + 1.0, one, k) == pytest.approx(0.5, abs=TOL)


@pytest.mark.parametrize("k", [1, 5])
def test_knn_kl_2d_gaussians_with_different_covariances(k):
    # q wider than p: where q is thin under p's mass the kNN estimate converges much more slowly (negative bias).
    mu_p, cov_p = torch.zeros(2, dtype=torch.float64), torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    mu_q, cov_q = torch.tensor([0.5, -0.5], dtype=torch.float64), torch.tensor([[2.0, -0.4], [-0.4, 1.0]], dtype=torch.float64)
    truth = gaussian_kl(mu_p, cov_p, mu_q, cov_q)
    assert truth == pytest.approx(0.5088, abs=1e-3)
    assert averaged_estimate(mu_p, cov_p, mu_q, cov_q, k) == pytest.approx(truth, abs=TOL)


def test_knn_kl_same_distribution_is_near_zero():
    mu, cov = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    assert averaged_estimate(mu, cov, mu, cov, k=1) == pytest.approx(0.0, abs=TOL)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_kl_matches_brute_force_loop(k):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=g), torch.randn(45, 3, generator=g) + 0.5
    assert knn_kl(x, y, k) == pytest.approx(brute_force_knn_kl(x.double(), y.double(), k), rel=1e-9)


def test_knn_kl_is_finite_with_duplicate_points():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    value = knn_kl(x, x.clone(), k=1)
    assert math.isfinite(value)


def test_knn_kl_rejects_bad_shapes_and_k():
    with pytest.raises(DistqError, match="samples"):
        knn_kl(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(DistqError, match="k="):
        knn_kl(torch.randn(3, 2), torch.randn(5, 2), k=3)


def test_mean_ci95_on_known_numbers():
    mean, half_width = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    # std(ddof=1) = sqrt(2.5), so the half-width is 1.96 * sqrt(2.5 / 5) = 1.96 * sqrt(0.5).
    assert mean == 3.0
    assert half_width == pytest.approx(1.96 * math.sqrt(0.5), rel=1e-12)
    assert mean_ci95(torch.tensor([2.0, 2.0, 2.0])) == (2.0, 0.0)


def test_mean_ci95_single_value_has_nan_width_and_empty_is_rejected():
    mean, half_width = mean_ci95([4.0])
    assert mean == 4.0 and math.isnan(half_width)
    with pytest.raises(DistqError):
        mean_ci95([])


def test_mean_ci95_covers_the_true_mean_about_95_percent():
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(2000, 40, generator=g) * 3.0 + 1.0
    covered = [abs(mean - 1.0) <= hw for mean, hw in map(mean_ci95, draws)]
    # Binomial std of the rate over 2000 draws is 0.005; n = 40 with z = 1.96 gives ~0.943 coverage.
    assert 0.925 <= sum(covered) / len(covered) <= 0.965


def gaussian_source(shift: float):
    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 2, generator=generator) + torch.tensor([shift, 0.0])

    return draw


def reward_fn(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] + 2.0 * x[:, 1]


def evaluate(generate, seed: int = 0):
    return evaluate_samples(
        generate, gaussian_source(0.0), reward_fn, n=300, batches=20, k=1, generator=torch.Generator().manual_seed(seed)
    )


def test_evaluate_samples_of_the_data_itself_matches_the_floor():
    metrics, _ = evaluate(gaussian_source(0.0))
    assert abs(metrics["kl_mean"] - metrics["kl_floor"]) < 2 * (metrics["kl_ci95"] + metrics["kl_floor_ci95"])


def test_evaluate_samples_shifted_generator_has_larger_kl():
    metrics, _ = evaluate(gaussian_source(1.0))
    # True KL is 0.5 for a unit shift of unit Gaussians.
    assert metrics["kl_mean"] - metrics["kl_ci95"] > metrics["kl_floor"] + metrics["kl_floor_ci95"] + 0.2


def test_evaluate_samples_reward_and_shapes():
    metrics, samples = evaluate(gaussian_source(1.0))
    assert samples.shape == (6000, 2) and metrics["n_samples"] == 6000.0
    rewards = [float(row[0] + 2.0 * row[1]) for row in samples.double()]
    assert metrics["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert metrics["reward_mean"] == pytest.approx(1.0, abs=3 * metrics["reward_ci95"])
    assert all(isinstance(value, float) for value in metrics.values())


def test_evaluate_samples_is_deterministic_under_a_seed():
    assert evaluate(gaussian_source(0.5), seed=3)[0] == evaluate(gaussian_source(0.5), seed=3)[0]


def test_principal_projection_keeps_distances_within_the_data_span():
    """Data in a 2-D plane of R^5: projecting on 2 principal components is an isometry on that plane (up to the
    mean), so the kNN KL there equals the KL of the planar coordinates."""
    from distq.maths.metrics import principal_projection

    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64))[0]
    plane = torch.randn(500, 2, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    points = plane @ basis.T + 1.5
    project = principal_projection(points, 2)
    a, b = points[:10], points[10:20]
    assert torch.allclose(torch.cdist(project(a), project(b)), torch.cdist(a, b), atol=1e-9)
