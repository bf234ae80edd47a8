"""plot_samples and plot_training_curves write valid PNGs atomically (no temp files left behind)."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from distq.errors import DistqError
from distq.runs.plots import LABEL_SPACE, grid_rows, image_grid, plot_samples, plot_training_curves

pytestmark = pytest.mark.plots  # its runs draw their PNGs (conftest: elsewhere they skip them)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_only_png(folder, name: str) -> None:
    assert [p.name for p in folder.iterdir()] == [name]
    content = (folder / name).read_bytes()
    assert content.startswith(PNG_SIGNATURE)
    assert len(content) > 5_000  # a blank figure is ~2 kB; curves, markers and text add more


@pytest.mark.parametrize("d", [1, 2, 5])
def test_plot_samples_writes_a_png(tmp_path, d):
    g = torch.Generator().manual_seed(d)
    data = torch.randn(300, d, generator=g)
    generated = (torch.randn(200, d, generator=g) + 1.0).numpy()
    columns = tuple(f"x{i}" for i in range(d))
    plot_samples(generated, data, columns, tmp_path / "samples.png", title=f"d = {d}")
    assert_only_png(tmp_path, "samples.png")


def test_plot_samples_creates_the_folder_and_overwrites(tmp_path):
    path = tmp_path / "figures" / "samples.png"
    data = np.random.default_rng(0).normal(size=(50, 2))
    plot_samples(data, data, ("a", "b"), path)
    plot_samples(data + 1.0, data, ("a", "b"), path)
    assert_only_png(path.parent, "samples.png")


def test_plot_samples_rejects_mismatched_dimensions(tmp_path):
    with pytest.raises(DistqError, match="same dimension"):
        plot_samples(np.zeros((5, 2)), np.zeros((5, 3)), ("a", "b", "c"), tmp_path / "x.png")
    with pytest.raises(DistqError, match="same dimension"):
        plot_samples(np.zeros((5, 2)), np.zeros((5, 2)), ("a",), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def training_metrics() -> dict[str, list]:
    episodes = list(range(40))
    return {
        "episode": episodes,
        "reward/mean": [1.0 - np.exp(-e / 10) for e in episodes],
        "loss/td": [np.exp(-e / 5) for e in episodes],
        "time/rollout_s": [0.1] * 40,
        "kl/mean": [None if e % 10 else 0.5 / (1 + e) for e in episodes],
        "run": ["a"] * 40,
    }


def test_plot_training_curves_from_dict(tmp_path):
    plot_training_curves(training_metrics(), tmp_path / "curves.png")
    assert_only_png(tmp_path, "curves.png")


def test_plot_training_curves_from_pyarrow_table(tmp_path):
    plot_training_curves(pa.table(training_metrics()), tmp_path / "curves.png")
    assert_only_png(tmp_path, "curves.png")


def test_plot_training_curves_needs_the_x_column(tmp_path):
    with pytest.raises(DistqError, match="'step'"):
        plot_training_curves(training_metrics(), tmp_path / "curves.png", x="step")
    with pytest.raises(DistqError, match="mismatched: loss/td"):
        plot_training_curves({"episode": [0, 1, 2], "loss/td": [1.0, 2.0]}, tmp_path / "curves.png")


def test_image_grid_tiles_are_square_in_reading_order_with_a_gap():
    points = np.arange(5 * 4, dtype=float).reshape(5, 4) + 1  # five 2x2 images, values 1..20
    grid = image_grid(points, side=2, rows=3, background=0.0)
    assert grid.shape == (9, 9)
    assert (grid[0:2, 3:5] == points[1].reshape(2, 2)).all() and (grid[3:5, 3:5] == points[4].reshape(2, 2)).all()
    assert (grid[2, :] == 0).all() and (grid[:, 2] == 0).all() and (grid[3:5, 6:8] == 0).all()  # gaps, missing


def test_grid_rows_in_order_or_one_group_per_row():
    assert [r.tolist() for r in grid_rows(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    groups = ["b", "a", "b", "c", "a", "b", "b", "d"]
    # sorted groups, the first `rows` of them, each row its first `rows` members
    assert [r.tolist() for r in grid_rows(8, 3, groups)] == [[1, 4], [0, 2, 5], [3]]


def test_image_grids_write_each_rows_condition_and_mean_reward_under_it(tmp_path):
    side, rows = 8, 8
    generated, data = np.random.default_rng(0).random((20, 64)), np.random.default_rng(1).random((30, 64))
    generated_groups = ["label 1" if i % 2 else "label 0" for i in range(20)]
    data_groups = [f"label {i % 3}" for i in range(30)]
    generated_rewards, data_rewards = np.arange(20, dtype=float), np.full(30, 0.5)
    fig = plot_samples(generated, data, tuple(f"x{i}" for i in range(64)), tmp_path / "grid.png",
                       groups=(generated_groups, data_groups), rewards=(generated_rewards, data_rewards))
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    # label 0: samples 0, 2, .., 14 (the first 8 of the group), mean 7; label 1: 1, 3, .., 15, mean 8
    assert texts == [["label 0, h 7.00", "label 1, h 8.00"], ["label 0, h 0.50", "label 1, h 0.50", "label 2, h 0.50"]]
    height = fig.axes[0].images[0].get_array().shape[0]
    assert height == rows * (side + 1 + LABEL_SPACE)  # room under each row for its label


def test_a_conditional_digits_runs_grid_has_a_row_per_label_with_its_mean_reward(tmp_path):
    """distq.training.trainer.plot_image_grids: h (own_digit) evaluated on the shown tiles, with their conditions."""
    from distq.problems.data import load_dataset
    from distq.problems.rewards import load_reward
    from distq.setup.config import config_from_dict
    from distq.training.trainer import plot_image_grids

    config = config_from_dict({"data": {"source": "digits", "condition": "label", "n_samples": 200},
                               "reward": {"fn": "own_digit"}})
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values,
                         dataset.standardization)
    samples, conditions = dataset.points[:60], dataset.labels[:60]
    fig = plot_image_grids(config, dataset, reward, samples, conditions, tmp_path / "samples.png", "digits")
    generated = [t.get_text() for t in fig.axes[0].texts]
    expected = []
    for index in range(8):  # the first 8 labels present, each row its first 8 samples
        rows = torch.nonzero(conditions == index).flatten()[:8]
        h = reward(samples[rows], conditions[rows]).mean()
        expected.append(f"label {dataset.condition_values[index]}, h {float(h):.2f}")
    assert generated == expected


def test_square_dimensions_are_drawn_as_image_grids(tmp_path):
    generated, data = torch.rand(70, 64), torch.rand(90, 64)
    plot_samples(generated, data, tuple(f"x{i}" for i in range(64)), tmp_path / "grid.png", title="digits")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_leave_out_constant_columns_and_draw_positive_losses_on_a_log_scale(tmp_path):
    metrics = {"episode": [50, 100, 150], "loss/td": [1.0, 0.1, 0.01], "loss/policy_gradient": [0.5, -0.2, 0.1],
               "lr/policy": [1e-3] * 3, "time/transfer_s": [0.0] * 3, "reward/terminal_mean": [0.2, 0.4, 0.5]}
    fig = plot_training_curves(metrics, tmp_path / "curves.png")
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {"loss/td": "log", "loss/policy_gradient": "linear", "reward/terminal_mean": "linear"}


def test_samples_plot_shades_a_built_in_rewarded_region(tmp_path):
    from matplotlib.patches import Rectangle

    from distq.problems.rewards import SWISS_ROLL_RECTANGLE, rewarded_region, swiss_roll_rectangle

    assert rewarded_region("swiss_roll_rectangle") == SWISS_ROLL_RECTANGLE and rewarded_region("linear") is None
    assert rewarded_region(("swiss_roll_rectangle", "linear")) is None  # a sum of rewards pays outside it too
    inside, outside = torch.tensor([[-14.9, 0.1], [14.9, 17.4]]), torch.tensor([[-15.1, 5.0], [0.0, 17.6]])
    assert swiss_roll_rectangle(inside).tolist() == [1.0, 1.0] and swiss_roll_rectangle(outside).tolist() == [0, 0]
    fig = plot_samples(np.zeros((5, 2)), np.ones((5, 2)), ("x0", "x1"), tmp_path / "s.png", title="reward 0.8",
                       region=SWISS_ROLL_RECTANGLE)
    (patch,) = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == (-15.0, 0.0, 30.0, 17.5)
