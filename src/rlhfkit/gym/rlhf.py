"""`rlhfkit gym rlhf`: PPO on a reward learned from preferences between episode segments (Christiano et
al. 2017), judged by a simulated teacher or by people in the label app.

One update, top to bottom (the PPO update itself is `gym ppo`'s, through the same Collector seam):
1. collect `ppo.n_steps` x `env.num_envs` steps with the current policy; the environment's reward is
   kept aside (logged as the true return, never shown to the agent or the reward model);
2. cut the rollout into segments of `feedback.segment_len` steps inside one episode (a segment may end
   early where its episode terminated: a pole that fell);
3. when the query schedule says so, choose pairs (random, or the ones the reward ensemble disagrees on
   most among `feedback.candidates` x as many random pairs) and ask the teacher;
4. refit the reward ensemble on every label so far (Bradley-Terry on summed segment rewards, each member
   on a bootstrap resample; a held-out share measures its accuracy);
5. replace the rollout's rewards by the ensemble's (scaled by their running std), then GAE and PPO.
The schedule: `feedback.initial` labels at the first update, then the rest of `feedback.budget` spread
until `feedback.until` of training (`constant`, or front-loaded `decay`).

`feedback.mode=rate` asks for a score per segment instead of a comparison (steps 3-4: segments chosen at
random or where the members' predicted returns spread most; regression on the standardized scores).

Outputs: `agent/` (for `gym eval`), `reward_model/` (`load_reward_model`, `.score(obs, actions)`) and
`labels.jsonl`, every answered query with its segments' raw observations, actions and true returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlhfkit.config import opt, section
from rlhfkit.errors import ConfigError
from rlhfkit.gym.common import EnvConfig, GymEvalConfig, GymRunConfig, make_env, make_vector_env
from rlhfkit.gym.ppo import GymPPOAlgo, NetConfig, _collect, _Run, build_agent, run_ppo_updates
from rlhfkit.gym.reward_ensemble import RewardEnsemble, fit, fit_ratings, pad_segments, save_reward_model
from rlhfkit.gym.teachers import Segment, load_teacher
from rlhfkit.runtime.atomic import atomic_folder, write_atomic
from rlhfkit.runtime.distributed import DistInfo, all_gather_objects, barrier, run_on_ranks
from rlhfkit.runtime.seeding import seed_everything


@dataclass
class FeedbackConfig:
    teacher: str = opt("oracle", "who labels: oracle (true return), app (people in a label project), or module:function")
    teacher_options: dict = opt({}, "oracle: temperature, mistake_rate, tie_threshold, skip_below, rating_noise, "
                                    "score (module:function judging a segment instead of its true return); "
                                    "app: project (label project file or URL), timeout (s), task (shown to people), "
                                    "clips_per_item (rate)")
    mode: Literal["compare", "rate"] = opt("compare", "compare pairs of segments, or rate single segments "
                                                      "(regression on the scores)")
    budget: int = opt(300, "queries in total (comparisons, or rated segments with mode=rate)", gt=0)
    initial: int = opt(50, "queries asked at the first update, before any learning", ge=0)
    until: float = opt(0.5, "share of training by which the budget is spent", gt=0.0, le=1.0)
    schedule: Literal["constant", "decay"] = opt("decay", "constant rate, or front-loaded (more labels early)")
    segment_len: int = opt(25, "steps per segment", gt=0)
    selection: Literal["random", "disagreement"] = opt("disagreement", "how queries are chosen")
    candidates: int = opt(4, "disagreement: candidate pairs (or segments) per query asked", gt=0)


@dataclass
class RewardModelConfig:
    members: int = opt(3, "ensemble size", gt=0)
    hidden: list[int] = opt([64, 64], "hidden layers of each member")
    use_action: bool = opt(True, "r(observation, action); false: r(observation)")
    lr: float = opt(3e-4, "Adam learning rate", gt=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", ge=0.0)
    epochs: int = opt(20, "passes over the labels at each refit", gt=0)
    batch_size: int = opt(64, "pairs per step", gt=0)
    heldout: float = opt(0.2, "share of labels held out to measure accuracy (never trained on)", ge=0.0, lt=1.0)
    normalize: Literal["std", "meanstd", "none"] = opt("std", "scale of the reward PPO sees (see reward_ensemble.py)")


@dataclass
class GymRLHFConfig(GymRunConfig):
    output_dir: str = opt("runs/gym-rlhf", "run folder: config, metrics, checkpoints, agent, reward model")
    env: EnvConfig = section(EnvConfig, "environment (its reward is used only to evaluate and by the oracle)")
    net: NetConfig = section(NetConfig, "policy and value networks")
    ppo: GymPPOAlgo = section(GymPPOAlgo, "PPO")
    feedback: FeedbackConfig = section(FeedbackConfig, "queries and the teacher")
    reward: RewardModelConfig = section(RewardModelConfig, "the learned reward")
    eval: GymEvalConfig = section(GymEvalConfig, "evaluation on the TRUE reward")

    def validate(self) -> None:
        super().validate()
        if self.feedback.initial > self.feedback.budget:
            raise ConfigError("feedback.initial", f"{self.feedback.initial} > feedback.budget {self.feedback.budget}")
        if self.ppo.normalize_reward:
            raise ConfigError("ppo.normalize_reward", "the learned reward is scaled by reward.normalize; leave this off")


def train(cfg: GymRLHFConfig, resume: str | None = None) -> Path:
    """Train; returns the folder of the final agent (`output_dir/agent`)."""
    return run_on_ranks(lambda info: _train(cfg, resume, info), cfg.torch_device())


def cut_segments(trace: dict[str, Any], length: int) -> list[Segment]:
    """Non-overlapping windows of `length` steps inside one episode, per env; a window cut short by a
    termination is kept (its end is the point), one cut short by a time limit or the rollout's end is not."""
    obs, actions, true, term, ends, frames = (trace[k] for k in ("obs", "actions", "true", "terminated", "ends", "frames"))
    T, N = true.shape
    out = []
    for n in range(N):
        t = 0
        while t < T:
            stop = min(t + length, T)
            end = next((u for u in range(t, stop) if ends[u, n]), None)
            if end is not None:
                if term[end, n] or end - t + 1 == length:
                    out.append(_segment(obs, actions, true, frames, n, t, end + 1, bool(term[end, n])))
                t = end + 1
            elif stop - t == length:
                out.append(_segment(obs, actions, true, frames, n, t, stop, False))
                t = stop
            else:
                break
    return out


def _segment(obs: np.ndarray, actions: np.ndarray, true: np.ndarray, frames: Any, n: int, a: int, b: int,
             terminated: bool) -> Segment:
    clip = [_small(frames[t][n]) for t in range(a, b)] if frames else []
    return Segment(obs[a:b, n].copy(), actions[a:b, n].copy(), true[a:b, n].copy(), terminated, clip)


def _small(frame: np.ndarray, width: int = 240) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(frame)
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))))
    return np.asarray(img)


@dataclass
class _Label:
    """One answered query: the features of its segment(s) (two for compare, one for rate) and the answer
    (mu for compare, the score for rate); `record` is its labels.jsonl row."""

    xs: list[torch.Tensor]
    value: float
    record: dict[str, Any] = field(default_factory=dict)


def _segment_record(seg: Segment) -> dict[str, Any]:
    return {"obs": seg.obs.tolist(), "actions": seg.actions.tolist(), "true_return": seg.true_return,
            "terminated": seg.terminated}


class _RLHFRun(_Run):
    """`gym rlhf`'s Collector: gym ppo's environments, plus the labels, the reward ensemble and the schedule."""

    section = "ppo"

    def __init__(self, cfg: GymRLHFConfig, info: DistInfo, device: torch.device, teacher: Any):
        self.mode = cfg.feedback.mode
        need = "label" if self.mode == "compare" else "rate"
        if not hasattr(teacher, need):
            raise ConfigError("feedback.mode", f"{self.mode} needs a teacher with {need}(); {cfg.feedback.teacher} has none")
        if getattr(teacher, "mode", self.mode) != self.mode:
            raise ConfigError("feedback.mode", f"{self.mode}, but the label project is a {teacher.mode} project")
        super().__init__(cfg, info, device)  # type: ignore[arg-type]
        self.render = getattr(teacher, "name", "") == "app"
        if self.render:
            self.envs.close()
            self.envs = make_vector_env(cfg.env, render_mode="rgb_array")
        self.teacher = teacher
        space = self.envs.single_action_space
        kind, adim = ("box", int(space.shape[0])) if self.box else ("discrete", int(space.n))
        r = cfg.reward
        self.ensemble = RewardEnsemble(self.obs_dim, kind, adim, members=r.members, hidden=r.hidden,
                                       use_action=r.use_action, seed=cfg.seed)
        self.optimizers = [torch.optim.AdamW(m.parameters(), lr=r.lr, weight_decay=r.weight_decay)
                           for m in self.ensemble.members]
        self.gen = torch.Generator().manual_seed(cfg.seed + 7)  # the same on every rank: identical refits
        self.rng = np.random.default_rng([cfg.seed + 11, info.rank])  # each rank picks from its own segments
        self.labels: list[_Label] = []
        self.heldout: list[_Label] = []  # every k-th answer, never trained on: measures the ensemble honestly
        self.asked = 0  # queries asked so far (skips included)
        self.update = 0
        self.updates = max(1, cfg.ppo.total_steps // self.steps_per_update)

    # --- the schedule ----------------------------------------------------------------------------------

    def due(self, update: int) -> int:
        """Pairs that should have been asked by the end of `update` (1-based)."""
        fb = self.cfg.feedback
        f = min(1.0, update / max(1.0, fb.until * self.updates))
        spread = f if fb.schedule == "constant" else 1.0 - (1.0 - f) ** 2
        return min(fb.budget, fb.initial + int(round((fb.budget - fb.initial) * spread)))

    def _pairs(self, segs: list[Segment], k: int) -> list[tuple[Segment, Segment]]:
        if len(segs) < 2 or k <= 0:
            return []
        m = k * (self.cfg.feedback.candidates if self.cfg.feedback.selection == "disagreement" and self.labels else 1)
        idx = [tuple(self.rng.choice(len(segs), 2, replace=False)) for _ in range(m)]
        if m > k:
            a = pad_segments([self._x(segs[i]) for i, _ in idx])
            b = pad_segments([self._x(segs[j]) for _, j in idx])
            order = torch.argsort(self.ensemble.disagreement(a, b), descending=True)[:k].tolist()
            idx = [idx[i] for i in order]
        return [(segs[i], segs[j]) for i, j in idx]

    def _singles(self, segs: list[Segment], k: int) -> list[Segment]:
        if not segs or k <= 0:
            return []
        m = min(len(segs), k * (self.cfg.feedback.candidates
                                if self.cfg.feedback.selection == "disagreement" and self.labels else 1))
        idx = self.rng.choice(len(segs), m, replace=False).tolist()
        if m > k:
            spread = self.ensemble.spread(pad_segments([self._x(segs[i]) for i in idx]))
            idx = [idx[i] for i in torch.argsort(spread, descending=True)[:k].tolist()]
        return [segs[i] for i in idx[:k]]

    def _x(self, seg: Segment) -> torch.Tensor:
        return self.ensemble.features(seg.obs, seg.actions)

    # --- one update ------------------------------------------------------------------------------------

    def collect(self, fast: Any) -> tuple[Any, dict[str, float]]:
        self.update += 1
        stats: dict[str, float] = {}

        def learned(trace: dict[str, Any]) -> np.ndarray:
            want = self.due(self.update) - self.asked
            if want > 0:
                self._ask(cut_segments(trace, self.cfg.feedback.segment_len), want)
                if self.labels:
                    stats["reward/loss"] = self._refit()
            stats.update(self._diagnostics(trace))
            x = self.ensemble.features(trace["obs"], trace["actions"])
            return self.ensemble.reward(x, self.cfg.reward.normalize, info=self.info)

        batch, more = _collect(self, self.agent, self.device, fast, learned=learned)
        stats.update(more)
        stats["feedback/labels"] = float(len(self.labels) + len(self.heldout))
        stats["feedback/asked"] = float(self.asked)
        return batch, stats

    def _ask(self, segs: list[Segment], want: int) -> None:
        """Ask the teacher `want` queries and keep the answers. Under torchrun each rank asks its share
        from its own segments; the answers are gathered in rank order, so every rank keeps the same labels
        and refits the same ensemble."""
        info = self.info
        want = want // info.world_size + (info.rank < want % info.world_size)
        asked, mine = self._ask_local(segs, want)
        gathered = all_gather_objects((asked, mine), info)
        first = self.asked + 1
        self.asked += sum(n for n, _ in gathered)  # type: ignore[misc]
        every = round(1 / self.cfg.reward.heldout) if self.cfg.reward.heldout else 0
        for n, (xs, value, record) in enumerate(lab for _, part in gathered for lab in part):  # type: ignore[attr-defined]
            held = bool(every) and (len(self.labels) + len(self.heldout)) % every == 0
            record = {"query": first + n, "update": self.update, "mode": self.mode,
                      "split": "heldout" if held else "train", **record}
            (self.heldout if held else self.labels).append(_Label(xs, value, record))

    def _ask_local(self, segs: list[Segment], want: int) -> tuple[int, list[tuple[list[torch.Tensor], float, dict]]]:
        """(queries asked, the answered ones as (features, answer, record)) from this rank's teacher."""
        if self.mode == "compare":
            queries: list[list[Segment]] = [list(p) for p in self._pairs(segs, want)]
            answers = self.teacher.label([(a, b) for a, b in queries]) if queries else []
        else:
            queries = [[seg] for seg in self._singles(segs, want)]
            answers = self.teacher.rate([q[0] for q in queries]) if queries else []
        if len(answers) != len(queries):
            raise ConfigError("feedback.teacher", f"{self.cfg.feedback.teacher} answered {len(answers)} of "
                              f"{len(queries)} queries (expected one answer or None each)")
        names = ["a", "b"] if self.mode == "compare" else ["segment"]
        answered = []
        for query, value in zip(queries, answers):
            if value is not None:
                record = {("label" if self.mode == "compare" else "score"): float(value),
                          **{n: _segment_record(seg) for n, seg in zip(names, query)}}
                answered.append(([self._x(seg) for seg in query], float(value), record))
        return len(queries), answered

    def _stack(self, labels: list[_Label]) -> tuple[list[Any], torch.Tensor]:
        sides = [pad_segments([lab.xs[j] for lab in labels]) for j in range(len(labels[0].xs))]
        return sides, torch.tensor([lab.value for lab in labels])

    def _refit(self) -> float:
        sides, values = self._stack(self.labels)
        r = self.cfg.reward
        if self.mode == "rate":
            return fit_ratings(self.ensemble, self.optimizers, sides[0], values, epochs=r.epochs,
                               batch_size=r.batch_size, generator=self.gen)
        return fit(self.ensemble, self.optimizers, sides[0], sides[1], values, epochs=r.epochs,
                   batch_size=r.batch_size, generator=self.gen)

    def _quality(self, labels: list[_Label]) -> float:
        sides, values = self._stack(labels)
        if self.mode == "rate":
            return self.ensemble.correlation(sides[0], values)
        return self.ensemble.accuracy(sides[0], sides[1], values)

    def _diagnostics(self, trace: dict[str, Any]) -> dict[str, float]:
        out = {}
        name = "accuracy" if self.mode == "compare" else "corr"  # rate: correlation with the scores
        if self.heldout:
            out[f"reward/heldout_{name}"] = self._quality(self.heldout)
        if self.labels:
            out[f"reward/train_{name}"] = self._quality(self.labels)
        x = self.ensemble.features(trace["obs"], trace["actions"])
        learned = self.ensemble.member_rewards(x).mean(0).detach().numpy().reshape(-1)
        true = np.asarray(trace["true"]).reshape(-1)
        if learned.std() > 0 and true.std() > 0:
            out["reward/true_corr"] = float(np.corrcoef(learned, true)[0, 1])
        out = {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
        return out

    # --- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        def pack(items: list[_Label]) -> list[Any]:
            return [[[x.tolist() for x in lab.xs], lab.value, lab.record] for lab in items]

        state = {**super().state_dict(), "rlhf": {
            "labels": pack(self.labels), "heldout": pack(self.heldout), "asked": self.asked, "update": self.update,
            "ensemble": _jsonable(self.ensemble.state_dict()), "rms": self.ensemble.rms.state_dict(),
            "optimizers": [_jsonable(o.state_dict()) for o in self.optimizers],
            "gen": self.gen.get_state().tolist()}}
        # what differs per rank (its pair picks, its teacher), gathered so a resumed rank gets its own
        mine = {"rng": self.rng.bit_generator.state,
                "teacher": self.teacher.state_dict() if hasattr(self.teacher, "state_dict") else None}
        state["rlhf"]["ranks"] = all_gather_objects(mine, self.info)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        s = state["rlhf"]

        def unpack(items: list[Any]) -> list[_Label]:
            return [_Label([torch.tensor(x) for x in xs], float(v), rec) for xs, v, rec in items]

        self.labels, self.heldout = unpack(s["labels"]), unpack(s["heldout"])
        self.asked, self.update = s["asked"], s["update"]
        self.ensemble.load_state_dict(_tensors(s["ensemble"]))
        self.ensemble.rms.load_state_dict(s["rms"])
        for o, st in zip(self.optimizers, s["optimizers"]):
            o.load_state_dict(_tensors(st))
        self.gen.set_state(torch.tensor(s["gen"], dtype=torch.uint8))
        ranks = s["ranks"]
        if len(ranks) != self.info.world_size:
            raise ConfigError("--resume", f"the checkpoint was written by {len(ranks)} process(es); resume it with "
                              f"as many (this run has {self.info.world_size})")
        mine = ranks[self.info.rank]
        self.rng.bit_generator.state = mine["rng"]
        if mine["teacher"] is not None and hasattr(self.teacher, "load_state_dict"):
            self.teacher.load_state_dict(mine["teacher"])

    def describe(self, updates: int) -> str:
        fb = self.cfg.feedback
        what = "comparisons" if fb.mode == "compare" else "rated segments"
        return (super().describe(updates) + f"; learning the reward from {fb.budget} {what} ({fb.teacher}, "
                f"{fb.initial} first, segments of {fb.segment_len} steps, {fb.selection})")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _tensors(obj: Any, key: Any = None) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
    if isinstance(obj, dict):
        # optimizer state dicts key their per-parameter state by int
        return {(int(k) if k.isdigit() else k): _tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tensors(v) for v in obj]
    return obj


def _train(cfg: GymRLHFConfig, resume: str | None, info: DistInfo) -> Path:
    torch.set_num_threads(cfg.threads)
    device = cfg.torch_device(info.local_rank)
    seed_everything(cfg.seed)
    teacher = load_teacher(cfg.feedback.teacher, dict(cfg.feedback.teacher_options), seed=cfg.seed * 1009 + info.rank)
    run = _RLHFRun(cfg, info, device, teacher)
    agent = build_agent(make_env(cfg.env), cfg.net).to(device)
    agent.context = {"env": dict(cfg.env.__dict__), "normalize_obs": cfg.ppo.normalize_obs, "clip_obs": cfg.ppo.clip_obs}
    run.agent = agent
    session = run_ppo_updates(cfg, cfg.ppo, agent, info, resume, run)
    run.envs.close()
    out = session.run_dir / "agent"
    if info.is_main:
        with atomic_folder(out) as tmp:
            agent.save_pretrained(str(tmp))
            (tmp / "normalizers.json").write_text(json.dumps(run.normalizer_state(), indent=2))
        with atomic_folder(session.run_dir / "reward_model") as tmp:
            save_reward_model(run.ensemble, tmp, mode=cfg.feedback.mode, env=cfg.env.id, normalize=cfg.reward.normalize,
                              labels=len(run.labels) + len(run.heldout))
        answered = sorted(run.labels + run.heldout, key=lambda lab: lab.record["query"])
        write_atomic(session.run_dir / "labels.jsonl", "".join(json.dumps(lab.record) + "\n" for lab in answered))
        print(f"saved agent to {out}, the reward model to {session.run_dir / 'reward_model'} and "
              f"{len(answered)} labels to {session.run_dir / 'labels.jsonl'}", flush=True)
    barrier(info)
    return out

