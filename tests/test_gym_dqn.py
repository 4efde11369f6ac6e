"""DQN on gymnasium: replay transitions at episode ends, TD targets, epsilon, a CartPole smoke run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.gym.dqn import GymDQNConfig, QAgent, ReplayBuffer, _Run, dqn_targets, epsilon_at, train


class Corridor(gym.Env):
    """Action 1 moves right; reaching position 3 terminates (reward 1). Observation: (position, time in
    the episode), so a final observation never equals the next episode's first one (time 0)."""

    observation_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.pos, self.t = 0, 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.pos += int(action)
        self.t += 1
        done = self.pos >= 3
        return self._obs(), float(done), done, False, {}

    def _obs(self) -> np.ndarray:
        return np.array([self.pos, self.t], np.float32)


if "RlhfkitTest/Corridor-v0" not in gym.registry:
    gym.register(id="RlhfkitTest/Corridor-v0", entry_point=Corridor)


def _cfg(out: Path, *extra: str) -> GymDQNConfig:
    return load_config(GymDQNConfig, None, [f"output_dir={out}", "progress=false", "tensorboard=false", *extra])


def _recording_run(cfg: GymDQNConfig, vec_steps: int) -> tuple[_Run, list]:
    """A _Run collecting `vec_steps` uniformly random steps, with every envs.step result recorded."""
    env = gym.make(cfg.env.id)
    run = _Run(cfg, int(env.action_space.n), torch.device("cpu"))
    agent = QAgent(run.obs_dim, int(env.action_space.n), dict(cfg.net.__dict__))
    run.restart(0)
    log: list = []
    inner = run.envs.step

    def step(actions: np.ndarray) -> tuple:
        out = inner(actions)
        log.append((run.obs.copy(), np.array(actions), *out))
        return out

    run.envs.step = step  # type: ignore[method-assign]
    run.collect(agent, vec_steps)
    run.envs.close()
    return run, log


def _check_transitions(run: _Run, log: list) -> tuple[int, int]:
    """Every stored row against what the env returned; (#terminated, #truncated) episode ends seen."""
    n = run.cfg.env.num_envs
    ends = [0, 0]
    buf = run.buffer
    for t, (obs, actions, next_obs, reward, terminated, truncated, infos) in enumerate(log):
        for i in range(n):
            k = t * n + i
            np.testing.assert_array_equal(buf.obs[k], obs[i])
            assert buf.actions[k] == actions[i] and buf.rewards[k] == np.float32(reward[i])
            assert buf.terminated[k] == float(terminated[i])  # truncation is not termination
            if terminated[i] or truncated[i]:
                ends[0 if terminated[i] else 1] += 1
                np.testing.assert_array_equal(buf.next_obs[k], infos["final_obs"][i])
                assert not np.array_equal(buf.next_obs[k], next_obs[i])  # not the next episode's reset obs
                if t + 1 < len(log):  # the next stored step starts from the reset observation
                    np.testing.assert_array_equal(buf.obs[k + n], next_obs[i])
            else:
                np.testing.assert_array_equal(buf.next_obs[k], next_obs[i])
    return ends[0], ends[1]


def test_buffer_stores_real_final_obs_and_truncation_is_not_termination(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "r", "env.num_envs=2", "env.max_episode_steps=5", "dqn.learning_starts=100000")
    run, log = _recording_run(cfg, 23)
    assert len(run.buffer) == 46 and run.env_steps == 46
    terminated, truncated = _check_transitions(run, log)
    assert terminated == 0 and truncated == 8  # CartPole cannot fall within 5 steps: every end is a time limit
    assert not run.buffer.terminated[:46].any()


def test_buffer_terminated_flag_on_a_hand_built_env(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "r", "env.id=RlhfkitTest/Corridor-v0", "env.num_envs=2", "env.max_episode_steps=4",
               "dqn.learning_starts=100000", "seed=3")
    run, log = _recording_run(cfg, 40)
    terminated, truncated = _check_transitions(run, log)
    assert terminated > 0 and truncated > 0
    stored = run.buffer.terminated[:80] > 0
    np.testing.assert_array_equal(run.buffer.next_obs[:80][stored, 0], 3.0)  # the terminal position, not 0


def test_replay_buffer_wraps_around() -> None:
    buf = ReplayBuffer(3, 1)
    for v in range(5):
        buf.add(np.array([[v]]), np.array([v]), np.array([v]), np.array([[v + 0.5]]), np.array([0.0]))
    assert len(buf) == 3 and sorted(buf.actions.tolist()) == [2, 3, 4]
    b = buf.sample(50, torch.device("cpu"))
    assert set(b.actions.tolist()) <= {2, 3, 4}
    torch.testing.assert_close(b.next_obs[:, 0], b.obs[:, 0] + 0.5)


def test_dqn_and_double_dqn_targets_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.5, -1.0])
    online = torch.tensor([[1.0, 3.0], [2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[10.0, 4.0], [5.0, 7.0], [2.0, 6.0]])
    terminated = torch.tensor([0.0, 0.0, 1.0])
    # DQN: r + 0.9 * max_a Q_target(s', a); terminated: r only.
    torch.testing.assert_close(dqn_targets(rewards, None, target, terminated, 0.9, False),
                               torch.tensor([1.0 + 9.0, 0.5 + 6.3, -1.0]))
    # Double DQN: the online net picks a* = (1, 0, 1); the target net values it: (4, 5, 6).
    torch.testing.assert_close(dqn_targets(rewards, online, target, terminated, 0.9, True),
                               torch.tensor([1.0 + 3.6, 0.5 + 4.5, -1.0]))
    with pytest.raises(ValueError):
        dqn_targets(rewards, None, target, terminated, 0.9, True)


def test_epsilon_schedule() -> None:
    def eps(step: int, fraction: float = 0.16) -> float:
        return epsilon_at(step, 1000, 1.0, 0.04, fraction)

    assert eps(0) == 1.0
    assert eps(80) == pytest.approx(0.52)  # half-way through the decay
    assert eps(40) == pytest.approx(0.76)
    assert eps(160) == pytest.approx(0.04) and eps(999) == pytest.approx(0.04) and eps(5000) == pytest.approx(0.04)
    assert eps(0, fraction=0.0) == 0.04


def test_target_update_hard_and_soft() -> None:
    agent = QAgent(3, 2, {"hidden": [4], "activation": "relu"})
    for p in agent.target.parameters():
        assert not p.requires_grad
    with torch.no_grad():
        for p in agent.q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in agent.target.parameters()]
    agent.update_target(0.25)
    for t, s, b in zip(agent.target.parameters(), agent.q.parameters(), before):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    agent.update_target(1.0)
    for t, s in zip(agent.target.parameters(), agent.q.parameters()):
        torch.testing.assert_close(t, s)


SMOKE = ["dqn.total_steps=2048", "dqn.learning_starts=256", "dqn.gradient_steps=8", "dqn.train_freq=256",
         "dqn.batch_size=32", "dqn.target_update_interval=100", "net.hidden=[32,32]", "eval.every=1024",
         "eval.episodes=2", "env.max_episode_steps=100", "save_every=4", "save_total_limit=0"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cartpole_smoke_run_checkpoints_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rlhfkit.gym.evaluate import load_agent

    out = tmp_path / "run"
    cfg = _cfg(out, *SMOKE, "dqn.double_dqn=true")
    assert cfg.env.num_envs == 1 and cfg.net.activation == "relu"
    agent_dir = train(cfg)
    assert agent_dir == out / "agent"
    rows = _rows(out)
    train_rows = [r for r in rows if "train/epsilon" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [r["env_steps"] for r in train_rows] == [256.0 * k for k in range(1, 9)]
    assert "train/loss" not in train_rows[0] and np.isfinite(train_rows[1]["train/loss"])  # learning starts at 256
    assert all(k in train_rows[-1] for k in ("train/loss", "train/q_mean", "time/sps", "buffer/size"))
    assert train_rows[0]["train/epsilon"] == pytest.approx(epsilon_at(256, 2048, 1.0, 0.04, 0.16)) and train_rows[-1]["train/epsilon"] == pytest.approx(0.04)
    assert any("episode/return" in r for r in rows)
    assert sum("eval/return" in r for r in rows) == 2  # at 1024 and 2048 steps
    state = json.loads((out / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["env_steps"] == 2048 and state["target_updates"] == 20 and state["gradient_steps"] == 7 * 8

    agent, spec, _ = load_agent(agent_dir)
    assert isinstance(agent, QAgent) and spec["type"] == "dqn" and spec["env"]["id"] == "CartPole-v1"
    fresh = QAgent.from_spec(json.loads((agent_dir / "agent.json").read_text()))
    fresh.load_checkpoint_weights(agent_dir)
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(agent.act(obs), fresh.act(obs))
    ckpt_agent, _, _ = load_agent(out / "checkpoints" / "step-00000008")
    np.testing.assert_array_equal(ckpt_agent.act(obs), agent.act(obs))

    # Resume from the middle: the schedule (steps, epsilon, target updates, gradient steps) continues.
    capsys.readouterr()
    train(_cfg(out, *SMOKE, "dqn.double_dqn=true"), resume=str(out / "checkpoints" / "step-00000004"))
    assert "refilled with 256 transitions" in capsys.readouterr().out
    resumed = [r for r in _rows(out) if "train/epsilon" in r]
    assert [r["step"] for r in resumed] == list(range(1, 9))  # rows after the checkpoint were replaced
    for a, b in zip(train_rows, resumed):
        for key in ("env_steps", "train/epsilon", "train/target_updates", "train/gradient_steps"):
            assert a[key] == b[key], key
    again = json.loads((out / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert {k: again[k] for k in ("env_steps", "target_updates", "gradient_steps")} == \
        {k: state[k] for k in ("env_steps", "target_updates", "gradient_steps")}
    assert again["train_seconds"] > 0


def test_box_actions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"env.id.*Pendulum-v1.*Discrete"):
        train(_cfg(tmp_path / "run", "env.id=Pendulum-v1"))
    assert not (tmp_path / "run").exists()


def test_refuses_several_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RlhfkitError, match="one process"):
        train(_cfg(tmp_path / "run"))
