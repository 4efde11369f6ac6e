"""`rlhfkit demo`: the quick start on the bundled model, CPU, minutes.

The feedback loop (default):
1. sample two answers per bundled review prompt from the bundled SmolLM2-135M-Instruct;
2. label each pair with a simulated annotator (VADER sentiment: the more positive answer wins) and
   write a standard preference file, the same file a human labeling session would produce;
3. train DPO (LoRA) on it, and a reward model on the same pairs;
4. answer held-out prompts before and after; print mean sentiment, mean per-token KL to the starting
   model, a few answers side by side, the reward model's held-out accuracy, and where the files are.

`rlhfkit demo --sft` runs the SFT demo instead (LoRA SFT on the bundled instruction set), and
`rlhfkit demo --label` opens the label web app on answers sampled from the bundled model.
Extra `key=value` arguments override the demo settings (`rlhfkit demo samples_per_prompt=3`), and
`dpo.KEY=...` / `reward.KEY=...` override the stage configs.
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from rlhfkit.config import load_config, opt
from rlhfkit.data.formats import Sample
from rlhfkit.data.sources import load_rows
from rlhfkit.data.tokenize import IGNORE, tokenize_prompt
from rlhfkit.losses.logprobs import sequence_logprobs
from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
from rlhfkit.rollout.generate import Completion, generate, generate_text
from rlhfkit.runtime.seeding import quiet_transformers


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("rlhfkit") / "configs" / name))


@dataclass
class FeedbackDemoConfig:
    output_dir: str = opt("runs/demo", "folder for the preference file and the DPO / reward-model runs")
    model: str = opt("bundled:smollm2-135m-instruct", "starting policy")
    prompts: str = opt("bundled:review_prompts", "prompts to sample candidate answers for")
    heldout: str = opt("bundled:review_prompts_heldout", "held-out prompts answered before and after")
    annotator: str = opt("sentiment", "simulated annotator: sentiment, length, or module:attribute")
    samples_per_prompt: int = opt(2, "candidate answers per prompt", ge=2)
    max_new_tokens: int = opt(40, "token budget of each answer", gt=0)
    temperature: float = opt(1.0, "sampling temperature for candidates", gt=0.0)
    seed: int = opt(0, "seed for sampling and training")
    reward_model: bool = opt(True, "also train a reward model on the pairs and report its held-out accuracy")


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    own, dpo, reward = [], [], []
    for item in overrides:
        if item.startswith("dpo."):
            dpo.append(item[4:])
        elif item.startswith("reward."):
            reward.append(item[7:])
        else:
            own.append(item)
    return own, dpo, reward


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:  # noqa: ANN001
    return [tokenize_prompt(Sample("demo", prompt=p), tokenizer) for p in prompts]


@torch.no_grad()
def mean_token_kl(policy: torch.nn.Module, reference: torch.nn.Module, prompt_ids: list[list[int]],
                  completions: list[Completion], eos_id: int) -> float:
    """Per-token KL(policy || reference) estimated on the policy's own samples (k1: mean log-ratio)."""
    total, count = 0.0, 0
    for ids, c in zip(prompt_ids, completions):
        answer = c.token_ids + ([eos_id] if c.ended else [])
        if not answer:
            continue
        x = torch.tensor([ids + answer])
        labels = torch.tensor([[IGNORE] * len(ids) + answer])
        lp_pi, n = sequence_logprobs(policy(input_ids=x).logits, labels)
        lp_ref, _ = sequence_logprobs(reference(input_ids=x).logits, labels)
        total += (lp_pi - lp_ref).item()
        count += int(n.item())
    return total / max(count, 1)


def feedback_demo(overrides: list[str]) -> None:
    from rlhfkit.feedback import simulate_feedback
    from rlhfkit.feedback.annotators import sentiment_scores
    from rlhfkit.recipes.dpo import DPOConfig
    from rlhfkit.recipes.dpo import train as train_dpo

    own, dpo_over, reward_over = _split_overrides(overrides)
    cfg = load_config(FeedbackDemoConfig, None, own)
    out = Path(cfg.output_dir)
    pairs_file = out / "preferences.jsonl"
    dpo_cfg = load_config(DPOConfig, packaged_config("demo_dpo.yaml"),
                          [f"model.name={cfg.model}", f"data.train={pairs_file}", f"output_dir={out / 'dpo'}",
                           f"seed={cfg.seed}", *dpo_over])
    t0 = time.perf_counter()

    print(f"[1/5] sampling {cfg.samples_per_prompt} answers per prompt from {cfg.model} and labeling them with the "
          f"'{cfg.annotator}' annotator ...", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stats = simulate_feedback(cfg.model, cfg.prompts, str(pairs_file), annotator=cfg.annotator,
                              samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=cfg.seed, batch_size=16, device="cpu")
    rows = [json.loads(x) for x in pairs_file.read_text().splitlines()]
    print(f"      {len(rows)} preference pairs written to {pairs_file} ({_fmt_stats(stats)}) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)

    heldout = [r.data["prompt"] for r in load_rows(cfg.heldout) if r.data]
    tokenizer = load_tokenizer(cfg.model)
    ids = _prompt_ids(tokenizer, heldout)
    start_model = load_causal_lm(ModelConfig(name=cfg.model, device="cpu"), tokenizer=tokenizer)
    before = generate(start_model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens + 8, batch_size=16)

    length = f"{dpo_cfg.train.max_steps} steps" if dpo_cfg.train.max_steps else f"{dpo_cfg.train.epochs:g} epochs"
    print(f"[2/5] DPO with LoRA on the pairs (beta {dpo_cfg.dpo.beta}, lr {dpo_cfg.train.lr}, {length}) ...", flush=True)
    t1 = time.perf_counter()
    model_dir = train_dpo(dpo_cfg)
    print(f"      trained in {time.perf_counter() - t1:.0f} s", flush=True)

    print("[3/5] answering held-out prompts with the tuned model (reloaded from the run folder) ...", flush=True)
    tuned = load_causal_lm(ModelConfig(name=str(model_dir), device="cpu"), tokenizer=tokenizer)
    after = generate(tuned, tokenizer, ids, max_new_tokens=cfg.max_new_tokens + 8, batch_size=16)
    torch.manual_seed(cfg.seed)
    sampled = generate(tuned, tokenizer, ids, max_new_tokens=cfg.max_new_tokens + 8, temperature=1.0, batch_size=16)
    kl = mean_token_kl(tuned, start_model, ids, sampled, tokenizer.eos_token_id)

    accuracy = None
    if cfg.reward_model:
        print("[4/5] training a reward model on the same pairs ...", flush=True)
        accuracy = _reward_demo(cfg, pairs_file, out, reward_over)
    else:
        print("[4/5] reward model skipped (reward_model=false)")

    print("[5/5] held-out prompts, before -> after (greedy answers)\n")
    s_before = sentiment_scores(heldout, [c.text for c in before])
    s_after = sentiment_scores(heldout, [c.text for c in after])
    for prompt, b, a, sb, sa in list(zip(heldout, before, after, s_before, s_after))[:5]:
        print(f"PROMPT: {prompt}")
        print(textwrap.indent(textwrap.fill(f"before ({sb:+.2f}): {b.text}", 100), "  "))
        print(textwrap.indent(textwrap.fill(f"after  ({sa:+.2f}): {a.text}", 100), "  "))
        print()
    mean_b, mean_a = sum(s_before) / len(s_before), sum(s_after) / len(s_after)
    print(f"mean sentiment (VADER compound, -1..1) on {len(heldout)} held-out prompts: {mean_b:+.3f} -> {mean_a:+.3f}")
    print(f"answers scored higher after tuning: {sum(a > b for a, b in zip(s_after, s_before))}/{len(heldout)}")
    print(f"mean per-token KL(tuned || start) on the tuned model's samples: {kl:.4f} nats")
    dpo_metrics = _last_metrics(out / "dpo" / "metrics.jsonl")
    if "eval/rewards/accuracies" in dpo_metrics:
        print(f"DPO held-out pair accuracy (implicit reward): {dpo_metrics['eval/rewards/accuracies']:.2f}")
    if accuracy is not None:
        print(f"reward model held-out accuracy: {accuracy:.2f}")
    print(f"\npreferences:  {pairs_file.resolve()}  (the format a human labeling session writes)")
    print(f"DPO run:      {(out / 'dpo').resolve()}  (model/ holds the LoRA adapter)")
    if cfg.reward_model:
        print(f"reward model: {(out / 'reward' / 'model').resolve()}")
    print(f"TensorBoard:  tensorboard --logdir {out.resolve()}")
    print(f"total demo time {time.perf_counter() - t0:.0f} s")


def _fmt_stats(stats: dict) -> str:
    keys = [k for k in ("ties", "too_few", "duplicates", "empty") if k in stats]
    return ", ".join(f"{stats[k]} {k}" for k in keys) or "ok"


def _last_metrics(path: Path) -> dict:
    merged: dict = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            merged.update(json.loads(line))
    return merged


def _reward_demo(cfg: FeedbackDemoConfig, pairs_file: Path, out: Path, overrides: list[str]) -> float | None:
    from rlhfkit.recipes.reward import RewardConfig
    from rlhfkit.recipes.reward import train as train_reward

    rcfg = load_config(RewardConfig, packaged_config("demo_reward.yaml"),
                       [f"model.name={cfg.model}", f"data.train={pairs_file}", f"output_dir={out / 'reward'}",
                        f"seed={cfg.seed}", *overrides])
    t = time.perf_counter()
    train_reward(rcfg)
    metrics = _last_metrics(out / "reward" / "metrics.jsonl")
    print(f"      trained in {time.perf_counter() - t:.0f} s", flush=True)
    return metrics.get("eval/accuracy")


# --------------------------------------------------------------------------------------------------
# SFT demo


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
        exists = any(a["name"] == name for a in _people(store))
        links.append((name, link(base, store.rotate_token(name) if exists else store.add_annotator(name))))
    store.close()
    print(f"\nproject {db} ({'new' if created else 'reused'}); open a link in a browser (a new link each start):")
    for name, url in links:
        print(f"  {name}: {url}")
    print(f"afterwards: rlhfkit label status {db}   and   rlhfkit label export {db} -o prefs.jsonl\n", flush=True)
    serve(str(db), host=cfg.host, port=cfg.port)


def _people(store) -> list[dict]:  # noqa: ANN001
    from sqlalchemy import select

    from rlhfkit.label import schema

    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(schema.annotators.c.name))]


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
