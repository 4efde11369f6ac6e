"""Control-task PPO: truncation bootstrapping, distributions, CartPole/Pendulum smoke runs, resume,
saved-agent evaluation, and two processes under torchrun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.gym.common import EnvConfig, RunningMeanStd
from rlhfkit.gym.ppo import ActorCritic, GymPPOConfig, _collect, _Run, train
from rlhfkit.runtime.distributed import DistInfo
from tests.test_sft import _cli, _losses


def rewind(out: Path, to_step: int, drop: tuple[int, ...]) -> None:
    """Make checkpoint `to_step` the latest and delete the later ones, as if the run had stopped there."""
    import shutil

    for step in drop:
        shutil.rmtree(out / "checkpoints" / f"step-{step:08d}")
    (out / "checkpoints" / "latest").write_text(f"step-{to_step:08d}\n")


class CounterEnv(gym.Env):
    """obs = [steps taken in this episode]; reward 1 per step; terminates when it reaches `end` (if set)."""

    def __init__(self, end: int = 0):
        self.observation_space = gym.spaces.Box(-100.0, 100.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.end, self.t = end, 0

    def reset(self, *, seed=None, options=None):  # noqa: ANN001, ANN201
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):  # noqa: ANN001, ANN201
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, bool(self.end and self.t >= self.end), False, {}


gym.register("RlhfkitCounter-v0", entry_point=CounterEnv)


def _value_is_obs(agent: ActorCritic) -> None:
    """Make V(obs) = 10 * obs[0] so values are easy to write by hand."""
    lin = torch.nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(10.0)
        lin.bias.zero_()
    agent.critic = lin


def test_truncation_bootstraps_from_the_final_observation_and_termination_does_not() -> None:
    # Time limit 3, no termination: episodes are truncated after obs 3; the next observation is the new
    # episode's 0. One env, 4 steps, gamma 0.5, lambda 1.
    args = ["env.id=RlhfkitCounter-v0", "env.num_envs=1", "env.max_episode_steps=3", "ppo.n_steps=4",
            "ppo.gamma=0.5", "ppo.lam=1.0", "output_dir=unused"]
    cfg = load_config(GymPPOConfig, None, args)
    run = _Run(cfg, DistInfo())
    agent = ActorCritic(1, "discrete", 2, dict(cfg.net.__dict__))
    _value_is_obs(agent)
    run.restart(0)
    batch, _ = _collect(run, agent, torch.device("cpu"))
    # observations 0,1,2 | 0 ; values 0,10,20 | 0 ; after step 2 (obs 2 -> final obs 3) truncated.
    # next values: V(1)=10, V(2)=20, V(final 3)=30 (not V(0)=0), then V(obs after step 3 = 1) = 10.
    # deltas: 1+5-0=6, 1+10-10=1, 1+15-20=-4 | 1+5-0=6 ; A_2=-4, A_1=1+0.5*-4=-1, A_0=6+0.5*-1=5.5, A_3=6.
    torch.testing.assert_close(batch.advantages, torch.tensor([5.5, -1.0, -4.0, 6.0]))
    torch.testing.assert_close(batch.returns, torch.tensor([5.5, 9.0, 16.0, 6.0]))
    run.envs.close()

    # The same with termination at 3: no bootstrap at the last step of the episode.
    gym.register("RlhfkitCounterEnd-v0", entry_point=lambda: CounterEnv(end=3))
    cfg = load_config(GymPPOConfig, None, [a.replace("RlhfkitCounter-v0", "RlhfkitCounterEnd-v0") for a in args])
    run = _Run(cfg, DistInfo())
    run.restart(0)
    batch, _ = _collect(run, agent, torch.device("cpu"))
    # delta_2 = 1 + 0 - 20 = -19; A_1 = 1 + 0.5*-19 = -8.5; A_0 = 6 + 0.5*-8.5 = 1.75
    torch.testing.assert_close(batch.advantages, torch.tensor([1.75, -8.5, -19.0, 6.0]))
    run.envs.close()


@pytest.mark.parametrize("kind", ["discrete", "box"])
def test_written_out_distributions_match_torch(kind: str) -> None:
    torch.manual_seed(0)
    net = {"hidden": [16], "activation": "tanh", "shared": False, "ortho_init": True, "log_std_init": -0.3}
    agent = ActorCritic(4, kind, 3, net)
    obs = torch.randn(5, 4)
    out, _ = agent(obs)
    action = agent.sample(out)
    if kind == "discrete":
        ref = torch.distributions.Categorical(logits=agent.actor(obs))
        torch.testing.assert_close(agent.log_prob(out, action), ref.log_prob(action))
        torch.testing.assert_close(agent.entropy(out), ref.entropy())
    else:
        ref = torch.distributions.Normal(out, agent.log_std.exp().expand_as(out))
        torch.testing.assert_close(agent.log_prob(out, action), ref.log_prob(action).sum(-1))
        torch.testing.assert_close(agent.entropy(out), ref.entropy().sum(-1))


def test_running_mean_std_matches_numpy_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    rms = RunningMeanStd((3,))
    chunks = [rng.normal(2.0, 3.0, size=(n, 3)) for n in (5, 17, 1, 40)]
    for c in chunks:
        rms.update(c)
    allx = np.concatenate(chunks)
    np.testing.assert_allclose(rms.mean, allx.mean(0), atol=1e-4)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-3)
    other = RunningMeanStd((3,))
    other.load_state_dict(json.loads(json.dumps(rms.state_dict())))
    np.testing.assert_array_equal(other.mean, rms.mean)
    assert other.count == rms.count


def _args(out: Path, *extra: str) -> list[str]:
    return ["env.num_envs=4", "ppo.n_steps=32", "ppo.epochs=4", "ppo.minibatches=2", "progress=false",
            "tensorboard=false", f"output_dir={out}", *extra]


def test_cartpole_smoke_eval_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(GymPPOConfig, None, _args(out, "ppo.total_steps=2048", "eval.every=1024", "eval.episodes=3")))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "train/policy_loss" in r]
    assert len(updates) == 16 and all(np.isfinite(r["train/approx_kl"]) for r in updates)
    assert {"episode/return", "time/sps", "train/clipfrac", "train/entropy"} <= set().union(*map(set, updates))
    assert sum("eval/return" in r for r in rows) == 2
    res = _cli("gym", "eval", str(out / "agent"), "--episodes", "2", cwd=tmp_path)
    assert res.returncode == 0 and "mean return" in res.stdout, res.stderr
    res = _cli("gym", "eval", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and "agent.json" in res.stderr


def test_box_actions_with_normalization_and_checkpointed_statistics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(GymPPOConfig, None, _args(out, "env.id=Pendulum-v1", "ppo.total_steps=1024", "ppo.normalize_obs=true",
                                              "ppo.normalize_reward=true", "eval.episodes=1", "save_every=4")))
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["normalizers"]["obs"]["count"] > 100 and len(state["normalizers"]["obs"]["mean"]) == 3
    saved = json.loads((out / "agent" / "normalizers.json").read_text())
    assert saved["obs"]["count"] > state["normalizers"]["obs"]["count"]
    res = _cli("gym", "eval", str(out / "checkpoints" / "step-00000004"), "--episodes", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_resume_continues_exactly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _args(out, "ppo.total_steps=768", "save_every=2", "save_total_limit=0", "ppo.normalize_obs=true",
                 "eval.every=0", "eval.episodes=1")
    train(load_config(GymPPOConfig, None, args))
    full = {k: _losses(out, k) for k in ("train/policy_loss", "train/value_loss", "train/entropy")}
    rewind(out, 2, drop=(4, 6))
    res = _cli("gym", "ppo", *args, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for key, values in full.items():
        again = _losses(out, key)
        assert sorted(again) == list(range(1, 7))
        for step in range(3, 7):
            assert again[step] == pytest.approx(values[step], abs=1e-6), (key, step)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="minibatches"):
        load_config(GymPPOConfig, None, _args(tmp_path, "ppo.minibatches=1000"))
    res = _cli("gym", "ppo", *_args(tmp_path / "r", "env.id=NoSuchEnv-v9"), cwd=tmp_path)
    assert res.returncode == 2 and "env.id" in res.stderr and "NoSuchEnv-v9" in res.stderr
    from rlhfkit.gym.common import make_vector_env

    with pytest.raises(ConfigError, match="observation space"):
        make_vector_env(EnvConfig(id="FrozenLake-v1", num_envs=1))
    with pytest.raises(ConfigError, match="'device': expected auto, cpu, cuda"):
        load_config(GymPPOConfig, None, _args(tmp_path, "device=gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'device': cuda was requested but torch sees no CUDA device"):
            load_config(GymPPOConfig, None, _args(tmp_path, "device=cuda"))


def test_two_processes_stay_identical_and_learn_cartpole(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    res = _cli("gym", "ppo", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "gym_cartpole_ppo.yaml"),
               f"output_dir={out}", "progress=false", "tensorboard=false", "env.num_envs=4", "ppo.total_steps=60000",
               "seed=1", cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    assert _losses(out, "dist/param_divergence") and max(_losses(out, "dist/param_divergence").values()) == 0.0
    evals = _losses(out, "eval/return")
    assert max(evals.values()) >= 475, evals


def test_two_process_resume_continues_exactly(tmp_path: Path) -> None:
    out = tmp_path / "ddp-resume"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "gym_cartpole_ppo.yaml")
    args = ("gym", "ppo", "--config", config, f"output_dir={out}", "progress=false", "tensorboard=false",
            "env.num_envs=2", "ppo.total_steps=768", "save_every=2", "save_total_limit=0", "ppo.normalize_obs=true",
            "eval.every=0", "seed=3")
    res = _cli(*args, cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    keys = ("train/policy_loss", "train/value_loss", "train/grad_norm")
    full = {k: _losses(out, k) for k in keys}
    rewind(out, 2, drop=(4, 6))
    res = _cli(*args, "--resume", cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    for key, values in full.items():
        again = _losses(out, key)
        assert sorted(again) == list(range(1, 7))
        for step in range(3, 7):
            assert again[step] == pytest.approx(values[step], abs=1e-6), (key, step)
    assert max(_losses(out, "dist/param_divergence").values()) == 0.0


def _corrupt(folder: Path, how: str) -> None:
    spec_path, weights = folder / "agent.json", folder / "model.safetensors"
    spec = json.loads(spec_path.read_text())
    if how == "json":
        spec_path.write_text(spec_path.read_text()[:-5])
    elif how == "type":
        spec_path.write_text(json.dumps({**spec, "type": "sac"}))
    elif how == "field":
        spec_path.write_text(json.dumps({k: v for k, v in spec.items() if k != "obs_dim"}))
    elif how == "shape":
        spec_path.write_text(json.dumps({**spec, "net": {**spec["net"], "hidden": [32, 32]}}))
    elif how == "no-weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "env":
        spec_path.write_text(json.dumps({k: v for k, v in spec.items() if k != "env"}))
    elif how == "env-field":
        spec_path.write_text(json.dumps({**spec, "env": {**spec["env"], "colour": "red"}}))


@pytest.mark.parametrize("how,expect", [
    ("json", r"agent.json: line \d+: not valid JSON"), ("type", "field 'type': unknown agent type 'sac'"),
    ("field", "agent.json: missing field 'obs_dim'"), ("shape", "model.safetensors: cannot load the weights"),
    ("no-weights", "no model.safetensors"), ("truncated", "model.safetensors: cannot load the weights"),
    ("env", "names no environment"), ("env-field", "field 'env' does not describe an environment"),
])
def test_gym_eval_of_a_damaged_agent_folder_says_what_is_wrong(tmp_path: Path, how: str, expect: str) -> None:
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.gym.evaluate import evaluate_saved

    agent = ActorCritic(4, "discrete", 2, {"hidden": [8, 8], "activation": "tanh", "shared": False,
                                           "ortho_init": True, "log_std_init": 0.0})
    agent.context = {"env": {"id": "CartPole-v1", "num_envs": 1, "vector": "sync", "max_episode_steps": 20,
                             "kwargs": {}}}
    agent.save_pretrained(str(tmp_path / "agent"))
    assert evaluate_saved(str(tmp_path / "agent"), episodes=1, seed=0)["eval/length"] <= 20  # intact: works
    _corrupt(tmp_path / "agent", how)
    with pytest.raises(RlhfkitError, match=expect):
        evaluate_saved(str(tmp_path / "agent"), episodes=1, seed=0)
    if how == "json":  # and on the command line: exit code 2, no traceback
        res = _cli("gym", "eval", str(tmp_path / "agent"), cwd=tmp_path)
        assert res.returncode == 2 and re.search(expect, res.stderr) and "Traceback" not in res.stderr


def test_resume_with_a_foreign_optimizer_state_is_a_clear_error(tmp_path: Path) -> None:
    from rlhfkit.errors import RlhfkitError

    out = tmp_path / "run"
    args = _args(out, "ppo.total_steps=256", "save_every=1", "save_total_limit=0", "eval.every=0")
    train(load_config(GymPPOConfig, None, args))
    ckpt = out / "checkpoints" / "step-00000001"
    # what a checkpoint of the per-tensor optimizer (before the flat parameter buffer) looks like
    agent = ActorCritic(4, "discrete", 2, {"hidden": [64, 64], "activation": "tanh", "shared": False,
                                           "ortho_init": True, "log_std_init": 0.0})
    torch.save(torch.optim.Adam(agent.parameters()).state_dict(), ckpt / "optimizer.pt")
    (ckpt / "manifest.json").unlink()  # such old checkpoints had no manifest (it would call the file damaged)
    with pytest.raises(RlhfkitError, match="optimizer state does not fit"):
        train(load_config(GymPPOConfig, None, args), resume=str(ckpt))


def test_the_gradient_path_is_chosen_by_ppo_grad_and_logged(tmp_path: Path, capsys) -> None:
    from rlhfkit.gym.fastgrad import FlatParams, PPOGrad
    from rlhfkit.gym.ppo import build_agent, gradient_path

    env = gym.make("CartPole-v1")
    split = build_agent(env, {"hidden": [8], "activation": "tanh", "shared": False, "ortho_init": True})
    shared = build_agent(env, {"hidden": [8], "activation": "tanh", "shared": True, "ortho_init": True})
    assert isinstance(gradient_path(split, FlatParams(split), "auto", "ppo"), PPOGrad)
    assert isinstance(gradient_path(split, FlatParams(split), "manual", "ppo"), PPOGrad)
    assert gradient_path(split, FlatParams(split), "autograd", "ppo") is None
    assert gradient_path(shared, FlatParams(shared), "auto", "ppo") is None  # no hand-written path: autograd
    with pytest.raises(ConfigError, match=r"ppo\.grad.*no hand-written gradients"):
        gradient_path(shared, FlatParams(shared), "manual", "ppo")
    with pytest.raises(ConfigError, match=r"mappo\.grad.*expected auto, autograd or manual"):
        gradient_path(split, FlatParams(split), "fast", "mappo")

    # the same run on either path: the hand-written gradients are pinned to autograd's (test_gym_fastgrad),
    # so the metrics agree to float noise; the path taken is printed
    runs = {}
    for grad in ("manual", "autograd"):
        out = tmp_path / grad
        train(load_config(GymPPOConfig, None, _args(out, "ppo.total_steps=256", f"ppo.grad={grad}")))
        printed = capsys.readouterr().out
        assert ("gradients: hand-written (gym/fastgrad.py)" if grad == "manual" else "gradients: autograd") in printed
        runs[grad] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/policy_loss" in x]
    for a, b in zip(runs["manual"], runs["autograd"]):
        assert a["train/policy_loss"] == pytest.approx(b["train/policy_loss"], abs=1e-4)
        assert a["train/value_loss"] == pytest.approx(b["train/value_loss"], rel=1e-3)
