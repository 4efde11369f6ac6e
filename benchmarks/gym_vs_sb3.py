"""rlhfkit gym ppo vs Stable-Baselines3 PPO on CartPole-v1, in one invocation, same machine.

Both use the rl-baselines3-zoo tuned CartPole hyperparameters (8 envs x 32 steps, 20 epochs of one
256-sample minibatch, gamma 0.98, lambda 0.8, lr 1e-3 decaying linearly over 100k steps; SB3 also
decays its clip range linearly, rlhfkit keeps 0.2). Each run evaluates the deterministic policy on
20 episodes every 5k steps and stops at a mean >= 475; evaluation time is excluded from the training
time. Printed per seed: steps and training seconds to 475, training steps/s; then medians and the
ratio rlhfkit / SB3 of the time to 475.

    pip install -e '.[bench]'             # stable-baselines3
    OMP_NUM_THREADS=1 python benchmarks/gym_vs_sb3.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

THRESHOLD = 475.0
EVAL_EVERY = 5000
MAX_STEPS = 100_000


def run_sb3(seed: int) -> dict:
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)

    def lin(v: float):  # noqa: ANN202
        return lambda progress: progress * v

    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                learning_rate=lin(1e-3), clip_range=lin(0.2), seed=seed, verbose=0, device="cpu")
    eval_env = gym.make("CartPole-v1")
    res: dict = {"seed": seed, "steps": None, "seconds": None}

    class Stop(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.t0, self.next, self.eval_time = time.perf_counter(), EVAL_EVERY, 0.0

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += EVAL_EVERY
                te = time.perf_counter()
                mean, _ = evaluate_policy(self.model, eval_env, n_eval_episodes=20, deterministic=True)
                self.eval_time += time.perf_counter() - te
                if mean >= THRESHOLD:
                    res.update(steps=self.num_timesteps, seconds=time.perf_counter() - self.t0 - self.eval_time)
                    return False
            return True

    cb = Stop()
    t0 = time.perf_counter()
    model.learn(total_timesteps=MAX_STEPS, callback=cb)
    res["sps"] = model.num_timesteps / max(1e-9, time.perf_counter() - t0 - cb.eval_time)
    return res


def run_rlhfkit(seed: int, out: Path) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.gym.ppo import GymPPOConfig, train

    config = Path(__file__).resolve().parents[1] / "configs" / "gym_cartpole_ppo.yaml"
    cfg = load_config(GymPPOConfig, config, [f"seed={seed}", f"output_dir={out}", "progress=false", "tensorboard=false",
                                             f"eval.every={EVAL_EVERY}", f"ppo.total_steps={MAX_STEPS}"])
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    hit = next((r for r in rows if "eval/target_reached_steps" in r), None)
    last = max((r for r in rows if "time/train_seconds" in r), key=lambda r: r["env_steps"])
    return {"seed": seed, "steps": hit and hit["eval/target_reached_steps"], "seconds": hit and hit["eval/target_reached_seconds"],
            "sps": last["env_steps"] / max(last["time/train_seconds"], 1e-9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rlhfkit-gym-bench-"))
    rows = []
    for seed in a.seeds:
        sb3 = run_sb3(seed)
        ours = run_rlhfkit(seed, tmp / f"seed{seed}")
        rows.append((seed, sb3, ours))
        print(f"seed {seed}: SB3 {sb3}  rlhfkit {ours}", flush=True)

    def fmt(x: float | None, spec: str) -> str:
        return "not reached" if x is None else format(x, spec)

    print("\n| seed | SB3 steps to 475 | SB3 s | SB3 steps/s | rlhfkit steps to 475 | rlhfkit s | rlhfkit steps/s | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for seed, s, o in rows:
        ratio = o["seconds"] / s["seconds"] if s["seconds"] and o["seconds"] else None
        if ratio is not None:
            ratios.append(ratio)
        print(f"| {seed} | {fmt(s['steps'], 'd')} | {fmt(s['seconds'], '.2f')} | {s['sps']:.0f} | "
              f"{fmt(o['steps'] and int(o['steps']), 'd')} | {fmt(o['seconds'], '.2f')} | {o['sps']:.0f} | "
              f"{fmt(ratio, '.2f')} |")
    done_s = [s["seconds"] for _, s, _ in rows if s["seconds"]]
    done_o = [o["seconds"] for _, _, o in rows if o["seconds"]]
    if done_s and done_o:
        print(f"\nmedian time to 475: SB3 {statistics.median(done_s):.2f} s, rlhfkit {statistics.median(done_o):.2f} s; "
              f"rlhfkit / SB3 = {statistics.median(done_o) / statistics.median(done_s):.2f}x "
              f"(per-seed median {statistics.median(ratios):.2f}x)" if ratios else "")
    print(json.dumps({"rows": [{"seed": seed, "sb3": s, "rlhfkit": o} for seed, s, o in rows]}))


if __name__ == "__main__":
    main()
