"""distq.problems.files: user data files (Parquet, CSV, .npy) read into the training data, and every bad file refused
in one message naming the file, the field and what is wrong."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distq.errors import DistqError
from distq.problems.data import load_dataset
from distq.setup.config import DataConfig


def _write_npy(tmp_path, array, name="data.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path




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



def test_constant_file_column_is_an_error(tmp_path):
    values = np.column_stack([np.arange(6.0), np.full(6, 3.0)])
    message = _message(_write_npy(tmp_path, values))
    assert "column 'x1' is constant" in message and "data.columns" in message



def test_values_whose_squares_overflow_float32_are_named(tmp_path):
    values = np.arange(12.0).reshape(6, 2)
    values[4, 1] = 1e30
    message = _message(_write_npy(tmp_path, values))
    assert "column 'x1'" in message and "row 4" in message and "rescale" in message

