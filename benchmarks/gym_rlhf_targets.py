"""Learning targets of `rlhfkit gym rlhf` over several seeds, with the oracle teacher (a benchmark, not a
unit test): per task and seed, the comparisons used, the first step count at which the mean TRUE eval
return reached the threshold, the final eval return and the training seconds; then how many seeds made
it. `--mistakes 0.1` runs a noisy teacher (10% of answers flipped) instead.

    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks cartpole --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks pendulum --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks cartpole --mistakes 0.1
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks cartpole --budgets 50 100 200 400 800

`--budgets` gives a label-efficiency table (true return reached vs comparisons). Not run here yet:
imitation's PreferenceComparisons side by side (it pins gymnasium 0.29 / SB3 2.2 and needs its own
virtual environment).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = {  # name: (config, step budget, threshold)
    "cartpole": ("gym_rlhf_cartpole.yaml", 100_000, 450.0),
    "pendulum": ("gym_rlhf_pendulum.yaml", 300_000, -300.0),
}


def run(task: str, seed: int, out: Path, mistakes: float, budget: int | None) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.gym.rlhf import GymRLHFConfig, train

    config, steps, threshold = TASKS[task]
    extra = [f"seed={seed}", f"output_dir={out}", "progress=false", "tensorboard=false", f"ppo.total_steps={steps}",
             f"eval.target_return={threshold}"]
    if mistakes:
        extra.append(f"feedback.teacher_options={{mistake_rate: {mistakes}}}")
    if budget is not None:
        extra += [f"feedback.budget={budget}", f"feedback.initial={max(1, budget // 6)}"]
    cfg = load_config(GymRLHFConfig, CONFIGS / config, extra)
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/return" in r]
    reached = next((r["env_steps"] for r in evals if r["eval/return"] >= threshold), None)
    labels = max((r.get("feedback/labels", 0) for r in rows), default=0)
    asked = max((r.get("feedback/asked", 0) for r in rows), default=0)
    return {"task": task, "seed": seed, "asked": int(asked), "labels": int(labels), "reached_steps": reached,
            "final_return": evals[-1]["eval/return"], "best_return": max(r["eval/return"] for r in evals),
            "seconds": max(r.get("time/train_seconds", 0) for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--mistakes", type=float, default=0.0, help="oracle mistake rate")
    p.add_argument("--budgets", nargs="+", type=int, default=None, help="label budgets to sweep (default: the config's)")
    a = p.parse_args()
    print("| task | teacher | budget | seed | comparisons asked | labels | steps to target | final return | best | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for task in a.tasks:
            for budget in a.budgets or [None]:
                results = []
                for seed in a.seeds:
                    r = run(task, seed, Path(tmp) / f"{task}-{budget}-{seed}", a.mistakes, budget)
                    results.append(r)
                    teacher = f"oracle, {a.mistakes:.0%} mistakes" if a.mistakes else "oracle"
                    print(f"| {task} | {teacher} | {budget or 'config'} | {seed} | {r['asked']} | {r['labels']} | "
                          f"{r['reached_steps'] or '-'} | {r['final_return']:.1f} | {r['best_return']:.1f} | "
                          f"{r['seconds']:.0f} |", flush=True)
                ok = sum(r["reached_steps"] is not None for r in results)
                print(f"| {task} | | {budget or 'config'} | {ok}/{len(results)} seeds reached {TASKS[task][2]} | | | | | | |",
                      flush=True)


if __name__ == "__main__":
    main()
