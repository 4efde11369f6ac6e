"""`rlhfkit gym eval`: load a saved control agent (final `agent/` folder or a checkpoint) and run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.errors import RlhfkitError
from rlhfkit.gym.common import EnvConfig, ObsNormalizer, SavableAgent, evaluate_policy


def _agent_class(kind: str) -> Any:
    if kind == "ppo":
        from rlhfkit.gym.ppo import ActorCritic

        return ActorCritic
    if kind == "dqn":
        from rlhfkit.gym.dqn import QAgent

        return QAgent
    raise RlhfkitError(f"unknown agent type '{kind}' in agent.json (expected ppo or dqn)")


def load_agent(folder: str | Path) -> tuple[SavableAgent, dict[str, Any], dict[str, Any] | None]:
    """(agent in eval mode, its agent.json, normalizer statistics or None) from an agent or checkpoint folder."""
    folder = Path(folder)
    model_dir = folder / "model" if (folder / "model" / "agent.json").is_file() else folder
    spec_path = model_dir / "agent.json"
    if not spec_path.is_file():
        raise RlhfkitError(f"{folder}: no agent.json; expected the agent/ folder of an `rlhfkit gym` run "
                           "or one of its checkpoints/step-N folders")
    spec = json.loads(spec_path.read_text())
    agent = _agent_class(spec.get("type", ""))
    model = agent.from_spec(spec)
    model.load_checkpoint_weights(model_dir)
    norms = None
    if (model_dir / "normalizers.json").is_file():
        norms = json.loads((model_dir / "normalizers.json").read_text())
    elif (folder / "state.json").is_file():
        norms = json.loads((folder / "state.json").read_text()).get("normalizers")
    return model.eval(), spec, norms


def evaluate_saved(folder: str, *, episodes: int, seed: int, gif: str = "", deterministic: bool = True
                   ) -> dict[str, float]:
    agent, spec, norms = load_agent(folder)
    if "env" not in spec:
        raise RlhfkitError(f"{folder}: agent.json names no environment")
    env_cfg = EnvConfig(**spec["env"])
    normalize = None
    if spec.get("normalize_obs") and norms is not None:
        normalize = ObsNormalizer(int(spec["obs_dim"]), True, float(spec.get("clip_obs", 10.0)))
        normalize.rms.load_state_dict(norms["obs"])

    def act(obs: np.ndarray) -> np.ndarray:
        return agent.act(obs, deterministic=deterministic)

    return evaluate_policy(act, env_cfg, episodes=episodes, seed=seed, normalize=normalize, record=gif)
