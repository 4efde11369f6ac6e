"""Saved control agents: which class each agent.json `type` names, and loading a folder back.

The lookup is by name (module:class, imported on use), so the trainers (ppo, dqn, mappo, and later
rlhf) and `gym eval` each import this module, never one another.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.gym.common import SavableAgent

AGENT_TYPES = {
    "ppo": "rlhfkit.gym.ppo:ActorCritic",
    "dqn": "rlhfkit.gym.dqn:QAgent",
    "mappo": "rlhfkit.gym.mappo:MAActorCritic",
}


def agent_class(kind: str, path: Path) -> type[SavableAgent]:
    """The class for agent.json's `type` (imported on use: loading a DQN agent needs no PPO code)."""
    if kind not in AGENT_TYPES:
        raise RlhfkitError(f"{path}: field 'type': unknown agent type {kind!r} (expected {', '.join(AGENT_TYPES)})")
    module, name = AGENT_TYPES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def read_json(path: Path) -> dict[str, Any]:
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
    spec = read_json(spec_path)
    agent = agent_class(spec.get("type", ""), spec_path)
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
        norms = read_json(model_dir / "normalizers.json")
    elif (folder / "state.json").is_file():
        norms = read_json(folder / "state.json").get("normalizers")
    return model.eval(), spec, norms


