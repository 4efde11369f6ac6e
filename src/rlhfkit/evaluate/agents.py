"""`rlhfkit eval --agents runs/a runs/b ...`: compare finished `rlhfkit gym` runs (ppo, dqn, mappo, rlhf).

Per run: its final agent (`run/agent/`) replayed with `rlhfkit.gym.evaluate.evaluate_saved` on the SAME
episode seeds for every run (seed, seed + 1, ...), so runs are compared on identical starts; its training
return curve (`episode/return`, undiscounted return of the training episodes, against `env_steps`) and
periodic evaluations (`eval/return`) from metrics.jsonl; the environment steps at which each first reached a
threshold; its training time (`time/train_seconds`); and for `gym rlhf` runs the labels used
(`feedback/labels`) against the return reached (label efficiency).

Runs are grouped across seeds: a group is the runs with the same environment, algorithm and config once
`seed` and the bookkeeping keys (IGNORED_KEYS: output folder, device, logging) are left out. Per group:
mean, std (over seeds, ddof=1), min and max of the final return, and how many seeds reached the threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluate.curves import Curve, first_reaching, read_config, read_curves, value_at
from rlhfkit.evaluate.report import Report

IGNORED_KEYS = frozenset({"seed", "output_dir", "overwrite", "device", "threads", "progress", "tensorboard",
                          "log_every", "save_every", "save_total_limit"})
"""Top-level config keys that do not make two runs different experiments."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _last(curve: Curve) -> float | None:
    return curve[-1][1] if curve else None


def _inspect(run_dir: Path) -> dict[str, Any]:
    """What a run folder says before any episode is played: its curves, config and agent (or an error)."""
    from rlhfkit.gym.agents import read_json

    curves = read_curves(run_dir, x="env_steps")  # errors for a folder that is not a run
    agent_dir = run_dir / "agent"
    if not (agent_dir / "agent.json").is_file():
        if (run_dir / "model").is_dir():
            raise RlhfkitError(f"{run_dir}: a language-model run (it has model/, no agent/); --agents takes "
                               "`rlhfkit gym` runs")
        raise RlhfkitError(f"{run_dir}: no agent/agent.json: the final agent is written when a gym run finishes. "
                           f"Finish it with --resume latest, or evaluate a checkpoint with `rlhfkit gym eval "
                           f"{run_dir}/checkpoints/step-N`")
    spec = read_json(agent_dir / "agent.json")
    config = read_config(run_dir)
    env = spec.get("env") if isinstance(spec.get("env"), dict) else config.get("env", {})
    env_id = env.get("id") if isinstance(env, dict) else None
    if not env_id:
        raise RlhfkitError(f"{agent_dir / 'agent.json'}: names no environment (field 'env.id')")
    rlhf = "feedback" in config or (run_dir / "reward_model").is_dir()
    eval_section = config.get("eval")
    target = eval_section.get("target_return") if isinstance(eval_section, dict) else None
    return {"run_dir": str(run_dir), "agent_dir": str(agent_dir), "curves": curves, "config": config,
            "env_id": str(env_id), "algo": "rlhf" if rlhf else str(spec.get("type", "?")),
            "seed": config.get("seed"), "target_return": target}


def _label_curve(curves: dict[str, Curve]) -> tuple[Curve | None, str | None]:
    """(labels so far, return) at each evaluation (true reward, deterministic policy), or at each
    training update when the run has fewer than two evaluations; None for runs without labels."""
    labels = curves.get("feedback/labels", [])
    if not labels:
        return None, None
    key = "eval/return" if len(curves.get("eval/return", [])) >= 2 else "episode/return"
    points = [(value_at(labels, x), y) for x, y in curves.get(key, [])]
    return [(float(n), y) for n, y in points if n is not None], key


def _run_record(info: dict[str, Any], final: dict[str, float], threshold: float | None) -> dict[str, Any]:
    curves = info["curves"]
    train, evals = curves.get("episode/return", []), curves.get("eval/return", [])
    label_curve, label_of = _label_curve(curves)
    steps = max((c[-1][0] for c in curves.values() if c), default=None)
    wall = curves.get("time/train_seconds", [])
    return {
        "run_dir": info["run_dir"], "algo": info["algo"], "env_id": info["env_id"], "seed": info["seed"],
        "final_return": final["eval/return"], "final_return_std": final.get("eval/return_std"),
        "final_min_return": final.get("eval/min_return"), "final_length": final.get("eval/length"),
        "env_steps": steps, "wall_seconds": max(v for _, v in wall) if wall else None,
        "threshold": threshold,
        "steps_to_threshold": first_reaching(train, threshold) if threshold is not None else None,
        "eval_steps_to_threshold": first_reaching(evals, threshold) if threshold is not None else None,
        "train_curve": train, "eval_curve": evals,
        "labels": _last(curves.get("feedback/labels", [])), "label_curve": label_curve, "label_curve_of": label_of,
    }


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else None


def _group(infos: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with the same (env, algo, config minus IGNORED_KEYS), with a label naming what sets them apart."""
    keys: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        config = {k: v for k, v in info["config"].items() if k not in IGNORED_KEYS}
        key = json.dumps([info["env_id"], info["algo"], config], sort_keys=True, default=str)
        keys.setdefault(key, []).append(i)
    groups = []
    for members in keys.values():
        first = infos[members[0]]
        flat = _flatten({k: v for k, v in first["config"].items() if k not in IGNORED_KEYS})
        groups.append({"env_id": first["env_id"], "algo": first["algo"], "runs": members, "flat": flat})
    for g in groups:  # what differs from the other groups of the same env and algorithm
        peers = [h["flat"] for h in groups if (h["env_id"], h["algo"]) == (g["env_id"], g["algo"])]
        names = sorted(set().union(*peers) - {"env.id"})
        g["differs"] = {k: g["flat"].get(k) for k in names
                        if len({json.dumps(p.get(k), default=str) for p in peers}) > 1}
    out, seen = [], set()
    for number, g in enumerate(groups, start=1):
        shown = [f"{k}={v}" for k, v in g["differs"].items()]
        label = f"{g['env_id']} {g['algo']}" + (f" [{', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}]"
                                                 if shown else "")
        if label in seen:
            label += f" #{number}"
        seen.add(label)
        members = [runs[i] for i in g["runs"]]
        finals = np.array([r["final_return"] for r in members], dtype=np.float64)
        reached = [r["steps_to_threshold"] for r in members if r["steps_to_threshold"] is not None]
        eval_reached = [r["eval_steps_to_threshold"] for r in members if r["eval_steps_to_threshold"] is not None]
        for r in members:
            r["group"] = len(out)
        out.append({
            "label": label, "env_id": g["env_id"], "algo": g["algo"], "runs": g["runs"],
            "seeds": [r["seed"] for r in members], "n": len(members),
            "final_return_mean": float(finals.mean()),
            "final_return_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
            "final_return_min": float(finals.min()), "final_return_max": float(finals.max()),
            "reached": len(reached), "steps_to_threshold_mean": _mean(reached),
            "eval_reached": len(eval_reached), "eval_steps_to_threshold_mean": _mean(eval_reached),
            "wall_seconds_mean": _mean([r["wall_seconds"] for r in members]),
            "env_steps_mean": _mean([r["env_steps"] for r in members]),
            "labels_mean": _mean([r["labels"] for r in members]),
            "differs": g["differs"],
        })
    return out


def evaluate_agents(run_dirs: list[str], episodes: int = 20, seed: int = 12345, threshold: float | None = None,
                    deterministic: bool = True) -> dict[str, Any]:
    """Evaluate the final agent of each gym run folder and group the runs across seeds.

    threshold: the return whose first crossing is reported (`steps_to_threshold` on the training
    episodes, `eval_steps_to_threshold` on the periodic evaluations); None takes each run's own
    `eval.target_return` (None if it has none). Every folder is checked before any episode is played.

    Returns {episodes, seed, deterministic, threshold, runs, groups}:
      runs[i]:   run_dir, algo (ppo, dqn, mappo, rlhf), env_id, seed, final_return, final_return_std,
                 final_min_return, final_length, env_steps, wall_seconds, threshold, steps_to_threshold,
                 eval_steps_to_threshold, train_curve and eval_curve ([(env_steps, return)]), labels,
                 label_curve ([(labels, return)] for rlhf runs, else None), label_curve_of, group (index)
      groups[j]: label, env_id, algo, runs (indexes), seeds, n, final_return_mean, final_return_std,
                 final_return_min, final_return_max, reached, steps_to_threshold_mean, eval_reached,
                 eval_steps_to_threshold_mean, wall_seconds_mean, env_steps_mean, labels_mean, differs
                 (the config keys that set this group apart from the others of its env and algorithm)
    """
    from rlhfkit.gym.evaluate import evaluate_saved

    if not run_dirs:
        raise RlhfkitError("--agents: no run folders given")
    if episodes < 1:
        raise RlhfkitError(f"--episodes: expected at least 1, got {episodes}")
    paths = [Path(d) for d in run_dirs]
    seen: dict[Path, str] = {}
    for given, path in zip(run_dirs, paths):
        if path.resolve() in seen:
            raise RlhfkitError(f"--agents: {given} is given twice (also as {seen[path.resolve()]})")
        seen[path.resolve()] = str(given)
    infos = [_inspect(p) for p in paths]  # every folder checked before the (slow) episodes
    runs = []
    for info in infos:
        final = evaluate_saved(info["agent_dir"], episodes=episodes, seed=seed, deterministic=deterministic)
        run_threshold = threshold if threshold is not None else info["target_return"]
        runs.append(_run_record(info, final, None if run_threshold is None else float(run_threshold)))
    groups = _group(infos, runs)
    return {"episodes": episodes, "seed": seed, "deterministic": deterministic, "threshold": threshold,
            "runs": runs, "groups": groups}


# --------------------------------------------------------------------------------------------------
# Report


def _shared_threshold(runs: list[dict[str, Any]]) -> float | None:
    values = {r["threshold"] for r in runs}
    return values.pop() if len(values) == 1 else None


def _reached_text(reached: int, n: int, mean: float | None) -> str:
    return f"{reached}/{n}" + (f", mean {mean:,.0f} steps" if mean is not None else "")


def agents_report(result: dict[str, Any], report: Report) -> None:
    """Add the control-agent section to `report`: group and run tables, final returns per group, return
    against environment steps (mean over seeds with a min-max band), and label efficiency for rlhf runs."""
    from rlhfkit.evaluate import plots

    runs, groups = result["runs"], result["groups"]
    report.heading("Control agents")
    first, last = result["seed"], result["seed"] + result["episodes"] - 1
    report.paragraph(f"Each final agent played {result['episodes']} episodes "
                     f"({'deterministic' if result['deterministic'] else 'sampled'} actions) from the same "
                     f"environment seeds {first}..{last}, so every run is scored on identical starts. Runs whose "
                     "configs differ only in seed (and output folder, device, logging) form one group.")
    has_threshold = any(r["threshold"] is not None for r in runs)
    columns = ["group", "seeds", "final return (mean)", "std", "min", "max", "env steps", "train s"]
    if has_threshold:
        columns += ["reached (train)", "reached (eval)"]
    rows = []
    for g in groups:
        row: list[object] = [g["label"], g["n"], g["final_return_mean"], g["final_return_std"], g["final_return_min"],
                             g["final_return_max"], g["env_steps_mean"], g["wall_seconds_mean"]]
        if has_threshold:
            row += [_reached_text(g["reached"], g["n"], g["steps_to_threshold_mean"]),
                    _reached_text(g["eval_reached"], g["n"], g["eval_steps_to_threshold_mean"])]
        rows.append(row)
    report.table(columns, rows, caption="Groups (std over seeds, ddof=1)")

    for env_id in dict.fromkeys(g["env_id"] for g in groups):
        mine = [g for g in groups if g["env_id"] == env_id]
        env_runs = [runs[i] for g in mine for i in g["runs"]]
        reference = _shared_threshold(env_runs)
        bars = {g["label"]: {"mean": g["final_return_mean"], "lo": g["final_return_min"], "hi": g["final_return_max"]}
                for g in mine}
        report.image(plots.bar_with_ci(bars, f"{env_id}: final return", "return", reference=reference),
                     f"{env_id}: final return of each group (bar: mean over seeds; whiskers: min and max)")
        train = {g["label"]: [runs[i]["train_curve"] for i in g["runs"]] for g in mine}
        if any(c for curves in train.values() for c in curves):
            report.image(plots.band_plot(train, f"{env_id}: training return", "environment steps", "episode return",
                                         reference=reference),
                         f"{env_id}: return of the training episodes (mean over seeds; band: min to max)")
        evals = {g["label"]: [runs[i]["eval_curve"] for i in g["runs"]] for g in mine}
        if any(len(c) >= 2 for curves in evals.values() for c in curves):
            report.image(plots.band_plot(evals, f"{env_id}: evaluation return", "environment steps", "eval return",
                                         reference=reference),
                         f"{env_id}: periodic deterministic evaluations during training (mean over seeds; band: "
                         "min to max)")
        labelled = {g["label"]: [runs[i]["label_curve"] for i in g["runs"] if runs[i]["label_curve"]] for g in mine}
        labelled = {k: v for k, v in labelled.items() if v}
        if labelled:
            report.image(plots.band_plot(labelled, f"{env_id}: label efficiency", "labels used", "return",
                                         reference=reference),
                         f"{env_id}: label efficiency: return reached against the labels the reward model had "
                         "learned from (gym rlhf; at repeated label counts the latest return counts)")

    columns = ["run", "group", "seed", "final return", "std over episodes", "env steps", "train s", "labels"]
    if has_threshold:
        columns += ["threshold", "steps to threshold (train)", "(eval)"]
    rows = []
    for r in runs:
        row = [r["run_dir"], groups[r["group"]]["label"], r["seed"], r["final_return"], r["final_return_std"],
               r["env_steps"], r["wall_seconds"], r["labels"]]
        if has_threshold:
            row += [r["threshold"], r["steps_to_threshold"], r["eval_steps_to_threshold"]]
        rows.append(row)
    report.table(columns, rows, caption="Runs")
