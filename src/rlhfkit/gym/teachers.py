"""Who judges pairs of segments for `gym rlhf`: one interface for a simulated teacher, people in the
label app, and your own function.

    teacher.label(pairs) -> [mu or None, ...]    mu = 1 (first better), 0 (second), 0.5 (equal); None = skipped

- `oracle`: prefers the segment with the higher TRUE return (the environment's reward, which the agent
  and the reward model never see), with the simulated-teacher knobs of B-Pref (Lee et al. 2021):
  `temperature` > 0 makes it Boltzmann-rational (P[first] = sigmoid((R1 - R2) / temperature)),
  `mistake_rate` flips a share of its answers, `tie_threshold` calls returns that close equal, and
  `skip_below` skips pairs where both returns are below it.
- `app`: people, through a label project (`rlhfkit label`): each pair becomes a compare item of two
  looping GIF clips in the project's media folder; the trainer waits (printing how many labels it
  still waits for) until they are answered or `timeout` passes. A tie or "both bad" is 0.5, a skip None.
- `module:function`: `function(options) -> object with .label(pairs)`.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rlhfkit.errors import ConfigError


@dataclass
class Segment:
    """Consecutive steps of one episode: raw observations (L, obs_dim), actions, true rewards (L,)."""

    obs: np.ndarray
    actions: np.ndarray
    true_rewards: np.ndarray
    terminated: bool
    frames: list[np.ndarray] = field(default_factory=list)
    """Rendered frames (only when the teacher needs clips)."""

    @property
    def true_return(self) -> float:
        return float(self.true_rewards.sum())


class Teacher(Protocol):
    name: str

    def label(self, pairs: list[tuple[Segment, Segment]]) -> list[float | None]: ...


class OracleTeacher:
    def __init__(self, *, temperature: float = 0.0, mistake_rate: float = 0.0, tie_threshold: float = 0.0,
                 skip_below: float = -math.inf, seed: int = 0) -> None:
        if temperature < 0 or not 0 <= mistake_rate <= 1 or tie_threshold < 0:
            raise ConfigError("feedback.oracle", "expected temperature >= 0, mistake_rate in [0, 1], tie_threshold >= 0")
        self.name = "oracle"
        self.temperature, self.mistake_rate, self.tie_threshold, self.skip_below = (
            temperature, mistake_rate, tie_threshold, skip_below)
        self.rng = np.random.default_rng(seed)

    def label(self, pairs: list[tuple[Segment, Segment]]) -> list[float | None]:
        out: list[float | None] = []
        for a, b in pairs:
            r1, r2 = a.true_return, b.true_return
            if max(r1, r2) < self.skip_below:
                out.append(None)
                continue
            if abs(r1 - r2) <= self.tie_threshold:
                out.append(0.5)
                continue
            if self.temperature > 0:
                mu = float(self.rng.random() < 1.0 / (1.0 + math.exp(-(r1 - r2) / self.temperature)))
            else:
                mu = 1.0 if r1 > r2 else 0.0
            if self.mistake_rate and self.rng.random() < self.mistake_rate:
                mu = 1.0 - mu
            out.append(mu)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


PROMPT = ("Which clip shows the better behaviour? (Each clip loops: {task}.) Pick the better one, or tie / "
          "both bad if you cannot tell.")


class AppTeacher:
    """People in a label project (SQLite file or PostgreSQL URL made with `rlhfkit label init --kind compare
    --media DIR`): the trainer writes clips into the project's media folder, adds the pairs as items
    through the project's store, and reads the answers back (the server serves them to people meanwhile)."""

    def __init__(self, project: str, *, task: str = "", timeout: float = 3600.0, poll: float = 1.0,
                 fps: int = 15) -> None:
        from rlhfkit.label.store import Store

        self.name = "app"
        self.store = Store.open(project)
        s = self.store.settings
        if s.kind != "compare" or not s.media_dir:
            raise ConfigError("feedback.app", f"{project}: expected a compare project with a media folder "
                                              "(rlhfkit label init ... --kind compare --media DIR)")
        self.media = Path(s.media_dir)
        self.run_id = uuid.uuid4().hex[:8]
        self.task, self.timeout, self.poll, self.fps = task, timeout, poll, fps
        self.asked = 0
        self.last_label = 0

    def _clip(self, seg: Segment, name: str) -> str:
        from rlhfkit.gym.common import save_gif

        if not seg.frames:
            raise ConfigError("feedback.teacher", "the app teacher needs rendered frames (the env must support "
                              "render_mode='rgb_array')")
        rel = f"rlhf-{self.run_id}/{name}.gif"
        save_gif(seg.frames, self.media / rel, fps=self.fps)
        return rel

    def label(self, pairs: list[tuple[Segment, Segment]]) -> list[float | None]:
        from rlhfkit.data.sources import Row
        from rlhfkit.label.export import raw_rows
        from rlhfkit.label.items import parse_rows

        rows, keys = [], []
        for a, b in pairs:
            self.asked += 1
            key = f"rlhf-{self.run_id}-{self.asked:06d}"
            keys.append(key)
            rows.append(Row(key, {"id": key, "prompt": PROMPT.format(task=self.task or "the agent"),
                                  "responses": [{"media": self._clip(a, f"{key}-a")},
                                                {"media": self._clip(b, f"{key}-b")}]}))
        self.store.add_items(parse_rows(rows, self.store.settings, "the trainer's queries"))
        answers: dict[str, float | None] = {}
        deadline = time.monotonic() + self.timeout
        shown = -1
        while len(answers) < len(keys):
            for r in raw_rows(self.store, after=self.last_label):
                self.last_label = max(self.last_label, r["label_id"])
                if r["item"] in keys and r["retracted_at"] is None and r["item"] not in answers:
                    answers[r["item"]] = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}.get(r["choice"])
            waiting = len(keys) - len(answers)
            if waiting and waiting != shown:
                print(f"waiting for {waiting} label(s) in {self.store.target} ...", file=sys.stderr, flush=True)
                shown = waiting
            if not waiting:
                break
            if time.monotonic() > deadline:
                print(f"{waiting} label(s) did not come within {self.timeout:g} s; going on without them",
                      file=sys.stderr, flush=True)
                break
            time.sleep(self.poll)
        return [answers.get(k) for k in keys]

    def state_dict(self) -> dict[str, Any]:
        return {"asked": self.asked, "last_label": self.last_label, "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.asked, self.last_label, self.run_id = state["asked"], state["last_label"], state["run_id"]


def load_teacher(kind: str, options: dict[str, Any], *, seed: int) -> Any:
    if kind == "oracle":
        known = {"temperature", "mistake_rate", "tie_threshold", "skip_below"}
        bad = set(options) - known
        if bad:
            raise ConfigError("feedback.teacher_options", f"unknown option {sorted(bad)[0]!r}; the oracle takes "
                                                         f"{', '.join(sorted(known))}")
        return OracleTeacher(seed=seed, **options)
    if kind == "app":
        if "project" not in options:
            raise ConfigError("feedback.teacher_options", "the app teacher needs 'project': the label project "
                                                         "(a file or postgresql:// URL)")
        return AppTeacher(**options)
    if ":" in kind:
        module, name = kind.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("feedback.teacher", f"cannot load {kind!r}: {exc}") from None
        teacher = factory(options)
        if not hasattr(teacher, "label"):
            raise ConfigError("feedback.teacher", f"{kind} returned {type(teacher).__name__}, which has no label()")
        return teacher
    raise ConfigError("feedback.teacher", f"expected oracle, app or module:function, got {kind!r}")
