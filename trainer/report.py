"""Numbers and figures for reports: summary statistics, pairwise distinguishability, histograms, curves, bars.

Plotting uses matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend switch, no
display needed). Every ``plot_*`` function draws on an ``Axes`` so callers can compose panels;
:func:`save_panels` lays them out on one figure and writes it atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "summary_stats",
    "distinguishability",
    "new_figure",
    "save_figure",
    "plot_histograms",
    "plot_curves",
    "plot_bars",
    "save_panels",
]


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def summary_stats(values: Any) -> dict[str, float]:
    """``n``, ``mean``, ``std`` (population), ``median``, ``min``, ``max`` of a list/array/tensor of numbers."""
    a = _array(values)
    if a.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "median": float(np.median(a)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def distinguishability(real: Any, generated: Any, *, lower_is_real: bool = True) -> float:
    """Share of (real, generated) pairs in which the real item scores as "more real", ties counting half.

    With ``lower_is_real`` (distances such as ``R_dist``) a pair counts when ``real < generated``; otherwise
    (rewards) when ``real > generated``. This is the paper's metric over all pairs, i.e. the ROC AUC, computed
    in ``O(n log n)`` from ranks rather than by forming every pair.
    """
    r, g = _array(real), _array(generated)
    if r.size == 0 or g.size == 0:
        return math.nan
    if not lower_is_real:
        r, g = -r, -g
    # Mann-Whitney U: for each real value, generated values strictly greater plus half the ties.
    gs = np.sort(g)
    greater = g.size - np.searchsorted(gs, r, side="right")
    ties = np.searchsorted(gs, r, side="right") - np.searchsorted(gs, r, side="left")
    return float((greater + 0.5 * ties).sum() / (r.size * g.size))


# ---------------------------------------------------------------------------------------------- figures
def new_figure(rows: int = 1, cols: int = 1, *, size: tuple[float, float] | None = None) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` on an Agg canvas and its axes array (always 2-D: ``axes[row][col]``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size or (6.0 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a figure as PNG through a temporary file and a rename (readers never see a partial file)."""
    from ..rewards.hub import atomic_write_file

    return atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _labels(ax: Any, title: str | None, xlabel: str | None, ylabel: str | None) -> None:
    for setter, text in ((ax.set_title, title), (ax.set_xlabel, xlabel), (ax.set_ylabel, ylabel)):
        if text:
            setter(text)


def plot_histograms(
    ax: Any,
    sets: Mapping[str, Any],
    *,
    bins: int = 40,
    title: str | None = None,
    xlabel: str | None = None,
    density: bool = True,
    markers: Mapping[str, float] | None = None,
) -> None:
    """Overlaid histograms of several sets on one shared binning, with each set's mean in the legend;
    ``markers`` draws labelled vertical lines (e.g. a target radius)."""
    arrays = {k: _array(v) for k, v in sets.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values() if a.size]
    if finite and sum(a.size for a in finite):
        allv = np.concatenate(finite)
        lo, hi = float(allv.min()), float(allv.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for name, a in arrays.items():
            a = a[np.isfinite(a)]
            if a.size:
                ax.hist(a, bins=edges, alpha=0.5, density=density, label=f"{name} (n={a.size}, mean {a.mean():.3f})")
    for label, x in (markers or {}).items():
        ax.axvline(x, color="k", linestyle="--", linewidth=1, label=label)
    _labels(ax, title, xlabel, "density" if density else "count")
    ax.legend(fontsize=8)


def plot_curves(
    ax: Any,
    curves: Mapping[str, Any],
    *,
    x: Any = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logy: bool = False,
) -> None:
    """One line per named curve (e.g. per-frame distances, loss per step); ``x`` is shared or per-curve."""
    for name, ys in curves.items():
        y = _array(ys)
        xs = x.get(name) if isinstance(x, Mapping) else x
        xs = np.arange(y.size) if xs is None else _array(xs)
        ax.plot(xs, y, label=name, linewidth=1.2)
    if logy:
        ax.set_yscale("log")
    _labels(ax, title, xlabel, ylabel)
    if len(curves) > 1:
        ax.legend(fontsize=8)


def plot_bars(
    ax: Any,
    means: Mapping[str, float],
    *,
    errors: Mapping[str, float] | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    reference: float | None = None,
) -> None:
    """Bars with optional error bars (e.g. mean ± std per set) and a horizontal reference line."""
    names = list(means)
    vals = [float(means[n]) for n in names]
    err = [float((errors or {}).get(n, 0.0)) for n in names] if errors else None
    ax.bar(range(len(names)), vals, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))], alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=0, fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", linewidth=1)
    _labels(ax, title, None, ylabel)


def save_panels(path: str | Path, panels: Sequence[Callable[[Any], None]], *, cols: int = 2, title: str | None = None) -> Path:
    """A grid of panels, each drawn by a callable ``panel(ax)``, saved as one PNG."""
    n = max(1, len(panels))
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = new_figure(rows, cols)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels):
        panel(ax)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
