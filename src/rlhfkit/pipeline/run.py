"""`rlhfkit pipeline --config F [--resume] [--dry-run]`: plan every stage of every round, then run them in
order, skipping what already finished with the same inputs.

The plan is made first and in full: each step's settings are resolved and checked (recipe configs are
built as their commands would build them), its inputs named, and its hash computed from its settings,
its outside inputs and the hashes of the steps it reads. So a bad config, an unknown stage or a missing
input stops the pipeline before anything runs, and `--dry-run` prints exactly what would happen.

Running a step: finished before with the same hash (and its outputs still there) -> skipped; started
before with the same hash and `--resume` -> the recipe continues from its last checkpoint (the other
stages are deterministic and start over); anything else -> its folder is cleared and it runs fresh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rlhfkit.config import load_config, to_dict
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.pipeline import stages as st
from rlhfkit.pipeline.config import POLICY_STAGES, REWARD_MODEL, PipelineConfig
from rlhfkit.pipeline.state import State, stage_hash


@dataclass
class Step:
    key: str
    """round-R/STAGE, or sft / compress."""
    stage: str
    round: int
    folder: Path
    settings: dict[str, Any]
    external: list[str]
    upstream: list[str]
    outputs: dict[str, str]
    run: Callable[[bool], None]
    """run(resume) does the work; outputs must exist afterwards."""
    digest: str = ""
    action: str = ""
    needs: list[str] = field(default_factory=list)
    """Files this step reads that an earlier step (or an earlier run) must have written."""


def _pairs_data(prefs: Path | None, prefs_eval: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The data keys of a reward/DPO stage that reads the feedback stage's pairs, and the files it needs."""
    if prefs is None:
        return {}, []  # the stage's own config must name its data (checked when its config is built)
    data: dict[str, Any] = {"train": str(prefs)}
    if prefs_eval is not None:
        data.update(eval=str(prefs_eval), eval_fraction=0.0)
    return {"data": data}, [str(prefs)] + ([str(prefs_eval)] if prefs_eval else [])


def _policy_stage(cfg: PipelineConfig) -> str | None:
    listed = [s for s in cfg.stages if s in POLICY_STAGES]
    if not listed:
        return None
    return listed[-1] if cfg.policy == "auto" else cfg.policy


def plan(cfg: PipelineConfig, log: Callable[[str], None] = print) -> list[Step]:
    out = Path(cfg.output_dir)
    steps: list[Step] = []
    policy_stage = _policy_stage(cfg)
    device = {"model": {"device": cfg.device}} if cfg.device != "auto" else {}

    def recipe_step(name: str, r: int, key: str, folder: Path, injected: dict[str, Any], upstream: list[str],
                    needs: list[str], external: list[str]) -> Step:
        stage_cfg = getattr(cfg, name)
        injected = st.merge({"output_dir": str(folder), "seed": cfg.seed, "overwrite": True}, st.merge(device, injected))
        raw = st.recipe_settings(name, stage_cfg, injected)
        config_file = out / "configs" / (key.replace("/", "-") + ".yaml")
        if name == "ppo":
            raw.setdefault("reward", {})["sources"] = injected.get("reward", {}).get("sources", [])
        built = st.build_recipe_config(name, raw)
        if not built.data.train:
            source = "the feedback stage" if name in ("reward", "dpo") else "prompts"
            raise ConfigError(f"{name}.set.data.train", f"stage {name} has no training data: add {source} before it, or "
                              f"name a file in {name}.set.data.train")
        settings = to_dict(built)

        run = partial(_run_recipe, name, built, raw, folder, config_file, log)
        return Step(key, name, r, folder, settings, external, upstream, {"model": str(folder / "model")}, run,
                    needs=needs)

    # round 0: the starting policy
    start_model, start_key = cfg.model, None
    if "sft" in cfg.stages:
        folder = out / "sft"
        steps.append(recipe_step("sft", 0, "sft", folder, {"model": {"name": cfg.model}}, [], [], [cfg.model]))
        start_model, start_key = str(folder / "model"), "sft"

    policy_model, policy_key = start_model, start_key
    feedback_dirs: list[Path] = []
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        prev_feedback = list(feedback_dirs)
        fb_key = reward_key = None
        prefs = prefs_eval = reward_model = None
        if "feedback" in cfg.stages:
            fb_dir = rdir / "feedback"
            fb_key = f"round-{r}/feedback"
            sampling_policy, seed = policy_model, cfg.seed + r - 1
            f = cfg.feedback
            outputs = {"pairs": str(fb_dir / "all_preferences.jsonl")}
            if f.source == "simulated" and f.eval_prompts:
                outputs["eval_pairs"] = str(fb_dir / "all_preferences_eval.jsonl")

            run_feedback = partial(_run_feedback, cfg, fb_dir, sampling_policy, seed, prev_feedback, log)
            settings = {"feedback": to_dict(f), "policy": sampling_policy, "seed": seed, "device": cfg.device}
            upstream = [k for k in ([policy_key] + [f"round-{i}/feedback" for i in range(1, r)]) if k]
            external = [f.prompts] + ([f.eval_prompts] if f.eval_prompts else []) + ([] if policy_key else [sampling_policy])
            steps.append(Step(fb_key, "feedback", r, fb_dir, settings, external, upstream, outputs, run_feedback))
            feedback_dirs.append(fb_dir)
            prefs, prefs_eval = Path(outputs["pairs"]), Path(outputs["eval_pairs"]) if "eval_pairs" in outputs else None

        if "reward" in cfg.stages:
            reward_key = f"round-{r}/reward"
            injected, needs = _pairs_data(prefs, prefs_eval if "reward" in cfg.feedback.validate else None)
            injected["model"] = {"name": start_model}
            steps.append(recipe_step("reward", r, reward_key, rdir / "reward", injected,
                                     [k for k in (fb_key, start_key) if k], needs, [] if start_key else [start_model]))
            reward_model = rdir / "reward" / "model"

        round_policies: dict[str, str] = {}
        round_policy_keys: dict[str, str] = {}
        for name in POLICY_STAGES:
            if name not in cfg.stages:
                continue
            key = f"round-{r}/{name}"
            if name == "dpo":
                injected, needs = _pairs_data(prefs, prefs_eval if "dpo" in cfg.feedback.validate else None)
                upstream = [k for k in (fb_key, policy_key) if k]
            else:
                rewards = st.scorer_specs(cfg.ppo.rewards, reward_model, "ppo.rewards")
                injected = {"reward": {"sources": rewards},
                            "data": {"train": cfg.feedback.prompts, **({"eval": cfg.feedback.eval_prompts}
                                                                       if cfg.feedback.eval_prompts else {})}}
                needs = [str(reward_model)] if REWARD_MODEL in cfg.ppo.rewards else []
                upstream = [k for k in (reward_key if REWARD_MODEL in cfg.ppo.rewards else None, policy_key) if k]
            injected["model"] = {"name": policy_model}
            steps.append(recipe_step(name, r, key, rdir / name, injected, upstream, needs,
                                     [] if policy_key else [policy_model]))
            round_policies[name] = str(rdir / name / "model")
            round_policy_keys[name] = key

        if "eval" in cfg.stages:
            if not round_policies:
                raise ConfigError("stages", "eval compares a tuned model with the base: add dpo or ppo before it")
            key = f"round-{r}/eval"
            folder = rdir / "eval"
            e = cfg.eval
            scorers = st.scorer_specs(e.scorers, reward_model, "eval.scorers")
            runs = {k.split("/")[-1]: rdir / k.split("/")[-1] for k in [reward_key, *round_policy_keys.values()] if k}

            run_eval = partial(_run_eval, cfg, folder, start_model, dict(round_policies), scorers, runs, r, log)
            upstream = [k for k in [start_key, reward_key, *round_policy_keys.values()] if k]
            settings = {"eval": to_dict(e), "scorers": scorers, "base": start_model, "tuned": round_policies,
                        "seed": cfg.seed}
            steps.append(Step(key, "eval", r, folder, settings, [e.prompts], upstream,
                              {"summary": str(folder / "summary.json"), "report": str(folder / "report.html")}, run_eval))

        if policy_stage is not None and policy_stage in round_policies:
            policy_model, policy_key = round_policies[policy_stage], round_policy_keys[policy_stage]

    if "compress" in cfg.stages:
        if policy_key is None:
            raise ConfigError("stages", "compress makes the tuned model small: add sft, dpo or ppo before it")
        folder = out / "compress"
        c = cfg.compress
        final_policy = policy_model

        run_compress = partial(_run_compress, cfg, folder, final_policy, log)
        steps.append(Step("compress", "compress", cfg.rounds, folder, {"compress": to_dict(c), "model": final_policy,
                                                                       "quality": _quality_settings(cfg)},
                          [], [policy_key], {"table": str(folder / "compress.json")}, run_compress))
    return steps


# The work of each kind of step; plan() binds the arguments, run_pipeline passes `resume`.


def _run_recipe(name: str, built: Any, raw: dict[str, Any], folder: Path, config_file: Path, log: Callable[[str], None],
                resume: bool) -> None:
    if not resume or not st.has_checkpoint(folder):
        st.remove(folder)
    st.write_recipe_config(raw, config_file)
    st.run_recipe(name, built, folder, resume, log)


def _run_feedback(cfg: PipelineConfig, folder: Path, policy: str, seed: int, previous: list[Path],
                  log: Callable[[str], None], resume: bool) -> None:
    if cfg.feedback.source == "label":
        if not (resume and (folder / "feedback.db").exists()):  # a resumed stage keeps its label project
            st.remove(folder)
        st.label_feedback(cfg, policy, folder, seed, previous, log)
    else:
        st.remove(folder)
        st.simulated_feedback(cfg, policy, folder, seed, previous, log)


def _run_eval(cfg: PipelineConfig, folder: Path, base: str, tuned: dict[str, str], scorers: list[str],
              runs: dict[str, Path], r: int, log: Callable[[str], None], resume: bool) -> None:
    from rlhfkit.evaluate.lm import LMEvalConfig, evaluate_lm
    from rlhfkit.evaluate.lm_report import write_outputs

    st.remove(folder)
    e = cfg.eval
    ecfg = LMEvalConfig(prompts=e.prompts, scorers=scorers, max_prompts=e.max_prompts, max_new_tokens=e.max_new_tokens,
                        samples=e.samples, temperature=e.temperature, batch_size=e.batch_size, seed=cfg.seed,
                        device=cfg.device, mixed_precision=e.mixed_precision)
    summary = evaluate_lm(base, tuned, ecfg, log=log)
    summary["extra_tables"] = [st.run_finals_table(runs)]
    summary["round"] = r
    write_outputs(summary, folder, runs=[str(p) for p in runs.values()], title=f"rlhfkit pipeline, round {r}")


def _run_compress(cfg: PipelineConfig, folder: Path, model: str, log: Callable[[str], None], resume: bool) -> None:
    from rlhfkit.compress import compress_model
    from rlhfkit.runtime.atomic import write_atomic

    st.remove(folder)
    folder.mkdir(parents=True)
    table = {}
    quality = _quality_fn(cfg)
    for fmt in cfg.compress.to:
        log(f"  compressing {model} to {fmt} ...")
        table[fmt] = compress_model(model, fmt, str(folder / fmt), reference=cfg.compress.reference,
                                    max_reference=cfg.compress.max_reference, quality=quality)
    write_atomic(folder / "compress.json", json.dumps(table, indent=2, default=str) + "\n")


def _quality_settings(cfg: PipelineConfig) -> dict[str, Any]:
    return {"prompts": cfg.eval.prompts, "n": 16, "scorer": "sentiment", "max_new_tokens": cfg.eval.max_new_tokens}


def _quality_fn(cfg: PipelineConfig) -> Callable[[Any, Any], dict[str, float]]:
    """The held-out quality the compress table shows before/after: mean sentiment of greedy answers to the
    first 16 eval prompts (the annotator of the default pipeline)."""
    q = _quality_settings(cfg)

    def quality(model: Any, tokenizer: Any) -> dict[str, float]:
        from rlhfkit.evaluate.lm import prompt_token_ids
        from rlhfkit.feedback.annotators import sentiment_scores
        from rlhfkit.feedback.pairs import load_prompts, prompt_text
        from rlhfkit.rollout.generate import generate

        prompts = load_prompts(q["prompts"], q["n"])
        answers = generate(model, tokenizer, prompt_token_ids(tokenizer, prompts), max_new_tokens=q["max_new_tokens"],
                           batch_size=16)
        scores = sentiment_scores([prompt_text(p) for p in prompts], [a.text for a in answers])
        return {f"held-out sentiment ({q['n']} prompts, greedy)": sum(scores) / len(scores)}

    return quality


def resolve(steps: list[Step], state: State, resume: bool) -> None:
    """Hash every step (in order: a step's hash includes its upstream steps' hashes) and pick its action."""
    by_key: dict[str, Step] = {}
    for step in steps:
        step.digest = stage_hash(step.stage, step.settings, step.external, [by_key[k].digest for k in step.upstream
                                                                             if k in by_key])
        by_key[step.key] = step
        entry = state.get(step.key)
        if state.is_done(step.key, step.digest):
            step.action = "skip"
        elif resume and entry.get("hash") == step.digest and entry.get("status") == "running":
            step.action = "resume"
        else:
            step.action = "run" if not entry else ("rerun (changed)" if entry.get("hash") != step.digest else "rerun")
    produced = {p for s in steps for p in s.outputs.values()}
    for step in steps:
        for need in step.needs:
            inside = any(need == p or need.startswith(p.rsplit("/", 1)[0] + "/") for p in produced)
            if not inside and not Path(need).exists():
                raise RlhfkitError(f"stage {step.key} reads {need}, which no stage of this pipeline writes and which "
                                   "does not exist")


def describe(steps: list[Step]) -> str:
    lines = []
    for s in steps:
        outs = ", ".join(f"{k}: {v}" for k, v in s.outputs.items())
        ups = ", ".join(s.upstream) or "-"
        lines.append(f"{s.action:17s} {s.key:18s} hash {s.digest}  after: {ups}\n{'':18s} -> {outs}")
    return "\n".join(lines)


def run_pipeline(config: str | Path | None, overrides: list[str], *, resume: bool = False, dry_run: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    cfg = load_config(PipelineConfig, config, overrides)
    out = Path(cfg.output_dir)
    steps = plan(cfg, log)
    state = State(out)
    resolve(steps, state, resume)
    log(f"pipeline {out} ({len(steps)} steps):\n{describe(steps)}")
    if dry_run:
        return {"steps": [{"key": s.key, "action": s.action, "hash": s.digest, "outputs": s.outputs} for s in steps]}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, step in enumerate(steps, 1):
        if step.action == "skip":
            log(f"[{i}/{len(steps)}] {step.key}: unchanged, skipped")
            continue
        log(f"[{i}/{len(steps)}] {step.key} ({step.action}) ...")
        t = time.perf_counter()
        state.started(step.key, step.digest)
        step.run(step.action == "resume")
        missing = [p for p in step.outputs.values() if not Path(p).exists()]
        if missing:
            raise RlhfkitError(f"stage {step.key} finished without writing {', '.join(missing)}")
        state.finished(step.key, step.digest, step.outputs, time.perf_counter() - t)
        log(f"      done in {time.perf_counter() - t:.0f} s")
    from rlhfkit.pipeline.report import final_report

    result = final_report(cfg, steps)
    result["seconds"] = time.perf_counter() - t0
    return result
