"""Learning targets of `rlhfkit gym rlhf` over several seeds, with the oracle teacher (a benchmark, not a
unit test): per task and seed, the comparisons used, the first step count at which the mean TRUE eval
return reached the threshold, the final eval return and the training seconds; then how many seeds made
it. `--mistakes 0.1` runs a noisy teacher (10% of answers flipped) instead.

    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks cartpole --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks pendulum --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks cartpole --mistakes 0.1
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --tasks cartpole --budgets 50 100 200 400 --ceiling
    OMP_NUM_THREADS=1 python benchmarks/gym_rlhf_targets.py --imitation

`--budgets` gives a label-efficiency table (true return reached vs comparisons; runs go to the step
budget, no early stop) and `--ceiling` adds PPO on the TRUE reward with the same settings (what perfect
labels could reach). `--set key=value` overrides the task's config. `--imitation` runs imitation's
PreferenceComparisons in its own virtual environment (it pins gymnasium 0.29 / SB3 2.2) where pip can
install it, and says why not where it cannot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = {  # name: (config, step budget, threshold)
    "cartpole": ("gym_rlhf_cartpole.yaml", 100_000, 450.0),
    "pendulum": ("gym_rlhf_pendulum.yaml", 300_000, -300.0),
    "acrobot": ("gym_rlhf_acrobot.yaml", 300_000, -100.0),  # judged by tip height (see the config)
}


def _summary(out: Path, threshold: float) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/return" in r]
    reached = next((r["env_steps"] for r in evals if r["eval/return"] >= threshold), None)
    return {"reached_steps": reached, "final_return": evals[-1]["eval/return"],
            "best_return": max(r["eval/return"] for r in evals),
            "labels": int(max((r.get("feedback/labels", 0) for r in rows), default=0)),
            "asked": int(max((r.get("feedback/asked", 0) for r in rows), default=0)),
            "seconds": max(r.get("time/train_seconds", 0) for r in rows)}


def run(task: str, seed: int, out: Path, mistakes: float, budget: int | None, extra: list[str]) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.gym.rlhf import GymRLHFConfig, train

    config, steps, threshold = TASKS[task]
    args = [f"seed={seed}", f"output_dir={out}", "progress=false", "tensorboard=false", f"ppo.total_steps={steps}",
            f"eval.target_return={threshold}"]
    if mistakes:
        args.append(f"feedback.teacher_options={{mistake_rate: {mistakes}}}")
    if budget is not None:  # a sweep: every run to the step budget, so returns compare at equal steps
        args += [f"feedback.budget={budget}", f"feedback.initial={max(1, budget // 6)}", "eval.stop_at_target=false"]
    train(load_config(GymRLHFConfig, CONFIGS / config, args + extra))
    return {"task": task, "seed": seed, **_summary(out, threshold)}


def ceiling(task: str, seed: int, out: Path, extra: list[str]) -> dict:
    """PPO on the TRUE reward with the task's env, net, ppo and eval settings."""
    import yaml

    from rlhfkit.config import load_config
    from rlhfkit.gym.ppo import GymPPOConfig, train

    config, steps, threshold = TASKS[task]
    raw = yaml.safe_load((CONFIGS / config).read_text())
    raw = {k: v for k, v in raw.items() if k not in ("feedback", "reward")}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = [f"seed={seed}", f"output_dir={out}", "progress=false", "tensorboard=false", f"ppo.total_steps={steps}",
            f"eval.target_return={threshold}", "eval.stop_at_target=false"]
    train(load_config(GymPPOConfig, path, args + extra))
    return {"task": task, "seed": seed, **_summary(out, threshold)}


IMITATION = """
import json, sys, numpy as np, gymnasium as gym
from imitation.algorithms import preference_comparisons
from imitation.rewards.reward_nets import BasicRewardNet
from imitation.util.networks import RunningNorm
from imitation.util.util import make_vec_env
from imitation.policies.base import NormalizeFeaturesExtractor
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
env_id, comparisons, steps, seed, frag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(seed)
venv = make_vec_env(env_id, rng=rng, n_envs=8)
reward_net = BasicRewardNet(venv.observation_space, venv.action_space, normalize_input_layer=RunningNorm)
fragmenter = preference_comparisons.RandomFragmenter(warning_threshold=0, rng=rng)
gatherer = preference_comparisons.SyntheticGatherer(rng=rng)
model = preference_comparisons.BasicRewardTrainer(
    preference_model=preference_comparisons.PreferenceModel(reward_net), loss=preference_comparisons.CrossEntropyRewardLoss(),
    epochs=3, rng=rng)
agent = PPO("MlpPolicy", venv, seed=seed, n_steps=256, batch_size=64, ent_coef=0.01, n_epochs=10,
            policy_kwargs=dict(features_extractor_class=NormalizeFeaturesExtractor))
trajectory_generator = preference_comparisons.AgentTrainer(algorithm=agent, reward_fn=reward_net, venv=venv,
                                                           exploration_frac=0.05, rng=rng)
pc = preference_comparisons.PreferenceComparisons(
    trajectory_generator, reward_net, num_iterations=20, fragmenter=fragmenter, preference_gatherer=gatherer,
    reward_trainer=model, fragment_length=frag, transition_oversampling=1, initial_comparison_frac=0.1,
    allow_variable_horizon=True, initial_epoch_multiplier=4, query_schedule="hyperbolic")
pc.train(total_timesteps=steps, total_comparisons=comparisons)
mean, _ = evaluate_policy(agent.policy, gym.make(env_id), n_eval_episodes=20)
print(json.dumps({"final_return": float(mean)}))
"""


def imitation(tasks: list[str], seeds: list[int], venv: Path) -> None:
    """imitation's PreferenceComparisons at the same comparison and step budgets, in its own venv."""
    py = venv / "bin" / "python"
    if not py.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode:
            print(f"imitation: cannot make a virtual environment at {venv}: {made.stderr.strip()[-500:]}")
            return
    got = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "imitation"], capture_output=True, text=True)
    if got.returncode:
        tail = " ".join(got.stderr.strip().splitlines()[-2:])
        print(f"imitation: `pip install imitation` failed in {venv}, so it cannot run here: {tail}")
        return
    envs = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1", "acrobot": "Acrobot-v1"}
    for task in tasks:
        _, steps, threshold = TASKS[task]
        budget = {"cartpole": 300, "pendulum": 700, "acrobot": 400}[task]
        # imitation cuts fragments only from episodes at least that long: CartPole's first (random) episodes
        # last ~22 steps, so it gets 10-step fragments there (ours keep shorter segments that ended early)
        frag = 10 if task == "cartpole" else 25
        for seed in seeds:
            res = subprocess.run([str(py), "-c", IMITATION, envs[task], str(budget), str(steps), str(seed), str(frag)],
                                 capture_output=True, text=True)
            if res.returncode:
                last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"| {task} | imitation PreferenceComparisons | {budget} | {seed} | crashed: {last[:200]} | no |",
                      flush=True)
                continue
            final = json.loads(res.stdout.strip().splitlines()[-1])["final_return"]
            print(f"| {task} | imitation PreferenceComparisons | {budget} | {seed} | {final:.1f} | "
                  f"{'yes' if final >= threshold else 'no'} |", flush=True)


def _append(path: Path | None, row: dict) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--mistakes", type=float, default=0.0, help="oracle mistake rate")
    p.add_argument("--budgets", nargs="+", type=int, default=None, help="label budgets to sweep (default: the config's)")
    p.add_argument("--ceiling", action="store_true", help="also PPO on the true reward, same settings")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--jsonl", type=Path, default=None, help="also append every result as a JSON line here")
    p.add_argument("--imitation", action="store_true", help="only imitation's PreferenceComparisons, own venv")
    p.add_argument("--imitation-venv", type=Path, default=Path(tempfile.gettempdir()) / "rlhfkit-imitation-venv")
    a = p.parse_args()
    if a.imitation:
        imitation(a.tasks, a.seeds, a.imitation_venv)
        return
    print("| task | teacher | budget | seed | comparisons asked | labels | steps to target | final return | best | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    teacher = f"oracle, {a.mistakes:.0%} mistakes" if a.mistakes else "oracle"
    with tempfile.TemporaryDirectory() as tmp:
        for task in a.tasks:
            for budget in a.budgets or [None]:
                results = []
                for seed in a.seeds:
                    r = run(task, seed, Path(tmp) / f"{task}-{budget}-{seed}", a.mistakes, budget, a.set)
                    results.append(r)
                    _append(a.jsonl, {**r, "teacher": "oracle", "mistakes": a.mistakes, "budget": budget})
                    print(f"| {task} | {teacher} | {budget or 'config'} | {seed} | {r['asked']} | {r['labels']} | "
                          f"{r['reached_steps'] or '-'} | {r['final_return']:.1f} | {r['best_return']:.1f} | "
                          f"{r['seconds']:.0f} |", flush=True)
                ok = sum(r["reached_steps"] is not None for r in results)
                print(f"| {task} | | {budget or 'config'} | {ok}/{len(results)} seeds reached {TASKS[task][2]} | | | | | | |",
                      flush=True)
            if a.ceiling:
                for seed in a.seeds:
                    r = ceiling(task, seed, Path(tmp) / f"{task}-ppo-{seed}", a.set)
                    _append(a.jsonl, {**r, "teacher": "true reward"})
                    print(f"| {task} | PPO on the true reward | - | {seed} | - | - | {r['reached_steps'] or '-'} | "
                          f"{r['final_return']:.1f} | {r['best_return']:.1f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
