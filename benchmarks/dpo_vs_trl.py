"""rlhfkit dpo vs TRL's DPOTrainer: same model, data, order, batch, max length, beta, lr and schedule.

Each trainer runs in its own subprocess (so peak memory is its own), one after the other, in one
invocation. Printed: median seconds per step after warm-up, pairs/s, peak memory, and the per-step
loss difference over the first steps (a correctness check: with matching settings both implement
the same loss on the same batches, so the curves must agree closely).

    pip install -e '.[bench]'                       # TRL 1.16 and its dependencies
    python benchmarks/dpo_vs_trl.py                 # CPU: bundled SmolLM2, 4 pairs/step, max_length 128
    python benchmarks/dpo_vs_trl.py --defaults --also-rlhfkit-precompute --steps 12   # + each one's defaults
    python benchmarks/dpo_vs_trl.py --device cuda --model qwen2.5-0.5b-random --pairs 8 --max-length 512

Pinned runs (the default) state the same work on both sides: fp32 on CPU (TRL 1.16 turns on bf16 and
gradient checkpointing by default), bf16 autocast on CUDA, no gradient checkpointing, both sequences of
a pair padded (rlhfkit's `dpo.share_prompt=false`), linear schedule without warm-up, AdamW (0.9, 0.999,
1e-8), no weight decay, grad-norm clip 1.0, sequential data order. `--defaults` adds one run of each
trainer with its own defaults for everything else (TRL: bf16, gradient checkpointing, live reference;
rlhfkit: precomputed reference, the prompt computed once, bf16 autocast on CPUs with native bf16), and
prints how far rlhfkit's default losses are from its pinned fp32 ones on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ["bundled", "qwen2.5-0.5b-random", "tiny-random"]
WORDS = "good bad great awful nice terrible lovely poor excellent fine food service room price staff view".split()


def make_rows(n: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)

    def sent(k: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(k)) + "."

    return [{"prompt": f"Write a short review of place number {i}. {sent(prompt_words)}",
             "chosen": " " + sent(response_words), "rejected": " " + sent(response_words)} for i in range(n)]


def model_folder(name: str, device: str) -> str:
    """A local HF folder for the model both trainers load (bundled, or a random-init real shape)."""
    if name == "bundled":
        from rlhfkit.models.bundled import prepare_bundled

        return str(prepare_bundled())
    if name == "qwen2.5-0.5b-random":
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from rlhfkit.models.bundled import prepare_bundled_tokenizer
        from rlhfkit.models.load import load_tokenizer

        folder = Path(tempfile.gettempdir()) / "rlhfkit-bench-qwen05"
        if not (folder / "config.json").is_file():
            cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096,
                              tie_word_embeddings=True)
            torch.manual_seed(0)
            Qwen2ForCausalLM(cfg).save_pretrained(str(folder))
            tok = load_tokenizer(str(prepare_bundled_tokenizer()))
            tok.save_pretrained(str(folder))
        return str(folder)
    if name == "tiny-random":  # 2 layers, hidden 64: the dry run of benchmarks/gpu_suite.sh
        from rlhfkit.models.bundled import prepare_bundled_tokenizer
        from rlhfkit.models.load import load_tokenizer
        from rlhfkit.models.tiny import build_tiny, prepare_tiny

        tok = load_tokenizer(str(prepare_bundled_tokenizer()))
        return str(prepare_tiny("llama", build_tiny("llama", tok), tok))
    raise SystemExit(f"unknown --model {name}")


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------------------------------
# One side per subprocess


def run_rlhfkit(args: argparse.Namespace, folder: str, data: str, out: str) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.recipes.dpo import DPOConfig, train

    run = Path(tempfile.mkdtemp(prefix="rlhfkit-dpo-bench-"))
    overrides = [
        f"model.name={folder}", f"model.device={args.device}", f"data.train={data}", "data.chat_template=never",
        "data.shuffle=false", "data.group_by_length=false", "data.eval_fraction=0", f"data.max_length={args.max_length}",
        f"train.batch_size={args.pairs}", f"train.max_steps={args.steps}", f"train.lr={args.lr}", "train.scheduler=linear",
        "train.warmup_ratio=0", f"dpo.beta={args.beta}",
        "progress=false", "tensorboard=false", f"output_dir={run / 'run'}", "train.save_total_limit=1",
    ]
    if args.mode == "pinned":  # TRL's work: both sequences of a pair padded, fp32 on CPU
        overrides += [f"train.mixed_precision={'bf16' if args.device == 'cuda' else 'no'}", "dpo.share_prompt=false",
                      f"dpo.precompute_ref={'true' if args.ref == 'precompute' else 'false'}"]
    t0 = time.perf_counter()
    train(load_config(DPOConfig, None, overrides))
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    return {"losses": [r["train/loss"] for r in steps], "step_s": [r["train/step_seconds"] for r in steps],
            "peak_mb": peak_memory_mb(args.device), "total_s": total}


def run_trl(args: argparse.Namespace, folder: str, data: str, out: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]

    def load():  # noqa: ANN202
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device)

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *a, **k):  # noqa: ANN002, ANN003, ANN202 - same order as rlhfkit's
            return SequentialSampler(self.train_dataset)

    # pinned: fp32 on CPU, no gradient checkpointing; defaults: TRL's own (bf16, gradient checkpointing, live ref)
    pinned = {"bf16": args.device == "cuda", "fp16": False, "gradient_checkpointing": False,
              "precompute_ref_log_probs": args.ref == "precompute"} if args.mode == "pinned" else {}
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-bench-"), per_device_train_batch_size=args.pairs, max_length=args.max_length,
        learning_rate=args.lr, beta=args.beta, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=args.device == "cpu", dataloader_num_workers=0, seed=0, **pinned,
    )
    trainer = Sequential(model=load(), ref_model=load(), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **k):  # noqa: ANN001, ANN003, ANN201
            if args.device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_step_end(self, a, s, c, **k):  # noqa: ANN001, ANN003, ANN201
            if args.device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    trainer.add_callback(Timer())
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_s = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    return {"losses": losses, "step_s": step_s, "peak_mb": peak_memory_mb(args.device), "total_s": total,
            "version": trl.__version__}


# --------------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="bundled", choices=MODELS)
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the median")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--ref", default="live", choices=["live", "precompute"], help="reference for BOTH trainers")
    p.add_argument("--also-rlhfkit-precompute", action="store_true",
                   help="also time rlhfkit with its default precomputed reference (TRL stays live)")
    p.add_argument("--defaults", action="store_true",
                   help="also run each trainer with its own defaults (TRL: bf16 autocast, gradient checkpointing, live "
                        "reference; rlhfkit: precomputed reference, shared prompt, bf16 where the CPU has it)")
    p.add_argument("--skip-trl", action="store_true", help="time rlhfkit alone (TRL not installed)")
    p.add_argument("--mode", choices=["pinned", "defaults"], default="pinned", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    folder = model_folder(args.model, args.device)
    if args.side:
        fn = run_rlhfkit if args.side == "rlhfkit" else run_trl
        Path(args.out).write_text(json.dumps(fn(args, folder, args.data, args.out)))
        return

    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or pass --skip-trl)") from None
    work = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    prompt_words, response_words = (20, 35) if args.max_length <= 128 else (100, 280)
    data = work / "pairs.jsonl"
    rows = make_rows(args.pairs * (args.steps + 2), prompt_words, response_words)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--pairs", str(args.pairs),
            "--max-length", str(args.max_length), "--steps", str(args.steps), "--lr", str(args.lr), "--beta", str(args.beta),
            "--data", str(data)]
    # (label, side, reference, mode): "pinned" = the same work on both sides, "defaults" = each tool's own
    runs = ([] if args.skip_trl else [("trl", "trl", args.ref, "pinned")]) + [("rlhfkit", "rlhfkit", args.ref, "pinned")]
    if args.also_rlhfkit_precompute and args.ref == "live":
        runs.append(("rlhfkit (precomputed ref)", "rlhfkit", "precompute", "pinned"))
    if args.defaults:
        runs += ([] if args.skip_trl else [("trl (defaults)", "trl", "live", "defaults")])
        runs.append(("rlhfkit (defaults)", "rlhfkit", "precompute", "defaults"))
    results = {}
    for i, (label, side, ref, mode) in enumerate(runs):
        out = work / f"run{i}.json"
        print(f"running {label} ...", flush=True)
        subprocess.run([*base, "--side", side, "--ref", ref, "--mode", mode, "--out", str(out)], check=True)
        results[label] = json.loads(out.read_text())

    print(f"\nDPO, {args.model} on {args.device}: {args.pairs} pairs/step, max_length {args.max_length}, "
          f"reference {args.ref}, {args.steps} steps (median over steps {args.warmup + 1}..{args.steps})")
    trl_step = median(results["trl"]["step_s"][args.warmup:]) if "trl" in results else None
    trl_default = median(results["trl (defaults)"]["step_s"][args.warmup:]) if "trl (defaults)" in results else None
    print(f"{'trainer':<28}{'s/step':>10}{'pairs/s':>10}{'peak MB':>10}{'vs TRL':>9}{'vs TRL defaults':>17}")
    for label, r in results.items():
        s = median(r["step_s"][args.warmup:])
        ratio = f"{s / trl_step:>8.2f}x" if trl_step else f"{'-':>9}"
        ratio_d = f"{s / trl_default:>16.2f}x" if trl_default else f"{'-':>17}"
        print(f"{label:<28}{s:>10.3f}{args.pairs / s:>10.2f}{r['peak_mb']:>10.0f}{ratio}{ratio_d}")
    if "rlhfkit (defaults)" in results:
        a, b = results["rlhfkit (defaults)"]["losses"], results["rlhfkit"]["losses"]
        print(f"\nrlhfkit defaults vs rlhfkit pinned (same batches), max |loss diff| over {len(a)} steps: "
              f"{max(abs(x - y) for x, y in zip(a, b)):.2e} (steps: " + ", ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(a[:6], b)) + ")")
    if "trl" in results:
        a, b = results["rlhfkit"]["losses"], results["trl"]["losses"]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        print("\nper-step loss, first steps (rlhfkit vs TRL, same batches):")
        for i, (x, y) in enumerate(zip(a[:20], b[:20]), start=1):
            print(f"  step {i:>2}: {x:.6f}  {y:.6f}  |diff| {abs(x - y):.2e}")
        print(f"max |loss diff| over {len(diffs)} steps: {max(diffs):.2e}")
    print(json.dumps({"trl_version": results.get("trl", {}).get("version"), "pairs": args.pairs,
                      **{k: {"median_s_per_step": median(v["step_s"][args.warmup:]), "peak_mb": v["peak_mb"]}
                         for k, v in results.items()}}))


if __name__ == "__main__":
    main()
