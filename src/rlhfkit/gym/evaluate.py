"""`rlhfkit gym eval`: load a saved control agent (final `agent/` folder or a checkpoint) and run it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.errors import RlhfkitError
from rlhfkit.gym.common import EnvConfig, ObsNormalizer, SavableAgent, evaluate_policy


def _agent_class(kind: str, path: Path) -> Any:
    if kind == "ppo":
        from rlhfkit.gym.ppo import ActorCritic

        return ActorCritic
    if kind == "dqn":
        from rlhfkit.gym.dqn import QAgent

        return QAgent
    if kind == "mappo":
        from rlhfkit.gym.mappo import MAActorCritic

        return MAActorCritic
    raise RlhfkitError(f"{path}: field 'type': unknown agent type {kind!r} (expected ppo, dqn or mappo)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RlhfkitError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise RlhfkitError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_agent(folder: str | Path) -> tuple[SavableAgent, dict[str, Any], dict[str, Any] | None]:
    """(agent in eval mode, its agent.json, normalizer statistics or None) from an agent or checkpoint folder."""
    folder = Path(folder)
    model_dir = folder / "model" if (folder / "model" / "agent.json").is_file() else folder
    spec_path = model_dir / "agent.json"
    if not spec_path.is_file():
        raise RlhfkitError(f"{folder}: no agent.json; expected the agent/ folder of an `rlhfkit gym` run "
                           "or one of its checkpoints/step-N folders")
    spec = _read_json(spec_path)
    agent = _agent_class(spec.get("type", ""), spec_path)
    try:
        model = agent.from_spec(spec)
    except KeyError as exc:
        raise RlhfkitError(f"{spec_path}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise RlhfkitError(f"{spec_path}: a field has the wrong type or value ({exc})") from None
    if not (model_dir / "model.safetensors").is_file():
        raise RlhfkitError(f"{model_dir}: no model.safetensors next to agent.json")
    try:
        model.load_checkpoint_weights(model_dir)
    except RlhfkitError:
        raise
    except Exception as exc:  # a truncated or foreign safetensors file, or shapes that differ from agent.json
        raise RlhfkitError(f"{model_dir / 'model.safetensors'}: cannot load the weights: {exc}") from None
    norms = None
    if (model_dir / "normalizers.json").is_file():
        norms = _read_json(model_dir / "normalizers.json")
    elif (folder / "state.json").is_file():
        norms = _read_json(folder / "state.json").get("normalizers")
    return model.eval(), spec, norms


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
