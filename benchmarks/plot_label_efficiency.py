"""Label-efficiency plot of `gym rlhf` as an SVG (no plotting library needed): the final TRUE eval
return against the number of comparisons, per task, for the clean and the noisy (10% mistakes) oracle,
with PPO on the true reward as the ceiling. Reads the JSON lines that
`benchmarks/gym_rlhf_targets.py --budgets ... [--ceiling] [--mistakes 0.1] --jsonl FILE` appended.

    python benchmarks/plot_label_efficiency.py results.jsonl -o docs/images/gym_rlhf_label_efficiency.svg
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from html import escape
from pathlib import Path

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 420, 300, 60, 20, 40, 50
COLORS = {"clean": "#1f77b4", "noisy": "#d62728", "ceiling": "#555555"}


def _series(rows: list[dict], task: str) -> tuple[dict[str, dict[int, list[float]]], list[float]]:
    lines: dict[str, dict[int, list[float]]] = {"clean": defaultdict(list), "noisy": defaultdict(list)}
    ceiling = []
    for r in rows:
        if r["task"] != task:
            continue
        if r["teacher"] == "true reward":
            ceiling.append(r["final_return"])
        elif r.get("budget"):
            lines["noisy" if r.get("mistakes") else "clean"][int(r["budget"])].append(r["final_return"])
    return lines, ceiling


def panel(rows: list[dict], task: str, x0: float) -> list[str]:
    lines, ceiling = _series(rows, task)
    budgets = sorted({b for s in lines.values() for b in s})
    values = [v for s in lines.values() for vs in s.values() for v in vs] + ceiling
    if not budgets:
        return []
    lo, hi = min(values), max(values)
    lo, hi = lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)
    bx = [math.log2(b) for b in budgets]

    def sx(b: float) -> float:
        span = (bx[-1] - bx[0]) or 1.0
        return x0 + PAD_L + (math.log2(b) - bx[0]) / span * (W - PAD_L - PAD_R)

    def sy(v: float) -> float:
        return PAD_T + (hi - v) / (hi - lo) * (H - PAD_T - PAD_B)

    out = [f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(task)}</text>',
           f'<line x1="{x0 + PAD_L}" y1="{H - PAD_B}" x2="{x0 + W - PAD_R}" y2="{H - PAD_B}" stroke="black"/>',
           f'<line x1="{x0 + PAD_L}" y1="{PAD_T}" x2="{x0 + PAD_L}" y2="{H - PAD_B}" stroke="black"/>',
           f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle">comparisons</text>',
           f'<text x="{x0 + 14}" y="{H / 2}" text-anchor="middle" transform="rotate(-90 {x0 + 14} {H / 2})">'
           'final true return</text>']
    for b in budgets:
        out.append(f'<text x="{sx(b):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{b}</text>')
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        out.append(f'<text x="{x0 + PAD_L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    if ceiling:
        c = sum(ceiling) / len(ceiling)
        out.append(f'<line x1="{x0 + PAD_L}" y1="{sy(c):.1f}" x2="{x0 + W - PAD_R}" y2="{sy(c):.1f}" '
                   f'stroke="{COLORS["ceiling"]}" stroke-dasharray="6 4"/>')
    for name, series in lines.items():
        pts = [(sx(b), sy(sum(vs) / len(vs))) for b, vs in sorted(series.items())]
        if not pts:
            continue
        out.append(f'<polyline fill="none" stroke="{COLORS[name]}" stroke-width="2" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for b, vs in series.items():
            for v in vs:
                out.append(f'<circle cx="{sx(b):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{COLORS[name]}" opacity="0.5"/>')
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("-o", "--output", type=Path, required=True)
    a = p.parse_args()
    rows = [json.loads(x) for f in a.results for x in f.read_text().splitlines() if x.strip()]
    tasks = sorted({r["task"] for r in rows})
    body = []
    for i, task in enumerate(tasks):
        body += panel(rows, task, i * W)
    legend = [("clean oracle (mean; dots: seeds)", "clean"), ("10% mistakes", "noisy"),
              ("PPO on the true reward (mean)", "ceiling")]
    y = H + 10
    for j, (text, key) in enumerate(legend):
        x = 20 + j * 260
        body.append(f'<rect x="{x}" y="{y}" width="14" height="4" fill="{COLORS[key]}"/>')
        body.append(f'<text x="{x + 20}" y="{y + 6}">{escape(text)}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * max(1, len(tasks))}" height="{H + 30}" '
           f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>'
           + "".join(body) + "</svg>\n")
    a.output.write_text(svg)
    print(f"wrote {a.output} ({len(rows)} results, tasks: {', '.join(tasks)})")


if __name__ == "__main__":
    main()
