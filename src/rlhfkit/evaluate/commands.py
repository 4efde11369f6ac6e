"""What `rlhfkit eval` runs: check the inputs, evaluate, write the report, print the headline table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.config import load_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluate.lm import LMEvalConfig, evaluate_lm
from rlhfkit.evaluate.lm_report import terminal_table, write_outputs


def named_models(specs: list[str]) -> dict[str, str]:
    """`--model` values -> {name: spec}: NAME=SPEC names one; otherwise `tuned`, `tuned_2`, ..."""
    out: dict[str, str] = {}
    for i, item in enumerate(specs):
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = ("tuned" if i == 0 else f"tuned_{i + 1}"), item
        name, spec = name.strip(), spec.strip()
        if not name or not spec:
            raise RlhfkitError(f"--model {item!r}: expected SPEC or NAME=SPEC")
        if name in out or name == "base":
            raise RlhfkitError(f"--model {item!r}: the name {name!r} is " + ("taken" if name in out else "reserved"))
        out[name] = spec
    return out


def _check_runs(runs: list[str]) -> None:
    from rlhfkit.evaluate.curves import metrics_path

    for run in runs:
        metrics_path(run)  # a missing folder or one without metrics.jsonl is an error now, not after generation


def eval_lm(base: str, models: list[str], scorers: list[str], output: str, settings: list[str],
            runs: list[str] = (), log: Any = print) -> dict[str, Any]:
    cfg = load_config(LMEvalConfig, None, settings)
    cfg.scorers = scorers
    _check_runs(list(runs))
    tuned = named_models(models)
    log(f"evaluating {', '.join(tuned)} against {base} on {cfg.prompts} ...")
    summary = evaluate_lm(base, tuned, cfg, log=log)
    report = write_outputs(summary, output, runs=list(runs))
    log(terminal_table(summary))
    log(f"report: {report.resolve()}")
    log(f"numbers: {(Path(output) / 'summary.json').resolve()}")
    return summary


def eval_agents(run_dirs: list[str], output: str, *, episodes: int = 20, seed: int = 12345,
                threshold: float | None = None, log: Any = print) -> dict[str, Any]:
    import json

    from rlhfkit.evaluate.agents import agents_report, evaluate_agents
    from rlhfkit.evaluate.report import Report
    from rlhfkit.runtime.atomic import write_atomic

    result = evaluate_agents(run_dirs, episodes=episodes, seed=seed, threshold=threshold)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report("rlhfkit eval: control agents")
    agents_report(result, rep)
    path = rep.write(out / "report.html")
    write_atomic(out / "summary.json", json.dumps(result, indent=2, default=float) + "\n")
    rows = [["group", "runs", "final return (mean +- std)", "min..max", "reached", "steps to threshold", "wall s"]]
    for g in result["groups"]:
        std = g["final_return_std"] or 0.0
        rows.append([g["label"], str(g["n"]), f"{g['final_return_mean']:.1f} +- {std:.1f}",
                     f"{g['final_return_min']:.1f}..{g['final_return_max']:.1f}", f"{g['reached']}/{g['n']}",
                     "-" if g["steps_to_threshold_mean"] is None else f"{g['steps_to_threshold_mean']:.0f}",
                     "-" if g["wall_seconds_mean"] is None else f"{g['wall_seconds_mean']:.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        log("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    log(f"report: {path.resolve()}")
    return result
