"""One online-RL step, timed part by part: rlhfkit ppo (PPO with a critic, or RLOO) against TRL's
RLOOTrainer and plain `model.generate`, on the same model, prompts and token budget, in one invocation.

    python benchmarks/ppo_step.py                          # CPU: bundled SmolLM2, 4 prompts x 2, 64 new tokens
    python benchmarks/ppo_step.py --device cuda --model qwen2.5-0.5b-random --prompts 16 --samples 4 \
        --prompt-words 128 --new-tokens 256                # the H100 setting of ENVIRONMENT.md

Every completion is forced to the full budget (EOS ignored / min_new_tokens), as in TRL's anchor. The
reward is a cheap programmatic count, so the split shows the engine's own cost. Printed per trainer:
median seconds per step after warm-up, the split (generate / score / reference+values / train), new
tokens per second of generation, and the ratio against TRL and against `model.generate`.
TRL runs in a subprocess (so its memory is its own) when `trl` is importable (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import MODELS, model_folder, peak_memory_mb  # noqa: E402

WORDS = "good bad great awful nice terrible lovely poor excellent fine food service room price staff view".split()


def count_reward(prompts: list, completions: list[str], **_: object) -> list[float]:
    """Occurrences of 'good' per completion / 10 (the reward TRL's anchor uses is the same kind of count)."""
    return [c.count("good") / 10.0 for c in completions]


def make_prompts(path: Path, n: int, words: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rnd.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"prompt": f"Review {i}: {text}"}) + "\n")
    return path


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def run_rlhfkit(a: argparse.Namespace, folder: str, data: Path, out: Path, advantage: str, defaults: bool = False) -> dict:
    """defaults: rlhfkit's own precision (train.mixed_precision=auto: bf16 sampling and training on a CPU
    with native bf16) instead of the pinned fp32 on CPU / bf16 on CUDA."""
    import torch

    from rlhfkit.config import load_config
    from rlhfkit.recipes.ppo import PPOConfig, train

    k = a.samples
    args = [f"model.name={folder}", f"model.device={a.device}", f"data.train={data}", "data.eval_fraction=0",
            "data.chat_template=never", f"data.max_prompt_length={a.prompt_words * 4}",
            f"rollout.max_new_tokens={a.new_tokens}", "rollout.ignore_eos=true", f"rollout.samples_per_prompt={k}",
            "reward.sources=ppo_step:count_reward", f"ppo.advantage={advantage}", "ppo.epochs=2",
            f"ppo.mini_batch_size={a.prompts * k // 2}", f"ppo.micro_batch_size={a.micro_batch}",
            f"train.batch_size={a.prompts}", f"train.max_steps={a.warmup + a.steps}", "train.lr=1e-6",
            f"train.mixed_precision={'auto' if defaults else 'bf16' if a.device == 'cuda' else 'no'}",
            "progress=false", "tensorboard=false",
            "sample_every=0", "print_samples=0", f"output_dir={out}", "overwrite=true"]
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(load_config(PPOConfig, None, args))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r and r["step"] > a.warmup]
    keys = ["time/step", "time/generate", "time/score", "time/reference_and_values", "time/train"]
    res = {k.split("/")[1]: median([r[k] for r in rows]) for k in keys}
    res["new_tokens_per_s"] = a.prompts * k * a.new_tokens / res["generate"]
    res["peak_mb"] = peak_memory_mb(a.device)
    return res


def run_generate(a: argparse.Namespace, folder: str) -> dict:
    """`model.generate` on the same batch (left-padded prompts, forced length), median of a few calls."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(a.device).eval()
    rnd = random.Random(1)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(a.prompt_words)) for _ in range(a.prompts * a.samples)]
    enc = tok(texts, return_tensors="pt", padding=True).to(a.device)
    times = []
    for _ in range(1 + min(a.steps, 3)):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=a.new_tokens,
                           min_new_tokens=a.new_tokens, pad_token_id=tok.pad_token_id)
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = median(times[1:])
    return {"generate": t, "new_tokens_per_s": a.prompts * a.samples * a.new_tokens / t}


TRL_SCRIPT = r"""
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import RLOOConfig, RLOOTrainer
a = json.loads(sys.argv[1])
rows = [json.loads(x) for x in open(a["data"])]
tok = AutoTokenizer.from_pretrained(a["folder"])
def reward(completions, **kw):
    return [c.count("good") / 10.0 for c in completions]
cuda = a["device"] == "cuda"
# pinned: bf16 on CUDA only, no gradient checkpointing; defaults: TRL's own (bf16, gradient checkpointing)
pinned = {} if a["trl_defaults"] else {"bf16": cuda, "fp16": False, "gradient_checkpointing": False}
args = RLOOConfig(output_dir=a["out"], per_device_train_batch_size=a["prompts"] * a["samples"],
                  num_generations=a["samples"], max_completion_length=a["new_tokens"],
                  use_cpu=not cuda, report_to="none", logging_steps=1, max_steps=a["warmup"] + a["steps"],
                  save_strategy="no", learning_rate=1e-6, beta=0.05, temperature=1.0, top_k=0,
                  num_iterations=2, **pinned,
                  model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32},
                  generation_kwargs={"min_new_tokens": a["new_tokens"]})
tr = RLOOTrainer(model=a["folder"], reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                 processing_class=tok)
marks = []
class T(TrainerCallback):
    def on_step_end(self, *x, **k):
        if cuda: torch.cuda.synchronize()
        marks.append(time.perf_counter())
tr.add_callback(T())
t0 = time.perf_counter(); marks.append(t0)
tr.train()
steps = [b - a_ for a_, b in zip(marks, marks[1:])]
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
print("RESULT " + json.dumps({"steps": steps, "peak_mb": peak}))
"""


def run_trl(a: argparse.Namespace, folder: str, data: Path, out: Path, defaults: bool = False) -> dict | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed (pip install -e '.[bench]'): skipping the TRL run", flush=True)
        return None
    payload = {**vars(a), "folder": folder, "data": str(data), "out": str(out), "trl_defaults": defaults}
    res = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(payload)], capture_output=True, text=True)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        print(f"TRL run failed:\n{res.stderr[-3000:]}", flush=True)
        return None
    got = json.loads(line[7:])
    steps = got["steps"][a.warmup :]
    # RLOOTrainer generates once per `num_iterations` optimizer steps (with generation_batch_size = the
    # batch): one rollout step = generate + 2 updates = 2 trainer steps.
    pairs = [steps[i] + steps[i + 1] for i in range(0, len(steps) - 1, 2)] or steps
    return {"step": median(pairs), "peak_mb": got["peak_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="bundled", choices=MODELS)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--samples", type=int, default=2, help="completions per prompt")
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=0, help="rlhfkit ppo.micro_batch_size (0 = minibatch)")
    p.add_argument("--steps", type=int, default=4, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--defaults", action="store_true",
                   help="also run rlhfkit rloo and TRL RLOOTrainer with their own precision defaults (rlhfkit: bf16 on "
                        "CPUs with native bf16; TRL: bf16 and gradient checkpointing)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    folder = model_folder(a.model, a.device)
    tmp = Path(tempfile.mkdtemp(prefix="rlhfkit-ppo-bench-"))
    data = make_prompts(tmp / "prompts.jsonl", a.prompts * (a.warmup + a.steps + 2), a.prompt_words)
    print(f"model {a.model} on {a.device}: {a.prompts} prompts x {a.samples} completions, {a.prompt_words}-word "
          f"prompts, {a.new_tokens} new tokens forced, 2 epochs of 2 minibatches", flush=True)

    results: dict[str, dict] = {}
    results["rlhfkit ppo (gae, value head)"] = run_rlhfkit(a, folder, data, tmp / "ppo", "gae")
    results["rlhfkit rloo"] = run_rlhfkit(a, folder, data, tmp / "rloo", "rloo")
    results["model.generate"] = run_generate(a, folder)
    trl_res = None if a.skip_trl else run_trl(a, folder, data, tmp / "trl")
    if trl_res:
        results["TRL RLOOTrainer"] = trl_res
    if a.defaults:
        results["rlhfkit rloo (defaults)"] = run_rlhfkit(a, folder, data, tmp / "rloo-defaults", "rloo", defaults=True)
        trl_d = None if a.skip_trl else run_trl(a, folder, data, tmp / "trl-defaults", defaults=True)
        if trl_d:
            results["TRL RLOOTrainer (defaults)"] = trl_d

    print("\n| trainer | s/step | generate | score | ref+values | train | new tok/s (gen) | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("step", "generate", "score", "reference_and_values", "train")]
        tps = f"{r['new_tokens_per_s']:.0f}" if "new_tokens_per_s" in r else "-"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {tps} | {peak} |")
    ours = results["rlhfkit rloo"]
    gen = results["model.generate"]
    print(f"\nrlhfkit engine vs model.generate (generation only): {ours['new_tokens_per_s'] / gen['new_tokens_per_s']:.2f}x tokens/s")
    if trl_res:
        print(f"rlhfkit rloo step / TRL RLOOTrainer step: {ours['step'] / trl_res['step']:.2f}x "
              f"(< 1 = rlhfkit faster)")
    mine_d, theirs_d = results.get("rlhfkit rloo (defaults)"), results.get("TRL RLOOTrainer (defaults)")
    if mine_d:
        print(f"rlhfkit rloo defaults: engine vs model.generate {mine_d['new_tokens_per_s'] / gen['new_tokens_per_s']:.2f}x "
              f"tokens/s" + (f"; step / TRL RLOOTrainer defaults step: {mine_d['step'] / theirs_d['step']:.2f}x" if theirs_d else ""))
    print(json.dumps({"args": vars(a), "results": results}))


if __name__ == "__main__":
    main()
