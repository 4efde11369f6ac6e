"""The report of `rlhfkit eval`: report.html (self-contained), summary.json (every number), answers.jsonl
(every answer), and the short table printed to the terminal. The HTML is built with `Report`, which
escapes all text, so model answers are shown, never interpreted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfkit.evaluate import plots
from rlhfkit.evaluate.curves import pick_metrics, read_curves, read_rows
from rlhfkit.evaluate.report import Report
from rlhfkit.runtime.atomic import write_atomic


def run_finals(run_dirs: list[str]) -> dict[str, dict[str, float]]:
    """The last logged value of every metric of each run folder (eval accuracy, final loss, ...)."""
    out: dict[str, dict[str, float]] = {}
    for run in run_dirs:
        merged: dict[str, float] = {}
        for row in read_rows(run):
            merged.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        out[str(run)] = merged
    return out


def _fmt_ci(m: dict[str, Any] | None) -> str:
    if not m or m.get("mean") is None:
        return "-"
    return f"{m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}]"


def _fmt_win(w: dict[str, Any] | None) -> str:
    if not w or w.get("win_rate") is None:
        return "-"
    return f"{w['win_rate']:.0%} [{w['lo']:.0%}, {w['hi']:.0%}]"


def headline(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of the terminal table: per tuned model and scorer, base -> tuned mean, win rate, KL, length."""
    rows = []
    decoding = "greedy"
    for scorer, per_model in summary["scores"].items():
        for model in summary["models"]:
            w = summary["win_rate"][scorer][model][decoding]
            lm = summary["length_bias"][scorer][model][decoding]["length_matched"]
            kl = summary["kl"].get(model, {}).get("k1_per_token")
            lb = summary["answers"]["base"][decoding]["length_tokens"]["mean"]
            lt = summary["answers"][model][decoding]["length_tokens"]["mean"]
            rows.append([model, scorer, _fmt_ci(per_model["base"][decoding]), _fmt_ci(per_model[model][decoding]),
                         _fmt_win(w), _fmt_win(lm), "-" if kl is None else f"{kl:.3f}", f"{lb:.1f} -> {lt:.1f}"])
    return rows


HEADLINE = ["model", "scorer", "base (greedy)", "tuned (greedy)", "win rate", "length-matched win", "KL/token",
            "length (tokens)"]


def terminal_table(summary: dict[str, Any]) -> str:
    rows = [HEADLINE] + headline(summary)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(HEADLINE))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_report(summary: dict[str, Any], runs: list[str] = (), title: str = "rlhfkit eval") -> Report:
    rep = Report(title)
    models = list(summary["models"])
    rep.paragraph(f"Base model: {summary['base']}. Tuned: " + ", ".join(f"{m} = {s}" for m, s in summary["models"].items())
                  + f". {summary['prompts']['n']} held-out prompts from {summary['prompts']['source']}.")
    s = summary["settings"]
    rep.paragraph(f"Each model answers greedily and with {s['samples']} samples per prompt at temperature "
                  f"{s['temperature']} (seed {s['seed']}, the same for every model), up to {s['max_new_tokens']} new "
                  "tokens. Intervals are 95% bootstrap intervals over prompts; a win is a prompt whose tuned answer "
                  "scores higher than the base answer (ties count half).")
    rep.heading("Headline")
    rep.table(HEADLINE, headline(summary), caption="Greedy answers")
    for extra in summary.get("extra_tables", []):
        rep.table(extra["columns"], extra["rows"], caption=extra.get("caption", ""))

    rep.heading("Scores")
    for scorer, per_model in summary["scores"].items():
        rows = []
        for model, by_dec in per_model.items():
            for decoding, m in by_dec.items():
                w = summary["win_rate"].get(scorer, {}).get(model, {}).get(decoding)
                rows.append([model, decoding, m["mean"], m["lo"], m["hi"], m["n"],
                             None if w is None else w["wins"], None if w is None else w["ties"],
                             None if w is None else w["losses"], None if w is None else w["win_rate"],
                             None if w is None else w["sign_test_p"]])
        rep.table(["model", "decoding", "mean", "lo", "hi", "answers", "wins", "ties", "losses", "win rate", "sign test p"],
                  rows, caption=f"Scorer {scorer}")
        bars = {f"{model} ({dec})": m for model, by_dec in per_model.items() for dec, m in by_dec.items()}
        rep.image(plots.bar_with_ci(bars, f"mean {scorer} score", scorer), f"Mean {scorer} score with 95% intervals")

    rep.heading("Length bias")
    rep.paragraph("A reward can be gamed by length. If the score correlates with length and the tuned answers grew, "
                  "part of the gain may be length: compare the win rate on prompts whose two answers have about the "
                  f"same length (within {s['length_tolerance']:.0%}) and the length-controlled win rate (a logistic "
                  "fit that removes the length difference's effect).")
    rows = []
    for scorer, per_model in summary["length_bias"].items():
        for model, by_dec in per_model.items():
            for decoding, lb in by_dec.items():
                c, m, lc = lb["score_vs_length"], lb["length_matched"], lb["length_controlled"]
                rows.append([scorer, model, decoding, c["pearson"], c["spearman"], summary["win_rate"][scorer][model][decoding]["win_rate"],
                             m["win_rate"], f"{m['matched']}/{m['total']}", lc["lc_win_rate"]])
    rep.table(["scorer", "model", "decoding", "score~length Pearson", "Spearman", "win rate", "length-matched win rate",
               "matched pairs", "length-controlled win rate"], rows)

    rep.heading("Answers")
    rows = []
    for model, by_dec in summary["answers"].items():
        for decoding, a in by_dec.items():
            rows.append([model, decoding, a["length_tokens"]["mean"], a["length_tokens"]["p90"], a["eos_rate"],
                         a["empty_rate"], a["distinct_1"], a["distinct_2"]])
    rep.table(["model", "decoding", "mean length (tokens)", "p90 length", "EOS rate", "empty", "distinct-1", "distinct-2"],
              rows, caption="Length, ending and diversity (a collapse shows as falling distinct-n)")
    if summary["kl"]:
        rep.heading("KL to the base model")
        rep.table(["model", "KL/token (k1)", "KL/token (k3)", "per-answer mean", "p90", "per-sequence KL"],
                  [[m, k["k1_per_token"], k["k3_per_token"], (k["per_answer"] or {}).get("mean"),
                    (k["per_answer"] or {}).get("p90"), k["per_sequence_k1"]["mean"]] for m, k in summary["kl"].items()],
                  caption="KL(tuned || base) on the tuned model's sampled answers, nats")
        values = {m: k["per_answer_values"] for m, k in summary["kl"].items() if k["per_answer_values"]}
        if values:
            rep.image(plots.histogram(values, "per-token KL of each sampled answer", "nats per token"),
                      "Distribution of the per-token KL over answers")

    rep.heading("Side by side")
    n = summary["settings"]["show_samples"]
    first = summary["scorers"][0]
    cols = ["prompt", "base", *models]
    rows = []
    for t in summary["texts"][:n]:
        row = {"prompt": t["prompt"]}
        for m in ["base", *models]:
            row[m] = f"[{first} {t[f'{m}/greedy_scores'][first]:+.3f}] {t[f'{m}/greedy']}"
        rows.append(row)
    rep.samples(rows, cols)

    if runs:
        rep.heading("Learning curves")
        for run in runs:
            curves = read_curves(run)
            keys = pick_metrics(curves)
            if not keys:
                rep.note(f"{run}: no metrics to plot")
                continue
            rep.heading(str(run), level=3)
            for key in keys:
                rep.image(plots.line_plot({key: curves[key]}, key, "step", key), f"{run}: {key}")
    return rep


def write_outputs(summary: dict[str, Any], out_dir: str | Path, runs: list[str] = (), title: str = "rlhfkit eval") -> Path:
    """summary.json, answers.jsonl and report.html in `out_dir`; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = summary["texts"]
    slim = {k: v for k, v in summary.items() if k != "texts"}
    write_atomic(out / "answers.jsonl", "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts))
    write_atomic(out / "summary.json", json.dumps(slim, indent=2, default=float) + "\n")
    return build_report(summary, list(runs), title).write(out / "report.html")
