"""The `rlhfkit` command: thin wrappers that load a config and call a recipe.

    rlhfkit sft --config cfg.yaml train.lr=1e-4 lora.enabled=true
    rlhfkit sft --print-config
    rlhfkit sft --config cfg.yaml --resume            # continue the latest checkpoint of output_dir
    rlhfkit sft --config cfg.yaml --resume PATH       # or a given checkpoint folder

Problems the user can fix (config, data, model) print one clear message and exit with code 2.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from rlhfkit import __version__
from rlhfkit.errors import RlhfkitError

app = typer.Typer(
    help="rlhfkit: fine-tune models with feedback (SFT, reward models, DPO, PPO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Prepare and inspect models.", no_args_is_help=True)
data_app = typer.Typer(help="Validate data files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
feedback_app = typer.Typer(help="Produce preference data (simulated annotators).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(feedback_app, name="feedback")
gym_app = typer.Typer(help="Control tasks: PPO (one or many processes), multi-agent PPO, DQN on gymnasium/PettingZoo.",
                      no_args_is_help=True)
app.add_typer(gym_app, name="gym")

RECIPE_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config file.", show_default=False)
PRINT_OPT = typer.Option(False, "--print-config", help="Print every field with its default and help, then exit.")
RESUME_OPT = typer.Option(
    None, "--resume", help="Continue from 'latest' (the default when given alone) or a checkpoint folder."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlhfkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """rlhfkit: fine-tune models with feedback."""


def _load(cls: type, config: Optional[Path], overrides: list[str], print_config: bool):  # noqa: ANN202
    from rlhfkit.config import describe, load_config

    cfg = load_config(cls, config, overrides)
    if print_config:
        typer.echo(describe(cfg))
        raise typer.Exit()
    return cfg


def _reject_unknown_options(ctx: typer.Context) -> None:
    """Refuse extra arguments that look like options (`--bogus 1`) with click's usage error (exit code 2).

    Recipe commands let click pass unknown arguments through (allow_extra_args, ignore_unknown_options)
    so that `key=value` overrides reach the config; options, too, would otherwise arrive there.
    """
    for arg in ctx.args:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            known = [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
            close = difflib.get_close_matches(name, [*known, *ctx.help_option_names], n=1)
            ctx.fail(f"No such option: {name}" + (f"  Did you mean {close[0]}?" if close else ""))


def _recipe(group: typer.Typer, name: str, target: str, doc: str) -> None:
    """Register `rlhfkit [group] NAME --config F key=value ... [--print-config] [--resume [PATH]]` for the
    recipe at `target` ('module:ConfigClass'; the module's `train(cfg, resume)` runs it)."""

    @group.command(name, context_settings=RECIPE_CONTEXT, help=doc)
    def command(
        ctx: typer.Context,
        config: Optional[Path] = CONFIG_OPT,
        print_config: bool = PRINT_OPT,
        resume: Optional[str] = RESUME_OPT,
    ) -> None:
        import importlib

        _reject_unknown_options(ctx)
        module_name, cls_name = target.split(":")
        module = importlib.import_module(module_name)  # imported on use: `rlhfkit --help` stays fast
        cfg = _load(getattr(module, cls_name), config, list(ctx.args), print_config)
        module.train(cfg, resume=resume)


_recipe(app, "sft", "rlhfkit.recipes.sft:SFTConfig",
        "Supervised fine-tuning on prompt/completion or chat data. Overrides: key=value (dotted for sections).")
_recipe(app, "dpo", "rlhfkit.recipes.dpo:DPOConfig",
        "Direct Preference Optimization on prompt/chosen/rejected pairs (sigmoid, IPO, hinge, conservative).")
_recipe(app, "reward", "rlhfkit.recipes.reward:RewardConfig",
        "Train a reward model: pairwise (Bradley-Terry), regression on ratings, or classification.\n\n"
        "`rlhfkit reward score --model M --data F --output O` scores a file with a trained reward model.")
_recipe(app, "ppo", "rlhfkit.recipes.ppo:PPOConfig",
        "Online RL on prompts: PPO with a critic (ppo.advantage=gae), RLOO or GRPO, against reward models, "
        "built-in scorers (sentiment, length) or your own module:function.")
_recipe(gym_app, "ppo", "rlhfkit.gym.ppo:GymPPOConfig",
        "PPO on a gymnasium environment (discrete or Box actions); under torchrun, DD-PPO across processes.")
_recipe(gym_app, "rlhf", "rlhfkit.gym.rlhf:GymRLHFConfig",
        "PPO on a reward learned from preferences between episode segments (oracle teacher, people in a label "
        "project, or your own); the environment's reward is used only to evaluate.")
_recipe(gym_app, "dqn", "rlhfkit.gym.dqn:GymDQNConfig",
        "DQN (optionally Double DQN) on a discrete-action gymnasium environment.")
_recipe(gym_app, "mappo", "rlhfkit.gym.mappo:GymMAPPOConfig",
        "Multi-agent PPO on a PettingZoo parallel environment (shared policy; centralized or independent critic).")


@gym_app.command("eval")
def gym_eval(
    agent: str = typer.Argument(..., help="An agent folder (RUN/agent) or a checkpoint folder (RUN/checkpoints/step-N)."),
    episodes: int = typer.Option(20, "--episodes", min=1),
    seed: int = typer.Option(12345, "--seed"),
    gif: str = typer.Option("", "--gif", help="Save the first episode as an animated GIF here."),
    stochastic: bool = typer.Option(False, "--stochastic", help="Sample actions instead of the deterministic policy."),
) -> None:
    """Run a saved PPO, DQN or MAPPO agent for N episodes and print the mean return (team return for MAPPO)."""
    from rlhfkit.gym.evaluate import evaluate_saved

    m = evaluate_saved(agent, episodes=episodes, seed=seed, gif=gif, deterministic=not stochastic)
    typer.echo(f"mean return {m['eval/return']:.2f} +- {m['eval/return_std']:.2f} over {episodes} episodes "
               f"(min {m['eval/min_return']:.2f}, mean length {m['eval/length']:.1f})" + (f"; GIF: {gif}" if gif else ""))


@app.command("eval")
def eval_command(
    model: Optional[list[str]] = typer.Option(None, "--model", help="Tuned model (folder or spec); repeat for several, "
                                              "NAME=SPEC to name one in the report."),
    base: str = typer.Option("", "--base", help="The starting model the tuned ones are compared with."),
    prompts: str = typer.Option("bundled:reviews_heldout", "--prompts", help="Held-out prompt rows (file or bundled:NAME)."),
    scorers: str = typer.Option("sentiment", "--scorers", help="Comma-separated: sentiment, length, a reward model "
                                "folder, module:function."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for report.html, summary.json, answers.jsonl."),
    runs: Optional[list[str]] = typer.Option(None, "--runs", help="Run folders whose metrics.jsonl to plot as learning "
                                             "curves (`--runs runs/demo/*`)."),
    agents: Optional[list[str]] = typer.Option(None, "--agents", help="Control-task run folders to compare instead "
                                               "(`--agents runs/a runs/b`): returns per seed and across seeds."),
    max_prompts: int = typer.Option(0, "--max-prompts", min=0, help="0 = all prompts."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    samples: int = typer.Option(2, "--samples", min=0, help="Sampled answers per prompt besides the greedy one."),
    temperature: float = typer.Option(1.0, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="Autocast of the answering forwards: auto "
                                        "(bf16 on GPUs and CPUs with native bf16), no, bf16 or fp16."),
    episodes: int = typer.Option(20, "--episodes", min=1, help="--agents: evaluation episodes per run."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="--agents: return that counts as solved "
                                              "(default: each run's eval.target_return)."),
) -> None:
    """Before/after report: scores with intervals, win rate over the base, KL, length, diversity, length bias,
    answers side by side and learning curves (report.html, summary.json). With --agents: control runs."""
    from rlhfkit.evaluate.commands import eval_agents, eval_lm

    if agents:
        if model or base:
            raise RlhfkitError("--agents compares control-task runs; leave out --model and --base")
        eval_agents(list(agents), output, episodes=episodes, seed=seed, threshold=threshold)
        return
    if not model or not base:
        raise RlhfkitError("give the tuned model(s) with --model and the starting model with --base "
                           "(or control-task runs with --agents)")
    settings = [f"prompts={prompts}", f"max_prompts={max_prompts}", f"max_new_tokens={max_new_tokens}",
                f"samples={samples}", f"temperature={temperature}", f"seed={seed}", f"batch_size={batch_size}",
                f"device={device}", f"mixed_precision={mixed_precision}"]
    eval_lm(base, list(model), [s.strip() for s in scorers.split(",") if s.strip()], output, settings,
            runs=list(runs or []))


@app.command("compress")
def compress_command(
    model: str = typer.Option(..., "--model", help="Model folder (a run's model/, LoRA adapter or full) or spec."),
    to: str = typer.Option("", "--to", help="merged, int8, gguf-f16 or gguf-q8_0 (a LoRA adapter is merged first)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Only merge the LoRA adapter (same as --to merged)."),
    no_merge_lora: bool = typer.Option(False, "--no-merge-lora", help="Refuse an adapter instead of merging it."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write (must not exist, or --overwrite)."),
    reference: str = typer.Option("bundled:instructions", "--reference", help="Texts for the perplexity before/after."),
    max_reference: int = typer.Option(32, "--max-reference", min=1),
    speed_prompts: int = typer.Option(4, "--speed-prompts", min=0, help="Prompts in the tokens/s batch; 0 = skip."),
    speed_new_tokens: int = typer.Option(16, "--speed-new-tokens", min=1),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Make a tuned model small: merge LoRA, int8 weights (torchao), or GGUF; size, CPU speed and quality
    before/after, checked by loading the result back."""
    from rlhfkit.compress import compress_model, format_table

    if merge_lora and to and to != "merged":
        raise RlhfkitError(f"--merge-lora merges only; with --to {to} the adapter is merged anyway, leave it out")
    fmt = to or ("merged" if merge_lora else "")
    if not fmt:
        raise RlhfkitError("--to: expected merged, int8, gguf-f16 or gguf-q8_0 (or --merge-lora)")
    result = compress_model(model, fmt, output, merge_lora=not no_merge_lora, reference=reference,
                            max_reference=max_reference, speed_prompts=speed_prompts, speed_new_tokens=speed_new_tokens,
                            overwrite=overwrite)
    typer.echo(format_table(result))
    typer.echo(f"wrote {output}")


@app.command("pipeline", context_settings=RECIPE_CONTEXT)
def pipeline_command(
    ctx: typer.Context,
    config: Optional[Path] = CONFIG_OPT,
    print_config: bool = PRINT_OPT,
    resume: Optional[str] = RESUME_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (stages, inputs, outputs, what is skipped) "
                                 "and exit."),
) -> None:
    """One config from a base model to a tuned, evaluated, compressed model: sft -> feedback -> reward ->
    dpo/ppo -> eval -> compress, in rounds; finished stages with the same inputs are skipped, `--resume`
    continues an interrupted one from its checkpoint."""
    from rlhfkit.pipeline.config import PipelineConfig
    from rlhfkit.pipeline.run import run_pipeline

    _reject_unknown_options(ctx)
    if print_config:
        _load(PipelineConfig, config, list(ctx.args), True)
    if resume not in (None, "latest"):
        raise RlhfkitError("pipeline --resume takes no value: each stage continues from its own latest checkpoint")
    result = run_pipeline(config, list(ctx.args), resume=resume is not None, dry_run=dry_run)
    if not dry_run and result.get("report"):
        typer.echo(f"report: {Path(result['report']).resolve()}")


@app.command("reward-score", hidden=True)
def reward_score(
    model: str = typer.Option(..., "--model", help="Reward model folder (output of rlhfkit reward)."),
    data: str = typer.Option(..., "--data", help="prompt+response rows, or prompt/chosen/rejected pairs."),
    output: str = typer.Option(..., "--output", "-o", help="JSONL file to write (inputs plus scores)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_length: int = typer.Option(1024, "--max-length", min=2),
) -> None:
    """Score a data file with a reward model (rlhfkit reward score ...)."""
    from rlhfkit.recipes.reward import score_file

    path = score_file(model, data, output, batch_size=batch_size, max_length=max_length)
    typer.echo(f"wrote {path}")


@feedback_app.command("simulate")
def feedback_simulate(
    model: str = typer.Option("bundled:smollm2-135m-instruct", "--model", help="Model that writes the candidate answers."),
    prompts: str = typer.Option(..., "--prompts", help="Prompt rows: a file, bundled:NAME or HF dataset name."),
    output: str = typer.Option(..., "--output", "-o", help="Preference JSONL file to write."),
    annotator: str = typer.Option("sentiment", "--annotator", help="sentiment, length, or module:attribute."),
    samples_per_prompt: int = typer.Option(2, "--samples-per-prompt", min=2),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    max_prompts: int = typer.Option(0, "--max-prompts", min=0, help="0 = all prompts."),
    pairing: str = typer.Option("best_worst", "--pairing", help="best_worst (one pair per prompt) or all pairs."),
    unfinished: str = typer.Option("keep", "--unfinished", help="Answers cut off by the token budget: keep, drop, or "
                                   "trim to the last complete sentence."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="Autocast of the sampling forwards: no (the "
                                        "model's dtype), auto (bf16 on GPUs and CPUs with native bf16), bf16 or fp16."),
) -> None:
    """Sample answers, label them with a simulated annotator, and write a preference file."""
    from rlhfkit.feedback import simulate_feedback

    if temperature <= 0:
        raise RlhfkitError("--temperature: expected a value > 0 (candidates are sampled, not greedy)")

    stats = simulate_feedback(model, prompts, output, annotator=annotator, samples_per_prompt=samples_per_prompt,
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, max_prompts=max_prompts,
                              pairing=pairing, unfinished=unfinished, mixed_precision=mixed_precision)
    typer.echo(f"wrote {output}: " + ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (dict, list))))


@app.command(context_settings=RECIPE_CONTEXT)
def demo(ctx: typer.Context) -> None:
    """The quick-start demo: sample, label (simulated annotator), DPO + reward model, before/after.

    `rlhfkit demo --sft` runs the supervised fine-tuning demo instead.
    """
    from rlhfkit.demo import main as demo_main

    demo_main(list(ctx.args))


@models_app.command("prepare")
def models_prepare(spec: str = typer.Argument("bundled:smollm2-135m-instruct", help="Model spec to prepare.")) -> None:
    """Convert a bundled/GGUF model once into the cache and print its folder."""
    from rlhfkit.models.load import resolve_spec

    resolved = resolve_spec(spec)
    if resolved.kind == "tiny":
        typer.echo(f"{spec} is built in memory on use (random weights, bundled tokenizer); nothing to prepare")
    elif resolved.kind == "hub":
        typer.echo(f"{spec} is a hub id: it is downloaded by transformers on first use (needs network access)")
    else:
        typer.echo(resolved.target)


@data_app.command("validate")
def data_validate(
    path: str = typer.Argument(..., help="Data file, bundled:NAME or HF dataset name."),
    kind: str = typer.Option("sft", "--kind", help="sft, preference, prompt, rating or classification."),
    split: str = typer.Option("train", "--split", help="Split for HF datasets."),
) -> None:
    """Check every row of a data file against a format and list the problems."""
    from rlhfkit.data.formats import VALIDATORS, enforce, validate_rows
    from rlhfkit.data.sources import load_rows

    if kind not in VALIDATORS:
        raise RlhfkitError(f"--kind: expected one of {', '.join(VALIDATORS)}, got {kind!r}")
    rows = load_rows(path, split=split)
    if not rows:
        raise RlhfkitError(f"{path}: no rows found")
    samples, problems = validate_rows(rows, kind)  # type: ignore[arg-type]
    enforce(problems, on_error="error", total=len(rows), max_shown=50, what=path, hint="")
    typer.echo(f"{path}: {len(samples)} valid {kind} rows")


label_app = typer.Typer(help="The feedback web app: people compare, rank, rate and rewrite answers (SQLite or PostgreSQL).",
                        no_args_is_help=True)
app.add_typer(label_app, name="label")
DB_ARG = typer.Argument(None, help="The project: a SQLite file (feedback.db) or a postgresql:// URL.", show_default=False)
DB_OPT = typer.Option(None, "--db", help="The project as a URL (postgresql://user@host/name) or file.", show_default=False)


def _db(db: Optional[str], db_opt: Optional[str]) -> str:
    if bool(db) == bool(db_opt):
        raise RlhfkitError("give the project once: a file or URL as the first argument, or --db URL")
    return db or db_opt  # type: ignore[return-value]


@label_app.command("init")
def label_init(
    db: Optional[str] = DB_ARG,
    db_opt: Optional[str] = DB_OPT,
    source: str = typer.Option("", "--from", help="Candidates file: prompt + responses, response_a/_b, or a preference file."),
    model: str = typer.Option("", "--model", help="Sample the candidates with this model instead (needs --prompts)."),
    prompts: str = typer.Option("", "--prompts", help="Prompts to answer with --model."),
    samples: int = typer.Option(2, "--samples", min=1, help="--model: answers per prompt (2 for compare)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    max_prompts: int = typer.Option(0, "--max-prompts", min=0, help="0 = all prompts."),
    kind: str = typer.Option("compare", "--kind", help="compare, rank or rate."),
    overlap: int = typer.Option(1, "--overlap", help="Different annotators per item."),
    guidelines: str = typer.Option("", "--guidelines", help="Markdown file shown to annotators."),
    title: str = typer.Option("rlhfkit label", "--title"),
    scale: str = typer.Option("1-7", "--scale", help="rate: LOW-HIGH."),
    criteria: str = typer.Option("overall", "--criteria", help="rate: comma-separated criteria."),
    no_strength: bool = typer.Option(False, "--no-strength", help="compare: do not ask how much better."),
    rewrite: bool = typer.Option(False, "--rewrite", help="Let annotators correct an answer."),
    gold_rate: float = typer.Option(0.0, "--gold-rate", help="Share of items drawn from gold rows (a 'gold' field)."),
    media: str = typer.Option("", "--media", help="Folder of the media candidates (clips, images)."),
    priority: str = typer.Option("", "--priority", help="Reward model folder: label the answers it can least tell apart first."),
    lease_minutes: float = typer.Option(30.0, "--lease-minutes", help="Unanswered items go back to the queue after this."),
) -> None:
    """Create a label project from a candidates file, or from a model answering prompts."""
    from rlhfkit.label.commands import init_project, read_guidelines
    from rlhfkit.label.items import Settings, parse_scale

    target = _db(db, db_opt)
    settings = Settings(kind=kind, overlap=overlap, title=title, guidelines=read_guidelines(guidelines),
                        scale=parse_scale(scale), criteria=[c.strip() for c in criteria.split(",")],
                        strength=not no_strength, rewrite=rewrite, gold_rate=gold_rate, media_dir=media,
                        lease_seconds=int(lease_minutes * 60))
    store = init_project(target, settings, source=source, model=model, prompts=prompts, samples=samples,
                         max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, max_prompts=max_prompts,
                         priority=priority)
    n = store.count_items()
    store.close()
    typer.echo(f"created {target}: {kind} project, {n} items, overlap {overlap}. Next: rlhfkit label serve {target}")


@label_app.command("add")
def label_add(
    db: Optional[str] = DB_ARG, db_opt: Optional[str] = DB_OPT,
    source: str = typer.Option(..., "--from", help="Candidates file (same formats as init)."),
    priority: str = typer.Option("", "--priority", help="Reward model folder for the queue order."),
) -> None:
    """Add items to an existing project (all rows or none)."""
    from rlhfkit.label.commands import add_items

    ids = add_items(_db(db, db_opt), source, priority)
    typer.echo(f"added {len(ids)} items")


@label_app.command("serve")
def label_serve(
    db: Optional[str] = DB_ARG, db_opt: Optional[str] = DB_OPT,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8765, "--port", min=1, max=65535),
    public_url: str = typer.Option("", "--public-url", help="How people reach it (e.g. behind a TLS proxy), for links."),
    quiet: bool = typer.Option(False, "--quiet", help="No request log."),
) -> None:
    """Run the web app; prints the admin link and how to add annotators."""
    from rlhfkit.label.commands import serve

    serve(_db(db, db_opt), host=host, port=port, public_url=public_url, quiet=quiet)


@label_app.command("add-annotator")
def label_add_annotator(
    db: Optional[str] = DB_ARG,
    name: str = typer.Argument(..., help="The person's name (unique in the project)."),
    db_opt: Optional[str] = DB_OPT,
    rotate: bool = typer.Option(False, "--rotate", help="Give an existing person a new link (the old one stops working)."),
    deactivate: bool = typer.Option(False, "--deactivate", help="Revoke the person's link."),
) -> None:
    """Add a person and print their personal link (a secret token: send it privately)."""
    from rlhfkit.label.commands import link, public_base
    from rlhfkit.label.store import Store

    store = Store.open(_db(db, db_opt))
    try:
        if deactivate:
            store.deactivate(name)
            typer.echo(f"{name}: link revoked")
            return
        token = store.rotate_token(name) if rotate else store.add_annotator(name)
        typer.echo(f"{name.strip()}: {link(public_base(store), token)}")
    finally:
        store.close()


@label_app.command("status")
def label_status(
    db: Optional[str] = DB_ARG, db_opt: Optional[str] = DB_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print every number as JSON."),
) -> None:
    """Progress, agreement (kappa per pair, alpha), position bias, gold accuracy, per-annotator counts."""
    import json

    from rlhfkit.label.commands import status_text
    from rlhfkit.label.stats import project_status
    from rlhfkit.label.store import Store

    store = Store.open(_db(db, db_opt))
    try:
        status = project_status(store)
    finally:
        store.close()
    typer.echo(json.dumps(status, indent=2) if as_json else status_text(status))


@label_app.command("export")
def label_export(
    db: Optional[str] = DB_ARG, db_opt: Optional[str] = DB_OPT,
    output: str = typer.Option(..., "--output", "-o", help="JSONL file to write (atomically)."),
    what: str = typer.Option("preferences", "--what", help="preferences, ratings, sft (rewrites) or raw (every label)."),
    ties: str = typer.Option("drop", "--ties", help="preferences: drop or keep (as \"tie\": true rows)."),
    both_bad: str = typer.Option("drop", "--both-bad", help="preferences: drop or keep (as tie rows)."),
    rank_pairs: str = typer.Option("all", "--rank-pairs", help="rank: all implied pairs, or best_worst."),
    min_votes: int = typer.Option(1, "--min-votes", min=1, help="preferences: items with fewer labels are left out."),
    rewrites: bool = typer.Option(True, "--rewrites/--no-rewrites", help="preferences: rewrites as chosen over the original."),
    criterion: str = typer.Option("", "--criterion", help="ratings: one criterion (default: the mean over all)."),
) -> None:
    """Write labels as the files `rlhfkit reward`, `dpo` and `sft` read (validated), or every raw label."""
    from rlhfkit.label.export import export
    from rlhfkit.label.store import Store

    options: dict = {}
    if what == "preferences":
        options = {"ties": ties, "both_bad": both_bad, "rank_pairs": rank_pairs, "min_votes": min_votes,
                   "rewrites": rewrites}
    elif what == "ratings":
        options = {"criterion": criterion}
    store = Store.open(_db(db, db_opt))
    try:
        stats = export(store, what, output, **options)
    finally:
        store.close()
    typer.echo(f"wrote {output}: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))


def _expand_lists(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`--runs a b c` -> `--runs a --runs b --runs c` (what a shell glob gives), for list options."""
    out: list[str] = []
    current = None
    for arg in argv:
        if arg in options:
            current = arg
            continue
        if arg.startswith("-"):
            current = None
        elif current is not None:
            out.append(current)
        out.append(arg)
    return out


def _normalize_resume(argv: list[str]) -> list[str]:
    """Let `--resume` stand alone (meaning latest): typer options always want a value.

    Also maps `reward score ...` to the hidden `reward-score` command: `reward` itself takes free
    `key=value` overrides, so it cannot be a command group.
    """
    if argv[:2] == ["reward", "score"]:
        argv = ["reward-score", *argv[2:]]
    if argv[:1] == ["eval"]:
        argv = _expand_lists(argv, ("--runs", "--agents"))
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") or "=" in nxt:
                out.append("latest")
    return out


def main(argv: list[str] | None = None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _main(argv)
        return
    # Under torchrun, leave without running the interpreter's exit-time destructors: with gloo, a rank
    # occasionally aborts there ("terminate called without an active exception", seen on a loaded
    # 2-core machine after the run had finished and the process group was destroyed), which turns a
    # finished run into a failed one. Every file is written and closed by then.
    try:
        _main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _usage_error_types() -> tuple[type, ...]:
    """click's ClickException, from click itself and from the copy newer typer versions vendor and raise
    (typer._click): usage errors such as an unknown command or a missing argument."""
    types = []
    for name in ("click", "typer._click.exceptions"):
        try:
            types.append(importlib.import_module(name).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _main(argv: list[str] | None) -> None:
    import warnings

    # peft still calls transformers' deprecated alias on every LoRA model; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft checks the base model's config on the hub when an adapter's base is a hub id; offline
    # (HF_HUB_OFFLINE=1) that check fails with this warning although the adapter is saved correctly.
    warnings.filterwarnings("ignore", message="Could not find a config file in .*", category=UserWarning)
    args = _normalize_resume(list(sys.argv[1:] if argv is None else argv))
    try:
        # In non-standalone mode typer returns an exit code instead of raising for Ctrl-C (130) and
        # ctx.exit(N); our commands return None, so an int here is such a code.
        code = app(args=args, prog_name="rlhfkit", standalone_mode=False)
    except RlhfkitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:  # Ctrl-C under typer versions that raise instead of returning 130
        code = 130
    except Exception as exc:  # usage errors arrive here in non-standalone mode
        if isinstance(exc, _usage_error_types()):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == 130:
            print("interrupted", file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
