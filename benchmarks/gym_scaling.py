"""Distributed PPO scaling on CPU: `rlhfkit gym ppo` on CartPole-v1 with 1 process and under
`torchrun --nproc_per_node N`, same total environment steps, `env.num_envs` envs per process.

    OMP_NUM_THREADS=1 python benchmarks/gym_scaling.py                 # 1 vs 2 processes, 51,200 steps
    OMP_NUM_THREADS=1 python benchmarks/gym_scaling.py --procs 1 2 4 --steps 102400

Reports training seconds (evaluation off) and environment steps per second over all processes, from the
run's own metrics (`time/train_seconds`, `env_steps`), plus the final `dist/param_divergence` (0 when the
processes stayed bit-identical). Printed as a markdown table followed by one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(procs: int, steps: int, envs: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "rlhfkit"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "rlhfkit"]
    cmd += ["gym", "ppo", "--config", str(ROOT / "configs" / "gym_cartpole_ppo.yaml"), f"output_dir={out}",
            "progress=false", "tensorboard=false", f"env.num_envs={envs}", f"ppo.total_steps={steps}",
            "eval.every=0", "eval.episodes=1", "eval.stop_at_target=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "time/train_seconds" in r][-1]
    divergence = [r["dist/param_divergence"] for r in rows if "dist/param_divergence" in r]
    return {"procs": procs, "env_steps": last["env_steps"], "train_seconds": last["time/train_seconds"],
            "steps_per_second": last["env_steps"] / last["time/train_seconds"],
            "param_divergence": divergence[-1] if divergence else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=51_200, help="environment steps over all processes")
    p.add_argument("--envs", type=int, default=8, help="environments per process")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-gym-scaling-") as root:
        for n in args.procs:
            rows.append(run(n, args.steps, args.envs, Path(root) / f"p{n}"))
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n| processes | env steps | training s | steps/s | param divergence |\n|---|---|---|---|---|")
    for r in rows:
        div = "-" if r["param_divergence"] is None else f"{r['param_divergence']:.3g}"
        print(f"| {r['procs']} | {r['env_steps']:.0f} | {r['train_seconds']:.2f} | {r['steps_per_second']:.0f} | {div} |")
    print(json.dumps({"benchmark": "gym_scaling", "envs_per_process": args.envs, "rows": rows}))


if __name__ == "__main__":
    main()
