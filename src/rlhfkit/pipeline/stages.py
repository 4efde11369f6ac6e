"""What each pipeline stage does. Every stage calls the existing command's public function (the recipes'
`train`, `simulate_feedback`, the label app's project functions, `evaluate_lm`, `compress_model`), never a
copy of it; a stage only connects inputs to outputs.

Folder layout under output_dir:

    sft/                       round 0's policy (optional stage)
    round-R/feedback/          preferences.jsonl (this round), all_preferences.jsonl (rounds 1..R), *_eval.jsonl
    round-R/reward/            `rlhfkit reward` run folder; model/ is the reward model
    round-R/dpo/, round-R/ppo/ run folders; model/ is the policy
    round-R/eval/              report.html, summary.json, answers.jsonl
    compress/FORMAT/           the compressed final policy; compress/compress.json the before/after table
    report.html, summary.json  the final report: the last round, every round side by side, compression
    configs/                   the resolved config of every recipe stage, as the command reads it
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.pipeline.config import REWARD_MODEL, PipelineConfig, RecipeStage

RECIPES = {
    "sft": "rlhfkit.recipes.sft:SFTConfig",
    "reward": "rlhfkit.recipes.reward:RewardConfig",
    "dpo": "rlhfkit.recipes.dpo:DPOConfig",
    "ppo": "rlhfkit.recipes.ppo:PPOConfig",
}


def packaged(name: str) -> Path:
    return Path(str(resources.files("rlhfkit") / "configs" / name))


def config_path(spec: str, key: str) -> Path:
    """A stage's `config`: a file, or rlhfkit:NAME.yaml for one shipped with rlhfkit."""
    path = packaged(spec.split(":", 1)[1]) if spec.startswith("rlhfkit:") else Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"config file not found: {spec}")
    return path


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1, "lora": {"r": 8}} -> {"train": {"lr": 1}, "lora": {"r": 8}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(str(key), f"'{part}' is set to a value and used as a section")
        node[parts[-1]] = _nest(value) if isinstance(value, dict) else value
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe_settings(name: str, stage: RecipeStage, injected: dict[str, Any]) -> dict[str, Any]:
    """The raw config of a recipe stage: its YAML, then `set`, then what the pipeline connects (which wins:
    the pipeline owns model, data, output_dir and seed). Checked now by building the typed config."""
    raw: dict[str, Any] = {}
    if stage.config:
        raw = yaml.safe_load(config_path(stage.config, f"{name}.config").read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}.config", f"{stage.config} must hold a mapping of keys to values")
    raw = merge(merge(raw, _nest(_plain(stage.set))), _nest(injected))
    return raw


def _plain(value: Any) -> Any:
    """Command-line override values arrive as str subclasses; YAML writes only plain types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def build_recipe_config(name: str, raw: dict[str, Any]) -> Any:
    """Load `raw` as the command would load it from a file (errors name the pipeline key: `dpo.train.lr`)."""
    import importlib
    import tempfile

    module_name, cls_name = RECIPES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        try:
            return load_config(cls, path)
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc.key}", exc.reason) from None


def write_recipe_config(raw: dict[str, Any], config_file: Path) -> None:
    """The stage's resolved config, as a file `rlhfkit NAME --config` reads (a record, and a way to rerun it)."""
    from rlhfkit.runtime.atomic import write_atomic

    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config_file, yaml.safe_dump(raw, sort_keys=False))


def has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())


def run_recipe(name: str, cfg: Any, run_dir: Path, resume: bool, log: Any) -> Path:
    import importlib

    module = importlib.import_module(RECIPES[name].split(":")[0])
    again = resume and has_checkpoint(run_dir)
    log(f"  {'resuming' if again else 'running'} rlhfkit {name} -> {run_dir}")
    return Path(module.train(cfg, resume="latest" if again else None))


# --------------------------------------------------------------------------------------------------
# feedback


def concat_jsonl(parts: list[Path], out: Path) -> int:
    from rlhfkit.runtime.atomic import write_atomic

    lines = []
    for part in parts:
        if part.is_file():
            lines += [line for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_atomic(out, "".join(line + "\n" for line in lines))
    return len(lines)


def simulated_feedback(cfg: PipelineConfig, policy: str, folder: Path, seed: int, previous: list[Path],
                       log: Any = print) -> dict[str, Any]:
    """Sample answers from `policy`, label them with the simulated annotator; this round's pairs plus the
    cumulative files of all rounds so far (`previous`: earlier rounds' feedback folders)."""
    from rlhfkit.feedback import simulate_feedback

    f = cfg.feedback
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(annotator=f.annotator, annotator_options=dict(f.annotator_options), samples_per_prompt=f.samples_per_prompt,
                  max_new_tokens=f.max_new_tokens, temperature=f.temperature, batch_size=f.batch_size,
                  device=cfg.device, pairing=f.pairing, unfinished=f.unfinished,
                  mixed_precision=f.mixed_precision)
    log(f"  sampling {f.samples_per_prompt} answers per prompt of {f.prompts}"
        + (f" (first {f.max_prompts})" if f.max_prompts else "") + f" with {policy}; the '{f.annotator}' annotator "
        "compares them ...")
    stats = {"train": simulate_feedback(policy, f.prompts, str(folder / "preferences.jsonl"), seed=seed,
                                        max_prompts=f.max_prompts, **common)}
    if f.eval_prompts:
        stats["eval"] = simulate_feedback(policy, f.eval_prompts, str(folder / "preferences_eval.jsonl"),
                                          seed=seed + 7919, max_prompts=f.max_eval_prompts, **common)
    for split, part in stats.items():
        log(f"  {split}: {part['pairs']} pairs from {part['prompts']} prompts ({part['ties']} all-tie prompts, "
            f"{part['too_few']} with < 2 answers, {part['trimmed']} cut-off answers trimmed to their last sentence, {part['unfinished']} dropped) in "
            f"{part['seconds']:.0f} s")
    return _cumulate(folder, previous, stats)


def _cumulate(folder: Path, previous: list[Path], stats: dict[str, Any]) -> dict[str, Any]:
    from rlhfkit.runtime.atomic import write_atomic

    n = concat_jsonl([p / "preferences.jsonl" for p in previous] + [folder / "preferences.jsonl"],
                     folder / "all_preferences.jsonl")
    stats["all_pairs"] = n
    if (folder / "preferences_eval.jsonl").is_file():
        stats["all_eval_pairs"] = concat_jsonl([p / "preferences_eval.jsonl" for p in previous]
                                               + [folder / "preferences_eval.jsonl"], folder / "all_preferences_eval.jsonl")
    write_atomic(folder / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")
    return stats


def label_feedback(cfg: PipelineConfig, policy: str, folder: Path, seed: int, previous: list[Path],
                   log: Any) -> dict[str, Any]:
    """People label this round's pairs: create the project (once; a resumed stage reuses it), print each
    person's link, serve the app in a child process, wait until `wait_for` labels are in, export."""
    from rlhfkit.label.commands import init_project, link, read_guidelines
    from rlhfkit.label.export import export
    from rlhfkit.label.items import Settings
    from rlhfkit.label.store import Store

    f = cfg.feedback
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "feedback.db"
    if not db.exists():
        log(f"  sampling {f.samples_per_prompt} answers per prompt of {f.prompts} with {policy} for the label project ...")
        settings = Settings(kind="compare", overlap=f.overlap, title=f"rlhfkit pipeline, {folder.parent.name}",
                            guidelines=read_guidelines(f.guidelines))
        tmp = folder / "feedback.db.tmp"
        tmp.unlink(missing_ok=True)
        init_project(str(tmp), settings, model=policy, prompts=f.prompts, samples=2, max_new_tokens=f.max_new_tokens,
                     temperature=f.temperature, seed=seed, max_prompts=f.max_prompts).close()
        tmp.rename(db)  # a project appears whole or not at all
    store = Store.open(str(db))
    base = f.public_url or f"http://{f.host}:{f.port}"
    store.set_meta("public_url", base)
    known = set(store.annotator_names())
    for name in f.annotators:
        token = store.rotate_token(name) if name in known else store.add_annotator(name)
        log(f"  {name}: {link(base, token)}")
    target = f.wait_for or store.count_items() * f.overlap
    store.close()
    server = subprocess.Popen([sys.executable, "-m", "rlhfkit", "label", "serve", str(db), "--host", f.host,
                               "--port", str(f.port), "--quiet"] + (["--public-url", f.public_url] if f.public_url else []))
    try:
        done = _wait_for_labels(str(db), target, f.poll_seconds, server, log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    store = Store.open(str(db))
    try:
        stats = {"train": export(store, "preferences", str(folder / "preferences.jsonl")), "labels": done}
    finally:
        store.close()
    return _cumulate(folder, previous, stats)


def _wait_for_labels(db: str, target: int, poll: float, server: subprocess.Popen, log: Any) -> int:
    from rlhfkit.label.stats import live_labels
    from rlhfkit.label.store import Store

    last = -1
    while True:
        if server.poll() is not None:
            raise RlhfkitError(f"the label server stopped (exit code {server.returncode}) before {target} labels were in")
        store = Store.open(db)
        try:
            n = sum(1 for label in live_labels(store) if label.choice != "skip" and not label.is_gold)
        finally:
            store.close()
        if n != last:
            log(f"  {n}/{target} labels")
            last = n
        if n >= target:
            return n
        time.sleep(poll)


# --------------------------------------------------------------------------------------------------
# eval and compress


def scorer_specs(scorers: list[str], reward_model: Path | None, key: str) -> list[str]:
    out = []
    for i, s in enumerate(scorers):
        if s == REWARD_MODEL:
            if reward_model is None:
                raise ConfigError(f"{key}[{i}]", "reward_model needs the reward stage in stages")
            out.append(str(reward_model))
        else:
            out.append(s)
    return out


def run_finals_table(runs: dict[str, Path]) -> dict[str, Any]:
    """Held-out numbers of the round's training runs, for the report (reward model accuracy first)."""
    from rlhfkit.evaluate.lm_report import run_finals

    finals = run_finals([str(p) for p in runs.values()])
    rows = []
    for stage, path in runs.items():
        m = finals[str(path)]
        for key in ("eval/accuracy", "eval/rewards/accuracies", "eval/loss", "eval/score", "eval/kl"):
            if key in m:
                rows.append([stage, key, m[key]])
        extra = [k for k in m if k.startswith("eval/") and k not in ("eval/accuracy", "eval/rewards/accuracies",
                                                                    "eval/loss")]
        rows += [[stage, k, m[k]] for k in sorted(extra)[:6]]
    return {"columns": ["stage", "metric (held-out, last)", "value"], "rows": rows,
            "caption": "The training runs' own held-out numbers (reward model: accuracy on validation pairs)"}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
