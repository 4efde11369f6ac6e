"""`rlhfkit demo`: the quick start on the bundled model, CPU, minutes.

The feedback loop (default) is `rlhfkit pipeline` on src/rlhfkit/configs/pipeline_demo.yaml:
1. feedback: sample 4 answers per training prompt from the bundled SmolLM2-135M-Instruct, label every
   pair with a simulated annotator (VADER sentiment: the more positive answer wins) and write a
   standard preference file, the same file a human labeling session produces;
2. reward: a reward model on the pairs, validated on pairs from prompts about other subjects;
3. dpo: DPO (LoRA) on the pairs;
4. eval: held-out prompts (a third set of subjects) answered by the base and the tuned model: scores
   with intervals, win rate, KL, length and length bias, in runs/demo/report.html;
5. compress: the tuned model as int8 weights, size and quality before/after.
It prints a few greedy answers before and after and the headline numbers. Finished stages are skipped
when it runs again with the same settings; `--resume` continues an interrupted stage.

`rlhfkit demo --sft` runs the SFT demo instead (LoRA SFT on the bundled instruction set), and
`rlhfkit demo --label` opens the label web app on answers sampled from the bundled model.
Extra `key=value` arguments override the pipeline config (`rlhfkit demo feedback.max_prompts=80
dpo.set.train.lr=1e-4`).
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rlhfkit.config import load_config, opt
from rlhfkit.data.formats import Sample
from rlhfkit.data.sources import load_rows
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
from rlhfkit.rollout.generate import generate_text
from rlhfkit.runtime.seeding import quiet_transformers


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("rlhfkit") / "configs" / name))


def feedback_demo(overrides: list[str]) -> None:
    """The pipeline of src/rlhfkit/configs/pipeline_demo.yaml (feedback -> reward -> dpo -> eval -> compress),
    then the headline numbers and a few greedy answers before and after."""
    from rlhfkit.pipeline.run import run_pipeline

    t0 = time.perf_counter()
    resume = "--resume" in overrides
    if resume:  # `--resume` alone arrives as `--resume latest` (cli._normalize_resume)
        i = overrides.index("--resume")
        overrides = overrides[:i] + overrides[i + 2 if overrides[i + 1 : i + 2] == ["latest"] else i + 1 :]
    result = run_pipeline(packaged_config("pipeline_demo.yaml"), overrides, resume=resume)
    if not result.get("rounds"):
        return
    summary = result["rounds"][-1]
    out = Path(result["output_dir"])
    rows = [json.loads(x) for x in (out / f"round-{len(result['rounds'])}" / "eval" / "answers.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    tuned = next(iter(summary["models"]))
    print("\nheld-out prompts (other subjects than training), greedy answers before -> after:\n")
    for row in rows[:5]:
        sb, sa = row["base/greedy_scores"]["sentiment"], row[f"{tuned}/greedy_scores"]["sentiment"]
        print(f"PROMPT: {row['prompt']}")
        print(textwrap.indent(textwrap.fill(f"before ({sb:+.2f}): {row['base/greedy']}", 100), "  "))
        print(textwrap.indent(textwrap.fill(f"after  ({sa:+.2f}): {row[f'{tuned}/greedy']}", 100), "  "))
        print()
    for line in headline_lines(summary, result):
        print(line)
    print(f"\nreport:       {Path(result['report']).resolve()}")
    print(f"numbers:      {(out / 'summary.json').resolve()}")
    print(f"preferences:  {(out / 'round-1' / 'feedback' / 'preferences.jsonl').resolve()}  (the format a human "
          "labeling session writes)")
    print(f"TensorBoard:  tensorboard --logdir {out.resolve()}")
    print(f"total demo time {time.perf_counter() - t0:.0f} s")


def headline_lines(summary: dict, result: dict) -> list[str]:
    """The demo's last lines: sentiment before -> after, win rate, KL, length, reward-model accuracy,
    compression."""
    tuned = next(iter(summary["models"]))
    lines = []
    for decoding in ("greedy", "sampled"):
        s = summary["scores"]["sentiment"]
        if decoding not in s["base"]:
            continue
        b, a = s["base"][decoding], s[tuned][decoding]
        w = summary["win_rate"]["sentiment"][tuned][decoding]
        lm = summary["length_bias"]["sentiment"][tuned][decoding]["length_matched"]
        lines.append(f"mean sentiment ({decoding}) on {summary['prompts']['n']} held-out prompts: {b['mean']:+.3f} -> "
                     f"{a['mean']:+.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}]; win rate over the base {w['win_rate']:.0%} "
                     f"[{w['lo']:.0%}, {w['hi']:.0%}] ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses), "
                     + (f"{lm['win_rate']:.0%} on {lm['matched']} length-matched prompts" if lm["win_rate"] is not None
                        else "no length-matched prompts"))
        lb, la = (summary["answers"][m][decoding]["length_tokens"]["mean"] for m in ("base", tuned))
        lines.append(f"  answer length ({decoding}): {lb:.1f} -> {la:.1f} tokens")
    if tuned in summary["kl"]:
        lines.append(f"KL(tuned || base) per token on the tuned model's samples: {summary['kl'][tuned]['k1_per_token']:.3f} nats")
    for extra in summary.get("extra_tables", []):
        for _stage, key, value in extra["rows"]:
            if key == "eval/accuracy":
                lines.append(f"reward model accuracy on held-out pairs: {value:.2f}")
            if key == "eval/rewards/accuracies":
                lines.append(f"DPO implicit-reward accuracy on held-out pairs: {value:.2f}")
    for fmt, r in (result.get("compress") or {}).items():
        b, a = r["before"], r["after"]
        lines.append(f"compressed to {fmt}: {b['size_mib']:.0f} -> {a['size_mib']:.0f} MiB, perplexity "
                     f"{b['perplexity']:.2f} -> {a['perplexity']:.2f}, in {r['output']}")
    return lines


# --------------------------------------------------------------------------------------------------
# SFT demo


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:  # noqa: ANN001
    return [tokenize_prompt(Sample("demo", prompt=p), tokenizer) for p in prompts]


def _answers(model_spec: str, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int, bool]]:
    tokenizer = load_tokenizer(model_spec)
    model = load_causal_lm(ModelConfig(name=model_spec, device="cpu"), tokenizer=tokenizer)
    return generate_text(model, tokenizer, _prompt_ids(tokenizer, prompts), max_new_tokens=max_new_tokens)


def _summary(answers: list[tuple[str, int, bool]]) -> str:
    words = sum(len(a.split()) for a, _, _ in answers) / len(answers)
    ended = sum(e for _, _, e in answers) / len(answers)
    return f"mean {words:.1f} words, {ended:.0%} finished within the token budget"


def sft_demo(overrides: list[str]) -> None:
    from rlhfkit.recipes.sft import SFTConfig, train

    cfg = load_config(SFTConfig, packaged_config("demo_sft.yaml"), overrides)
    prompts = [row.data["prompt"] for row in load_rows("bundled:demo_prompts") if row.data]
    budget = 96
    t0 = time.perf_counter()
    print(f"[1/4] preparing {cfg.model.name} (converted from GGUF once, then cached) ...", flush=True)
    before = _answers(cfg.model.name, prompts, budget)
    print(f"      done in {time.perf_counter() - t0:.0f} s; answered {len(prompts)} held-out prompts", flush=True)
    print(f"[2/4] fine-tuning with {'LoRA' if cfg.lora.enabled else 'all weights'} on {cfg.data.train} ...", flush=True)
    t1 = time.perf_counter()
    model_dir = train(cfg)
    print(f"      trained in {time.perf_counter() - t1:.0f} s", flush=True)
    print("[3/4] reloading the fine-tuned model from the run folder and answering again ...", flush=True)
    after = _answers(str(model_dir), prompts, budget)
    print("[4/4] before -> after\n")
    for prompt, (b, _, _), (a, _, _) in list(zip(prompts, before, after))[:6]:
        print(f"PROMPT: {prompt}")
        print(textwrap.indent(textwrap.fill("before: " + b, 100), "  "))
        print(textwrap.indent(textwrap.fill("after:  " + a, 100), "  "))
        print()
    run_dir = Path(cfg.output_dir)
    evals = [json.loads(x)["eval/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]
    print(f"answers before: {_summary(before)}")
    print(f"answers after:  {_summary(after)}")
    if evals:
        print(f"eval loss on held-out instructions: {evals[0]:.3f} -> {evals[-1]:.3f}")
    print(f"\nrun folder:   {run_dir.resolve()}")
    print(f"  model:       {model_dir.resolve()}  (LoRA adapter; load it with rlhfkit or peft)")
    print(f"  metrics:     {(run_dir / 'metrics.jsonl').resolve()}")
    print(f"  samples:     {(run_dir / 'samples.jsonl').resolve()}")
    print(f"  checkpoints: {(run_dir / 'checkpoints').resolve()}")
    print(f"  TensorBoard: tensorboard --logdir {(run_dir / 'tensorboard').resolve()}")
    print(f"total demo time {time.perf_counter() - t0:.0f} s")


@dataclass
class LabelDemoConfig:
    db: str = opt("runs/demo-label/feedback.db", "the label project (created on the first run, reused after)")
    model: str = opt("bundled:smollm2-135m-instruct", "model that writes the candidate answers")
    prompts: str = opt("bundled:demo_prompts", "prompts to answer")
    max_new_tokens: int = opt(48, "token budget of each answer", gt=0)
    overlap: int = opt(2, "annotators per item", ge=1)
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8765, "port to listen on", ge=1)
    seed: int = opt(0, "sampling seed")


def label_demo(overrides: list[str]) -> None:
    """`rlhfkit demo --label`: sample two answers per bundled prompt from the bundled model, open a compare
    project with two annotators (alice, bob), print their links and serve until Ctrl-C."""
    from rlhfkit.label.commands import init_project, link, serve
    from rlhfkit.label.items import Settings
    from rlhfkit.label.store import Store

    cfg = load_config(LabelDemoConfig, None, overrides)
    db = Path(cfg.db)
    created = not db.exists()
    if created:
        db.parent.mkdir(parents=True, exist_ok=True)
        print(f"sampling 2 answers per prompt of {cfg.prompts} with {cfg.model} (about a minute on CPU) ...", flush=True)
        guide = packaged_config("label_guidelines.md").read_text(encoding="utf-8")
        settings = Settings(kind="compare", overlap=cfg.overlap, title="rlhfkit label demo", guidelines=guide)
        init_project(str(db), settings, model=cfg.model, prompts=cfg.prompts, samples=2,
                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed).close()
    store = Store.open(str(db))
    base = f"http://{cfg.host}:{cfg.port}"
    store.set_meta("public_url", base)
    links = []
    for name in ("alice", "bob"):
        exists = name in store.annotator_names()
        links.append((name, link(base, store.rotate_token(name) if exists else store.add_annotator(name))))
    store.close()
    print(f"\nproject {db} ({'new' if created else 'reused'}); open a link in a browser (a new link each start):")
    for name, url in links:
        print(f"  {name}: {url}")
    print(f"afterwards: rlhfkit label status {db}   and   rlhfkit label export {db} -o prefs.jsonl\n", flush=True)
    serve(str(db), host=cfg.host, port=cfg.port)


def main(args: list[str] | None = None) -> None:
    quiet_transformers()
    args = list(args or [])
    if "--label" in args:
        label_demo([a for a in args if a != "--label"])
        return
    if "--sft" in args:
        sft_demo([a for a in args if a != "--sft"])
    else:
        feedback_demo(args)
