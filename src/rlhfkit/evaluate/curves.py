"""Learning curves from rlhfkit run folders, and putting curves of several seeds on one x grid.

A run folder (see `rlhfkit.runtime.rundir`) holds `rlhfkit-run.json`, `config.yaml` and `metrics.jsonl`,
one JSON object per logged step (`rlhfkit.runtime.metrics.MetricsLogger`):

    {"step": 10, "train/loss": 2.3, "train/lr": 0.001, ...}
    {"step": 10, "eval/return": 22.0, "env_steps": 2048.0, ...}     (gym runs also log env_steps)

`read_curves` turns that into metric -> [(x, value), ...] in logged order, x being `step` (the update or
optimizer step) or another logged number such as `env_steps`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.errors import DataError, RlhfkitError

Curve = list[tuple[float, float]]

MARKER = "rlhfkit-run.json"  # rlhfkit.runtime.rundir.MARKER (not imported: that module pulls in torch)

_INTERESTING = ("return", "reward", "score", "win", "loss", "kl", "accuracy", "acc", "entropy", "length",
                "margin", "clipfrac", "explained_variance", "grad_norm")
"""Keywords of the metrics worth a plot, most interesting first."""
_BOOKKEEPING = re.compile(r"(^|/)(time|dist)/|env_steps|(^|/)lr$|_lr$|/count$|/asked$|_std$|^step$|tokens")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_path(run_dir: str | Path) -> Path:
    """run_dir/metrics.jsonl, or an error saying why run_dir is not a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RlhfkitError(f"{run_dir}: no such folder (expected an rlhfkit run folder)")
    if not run_dir.is_dir():
        raise RlhfkitError(f"{run_dir}: is a file, not a run folder (pass the run's output_dir)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        started = (run_dir / MARKER).is_file()
        what = "an rlhfkit run that logged nothing yet" if started else "not an rlhfkit run folder"
        raise RlhfkitError(f"{run_dir}: no metrics.jsonl ({what}; a run folder holds {MARKER}, config.yaml and "
                           "metrics.jsonl)")
    return path


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl. A malformed line is a DataError naming `file:line`; only a last
    line cut short by a kill (no newline after it) is skipped, as the logger itself does on resume."""
    path = metrics_path(run_dir)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                continue  # a torn last write
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        elif not _is_number(row.get("step")):
            problems.append(f"{path}:{number}: field 'step': expected a number, got {row.get('step')!r}")
        else:
            rows.append(row)
    if problems:
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{path}: {len(problems)} malformed line(s):\n  {shown}", problems)
    return rows


def read_curves(run_dir: str | Path, x: str = "step") -> dict[str, Curve]:
    """metric -> [(x, value), ...] from run_dir/metrics.jsonl, in logged order.

    x: the row field used as abscissa (`step`, or `env_steps` for gym runs); rows without it are skipped.
    Non-numeric and non-finite values (a diverged loss logged as NaN) are left out; the x field itself
    and `step` are not curves.
    """
    curves: dict[str, Curve] = {}
    for row in read_rows(run_dir):
        at = row.get(x)
        if not _is_number(at) or not math.isfinite(at):
            continue
        for key, value in row.items():
            if key in (x, "step") or not _is_number(value) or not math.isfinite(value):
                continue
            curves.setdefault(key, []).append((float(at), float(value)))
    return curves


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as a dict ({} when the folder has none)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise DataError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _rank(key: str) -> tuple[int, int, int, str]:
    """Sort key: keyword priority, then eval/ before the rest, then the shorter name (eval/return before
    eval/min_return), then the name."""
    low = key.lower()
    priority = next((i for i, word in enumerate(_INTERESTING) if word in low), len(_INTERESTING))
    return priority, 0 if low.startswith("eval/") else 1, len(low), low


def pick_metrics(curves: dict[str, Curve], max_plots: int = 8) -> list[str]:
    """Up to max_plots metric names worth plotting, most interesting first.

    Interesting = the name holds one of return, reward, score, win, loss, kl, accuracy, entropy, length, ...
    (in that order; eval/ before train/); bookkeeping (time/, lr, env_steps, counts, *_std) is never
    picked; curves with fewer than 2 points are skipped. Remaining slots go to other metrics by name.
    """
    if max_plots < 1:
        raise ValueError(f"pick_metrics: max_plots must be >= 1, got {max_plots}")
    usable = [k for k, c in curves.items() if len(c) >= 2 and not _BOOKKEEPING.search(k.lower())]
    return sorted(usable, key=_rank)[:max_plots]


def align_curves(curves: list[Curve], points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Curves of several seeds on one x grid: (grid (G,), values (S, G)) by linear interpolation.

    The grid spans the x range all curves cover (the latest start to the earliest end), so nothing is
    extrapolated; G = min(points, distinct x inside it). Each curve is sorted by x first (a repeated x
    keeps its last value). Empty curves are dropped; no overlap gives G = 0.
    """
    if points < 2:
        raise ValueError(f"align_curves: points must be >= 2, got {points}")
    arrays = []
    for curve in curves:
        if not curve:
            continue
        pairs = dict(sorted((float(a), float(b)) for a, b in curve))  # sorted by x; a repeated x keeps the last
        arrays.append((np.fromiter(pairs.keys(), float), np.fromiter(pairs.values(), float)))
    if not arrays:
        return np.zeros(0), np.zeros((0, 0))
    start, end = max(xs[0] for xs, _ in arrays), min(xs[-1] for xs, _ in arrays)
    if start > end:
        return np.zeros(0), np.zeros((len(arrays), 0))
    inside = np.unique(np.concatenate([xs[(xs >= start) & (xs <= end)] for xs, _ in arrays]))
    grid = inside if len(inside) <= points else np.linspace(start, end, points)
    return grid, np.stack([np.interp(grid, xs, ys) for xs, ys in arrays])


def value_at(curve: Curve, x: float) -> float | None:
    """The last value logged at or before x (a step function), None if the curve starts after x."""
    best = None
    for at, value in curve:
        if at <= x:
            best = value
    return best


def first_reaching(curve: Curve, threshold: float) -> float | None:
    """The first x whose value is >= threshold (in logged order), None if never."""
    return next((at for at, value in curve if value >= threshold), None)
