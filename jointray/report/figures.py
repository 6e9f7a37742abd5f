"""The report's plots, one function per kind, each returning a matplotlib ``Figure`` of a fixed size.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never ``pyplot``: no
global state, no display needed, safe in a Ray worker or a server thread. :func:`save` writes a PNG of
exactly ``WIDTH × HEIGHT`` pixels (``SLICES_HEIGHT`` for the three-slice views), which the report
embeds and the tests check.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from jointray.metrics.calibration import BIN_CONFIDENCE, BIN_CORRECT, BIN_COUNT
from jointray.metrics.volume import BlandAltman

DPI = 100
WIDTH, HEIGHT = 720, 420  # pixels of every plot
SLICES_HEIGHT = 300  # pixels of a three-slice view (same width)
#: One colour per structure (label 1, 2, ...), then cycling; background transparent.
STRUCTURE_COLOURS = ["#e4572e", "#17bebb", "#ffc914", "#76b041", "#a663cc", "#2e86ab"]


@dataclass(frozen=True)
class SavedFigure:
    """A PNG rendered by :func:`save`: its bytes, where it was written (None: kept in memory only), its size
    in pixels, and what it shows."""

    data: bytes = field(repr=False)
    path: Path | None
    width: int
    height: int
    caption: str


def new_figure(height: int = HEIGHT, columns: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(WIDTH / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def save(figure: Figure, path: Path | None, caption: str) -> SavedFigure:
    """Render ``figure`` as a PNG at its own size (no tight bounding box: the size is part of the contract),
    and write it to ``path`` unless None."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    width, height = (int(round(v * DPI)) for v in figure.get_size_inches())
    return SavedFigure(data=buffer.getvalue(), path=path, width=width, height=height, caption=caption)


def strips(values: dict[str, Sequence[float]], ylabel: str,
           highlight: dict[str, Sequence[int]] | None = None) -> Figure:
    """One box per group with every case as a jittered point; ``highlight``: indices drawn in red (the
    worst cases)."""
    figure, (ax,) = new_figure()
    names = list(values)
    data = [np.asarray(values[n], dtype=np.float64) for n in names]
    ax.boxplot([d[np.isfinite(d)] for d in data], showfliers=False, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1), names)
    jitter = np.random.default_rng(0)  # the same picture on every build
    for i, d in enumerate(data, start=1):
        x = i + jitter.uniform(-0.15, 0.15, len(d))
        ax.scatter(x, d, s=14, alpha=0.6, color="#2e86ab", zorder=3)
        marked = list((highlight or {}).get(names[i - 1], []))
        ax.scatter(x[marked], d[marked], s=30, color="#d62828", zorder=4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return figure


def agreement(pred: np.ndarray, ref: np.ndarray, result: BlandAltman, name: str) -> Figure:
    """Predicted against reference volume (with the identity line), and the Bland–Altman plot: difference
    against mean, with the bias and the 95 % limits of agreement."""
    figure, (left, right) = new_figure(columns=2)
    low, high = float(min(pred.min(), ref.min())), float(max(pred.max(), ref.max()))
    left.scatter(ref, pred, s=14, alpha=0.7, color="#2e86ab")
    left.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    left.set(xlabel=f"reference {name} volume (mm³)", ylabel="predicted (mm³)", title="volumes")
    mean, diff = (pred + ref) / 2, pred - ref
    right.scatter(mean, diff, s=14, alpha=0.7, color="#2e86ab")
    for value, style, label in ((result.bias, "-", "bias"), (result.lower, "--", "−1.96 SD"),
                                (result.upper, "--", "+1.96 SD")):
        right.axhline(value, color="#d62828", linestyle=style, linewidth=1)
        right.annotate(f"{label} {value:+.0f}", (1.0, value), xycoords=("axes fraction", "data"), ha="right",
                       va="bottom", fontsize=8, color="#d62828")
    right.set(xlabel="mean of the two (mm³)", ylabel="predicted − reference (mm³)", title="Bland–Altman")
    return figure


def predicted_against_true(true: np.ndarray, pred: np.ndarray, low: np.ndarray | None, high: np.ndarray | None,
                           label: str) -> Figure:
    """Predicted against true values, with the Monte Carlo interval as a vertical line where given (the point
    prediction, one deterministic pass, may lie outside its samples' interval)."""
    figure, (ax,) = new_figure()
    if low is not None and high is not None:
        ax.vlines(true, low, high, color="#9ecae1", linewidth=1.5, label="interval")
    ax.scatter(true, pred, s=16, alpha=0.8, color="#2e86ab", zorder=3)
    lo, hi = float(np.nanmin([true.min(), pred.min()])), float(np.nanmax([true.max(), pred.max()]))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel=f"true {label}", ylabel=f"predicted {label}")
    ax.grid(alpha=0.3)
    return figure


def confusion(matrix: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """A confusion matrix (rows: true, columns: predicted) with its counts written in."""
    figure, (ax,) = new_figure()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(int(count)), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return figure


def kaplan_meier(time: np.ndarray, event: np.ndarray, group: np.ndarray, names: Sequence[str], title: str) -> Figure:
    """Kaplan–Meier survival curves (lifelines), one per group, with their 95 % confidence bands."""
    from lifelines import KaplanMeierFitter

    figure, (ax,) = new_figure()
    for g, name in enumerate(names):
        chosen = group == g
        if chosen.any():
            fitter = KaplanMeierFitter(label=f"{name} (n={int(chosen.sum())})")
            fitter.fit(time[chosen], event[chosen])
            fitter.plot_survival_function(ax=ax, ci_show=True, ci_alpha=0.12)
    ax.set(xlabel="time", ylabel="event-free probability", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    return figure


def reliability(bins: dict[str, np.ndarray], title: str) -> Figure:
    """Reliability diagrams: accuracy against mean confidence per bin (marker area ∝ the bin's share), one
    series per entry of ``bins``, with the diagonal of perfect calibration."""
    figure, (ax,) = new_figure()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for (name, b), colour in zip(bins.items(), STRUCTURE_COLOURS):
        b = np.asarray(b, dtype=np.float64)
        used = b[BIN_COUNT] > 0
        count = b[BIN_COUNT, used]
        confidence, accuracy = b[BIN_CONFIDENCE, used] / count, b[BIN_CORRECT, used] / count
        ax.plot(confidence, accuracy, color=colour, linewidth=1)
        ax.scatter(confidence, accuracy, s=20 + 300 * count / count.sum(), color=colour, alpha=0.7, label=name)
    ax.set(xlabel="mean confidence in bin", ylabel="accuracy in bin", title=title, xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """Risk–coverage curves: the mean error of the cases kept against the share kept, one per entry of
    ``curves`` (name → (coverage, risk))."""
    figure, (ax,) = new_figure()
    for (name, (coverage, risk)), colour in zip(curves.items(), STRUCTURE_COLOURS):
        ax.plot(coverage, risk, color=colour, linewidth=1.5, label=name)
    ax.set(xlabel="share of cases kept (most confident first)", ylabel="mean 1 − Dice of the kept cases",
           title=title, xlim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def uncertainty_error(uncertainty: np.ndarray, error: np.ndarray, flagged: np.ndarray | None, title: str) -> Figure:
    """Per-case mean entropy against 1 − Dice; cases the review flag sent to a person in red."""
    figure, (ax,) = new_figure()
    flagged = np.zeros(len(uncertainty), bool) if flagged is None else flagged
    ax.scatter(uncertainty[~flagged], error[~flagged], s=16, alpha=0.7, color="#2e86ab", label="not flagged")
    if flagged.any():
        ax.scatter(uncertainty[flagged], error[flagged], s=22, alpha=0.8, color="#d62828", label="needs review")
    ax.set(xlabel="mean predictive entropy in the structures (nats)", ylabel="1 − mean Dice", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def curves(epochs: np.ndarray, series: dict[str, np.ndarray], ylabel: str, title: str, log: bool = False) -> Figure:
    """Lines against the epoch (1-based), one per series (NaN gaps left open)."""
    figure, (ax,) = new_figure()
    for name, values in series.items():
        ax.plot(epochs + 1, values, marker="o", markersize=3, label=name)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` (X, Y, Z) flipped and transposed to the RAS orientation closest to its ``affine``, so that
    every view is drawn the radiological-textbook way round whatever the scanner's voxel order."""
    return nib.orientations.apply_orientation(volume, nib.orientations.io_orientation(affine))


def centre_of(*volumes: np.ndarray | None) -> np.ndarray:
    """Voxel centre of mass of the first non-empty volume's non-zero voxels; the grid centre if all are empty."""
    for volume in volumes:
        if volume is not None and volume.any():
            return np.round(np.argwhere(volume > 0).mean(axis=0)).astype(int)
    shape = next(v for v in volumes if v is not None).shape
    return np.array(shape) // 2


def slices(image: np.ndarray, mask: np.ndarray | None, reference: np.ndarray | None, centre: Sequence[int],
           title: str, heat: np.ndarray | None = None, heat_max: float = 1.0) -> Figure:
    """Three orthogonal slices through ``centre`` of a (X, Y, Z) volume in RAS orientation: the image in
    grey, the predicted structures (``mask``) filled in colour or a ``heat`` map (0 to ``heat_max``, e.g.
    the voxel entropy) over it, and the ``reference``'s outline in white."""
    figure, axes = new_figure(SLICES_HEIGHT, columns=3)
    colours = ListedColormap(["none", *STRUCTURE_COLOURS])
    low, high = np.percentile(image, [1, 99.5])
    views = (("sagittal", 0), ("coronal", 1), ("axial", 2))
    for ax, (name, axis) in zip(axes, views):
        def cut(volume):
            return np.take(volume, int(centre[axis]), axis=axis).T  # rows: the second remaining axis, upwards
        ax.imshow(cut(image), cmap="gray", vmin=low, vmax=high, origin="lower")
        if mask is not None:
            ax.imshow(np.ma.masked_equal(cut(mask).astype(float), 0), cmap=colours, vmin=0,
                      vmax=len(STRUCTURE_COLOURS), alpha=0.45, origin="lower", interpolation="nearest")
        if heat is not None:
            shown = cut(heat)
            ax.imshow(np.ma.masked_less(shown, 0.05 * heat_max), cmap="inferno", vmin=0, vmax=heat_max, alpha=0.7,
                      origin="lower", interpolation="nearest")
        if reference is not None and cut(reference).any():
            ax.contour(cut(reference) > 0, levels=[0.5], colors="white", linewidths=0.8, origin="lower")
        ax.set_title(f"{name} {int(centre[axis])}", fontsize=9)
        ax.set_axis_off()
    figure.suptitle(title, fontsize=10)
    return figure


def attribution_bars(attributions: dict[str, dict[str, float]]) -> Figure:
    """Horizontal bars of each outcome's attribution to each clinical feature, one panel per outcome."""
    heads = list(attributions)
    figure, axes = new_figure(columns=len(heads))
    for ax, head in zip(axes, heads):
        names = list(attributions[head])
        values = np.array([attributions[head][n] for n in names])
        ax.barh(names, values, color=["#d62828" if v > 0 else "#2e86ab" for v in values])
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_title(head, fontsize=10)
        ax.tick_params(labelsize=8)
    figure.suptitle("what knowing each clinical feature changed (Integrated Gradients, output units)", fontsize=9)
    return figure
