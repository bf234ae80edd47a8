"""distq.problems.data: built-in laws against closed forms and sklearn, conditions, standardisation and the reference
draws (user files: tests/test_files.py)."""
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll
from test_files import _write_npy

from distq.errors import DistqError
from distq.problems.data import load_dataset
from distq.setup.config import DataConfig

N_STAT = 20000  # large enough for 4-sigma checks of means and variances, still milliseconds


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)



def test_gmm1d_moments_match_closed_form():
    # 0.5 N(-2,1) + 0.5 N(2,1): mean 0, var 1 + 4 = 5, E[(x - 0)^4] = 16 + 6*4 + 3 = 43.
    x = load_dataset(DataConfig(source="gmm1d", n_samples=N_STAT), seed=0).points[:, 0].double()
    assert abs(x.mean()) < 4 * math.sqrt(5 / N_STAT)
    assert abs(x.var() - 5) < 4 * math.sqrt((43 - 25) / N_STAT)
    assert abs((x > 0).double().mean() - 0.5) < 4 * math.sqrt(0.25 / N_STAT)



def test_gmm1d_fresh_draws_same_law():
    data = load_dataset(DataConfig(source="gmm1d"), seed=0)
    x = data.fresh(N_STAT, _gen())
    assert x.shape == (N_STAT, 1) and x.dtype == torch.float32
    x = x.double()
    assert abs(x.mean()) < 4 * math.sqrt(5 / N_STAT)
    assert abs(x.var() - 5) < 4 * math.sqrt(18 / N_STAT)



@pytest.mark.parametrize("source", ["gmm1d", "swiss_roll", "gaussian"])
def test_builtins_deterministic_given_seed(source):
    cfg = DataConfig(source=source, n_samples=50)
    a, b, c = load_dataset(cfg, 3), load_dataset(cfg, 3), load_dataset(cfg, 4)
    assert a.points.dtype == torch.float32 and a.points.shape == (50, a.dim)
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    assert a.columns == tuple(f"x{i}" for i in range(a.dim)) and a.name == source



def test_swiss_roll_matches_sklearn():
    data = load_dataset(DataConfig(source="swiss_roll", n_samples=300), seed=7)
    expected = make_swiss_roll(300, noise=0.5, random_state=7)[0][:, [0, 2]].astype(np.float32)
    np.testing.assert_array_equal(data.points.numpy(), expected)
    assert data.dim == 2 and data.n == 300



def test_swiss_roll_fresh_draws_are_new_and_reproducible():
    data = load_dataset(DataConfig(source="swiss_roll", n_samples=300), seed=0)
    g = _gen(1)
    first, second = data.fresh(300, g), data.fresh(300, g)
    assert first.shape == (300, 2) and first.dtype == torch.float32
    assert not torch.equal(first, second) and not torch.equal(first, data.points)
    assert torch.equal(first, data.fresh(300, _gen(1)))
    # Same law as the training data: section 12's std of about 6.7 per column.
    assert torch.allclose(first.std(0), data.points.std(0), rtol=0.15)



def test_gaussian_mean_and_std():
    mean, std = (1.0, -2.0, 3.0), 0.5
    x = load_dataset(DataConfig(source="gaussian", n_samples=N_STAT, mean=mean, std=std), seed=0).points.double()
    assert x.shape == (N_STAT, 3)
    assert torch.all((x.mean(0) - torch.tensor(mean, dtype=torch.float64)).abs() < 4 * std / math.sqrt(N_STAT))
    # The sample std has standard error std / sqrt(2 N).
    assert torch.all((x.std(0) - std).abs() < 4 * std / math.sqrt(2 * N_STAT))



def test_reference_uses_fresh_draws_for_known_laws():
    data = load_dataset(DataConfig(source="gmm1d", n_samples=100), seed=0)
    ref = data.reference(500, _gen())
    assert ref.shape == (500, 1) and torch.equal(ref, data.fresh(500, _gen()))



def test_digits_are_sklearns_8x8_images():
    from sklearn.datasets import load_digits

    dataset = load_dataset(DataConfig(source="digits"), seed=0)
    assert dataset.points.shape == (1797, 64) and dataset.fresh is None
    assert np.array_equal(dataset.points.numpy(), load_digits().data.astype(np.float32))



def test_gmm_tilt_is_the_closed_form_of_importance_weighting():
    """(E7) for a mixture: exp(beta c . x) p(x) normalised. The closed form's mean and component weights against
    self-normalised importance weights of 400,000 draws."""
    from distq.problems.data import gmm_means, gmm_sampler, tilted_gmm

    means, std, beta = gmm_means(4, 3, seed=1), 0.8, 0.3
    coef = torch.tensor([1.0, -0.5, 0.25])
    draws = gmm_sampler(means, std)(400_000, torch.Generator().manual_seed(2)).double()
    weights = torch.softmax(beta * draws @ coef.double(), 0)
    tilted_means, tilted_weights = tilted_gmm(means, std, beta, coef)
    expected = (tilted_weights[:, None] * tilted_means).sum(0).double()
    assert torch.allclose((weights[:, None] * draws).sum(0), expected, atol=0.05)
    tilted = gmm_sampler(tilted_means, std, tilted_weights)(400_000, torch.Generator().manual_seed(3))
    assert torch.allclose(tilted.mean(0).double(), expected, atol=0.05)



def test_gmm_source_has_its_dimension_and_seeded_means():
    first = load_dataset(DataConfig(source="gmm", n_samples=1000, dim=5, components=3), seed=4)
    again = load_dataset(DataConfig(source="gmm", n_samples=1000, dim=5, components=3), seed=4)
    assert first.points.shape == (1000, 5) and torch.equal(first.points, again.points)



def test_builtin_labels_are_the_natural_ones():
    gmm1d = load_dataset(DataConfig(source="gmm1d", n_samples=2000, condition="label"), seed=0)
    assert gmm1d.condition_values == (0, 1)
    assert gmm1d.points[gmm1d.labels == 0].mean() < -1.5 and gmm1d.points[gmm1d.labels == 1].mean() > 1.5
    roll = load_dataset(DataConfig(source="swiss_roll", n_samples=3000, condition="label", classes=3), seed=0)
    radius = roll.points.norm(dim=1)  # the roll's radius grows with its parameter: segments are nested rings
    means = [float(radius[roll.labels == c].mean()) for c in range(3)]
    assert means[0] < means[1] < means[2]
    digits = load_dataset(DataConfig(source="digits", condition="label"), seed=0)
    assert digits.classes == 10 and torch.bincount(digits.labels).min() > 150
    plain = load_dataset(DataConfig(source="gmm1d", n_samples=2000), seed=0)
    assert torch.equal(plain.points, gmm1d.points) and plain.labels is None



def test_conditional_reference_draws_only_that_condition():
    gmm1d = load_dataset(DataConfig(source="gmm1d", n_samples=200, condition="label"), seed=0)
    fresh = gmm1d.reference(4000, torch.Generator().manual_seed(1), condition=1)
    assert fresh.shape == (4000, 1) and abs(float(fresh.mean()) - 2.0) < 0.1



def test_files_are_standardised_by_default_builtins_are_not(tmp_path):
    values = np.random.default_rng(1).normal((170.0, 70.0), (10.0, 15.0), size=(500, 2))
    path = _write_npy(tmp_path, values)
    data = load_dataset(DataConfig(source="file", path=str(path)), seed=0)
    expected = (values - values.mean(0)) / values.std(0)  # numpy's population std (ddof 0)
    np.testing.assert_allclose(data.points.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(data.standardization.mean.numpy(), values.mean(0), rtol=1e-6)
    off = load_dataset(DataConfig(source="file", path=str(path), standardize=False), seed=0)
    assert off.standardization.identity and np.allclose(off.points.numpy(), values.astype(np.float32))
    roll = load_dataset(DataConfig(source="swiss_roll"), seed=0)
    assert roll.standardization.identity



def test_standardised_builtin_maps_its_fresh_draws():
    # gaussian N((50, -20), 4^2 I) standardised: fresh draws are N(0, I) in the model's coordinates
    data = load_dataset(DataConfig(source="gaussian", mean=(50.0, -20.0), std=4.0, n_samples=N_STAT,
                                   standardize=True), seed=0)
    x = data.fresh(N_STAT, _gen()).double()
    assert x.mean(0).abs().max() < 4 / math.sqrt(N_STAT)
    assert (x.std(0) - 1).abs().max() < 4 * math.sqrt(0.5 / N_STAT)



def test_too_few_distinct_rows_for_the_evaluation(tmp_path):
    from distq.problems.data import check_distinct

    values = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [5.0, 7.0]])
    data = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values))), seed=0)
    with pytest.raises(DistqError, match=r"data file '.*data.npy' \(data.path\): has 3 distinct rows of 5; .*eval.k = 1"):
        check_distinct(data, k=1)
    check_distinct(load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, np.arange(8.0).reshape(4, 2),
                                                                               "ok.npy"))), seed=0), k=1)


def test_reference_of_file_is_subset_without_replacement(tmp_path):
    values = np.arange(40, dtype=np.float32).reshape(20, 2)
    data = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values)), standardize=False), seed=0)
    ref = data.reference(8, _gen())
    assert data.fresh is None and ref.shape == (8, 2)
    rows = {tuple(r) for r in ref.tolist()}
    assert len(rows) == 8 and rows <= {tuple(r) for r in values.tolist()}
    assert torch.equal(data.reference(20, _gen()), data.points)
    assert torch.equal(data.reference(100, _gen()), data.points)
