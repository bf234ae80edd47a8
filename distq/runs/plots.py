"""Figures: generated samples against data (like the paper's figures) and training curves, written as PNG.

Uses matplotlib's Agg canvas directly (no pyplot, no global figure state); every file is written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from distq.errors import DistqError
from distq.runs import rundir

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
    groups: Optional[tuple[Sequence[str], Sequence[str]]] = None,
    rewards: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> Figure:
    """PNG of generated (n, d) vs data (m, d): density histograms when d == 1, image grids when d is a square >= 16
    (8x8 digits), else a scatter of columns 0 and 1 with the rewarded box `region` (distq.problems.rewards.rewarded_region)
    shaded. Returns the figure.

    `columns` names the d coordinates (axis labels); `title` is shown as given. Image grids only: `groups` (the
    generated samples' and the data's condition labels, n and m strings) puts one condition per row, and `rewards`
    (h of each generated sample and data point, (n,) and (m,)) their mean; either is written under each row.
    """
    generated, data = _as_array(generated, "generated"), _as_array(data, "data")
    d = data.shape[1]
    if generated.shape[1] != d or len(columns) != d:
        raise DistqError(
            f"plot_samples needs generated, data and columns of the same dimension; "
            f"got {generated.shape[1]}, {d} and {len(columns)} ({', '.join(columns)})"
        )
    side = math.isqrt(d)
    if is_image(d):
        return _image_grids((generated, data), side, path, title, groups, rewards)
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


def is_image(dim: int) -> bool:
    """Whether samples of dimension `dim` are drawn as square images (a square >= 16: 8x8 digits)."""
    return dim >= 16 and math.isqrt(dim) ** 2 == dim


def image_grid(points: np.ndarray, side: int, rows: int, background: float, label_space: int = 0) -> np.ndarray:
    """The first rows x rows of `points` (n, side * side) as one (rows (side + 1 + label_space), rows (side + 1))
    image, row by row: tile (i, j) is point i rows + j, followed by a 1-pixel gap of `background` on its right and
    below (8x8 digits have blank side columns but none at the top or bottom, and would otherwise run into tall
    stripes), and `label_space` background pixels under each row of tiles for its label; missing points and NaN
    rows are background."""
    count, cell = min(rows * rows, points.shape[0]), side + 1
    tiles = np.full((rows * rows, cell + label_space, cell), background)
    tiles[:count, :side, :side] = np.nan_to_num(points[:count], nan=background).reshape(count, side, side)
    return tiles.reshape(rows, rows, cell + label_space, cell).transpose(0, 2, 1, 3).reshape(
        rows * (cell + label_space), rows * cell)


def grid_rows(count: int, rows: int, groups: Optional[Sequence[str]] = None) -> list[np.ndarray]:
    """Which of `count` images fill each row of a rows x rows grid: in order, or, with a group label per image,
    the first `rows` images of each group, one group per row (groups in sorted order, the first `rows` of them)."""
    if groups is None:
        return [np.arange(start, min(start + rows, count)) for start in range(0, min(count, rows * rows), rows)]
    labels = np.asarray(groups)
    return [np.flatnonzero(labels == group)[:rows] for group in sorted(set(labels.tolist()))[:rows]]


GRID_ROWS = 8
"""Rows (and tiles per row) of an image grid."""
LABEL_SPACE = 5
"""Pixels under each row of an image grid for its label (8x8 tiles)."""


def _image_grids(panels: tuple[np.ndarray, np.ndarray], side: int, path, title: str,
                 groups: Optional[tuple[Sequence[str], Sequence[str]]] = None,
                 rewards: Optional[tuple[np.ndarray, np.ndarray]] = None, rows: int = GRID_ROWS) -> Figure:
    """Two grids of rows x rows square tiles (side x side pixels and a gap, grey scale shared by both): generated,
    then data; with groups or rewards, each row's condition and mean reward under it."""
    fig = Figure(figsize=(10, 5.4 if groups is None and rewards is None else 6.4), layout="constrained")
    generated, data = panels
    low, high = float(data.min()), float(data.max())
    labelled = groups is not None or rewards is not None
    space = LABEL_SPACE if labelled else 0
    for panel, (name, points) in enumerate((("generated", generated), ("data", data))):
        members = grid_rows(points.shape[0], rows, None if groups is None else groups[panel])
        laid_out = np.full((rows * rows, points.shape[1]), np.nan)
        for row, indices in enumerate(members):
            laid_out[row * rows:row * rows + len(indices)] = points[indices]
        ax = fig.add_subplot(1, 2, panel + 1)
        ax.imshow(image_grid(laid_out, side, rows, low, space), cmap="gray_r", vmin=low, vmax=high)
        for row, indices in enumerate(members if labelled else []):
            parts = [str(groups[panel][indices[0]])] if groups is not None and len(indices) else []
            if rewards is not None and len(indices):
                parts.append(f"h {float(np.mean(rewards[panel][indices])):.2f}")
            ax.text(rows * (side + 1) / 2 - 0.5, row * (side + 1 + space) + side + space / 2, ", ".join(parts),
                    ha="center", va="center", fontsize=7)
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
