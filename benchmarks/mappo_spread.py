"""MPE simple_spread (N=3, max_cycles 25, discrete actions): random policy vs independent PPO (IPPO,
`mappo.critic=independent`) vs MAPPO (`mappo.critic=centralized`), over several seeds at one step budget.

    python benchmarks/mappo_spread.py                       # 300k env steps, seeds 1 2 3, one process
    python benchmarks/mappo_spread.py --steps 150000 --jobs 2

Both learners use `rlhfkit gym mappo` with its defaults (shared policy + one-hot agent id, value
normalization, 8 envs x 100 steps per update, lr 7e-4 annealed, 10 epochs, 4 minibatches, ent 0.01); only
the critic differs. An environment step is one step of one environment copy (all 3 agents act), so the
budget is counted once for all agents.

Reported per method: the final deterministic evaluation's mean TEAM return (sum over the 3 agents of
their episode rewards) over `--eval-episodes` episodes seeded seed+100000, ..., then mean +- std over
seeds. The random policy (uniform actions) is evaluated on exactly the same episodes. Printed as a
markdown table followed by one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ENV_ID = "mpe2.simple_spread_v3:parallel_env"
ENV_KWARGS = {"N": 3, "max_cycles": 25, "continuous_actions": False}


def random_return(seed: int, episodes: int) -> dict:
    import numpy as np

    from rlhfkit.gym.mappo import ParallelEnvConfig, evaluate_parallel

    rng = np.random.default_rng(seed)
    n_actions = 5  # simple_spread's Discrete(5): no-op, left, right, down, up
    m = evaluate_parallel(lambda x: rng.integers(0, n_actions, size=len(x)),
                          ParallelEnvConfig(id=ENV_ID, num_envs=1, kwargs=dict(ENV_KWARGS)),
                          episodes=episodes, seed=seed + 100_000)
    return {"method": "random", "seed": seed, "return": m["eval/return"], "seconds": 0.0}


def learner_return(method: str, seed: int, steps: int, episodes: int, root: str) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.gym.mappo import GymMAPPOConfig, train

    critic = {"ippo": "independent", "mappo": "centralized"}[method]
    out = Path(root) / f"{method}-seed{seed}"
    cfg = load_config(GymMAPPOConfig, overrides=[
        f"output_dir={out}", "overwrite=true", "progress=false", "tensorboard=false", f"seed={seed}",
        f"env.id={ENV_ID}", f"mappo.critic={critic}", f"mappo.total_steps={steps}", "eval.every=0",
        f"eval.episodes={episodes}"])
    cfg.env.kwargs = dict(ENV_KWARGS)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval/return" in r][-1]
    last_train = [r for r in rows if "episode/return" in r][-1]
    return {"method": method, "seed": seed, "return": final["eval/return"], "seconds": seconds,
            "env_steps": final["env_steps"], "train_episode_return": last_train["episode/return"]}


def _run(job: tuple) -> dict:
    kind, seed, steps, episodes, root = job
    if kind == "random":
        return random_return(seed, episodes)
    return learner_return(kind, seed, steps, episodes, root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300_000, help="environment steps per training run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one CPU core each)")
    p.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    a = p.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="mappo-spread-")
    jobs = [(kind, s, a.steps, a.eval_episodes, root) for kind in ("mappo", "ippo") for s in a.seeds]
    t0 = time.perf_counter()
    results = [random_return(s, a.eval_episodes) for s in a.seeds]
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs) as pool:
            results += list(pool.map(_run, jobs))
    else:
        results += [_run(j) for j in jobs]
    wall = time.perf_counter() - t0

    print(f"\nsimple_spread N=3, max_cycles 25: {a.steps} env steps per run, seeds {a.seeds}, "
          f"{a.eval_episodes} deterministic eval episodes; team return (sum over agents), higher is better\n")
    print("| method | eval team return (mean +- std over seeds) | per seed | train s / run |")
    print("| --- | ---: | --- | ---: |")
    summary = {}
    for method, label in (("random", "random policy"), ("ippo", "IPPO (critic=independent)"),
                          ("mappo", "MAPPO (critic=centralized)")):
        rs = [r for r in results if r["method"] == method]
        vals = [r["return"] for r in rs]
        mean, std = statistics.mean(vals), statistics.pstdev(vals)
        secs = statistics.mean(r["seconds"] for r in rs)
        summary[method] = {"mean": mean, "std": std, "per_seed": vals, "train_seconds": secs}
        timing = f"{secs:.0f}" if method != "random" else "-"
        print(f"| {label} | {mean:.2f} +- {std:.2f} | {', '.join(f'{v:.2f}' for v in vals)} | {timing} |")
    print(json.dumps({"benchmark": "mappo_spread", "env": ENV_ID, "env_kwargs": ENV_KWARGS, "steps": a.steps,
                      "seeds": a.seeds, "eval_episodes": a.eval_episodes, "jobs": a.jobs,
                      "wall_seconds": round(wall, 1), "results": summary, "runs": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
