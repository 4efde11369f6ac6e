"""`rlhfkit gym eval`: load a saved control agent (final `agent/` folder or a checkpoint) and run it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from rlhfkit.errors import RlhfkitError
from rlhfkit.gym.agents import load_agent
from rlhfkit.gym.common import EnvConfig, ObsNormalizer, evaluate_policy

__all__ = ["evaluate_saved", "load_agent", "quiet_rendering"]


def _env_config(cls: Any, spec: dict[str, Any], folder: str) -> Any:
    try:
        return cls(**spec["env"])
    except TypeError as exc:
        raise RlhfkitError(f"{folder}: agent.json field 'env' does not describe an environment ({exc})") from None


@contextlib.contextmanager
def quiet_rendering() -> Iterator[None]:
    """Keep SDL quiet while frames are rendered for a GIF, then restore the environment variables.

    Rendering starts pygame, whose SDL probes for a sound device and a Wayland display; on a headless
    machine that prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` (and ALSA
    complaints) although nothing fails. Off-screen frames need neither, so unless the user chose them,
    audio goes to SDL's dummy driver and the runtime folder is an empty private one.
    """
    saved = {k: os.environ.get(k) for k in ("SDL_AUDIODRIVER", "XDG_RUNTIME_DIR")}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-sdl-") as runtime_dir:
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        os.environ.setdefault("XDG_RUNTIME_DIR", runtime_dir)  # mode 0700, as the XDG spec asks
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def evaluate_saved(folder: str, *, episodes: int, seed: int, gif: str = "", deterministic: bool = True
                   ) -> dict[str, float]:
    with quiet_rendering() if gif else contextlib.nullcontext():
        return _evaluate_saved(folder, episodes=episodes, seed=seed, gif=gif, deterministic=deterministic)


def _evaluate_saved(folder: str, *, episodes: int, seed: int, gif: str, deterministic: bool) -> dict[str, float]:
    agent, spec, norms = load_agent(folder)
    if not isinstance(spec.get("env"), dict):
        raise RlhfkitError(f"{folder}: agent.json names no environment (field 'env')")

    def act(obs: np.ndarray) -> np.ndarray:
        return agent.act(obs, deterministic=deterministic)  # type: ignore[operator]

    if spec["type"] == "mappo":
        from rlhfkit.gym.mappo import ParallelEnvConfig, evaluate_parallel

        return evaluate_parallel(act, _env_config(ParallelEnvConfig, spec, folder), episodes=episodes, seed=seed,
                                 agent_id_feature=bool(spec.get("agent_id_feature", True)), record=gif)
    env_cfg = _env_config(EnvConfig, spec, folder)
    normalize = None
    if spec.get("normalize_obs") and norms is not None:
        normalize = ObsNormalizer(int(spec["obs_dim"]), True, float(spec.get("clip_obs", 10.0)))
        normalize.rms.load_state_dict(norms["obs"])
    return evaluate_policy(act, env_cfg, episodes=episodes, seed=seed, normalize=normalize, record=gif)
