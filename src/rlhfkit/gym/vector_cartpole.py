"""CartPole-v1 stepped for all environments at once in numpy, with SAME_STEP autoreset.

`gym.vector.SyncVectorEnv` steps each CartPole in a Python loop through four wrappers; at 8 environments
that loop costs more than the policy's forward pass. Gymnasium's own numpy CartPole
(`gym.make_vec(..., vectorization_mode="vector_entry_point")`) resets NEXT_STEP (a done environment
returns a dummy transition on the following step) and keeps no final observation, so truncated
episodes could not bootstrap. This class is a drop-in for the SyncVectorEnv that
`rlhfkit.gym.common.make_vector_env` builds:

- the same physics as `gymnasium.envs.classic_control.CartPoleEnv` (Euler, float64 state, float32
  observations), the same termination bounds, and a time limit as `TimeLimit` applies it;
- SAME_STEP autoreset: the step that ends an episode returns the next episode's first observation,
  with the real last one in `infos["final_obs"]` (and the `_final_obs` mask), as SyncVectorEnv does;
- one random generator per environment, seeded and drawn exactly as each `CartPoleEnv.reset` would, so
  a seeded run starts and restarts its episodes in the same states as with SyncVectorEnv.

`tests/test_gym_vector_cartpole.py` steps both side by side on random actions. The trajectories agree to
the last bit where numpy's vectorized sin/cos round like its scalar ones; where they differ it is by an
ulp (floating-point noise, not a different environment).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding

_GRAVITY, _MASSCART, _MASSPOLE, _LENGTH, _FORCE, _TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
_TOTAL = _MASSPOLE + _MASSCART
_POLEMASS_LENGTH = _MASSPOLE * _LENGTH
_THETA_LIMIT = 12 * 2 * math.pi / 360
_X_LIMIT = 2.4


class CartPoleVec(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int, max_episode_steps: int = 500, sutton_barto_reward: bool = False):
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.sutton_barto_reward = sutton_barto_reward
        high = np.array([_X_LIMIT * 2, np.inf, _THETA_LIMIT * 2, np.inf], dtype=np.float32)
        self.single_observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.render_mode = None
        self.state = np.zeros((num_envs, 4), np.float64)
        self.elapsed = np.zeros(num_envs, np.int64)
        self.rngs: list[np.random.Generator] = [seeding.np_random()[0] for _ in range(num_envs)]

    def _draw(self, i: int) -> None:
        self.state[i] = self.rngs[i].uniform(low=-0.05, high=0.05, size=(4,))
        self.elapsed[i] = 0

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if options:
            raise ValueError("CartPoleVec.reset takes no options")
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(self.num_envs)]  # SyncVectorEnv's rule for one int
        else:
            if len(seed) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seed)}")
            seeds = list(seed)
        for i, s in enumerate(seeds):
            if s is not None:
                self.rngs[i] = seeding.np_random(s)[0]
            self._draw(i)
        return self.state.astype(np.float32), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or not np.isin(actions, (0, 1)).all():
            raise ValueError(f"expected {self.num_envs} actions in {{0, 1}}, got {actions!r}")
        x, x_dot, theta, theta_dot = self.state.T
        force = np.where(actions == 1, _FORCE, -_FORCE)
        costheta, sintheta = np.cos(theta), np.sin(theta)
        # The same expression order as CartPoleEnv.step, so the float64 results match it.
        temp = (force + _POLEMASS_LENGTH * np.square(theta_dot) * sintheta) / _TOTAL
        thetaacc = (_GRAVITY * sintheta - costheta * temp) / (_LENGTH * (4.0 / 3.0 - _MASSPOLE * np.square(costheta) / _TOTAL))
        xacc = temp - _POLEMASS_LENGTH * thetaacc * costheta / _TOTAL
        x, x_dot = x + _TAU * x_dot, x_dot + _TAU * xacc
        theta, theta_dot = theta + _TAU * theta_dot, theta_dot + _TAU * thetaacc
        self.state = np.stack((x, x_dot, theta, theta_dot), axis=1)
        terminated = (x < -_X_LIMIT) | (x > _X_LIMIT) | (theta < -_THETA_LIMIT) | (theta > _THETA_LIMIT)
        self.elapsed += 1
        truncated = self.elapsed >= self.max_episode_steps
        if self.sutton_barto_reward:
            reward = np.where(terminated, -1.0, 0.0)
        else:
            reward = np.ones(self.num_envs, np.float64)
        obs = self.state.astype(np.float32)
        infos: dict[str, Any] = {}
        done = terminated | truncated
        if done.any():
            final = np.empty(self.num_envs, dtype=object)
            for i in np.flatnonzero(done):
                final[i] = obs[i].copy()
                self._draw(int(i))
                obs[i] = self.state[i]
            infos = {"final_obs": final, "_final_obs": done.copy(), "final_info": {}, "_final_info": done.copy()}
        return obs, reward, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        pass


def is_plain_cartpole(env_id: str, kwargs: dict, render_mode: str | None) -> bool:
    """Whether `gym.make(env_id, **kwargs)` is CartPole-v1 with nothing CartPoleVec does not reproduce."""
    return env_id == "CartPole-v1" and render_mode is None and set(kwargs) <= {"max_episode_steps", "sutton_barto_reward"}
