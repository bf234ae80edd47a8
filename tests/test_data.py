"""distq.problems.data: built-in laws against closed forms and sklearn, file round trips, and every bad-file error."""
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import make_swiss_roll

from distq.errors import DistqError
from distq.problems.data import Dataset, load_dataset
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


def _write_npy(tmp_path, array, name="data.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_reference_of_file_is_subset_without_replacement(tmp_path):
    values = np.arange(40, dtype=np.float32).reshape(20, 2)
    data = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values)), standardize=False), seed=0)
    ref = data.reference(8, _gen())
    assert data.fresh is None and ref.shape == (8, 2)
    rows = {tuple(r) for r in ref.tolist()}
    assert len(rows) == 8 and rows <= {tuple(r) for r in values.tolist()}
    assert torch.equal(data.reference(20, _gen()), data.points)
    assert torch.equal(data.reference(100, _gen()), data.points)


def _table():
    return pa.table({"a": [1.5, -2.0, 3.25], "b": [1, 2, 3], "c": [0.0, 1e-3, 7.0]})


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(_table(), path)
    data = load_dataset(DataConfig(source="file", path=str(path), standardize=False), seed=0)
    assert data.columns == ("a", "b", "c") and data.name == str(path) and data.points.dtype == torch.float32
    expected = np.array([[1.5, 1, 0.0], [-2.0, 2, 1e-3], [3.25, 3, 7.0]], dtype=np.float32)
    np.testing.assert_array_equal(data.points.numpy(), expected)


def test_csv_round_trip_with_selected_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c,label\n1.5,1,0.0,x\n-2.0,2,0.001,y\n3.25,3,7.0,z\n")
    data = load_dataset(DataConfig(source="file", path=str(path), columns=("c", "a"), standardize=False), seed=0)
    assert data.columns == ("c", "a")
    np.testing.assert_array_equal(data.points.numpy(), np.array([[0.0, 1.5], [1e-3, -2.0], [7.0, 3.25]], np.float32))


def test_npy_round_trips(tmp_path):
    values = np.random.default_rng(0).normal(size=(10, 3))
    data = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values)), standardize=False), seed=0)
    assert data.columns == ("x0", "x1", "x2")
    np.testing.assert_array_equal(data.points.numpy(), values.astype(np.float32))
    picked = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values)), columns=("x2", "x0"),
                                     standardize=False), 0)
    np.testing.assert_array_equal(picked.points.numpy(), values[:, [2, 0]].astype(np.float32))
    flat = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values[:, 0], "f.npy"))), 0)
    assert flat.points.shape == (10, 1) and flat.columns == ("x0",)


def test_file_ignores_n_samples(tmp_path):
    path = _write_npy(tmp_path, np.arange(10.0).reshape(5, 2))
    assert load_dataset(DataConfig(source="file", path=str(path), n_samples=300), 0).n == 5


def _message(path, columns=None) -> str:
    with pytest.raises(DistqError) as info:
        load_dataset(DataConfig(source="file", path=str(path), columns=columns), seed=0)
    message = str(info.value)
    assert path.name in message and "data.path" in message
    return message


def test_missing_file(tmp_path):
    assert "does not exist" in _message(tmp_path / "nope.csv")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n3,4\n")
    assert ".txt" in _message(path)


@pytest.mark.parametrize("name", ["bad.parquet", "bad.npy"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 this is not a real file \xff" * 10)
    assert "could not be read" in _message(path)


def test_truncated_npy(tmp_path):
    path = _write_npy(tmp_path, np.zeros((100, 2)))
    path.write_bytes(path.read_bytes()[:200])
    assert "could not be read" in _message(path)


def test_empty_files(tmp_path):
    zero_bytes = tmp_path / "zero.csv"
    zero_bytes.write_text("")
    assert "empty" in _message(zero_bytes)
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b\n")
    assert "0 rows" in _message(header_only)
    no_rows = tmp_path / "none.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), no_rows)
    assert "0 rows" in _message(no_rows)
    assert "0 rows" in _message(_write_npy(tmp_path, np.zeros((0, 2))))


def test_single_row(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("a,b\n1,2\n")
    assert "1 rows" in _message(path)


def test_missing_column_lists_available(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(_table(), path)
    message = _message(path, columns=("a", "zzz"))
    assert "'zzz'" in message and "data.columns" in message and "a, b, c" in message
    assert "x0, x1" in _message(_write_npy(tmp_path, np.zeros((3, 2))), columns=("x5",))


def test_non_numeric_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,label\n1,x\n2,y\n")
    assert "'label'" in _message(path)
    assert "<U1" in _message(_write_npy(tmp_path, np.array([["a", "b"], ["c", "d"]])))


@pytest.mark.parametrize("cell", ["nan", "inf", "", "1e300"])
def test_non_finite_value_names_column_and_row(tmp_path, cell):
    path = tmp_path / "d.csv"
    path.write_text(f"a,b\n1,2\n3,4\n5,{cell}\n6,nan\n")
    message = _message(path)
    assert "column 'b'" in message and "row 2" in message


def test_non_finite_npy(tmp_path):
    values = np.zeros((4, 3))
    values[3, 1] = np.inf
    message = _message(_write_npy(tmp_path, values))
    assert "column 'x1'" in message and "row 3" in message


def test_npy_wrong_rank(tmp_path):
    assert "(2, 2, 2)" in _message(_write_npy(tmp_path, np.zeros((2, 2, 2))))


# ---- larger and higher-dimensional sources ----------------------------------------------------------------------

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


def test_large_parquet_is_read_in_batches_and_bad_rows_are_named(tmp_path):
    """10^5 rows x 16 columns: read batch by batch into one float32 array (peak traced allocations stay a few times
    the array, far below the ~50 MB Python floats would take), and a NaN deep in the file is named by its row."""
    import tracemalloc

    rows = 100_000
    values = np.random.default_rng(0).normal(size=(rows, 16))
    table = pa.table({f"c{i}": values[:, i] for i in range(16)})
    good = tmp_path / "big.parquet"
    pq.write_table(table, good, row_group_size=20_000)
    tracemalloc.start()
    dataset = load_dataset(DataConfig(source="file", path=str(good)), seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dataset.points.shape == (rows, 16) and dataset.columns[0] == "c0"
    # standardised in place (data.standardize auto: on for files), within the same memory
    assert np.allclose(dataset.standardization.to_user(dataset.points).numpy(), values, atol=1e-5)
    assert peak < 4 * dataset.points.numpy().nbytes, peak
    values[76_543, 9] = np.nan
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({f"c{i}": values[:, i] for i in range(16)}), bad, row_group_size=20_000)
    with pytest.raises(DistqError, match="column 'c9' .* at row 76543"):
        load_dataset(DataConfig(source="file", path=str(bad)), seed=0)


# ---- conditions (data.condition, Algorithm 2) ---------------------------------------------------------------------

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


def test_file_label_column(tmp_path):
    path = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"a": [0.0, 1.0, 2.0, 3.0], "b": [1.0, 1.0, 2.0, 2.0], "kind": [7, 3, 7, 3]}), path)
    dataset = load_dataset(DataConfig(source="file", path=str(path), condition="kind"), seed=0)
    assert dataset.columns == ("a", "b") and dataset.condition_values == (3, 7)
    assert dataset.labels.tolist() == [1, 0, 1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,kind\n1.0,0.5\n2.0,1\n")
    with pytest.raises(DistqError, match="whole-number labels"):
        load_dataset(DataConfig(source="file", path=str(bad), condition="kind"), seed=0)
    with pytest.raises(DistqError, match="'nope'"):
        load_dataset(DataConfig(source="file", path=str(path), condition="nope"), seed=0)
    lonely = tmp_path / "lonely.parquet"
    pq.write_table(pa.table({"a": [0.0, 1.0, 2.0], "kind": [0, 0, 1]}), lonely)
    with pytest.raises(DistqError, match="condition 1 has 1 of the 3 points"):
        load_dataset(DataConfig(source="file", path=str(lonely), condition="kind"), seed=0)


# ---- standardisation (data.standardize) and the checks before training ---------------------------------------------

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


def test_constant_file_column_is_an_error(tmp_path):
    values = np.column_stack([np.arange(6.0), np.full(6, 3.0)])
    message = _message(_write_npy(tmp_path, values))
    assert "column 'x1' is constant" in message and "data.columns" in message


def test_values_whose_squares_overflow_float32_are_named(tmp_path):
    values = np.arange(12.0).reshape(6, 2)
    values[4, 1] = 1e30
    message = _message(_write_npy(tmp_path, values))
    assert "column 'x1'" in message and "row 4" in message and "rescale" in message


def test_too_few_distinct_rows_for_the_evaluation(tmp_path):
    from distq.problems.data import check_distinct

    values = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [5.0, 7.0]])
    data = load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, values))), seed=0)
    with pytest.raises(DistqError, match=r"data file '.*data.npy' \(data.path\): has 3 distinct rows of 5; .*eval.k = 1"):
        check_distinct(data, k=1)
    check_distinct(load_dataset(DataConfig(source="file", path=str(_write_npy(tmp_path, np.arange(8.0).reshape(4, 2),
                                                                               "ok.npy"))), seed=0), k=1)
