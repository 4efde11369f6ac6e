"""rlhfkit gym mappo on simple_spread: smoke runs of both critics, critic input sizes, exact resume,
value-normalizer state, and errors for bad environments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("mpe2")

from rlhfkit.config import load_config  # noqa: E402
from rlhfkit.errors import ConfigError, RlhfkitError  # noqa: E402
from rlhfkit.gym.mappo import (  # noqa: E402
    Features,
    GymMAPPOConfig,
    ParallelEnvConfig,
    ValueNormalizer,
    evaluate_parallel,
    inspect_env,
    load_agent,
    make_parallel_env,
    train,
)

SPREAD = "mpe2.simple_spread_v3:parallel_env"


def _cfg(out: Path, *extra: str) -> GymMAPPOConfig:
    return load_config(GymMAPPOConfig, overrides=[
        f"output_dir={out}", "progress=false", "tensorboard=false", f"env.id={SPREAD}", "env.num_envs=4",
        "mappo.n_steps=25", "mappo.epochs=4", "eval.episodes=2", *extra])


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _spread_spec(n: int = 3) -> Any:
    env = make_parallel_env(ParallelEnvConfig(id=SPREAD, num_envs=1, kwargs={"N": n, "max_cycles": 25,
                                                                              "continuous_actions": False}))
    return inspect_env(env, SPREAD)


@pytest.mark.parametrize("critic", ["centralized", "independent"])
def test_smoke_run_writes_metrics_and_agent(tmp_path: Path, critic: str) -> None:
    out = tmp_path / critic
    agent_dir = train(_cfg(out, f"mappo.critic={critic}", "mappo.total_steps=2000", "eval.every=1000"))
    rows = _rows(out)
    train_rows = [r for r in rows if "train/policy_loss" in r]
    assert len(train_rows) == 20  # 2000 steps / (4 envs x 25 steps)
    for key in ("train/value_loss", "train/entropy", "train/approx_kl", "train/explained_variance",
                "train/value_norm_std", "time/sps", "env_steps", "episode/return", "episode/length"):
        assert all(key in r and np.isfinite(r[key]) for r in train_rows), key
    assert train_rows[0]["episode/length"] == 25.0  # max_cycles, in environment steps
    assert train_rows[-1]["env_steps"] == 2000.0
    evals = [r for r in rows if "eval/return" in r]
    assert [r["step"] for r in evals] == [10, 20] and all(r["eval/length"] == 25.0 for r in evals)
    assert evals[-1]["eval/return"] < 0  # simple_spread rewards are negative distances / collisions
    for name in ("model.safetensors", "agent.json", "value_norm.json"):
        assert (agent_dir / name).is_file()
    spec = json.loads((agent_dir / "agent.json").read_text())
    assert spec["critic"] == critic and spec["n_agents"] == 3
    # The saved agent acts as the trained one (deterministic eval gives the logged return).
    agent = load_agent(agent_dir)
    again = evaluate_parallel(agent.act, ParallelEnvConfig(id=SPREAD, kwargs=_cfg(out).env.kwargs), episodes=2,
                              seed=1 + 100_000)
    assert again["eval/return"] == pytest.approx(evals[-1]["eval/return"], abs=1e-6)
    # ... and so does `rlhfkit gym eval` (the env config travels in agent.json)
    from rlhfkit.gym.evaluate import evaluate_saved

    saved = evaluate_saved(str(agent_dir), episodes=2, seed=1 + 100_000)
    assert saved["eval/return"] == pytest.approx(evals[-1]["eval/return"], abs=1e-6)


def test_critic_input_sizes() -> None:
    for n in (3, 2):
        spec = _spread_spec(n)
        obs_dim = spec.obs_dim
        central = Features(spec, "centralized", agent_id=True)
        independent = Features(spec, "independent", agent_id=True)
        assert central.critic_dim == n * obs_dim + n
        assert independent.critic_dim == obs_dim + n
        assert central.actor_dim == independent.actor_dim == obs_dim + n
        assert Features(spec, "centralized", agent_id=False).critic_dim == n * obs_dim
        obs = np.random.default_rng(0).normal(size=(5, n, obs_dim)).astype(np.float32)
        packed = central.packed(obs, obs.reshape(5, -1))
        assert packed.shape == (5, n, central.actor_dim + central.critic_dim)
        # every agent sees the same global state, followed by its own one-hot id
        critic_part = packed[..., central.actor_dim:]
        np.testing.assert_array_equal(critic_part[:, 0, : n * obs_dim], critic_part[:, -1, : n * obs_dim])
        np.testing.assert_array_equal(critic_part[0, :, n * obs_dim:], np.eye(n))
        # agent-specific global state: [own observation | global state | id]
        own = Features(spec, "centralized", agent_id=True, own_obs=True)
        assert own.critic_dim == (n + 1) * obs_dim + n
        critic_part = own.packed(obs, obs.reshape(5, -1))[..., own.actor_dim:]
        np.testing.assert_array_equal(critic_part[..., :obs_dim], obs)
        np.testing.assert_array_equal(critic_part[:, 0, obs_dim:-n], obs.reshape(5, -1))
        np.testing.assert_array_equal(critic_part[0, :, -n:], np.eye(n))
    assert _spread_spec(3).obs_dim == 18


def test_resume_continues_exactly(tmp_path: Path) -> None:
    extra = ("env.num_envs=2", "mappo.total_steps=300", "save_every=3", "save_total_limit=0", "eval.every=100")
    full = tmp_path / "full"
    train(_cfg(full, *extra))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "agent")
    state = json.loads((part / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["value_norm"]["count"] > 1  # value-normalizer statistics travel with the checkpoint
    train(_cfg(part, *extra), resume=str(part / "checkpoints" / "step-00000003"))
    a, b = _rows(full), _rows(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] and max(r["step"] for r in a) == 6
    after = [(x, y) for x, y in zip(a, b) if x["step"] > 3]
    assert len(after) >= 4 and any("eval/return" in x for x, _ in after)
    for x, y in after:
        keys = {k for k in x if not k.startswith("time/")}
        assert keys == {k for k in y if not k.startswith("time/")}
        for k in keys:
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
    wa = load_agent(full / "agent").state_dict()
    wb = load_agent(part / "agent").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_value_normalizer_round_trip() -> None:
    vn = ValueNormalizer(True)
    rng = np.random.default_rng(0)
    for _ in range(3):
        vn.update(torch.as_tensor(rng.normal(-20.0, 5.0, size=300)))
    assert vn.rms.mean == pytest.approx(-20.0, abs=1.0) and np.sqrt(vn.rms.var) == pytest.approx(5.0, rel=0.1)
    x = torch.linspace(-40, 0, 9)
    torch.testing.assert_close(vn.denormalize(vn.normalize(x)), x, rtol=0, atol=1e-4)
    restored = ValueNormalizer(True)
    restored.load_state_dict(json.loads(json.dumps(vn.state_dict())))
    assert restored.state_dict() == vn.state_dict()
    torch.testing.assert_close(restored.normalize(x), vn.normalize(x), rtol=0, atol=0)
    off = ValueNormalizer(False)
    off.update(x)
    assert off.normalize(x) is x and off.denormalize(x) is x


def test_bad_env_id_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"env\.id") as exc:
        train(_cfg(tmp_path / "bad", "env.id=nomodule:fn"))
    assert "nomodule" in str(exc.value)
    assert not (tmp_path / "bad").exists()  # fails before the run folder is written
    with pytest.raises(ConfigError, match=r"env\.id"):
        load_config(GymMAPPOConfig, overrides=["env.id=no_colon_here"])
    with pytest.raises(ConfigError, match=r"env\.id.*no function"):
        make_parallel_env(ParallelEnvConfig(id="mpe2.simple_spread_v3:nope"))
    with pytest.raises(ConfigError, match=r"env\.kwargs"):
        make_parallel_env(ParallelEnvConfig(id="tests.test_gym_mappo:hetero_env", kwargs={"bogus": 1}))


def test_box_actions_and_heterogeneous_agents_are_refused() -> None:
    box = make_parallel_env(ParallelEnvConfig(id=SPREAD, kwargs={"N": 2, "continuous_actions": True}))
    with pytest.raises(ConfigError, match=r"continuous \(Box\) actions"):
        inspect_env(box, SPREAD)
    with pytest.raises(ConfigError, match="heterogeneous agents"):
        inspect_env(make_parallel_env(ParallelEnvConfig(id="tests.test_gym_mappo:hetero_env", kwargs={})), "hetero")
    with pytest.raises(RlhfkitError, match="not a PettingZoo ParallelEnv"):
        make_parallel_env(ParallelEnvConfig(id="mpe2.simple_spread_v3:env", kwargs={}))


class _Hetero:
    """A minimal parallel env whose two agents see observations of different sizes."""

    possible_agents = ["a", "b"]

    def observation_space(self, agent: str) -> gym.spaces.Box:
        return gym.spaces.Box(-1, 1, (3 if agent == "a" else 4,))

    def action_space(self, agent: str) -> gym.spaces.Discrete:
        return gym.spaces.Discrete(2)

    def reset(self, seed: int | None = None, options: dict | None = None) -> Any:
        raise NotImplementedError

    def step(self, actions: dict) -> Any:
        raise NotImplementedError


def hetero_env() -> _Hetero:
    return _Hetero()
