"""The numpy CartPole (rlhfkit.gym.vector_cartpole) against gymnasium's SyncVectorEnv of CartPoleEnv,
stepped side by side with SAME_STEP autoreset: same observations, rewards, ends, final observations and
resets, and `make_vector_env` picks it only where it reproduces gym.make."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rlhfkit.gym.common import EnvConfig, make_vector_env
from rlhfkit.gym.vector_cartpole import CartPoleVec


def _sync(n: int, **kwargs) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1", **kwargs) for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


@pytest.mark.parametrize("limit", [500, 40])
def test_matches_sync_vector_env_step_for_step(limit: int) -> None:
    n = 6
    ref, ours = _sync(n, max_episode_steps=limit), CartPoleVec(n, max_episode_steps=limit)
    seeds = [11 * i + 3 for i in range(n)]
    o_ref, _ = ref.reset(seed=seeds)
    o_ours, _ = ours.reset(seed=seeds)
    np.testing.assert_array_equal(o_ours, o_ref)
    rng = np.random.default_rng(0)
    # Mostly one direction for stretches, so episodes both fail early and (with limit 40) run to the limit.
    actions = rng.integers(0, 2, size=(3000, n))
    ends = {"terminated": 0, "truncated": 0}
    for t in range(3000):
        a = actions[t] if t % 200 < 150 else (o_ref[:, 2] > 0).astype(np.int64)  # a balancing stretch
        r1, r2 = ref.step(a), ours.step(a)
        np.testing.assert_allclose(r2[0], r1[0], rtol=0, atol=1e-6, err_msg=f"obs at step {t}")
        np.testing.assert_array_equal(r2[1], r1[1])
        np.testing.assert_array_equal(r2[2], r1[2], err_msg=f"terminated at step {t}")
        np.testing.assert_array_equal(r2[3], r1[3], err_msg=f"truncated at step {t}")
        done = r1[2] | r1[3]
        ends["terminated"] += int(r1[2].sum())
        ends["truncated"] += int((r1[3] & ~r1[2]).sum())
        if done.any():
            np.testing.assert_array_equal(r2[4]["_final_obs"], r1[4]["_final_obs"])
            for i in np.flatnonzero(done):
                np.testing.assert_allclose(r2[4]["final_obs"][i], r1[4]["final_obs"][i], rtol=0, atol=1e-6)
        else:
            assert "final_obs" not in r2[4]
        o_ref = r1[0]
    assert ends["terminated"] > 20
    if limit == 40:
        assert ends["truncated"] > 5


def test_int_seed_and_reward_variant() -> None:
    ref, ours = _sync(3, sutton_barto_reward=True), CartPoleVec(3, sutton_barto_reward=True)
    np.testing.assert_array_equal(ours.reset(seed=5)[0], ref.reset(seed=5)[0])
    for _ in range(60):
        r1, r2 = ref.step(np.ones(3, np.int64)), ours.step(np.ones(3, np.int64))
        np.testing.assert_array_equal(r2[1], r1[1])
        np.testing.assert_array_equal(r2[2], r1[2])
    assert (ref.step(np.zeros(3, np.int64))[1] <= 0).all()


def test_bad_actions_are_refused() -> None:
    env = CartPoleVec(2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="2 actions"):
        env.step(np.array([0, 2]))
    with pytest.raises(ValueError, match="2 actions"):
        env.step(np.array([0]))
    with pytest.raises(ValueError, match="2 seeds"):
        env.reset(seed=[1, 2, 3])


def test_make_vector_env_chooses_it_only_where_it_is_the_same_env() -> None:
    assert isinstance(make_vector_env(EnvConfig(num_envs=2)), CartPoleVec)
    env = make_vector_env(EnvConfig(num_envs=2, max_episode_steps=30))
    assert isinstance(env, CartPoleVec) and env.max_episode_steps == 30
    assert isinstance(make_vector_env(EnvConfig(num_envs=2, vector="sync")), gym.vector.SyncVectorEnv)
    assert isinstance(make_vector_env(EnvConfig(num_envs=2), render_mode="rgb_array"), gym.vector.SyncVectorEnv)
    assert isinstance(make_vector_env(EnvConfig(id="Acrobot-v1", num_envs=2)), gym.vector.SyncVectorEnv)
