"""The demo pipeline over several seeds: are its numbers a property of the recipe or of seed 0?

    python benchmarks/demo_seeds.py --seeds 0 1 2                     # the `make demo` config, ~18 min a seed
    python benchmarks/demo_seeds.py --seeds 0 1 2 dpo.config=my.yaml  # any pipeline setting, as KEY=VALUE

Each seed is one `rlhfkit pipeline` run in OUT/seed-S (a seed already finished there is skipped by the
pipeline itself, so an interrupted benchmark continues where it stopped). The seed changes the
candidates' sampling, the pair order, LoRA's init and the eval samples; the prompts stay the same. It
prints one row per seed and the mean and standard deviation of each column, and writes them to
OUT/seeds.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEMO = "src/rlhfkit/configs/pipeline_demo.yaml"

COLUMNS = (
    ("rm_acc", "RM held-out acc"),
    ("dpo_acc", "policy implicit acc"),
    ("base", "base sentiment (greedy)"),
    ("tuned", "tuned sentiment (greedy)"),
    ("win_greedy", "win rate greedy"),
    ("win_sampled", "win rate sampled"),
    ("win_matched", "length-matched win"),
    ("kl", "KL nats/token"),
    ("len_base", "base length"),
    ("len_tuned", "tuned length"),
    ("eos_tuned", "tuned EOS rate"),
    ("minutes", "wall minutes"),
)


def seed_row(folder: Path) -> dict[str, float]:
    """The headline numbers of one finished pipeline folder (its last round)."""
    rnd = json.loads((folder / "summary.json").read_text())["rounds"][-1]
    tuned = next(iter(rnd["models"]))  # the first tuned model (the demo has one)
    extra = {(r[0], r[1]): r[2] for t in rnd.get("extra_tables", []) for r in t["rows"]}
    answers = rnd["answers"]
    row = {
        "rm_acc": extra.get(("reward", "eval/accuracy"), float("nan")),
        "dpo_acc": extra.get((tuned, "eval/rewards/accuracies"), float("nan")),
        "base": rnd["scores"]["sentiment"]["base"]["greedy"]["mean"],
        "tuned": rnd["scores"]["sentiment"][tuned]["greedy"]["mean"],
        "win_greedy": rnd["win_rate"]["sentiment"][tuned]["greedy"]["win_rate"],
        "win_sampled": rnd["win_rate"]["sentiment"][tuned]["sampled"]["win_rate"],
        "win_matched": rnd["length_bias"]["sentiment"][tuned]["greedy"]["length_matched"]["win_rate"],
        "kl": rnd["kl"][tuned]["k1_per_token"],
        "len_base": answers["base"]["greedy"]["length_tokens"]["mean"],
        "len_tuned": answers[tuned]["greedy"]["length_tokens"]["mean"],
        "eos_tuned": answers[tuned]["greedy"]["eos_rate"],
    }
    timing = folder / "seconds.txt"
    row["minutes"] = float(timing.read_text()) / 60 if timing.exists() else float("nan")
    return row


def table(rows: dict[int, dict[str, float]]) -> str:
    names = [c for c, _ in COLUMNS]
    lines = ["| seed | " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for seed, row in rows.items():
        lines.append(f"| {seed} | " + " | ".join(f"{row[c]:.3f}" for c in names) + " |")
    if len(rows) > 1:
        stats = []
        for c in names:
            vals = [r[c] for r in rows.values() if not math.isnan(r[c])]
            stats.append(f"{statistics.mean(vals):.3f} +- {statistics.stdev(vals):.3f}" if len(vals) > 1 else "n/a")
        lines.append("| mean +- sd | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default=DEMO, help="pipeline config (default: the demo's)")
    ap.add_argument("--out", default="runs/demo-seeds", help="one pipeline folder per seed below this")
    ap.add_argument("sets", nargs="*", help="pipeline settings KEY=VALUE, applied to every seed")
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("rlhfkit")
    rows: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed-{seed}"
        start = time.perf_counter()
        cmd = [str(exe), "pipeline", "--config", args.config, f"output_dir={folder}", f"seed={seed}", *args.sets]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
        if seconds > 60 or not (folder / "seconds.txt").exists():  # a skipped (already finished) run keeps its time
            (folder / "seconds.txt").write_text(f"{seconds:.1f}\n")
        rows[seed] = seed_row(folder)
        print(table(rows), flush=True)
    (Path(args.out) / "seeds.json").write_text(json.dumps({"config": args.config, "sets": args.sets, "rows": rows},
                                                          indent=1))
    print(f"\n{Path(args.out) / 'seeds.json'}")


if __name__ == "__main__":
    main()
