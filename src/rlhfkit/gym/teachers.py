"""Who judges pairs of segments for `gym rlhf`: one interface for a simulated teacher, people in the
label app, and your own function.

    teacher.label(pairs) -> [mu or None, ...]    mu = 1 (first better), 0 (second), 0.5 (equal); None = skipped
    teacher.rate(segments) -> [score or None, ...]    (feedback.mode=rate: a score per clip, any scale)

- `oracle`: prefers the segment with the higher TRUE return (the environment's reward, which the agent
  and the reward model never see), with the simulated-teacher knobs of B-Pref (Lee et al. 2021):
  `temperature` > 0 makes it Boltzmann-rational (P[first] = sigmoid((R1 - R2) / temperature)),
  `mistake_rate` flips a share of its answers, `tie_threshold` calls returns that close equal, and
  `skip_below` skips pairs where both returns are below it. Rating, it gives the true return, plus
  Gaussian noise of std `rating_noise`, or skips a clip whose return is below `skip_below`.
  `score: module:function` judges by function(segment) -> float instead of the true return: what a
  person sees where the reward says nothing yet (`rlhfkit.gym.teachers:acrobot_height`: how high the
  tip swings, for Acrobot's -1-per-step reward).
- `app`: people, through a label project (`rlhfkit label`): each pair becomes a compare item of two
  looping GIF clips in the project's media folder; the trainer waits (printing how many labels it
  still waits for) until they are answered or `timeout` passes. A tie or "both bad" is 0.5, a skip None.
  With a `rate` project, up to `clips_per_item` clips make one item and each gets a score on the
  project's scale (the mean over its criteria).
- `module:function`: `function(options) -> object with .label(pairs)` and/or `.rate(segments)`.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rlhfkit.errors import ConfigError
from rlhfkit.plugins import load_object


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
                 skip_below: float = -math.inf, rating_noise: float = 0.0, score: str | None = None,
                 seed: int = 0) -> None:
        if temperature < 0 or not 0 <= mistake_rate <= 1 or tie_threshold < 0 or rating_noise < 0:
            raise ConfigError("feedback.teacher_options", "expected temperature >= 0, mistake_rate in [0, 1], "
                              "tie_threshold >= 0, rating_noise >= 0")
        self.name = "oracle"
        self.rating_noise = rating_noise
        self.value = load_object(score, "feedback.teacher_options.score") if score else (lambda seg: seg.true_return)
        self.temperature, self.mistake_rate, self.tie_threshold, self.skip_below = (
            temperature, mistake_rate, tie_threshold, skip_below)
        self.rng = np.random.default_rng(seed)

    def label(self, pairs: list[tuple[Segment, Segment]]) -> list[float | None]:
        out: list[float | None] = []
        for a, b in pairs:
            r1, r2 = self.value(a), self.value(b)
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

    def rate(self, segments: list[Segment]) -> list[float | None]:
        out: list[float | None] = []
        for seg in segments:
            r = self.value(seg)
            if r < self.skip_below:
                out.append(None)
                continue
            out.append(r + (float(self.rng.normal(0.0, self.rating_noise)) if self.rating_noise else 0.0))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def acrobot_height(seg: Segment) -> float:
    """How high Acrobot's tip swings in a clip (its highest point, -2 hanging .. 2 upright; the goal line
    is 1): observations are cos/sin of both joint angles, tip height = -cos(t1) - cos(t1 + t2)."""
    c1, s1, c2, s2 = seg.obs[:, 0], seg.obs[:, 1], seg.obs[:, 2], seg.obs[:, 3]
    return float((-c1 - (c1 * c2 - s1 * s2)).max())


PROMPT = ("Which clip shows the better behaviour? (Each clip loops: {task}.) Pick the better one, or tie / "
          "both bad if you cannot tell.")
RATE_PROMPT = "How good is the behaviour in each clip? (Each clip loops: {task}.) Score every clip on its own."


class AppTeacher:
    """People in a label project (SQLite file or PostgreSQL URL made with `rlhfkit label init --kind compare
    --media DIR`): the trainer writes clips into the project's media folder, adds the pairs as items
    through the project's store, and reads the answers back (the server serves them to people meanwhile)."""

    def __init__(self, project: str, *, task: str = "", timeout: float = 3600.0, poll: float = 1.0,
                 fps: int = 15, clips_per_item: int = 4) -> None:
        from rlhfkit.label.store import Store

        self.name = "app"
        self.store = Store.open(project)
        s = self.store.settings
        if s.kind not in ("compare", "rate") or not s.media_dir:
            raise ConfigError("feedback.teacher_options", f"{project}: expected a compare or rate project with a "
                              "media folder (rlhfkit label init ... --kind compare --media DIR)")
        if clips_per_item < 1:
            raise ConfigError("feedback.teacher_options", f"clips_per_item: expected >= 1, got {clips_per_item}")
        self.mode = s.kind
        self.clips_per_item = clips_per_item
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
        task = PROMPT.format(task=self.task or "the agent")
        keys = self._post([[a, b] for a, b in pairs], task)
        mu = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
        answers = self._wait(keys, lambda r: mu.get(r["choice"]))
        return [answers.get(k) for k in keys]

    def rate(self, segments: list[Segment]) -> list[float | None]:
        task = RATE_PROMPT.format(task=self.task or "the agent")
        groups = [segments[i : i + self.clips_per_item] for i in range(0, len(segments), self.clips_per_item)]
        keys = self._post(groups, task)

        def scores(r: dict[str, Any]) -> list[float]:
            per = list((r["ratings"] or {}).values())
            return [sum(c[j] for c in per) / len(per) for j in range(len(per[0]))]

        answers = self._wait(keys, scores)
        out: list[float | None] = []
        for key, group in zip(keys, groups):
            got = answers.get(key)
            out += list(got) if got is not None else [None] * len(group)
        return out

    def _post(self, groups: list[list[Segment]], prompt: str) -> list[str]:
        """One item per group of clips; returns the item keys."""
        from rlhfkit.data.sources import Row
        from rlhfkit.label.items import parse_rows

        rows, keys = [], []
        for group in groups:
            self.asked += 1
            key = f"rlhf-{self.run_id}-{self.asked:06d}"
            keys.append(key)
            clips = [{"media": self._clip(seg, f"{key}-{'abcdefghijklmnopqrstuvwxyz'[j]}")} for j, seg in enumerate(group)]
            rows.append(Row(key, {"id": key, "prompt": prompt, "responses": clips}))
        self.store.add_items(parse_rows(rows, self.store.settings, "the trainer's queries"))
        return keys

    def _wait(self, keys: list[str], value: Any) -> dict[str, Any]:
        """Poll the project's labels until every key has a live one (value(row) of the first) or the timeout."""
        from rlhfkit.label.export import raw_rows

        wanted = set(keys)
        answers: dict[str, Any] = {}
        deadline = time.monotonic() + self.timeout
        shown = -1
        while True:
            for r in raw_rows(self.store, after=self.last_label):
                self.last_label = max(self.last_label, r["label_id"])
                if r["item"] in wanted and r["retracted_at"] is None and r["item"] not in answers:
                    answers[r["item"]] = value(r)
            waiting = len(keys) - len(answers)
            if not waiting:
                return answers
            if waiting != shown:
                print(f"waiting for {waiting} label(s) in {self.store.target} ...", file=sys.stderr, flush=True)
                shown = waiting
            if time.monotonic() > deadline:
                print(f"{waiting} label(s) did not come within {self.timeout:g} s; going on without them",
                      file=sys.stderr, flush=True)
                return answers
            time.sleep(self.poll)

    def state_dict(self) -> dict[str, Any]:
        return {"asked": self.asked, "last_label": self.last_label, "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.asked, self.last_label, self.run_id = state["asked"], state["last_label"], state["run_id"]


def load_teacher(kind: str, options: dict[str, Any], *, seed: int) -> Any:
    if kind == "oracle":
        known = {"temperature", "mistake_rate", "tie_threshold", "skip_below", "rating_noise", "score"}
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
        teacher = load_object(kind, "feedback.teacher")(options)
        if not (hasattr(teacher, "label") or hasattr(teacher, "rate")):
            raise ConfigError("feedback.teacher", f"{kind} returned {type(teacher).__name__}, which has neither "
                              "label() nor rate()")
        return teacher
    raise ConfigError("feedback.teacher", f"expected oracle, app or module:function, got {kind!r}")
