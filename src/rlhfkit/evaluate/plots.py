"""Small PNG charts for the `rlhfkit eval` report: lines, seed bands, histograms, bars with intervals.

Each function returns the PNG file's bytes. Figures are `matplotlib.figure.Figure` objects drawn by the
Agg canvas directly: pyplot is never imported, so no window opens, no global backend is switched in the
caller's process (a notebook keeps its own), and no figure outlives its call. Sizes stay small
(6 x 3.5 in at 100 dpi, about 20-40 kB) so a report with many plots stays a few hundred kB.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluate.curves import Curve, align_curves

FIGSIZE = (6.0, 3.5)
DPI = 100


def _figure() -> tuple[Any, Any]:
    """(figure, axes) on an Agg canvas, without pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RlhfkitError("plots in the eval report need matplotlib (pip install matplotlib)") from None
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)  # grid lines behind bars and bands
    return fig, ax


def _png(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, legend: bool) -> bytes:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: same input, same bytes
    return buf.getvalue()


def _nonempty(func: str, name: str, groups: Mapping[str, Any]) -> None:
    if not groups:
        raise ValueError(f"{func}: {name} is empty (nothing to plot)")


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
              reference: float | None = None) -> bytes:
    """One line per series (name -> [(x, y), ...]); `reference` draws a dashed horizontal line (a
    target return, a 0.5 win rate). A series with one point is drawn as a marker."""
    _nonempty("line_plot", "series", series)
    fig, ax = _figure()
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, marker="o" if len(points) == 1 else None, linewidth=1.5)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    return _png(fig, ax, title, xlabel, ylabel, legend=len(series) > 1)


def band_plot(groups: Mapping[str, Sequence[Curve]], title: str, xlabel: str, ylabel: str,
              band: str = "minmax", reference: float | None = None, points: int = 200) -> bytes:
    """Per group (name -> one curve per seed), the mean curve over seeds with a band: min-max over the
    seeds (band="minmax") or mean +- std (band="std"). The curves are interpolated onto a common x grid
    (`curves.align_curves`: the range every seed covers). A group with one seed is a plain line; a group
    whose curves do not overlap is drawn seed by seed, thin."""
    _nonempty("band_plot", "groups", groups)
    if band not in ("minmax", "std"):
        raise ValueError(f"band_plot: band must be 'minmax' or 'std', got {band!r}")
    fig, ax = _figure()
    for name, curves in groups.items():
        grid, values = align_curves(list(curves), points=points)  # (G,), (S, G)
        if grid.size == 0:
            for k, curve in enumerate(c for c in curves if c):
                xs, ys = zip(*curve)
                ax.plot(xs, ys, linewidth=0.8, label=name if k == 0 else None)
            continue
        mean = values.mean(0)
        seeds = len(values)
        (line,) = ax.plot(grid, mean, linewidth=1.5, label=f"{name} ({seeds} seed{'s' if seeds != 1 else ''})",
                          marker="o" if grid.size == 1 else None)
        if seeds > 1:
            lo, hi = ((values.min(0), values.max(0)) if band == "minmax"
                      else (mean - values.std(0), mean + values.std(0)))
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    return _png(fig, ax, title, xlabel, ylabel, legend=True)


def histogram(groups: Mapping[str, Sequence[float]], title: str, xlabel: str, bins: int = 30) -> bytes:
    """Overlaid histograms (name -> values) on shared bins, so the groups compare bar for bar."""
    _nonempty("histogram", "groups", groups)
    data = {name: np.asarray(v, dtype=np.float64) for name, v in groups.items()}
    data = {name: v[np.isfinite(v)] for name, v in data.items()}
    everything = np.concatenate([v for v in data.values()]) if data else np.zeros(0)
    if everything.size == 0:
        raise ValueError("histogram: groups hold no finite values")
    lo, hi = float(everything.min()), float(everything.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig, ax = _figure()
    for name, values in data.items():
        ax.hist(values, bins=edges, alpha=0.5 if len(data) > 1 else 0.8, label=f"{name} (n={len(values)})")
    return _png(fig, ax, title, xlabel, "count", legend=True)


def bar_with_ci(bars: Mapping[str, Mapping[str, float]], title: str, ylabel: str,
                reference: float | None = None) -> bytes:
    """One bar per name at its `mean`, with whiskers from `lo` to `hi`: the dicts of `metrics.mean_ci`
    fit as they are (a win-rate dict: pass {"mean": r["win_rate"], "lo": r["lo"], "hi": r["hi"]})."""
    _nonempty("bar_with_ci", "bars", bars)
    for name, b in bars.items():
        missing = [k for k in ("mean", "lo", "hi") if b.get(k) is None]
        if missing:
            raise ValueError(f"bar_with_ci: bars[{name!r}] has no {', '.join(missing)}")
    names = list(bars)
    means = np.array([float(bars[n]["mean"]) for n in names])
    lo = np.array([float(bars[n]["lo"]) for n in names])
    hi = np.array([float(bars[n]["hi"]) for n in names])
    err = np.stack([np.maximum(means - lo, 0.0), np.maximum(hi - means, 0.0)])  # (2, bars)
    fig, ax = _figure()
    ax.bar(range(len(names)), means, yerr=err, capsize=4, color="#4c72b0", alpha=0.85)
    crowded = len(names) > 4
    ax.set_xticks(range(len(names)), names, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    return _png(fig, ax, title, "", ylabel, legend=False)


def scatter(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
            ylabel: str) -> bytes:
    """Points per series (name -> (xs, ys)): score against length, to see a length bias."""
    _nonempty("scatter", "series", series)
    fig, ax = _figure()
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"scatter: series[{name!r}] has {len(xs)} x values and {len(ys)} y values")
        ax.scatter(xs, ys, s=8, alpha=0.5, label=name)
    return _png(fig, ax, title, xlabel, ylabel, legend=len(series) > 1)
