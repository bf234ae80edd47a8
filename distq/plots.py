"""Figures: generated samples against data (like the paper's figures) and training curves, written as PNG.

Uses matplotlib's Agg canvas directly (no pyplot, no global figure state); every file is written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from distq import rundir
from distq.errors import DistqError

if TYPE_CHECKING:
    import pyarrow

DATA_COLOUR = "tab:blue"
GENERATED_COLOUR = "tab:orange"


def _as_array(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(n, d) float64 numpy copy of a tensor or array."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 2:
        raise DistqError(f"plot {name} must be a 2-D array (n, d); got shape {array.shape}")
    return array.astype(np.float64)


def _save_atomically(fig: Figure, path) -> None:
    """Write `fig` as PNG through rundir.atomic_write: readers never see a partial file, and a full disk or a missing
    permission is a DistqError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DistqError(f"cannot write {path} ({err.strerror or err})") from None

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            FigureCanvasAgg(fig).print_png(handle)

    rundir.atomic_write(path, write)


def _histograms(ax, generated: np.ndarray, data: np.ndarray, column: str) -> None:
    """Overlaid density histograms of one coordinate, on bins shared by both sets."""
    bins = np.histogram_bin_edges(np.concatenate([data[:, 0], generated[:, 0]]), bins=50)
    ax.hist(data[:, 0], bins=bins, density=True, alpha=0.5, color=DATA_COLOUR, label="data")
    ax.hist(generated[:, 0], bins=bins, density=True, alpha=0.5, color=GENERATED_COLOUR, label="generated")
    ax.set_xlabel(column)
    ax.set_ylabel("density")


def _scatter(ax, generated: np.ndarray, data: np.ndarray, columns: tuple[str, ...],
             region: Optional[tuple[float, float, float, float]]) -> None:
    """Overlaid scatter of the first two coordinates on equal axes, with as many generated points as data points
    (the first ones) so that neither cloud hides the other; the rewarded box (x0 low, x0 high, x1 low, x1 high)
    shaded."""
    generated = generated[: data.shape[0]]
    if region is not None:
        x0_low, x0_high, x1_low, x1_high = region
        ax.add_patch(Rectangle((x0_low, x1_low), x0_high - x0_low, x1_high - x1_low, color="tab:green", alpha=0.12,
                               label="rewarded region"))
    ax.scatter(data[:, 0], data[:, 1], s=6, alpha=0.4, color=DATA_COLOUR, label="data")
    ax.scatter(generated[:, 0], generated[:, 1], s=6, alpha=0.4, color=GENERATED_COLOUR, label="generated")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(columns[0])
    ax.set_ylabel(columns[1])


def plot_samples(
    generated: np.ndarray | torch.Tensor,
    data: np.ndarray | torch.Tensor,
    columns: tuple[str, ...],
    path,
    title: str = "",
    region: Optional[tuple[float, float, float, float]] = None,
) -> Figure:
    """PNG of generated (n, d) vs data (m, d): density histograms when d == 1, image grids when d is a square >= 16
    (8x8 digits), else a scatter of columns 0 and 1 with the rewarded box `region` (distq.rewards.rewarded_region)
    shaded. Returns the figure.

    `columns` names the d coordinates (axis labels); `title` is shown as given.
    """
    generated, data = _as_array(generated, "generated"), _as_array(data, "data")
    d = data.shape[1]
    if generated.shape[1] != d or len(columns) != d:
        raise DistqError(
            f"plot_samples needs generated, data and columns of the same dimension; "
            f"got {generated.shape[1]}, {d} and {len(columns)} ({', '.join(columns)})"
        )
    side = math.isqrt(d)
    if d >= 16 and side * side == d:
        return _image_grids(generated, data, side, path, title)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot()
    if d == 1:
        _histograms(ax, generated, data, columns[0])
    else:
        _scatter(ax, generated, data, columns, region)
    ax.legend(loc="best")
    ax.set_title(title, fontsize=10)
    _save_atomically(fig, path)
    return fig


def image_grid(points: np.ndarray, side: int, rows: int, background: float) -> np.ndarray:
    """The first rows x rows of `points` (n, side * side) as one (rows (side + 1), rows (side + 1)) image, row by row:
    tile (i, j) is point i rows + j, followed by a 1-pixel gap of `background` on its right and below (8x8 digits
    have blank side columns but none at the top or bottom, and would otherwise run into tall stripes); missing
    points are background."""
    count, cell = min(rows * rows, points.shape[0]), side + 1
    tiles = np.full((rows * rows, cell, cell), background)
    tiles[:count, :side, :side] = points[:count].reshape(count, side, side)
    return tiles.reshape(rows, rows, cell, cell).transpose(0, 2, 1, 3).reshape(rows * cell, rows * cell)


def _image_grids(generated: np.ndarray, data: np.ndarray, side: int, path, title: str, rows: int = 8) -> Figure:
    """Two grids of rows x rows square tiles (side x side pixels and a gap, grey scale shared by both): generated,
    then data."""
    fig = Figure(figsize=(10, 5.4), layout="constrained")
    low, high = float(data.min()), float(data.max())
    for panel, (name, points) in enumerate((("generated", generated), ("data", data))):
        grid = image_grid(points, side, rows, low)
        ax = fig.add_subplot(1, 2, panel + 1)
        ax.imshow(grid, cmap="gray_r", vmin=low, vmax=high)
        ax.set_title(f"{name}" + (f": {title}" if title and panel == 0 else ""), fontsize=9)
        ax.axis("off")
    _save_atomically(fig, path)
    return fig


def _eval_path(ax, steps: np.ndarray, evals: dict[str, np.ndarray]) -> None:
    """The evaluations during training (eval.every) as one path in the (KL, reward) plane, with their 95% CIs,
    coloured by episode: how the run trades KL for reward as it trains."""
    done = ~np.isnan(evals["eval/kl_mean"])
    kl, reward = evals["eval/kl_mean"][done], evals["eval/reward_mean"][done]
    ax.errorbar(kl, reward, xerr=evals["eval/kl_ci95"][done], yerr=evals["eval/reward_ci95"][done], color="0.6",
                linewidth=0.8, elinewidth=0.6, zorder=1)
    points = ax.scatter(kl, reward, c=steps[done], cmap="viridis", s=18, zorder=2)
    ax.figure.colorbar(points, ax=ax, label="episode")
    ax.set_title("evaluation during training")
    ax.set_xlabel("kNN KL to the data")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)


def _numeric_columns(metrics: dict[str, list[float]] | pyarrow.Table) -> dict[str, np.ndarray]:
    """Columns of a dict of lists or a pyarrow Table that convert to float (nulls become nan)."""
    table = metrics if isinstance(metrics, dict) else metrics.to_pydict()
    numeric = {}
    for name, values in table.items():
        try:
            numeric[name] = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            continue  # text columns (run ids, tags) are not curves
    return numeric


def plot_training_curves(metrics: dict[str, list[float]] | pyarrow.Table, path, x: str = "episode") -> Figure:
    """PNG grid of line plots, one per numeric column of `metrics` (dict of lists or pyarrow Table), against `x`; the
    eval/* columns of evaluations during training (eval.every) as one panel, their path in the (KL, reward) plane.
    Columns that never change (a constant learning rate, no transfer time in process) get no panel; positive
    losses are drawn on a log scale. Returns the figure (written to `path`)."""
    columns = _numeric_columns(metrics)
    if x not in columns:
        raise DistqError(f"plot_training_curves needs a numeric '{x}' column; got columns {', '.join(columns)}")
    steps = columns.pop(x)
    evals = {name: columns.pop(name) for name in list(columns) if name.startswith("eval/")}
    mismatched = [name for name, values in columns.items() if values.shape != steps.shape]
    if not columns or mismatched:
        raise DistqError(
            f"plot_training_curves needs numeric 1-D columns as long as '{x}' ({len(steps)}); "
            f"mismatched: {', '.join(mismatched) or 'none'}, numeric: {', '.join(columns) or 'none'}"
        )
    varying = {name: values for name, values in columns.items()
               if np.unique(values[~np.isnan(values)]).size > 1}
    columns = varying or columns  # a one-row table: every column is constant, show them all
    panels = len(columns) + ("eval/kl_mean" in evals)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(4 * ncols, 3 * nrows), layout="constrained")
    if "eval/kl_mean" in evals:
        _eval_path(fig.add_subplot(nrows, ncols, panels), steps, evals)
    for index, (name, values) in enumerate(columns.items()):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        # Metrics logged every few episodes are nan in between; drop those so the line stays connected.
        logged = ~np.isnan(values)
        ax.plot(steps[logged], values[logged], linewidth=1.2, marker="o" if logged.sum() <= 50 else None, markersize=3)
        if name.startswith("loss/") and (values[logged] > 0).all():
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    _save_atomically(fig, path)
    return fig
