"""`rlhfkit demo`: the quick start on the bundled model, CPU, a few minutes.

1. prepare the bundled SmolLM2-135M-Instruct (converted once from its GGUF and cached);
2. answer held-out prompts with the starting model;
3. fine-tune it with LoRA on the bundled instruction set (short, direct answers);
4. reload the saved model from the run folder and answer the same prompts;
5. print both side by side with eval loss and answer length, and where the run's files are.

Extra `key=value` arguments override the demo config (`rlhfkit demo train.epochs=2`).
"""

from __future__ import annotations

import textwrap
import time
from importlib import resources
from pathlib import Path

from rlhfkit.config import load_config
from rlhfkit.data.formats import Sample
from rlhfkit.data.sources import load_rows
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
from rlhfkit.recipes.sft import SFTConfig, train
from rlhfkit.rollout.generate import generate_text
from rlhfkit.runtime.seeding import quiet_transformers


def demo_config_path() -> Path:
    return Path(str(resources.files("rlhfkit") / "configs" / "demo_sft.yaml"))


def _answers(model_spec: str, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int, bool]]:
    cfg = ModelConfig(name=model_spec, device="cpu")
    tokenizer = load_tokenizer(model_spec)
    model = load_causal_lm(cfg, tokenizer=tokenizer)
    ids = [tokenize_prompt(Sample("demo", prompt=p), tokenizer) for p in prompts]
    return generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens)


def _summary(answers: list[tuple[str, int, bool]]) -> str:
    words = sum(len(a.split()) for a, _, _ in answers) / len(answers)
    ended = sum(e for _, _, e in answers) / len(answers)
    return f"mean {words:.1f} words, {ended:.0%} finished within the token budget"


def main(overrides: list[str] | None = None) -> None:
    quiet_transformers()
    cfg = load_config(SFTConfig, demo_config_path(), overrides or [])
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
    width = 100
    for prompt, (b, _, _), (a, _, _) in list(zip(prompts, before, after))[:6]:
        print(f"PROMPT: {prompt}")
        print(textwrap.indent(textwrap.fill("before: " + b, width), "  "))
        print(textwrap.indent(textwrap.fill("after:  " + a, width), "  "))
        print()
    run_dir = Path(cfg.output_dir)
    evals = _eval_losses(run_dir / "metrics.jsonl")
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


def _eval_losses(path: Path) -> list[float]:
    import json

    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "eval/loss" in row:
                out.append(row["eval/loss"])
    return out
