"""Learning targets of `rlhfkit gym ppo` over several seeds (a benchmark, not a unit test).

For each task: the example config in configs/, a step budget, and a threshold on the mean return of
deterministic evaluation episodes. Printed per task and seed: the final eval return, the first step
count at which the eval mean reached the threshold, and the training seconds; then how many seeds
reached it.

    OMP_NUM_THREADS=1 python benchmarks/gym_targets.py                       # all tasks, seeds 0-4
    OMP_NUM_THREADS=1 python benchmarks/gym_targets.py --tasks cartpole --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = {
    # name: (config, step budget, threshold, eval every); "-dqn" tasks run `rlhfkit gym dqn` (no config = defaults)
    "cartpole": ("gym_cartpole_ppo.yaml", 50_000, 475.0, 5_000),
    "cartpole-dqn": ("", 100_000, 475.0, 5_000),
    "acrobot": ("gym_acrobot_ppo.yaml", 200_000, -100.0, 20_000),
    "pendulum": ("gym_pendulum_ppo.yaml", 200_000, -200.0, 20_000),
}


def run(task: str, seed: int, out: Path) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.gym import dqn, ppo

    config, budget, threshold, every = TASKS[task]
    recipe, cls, section = (dqn, dqn.GymDQNConfig, "dqn") if task.endswith("-dqn") else (ppo, ppo.GymPPOConfig, "ppo")
    cfg = load_config(cls, CONFIGS / config if config else None, [
        f"seed={seed}", f"output_dir={out}", "overwrite=true", "progress=false", "tensorboard=false",
        f"{section}.total_steps={budget}", f"eval.every={every}", "eval.episodes=20", f"eval.target_return={threshold}",
        "eval.stop_at_target=false"])
    recipe.train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/return" in r]
    hit = next((r for r in rows if "eval/target_reached_steps" in r), None)
    return {"task": task, "seed": seed, "final_return": evals[-1]["eval/return"], "best_return": max(r["eval/return"] for r in evals),
            "steps_to_threshold": hit and int(hit["eval/target_reached_steps"]),
            "seconds_to_threshold": hit and hit["eval/target_reached_seconds"],
            "train_seconds": evals[-1]["time/train_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rlhfkit-gym-targets-"))
    results = []
    for task in a.tasks:
        for seed in a.seeds:
            r = run(task, seed, tmp / f"{task}-{seed}")
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| task | budget | threshold | seed | final eval return | steps to threshold | training s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        _, budget, threshold, _ = TASKS[r["task"]]
        steps = r["steps_to_threshold"] if r["steps_to_threshold"] is not None else "not reached"
        print(f"| {r['task']} | {budget} | {threshold:g} | {r['seed']} | {r['final_return']:.1f} | {steps} | "
              f"{r['train_seconds']:.1f} |")
    for task in a.tasks:
        rs = [r for r in results if r["task"] == task]
        print(f"{task}: {sum(r['steps_to_threshold'] is not None for r in rs)}/{len(rs)} seeds reached the threshold "
              f"within {TASKS[task][1]} steps")


if __name__ == "__main__":
    main()
