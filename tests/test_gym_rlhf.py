"""gym rlhf: the preference loss, segment cutting, the oracle's knobs and the schedule by hand; a CartPole
run that learns from the oracle, resumes exactly, and one where a scripted person labels the clips
through the real label server while the trainer waits."""

from __future__ import annotations

import io
import json
import math
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.gym.reward_ensemble import (
    RewardEnsemble,
    fit,
    fit_ratings,
    load_reward_model,
    pad_segments,
    preference_loss,
    rating_loss,
    standardize,
)
from rlhfkit.gym.rlhf import GymRLHFConfig, _RLHFRun, cut_segments, train
from rlhfkit.gym.teachers import OracleTeacher, Segment, acrobot_height, load_teacher
from rlhfkit.runtime.distributed import DistInfo
from tests.test_gym_ppo import rewind
from tests.test_sft import _cli, _losses


def test_preference_loss_is_bradley_terry_on_segment_sums_and_ties_train_toward_one_half():
    r1, r2 = torch.tensor([2.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    # -log sigmoid(1) = 0.31326; a tie: -(log sigmoid(1) + log sigmoid(-1)) / 2 = (0.31326 + 1.31326) / 2
    # = 0.81326; equal sums with a tie: -log(1/2) = 0.69315. Mean = (0.31326 + 0.81326 + 0.69315) / 3
    loss = preference_loss(r1, r2, torch.tensor([1.0, 0.5, 0.5]))
    assert float(loss) == pytest.approx((0.313262 + 0.813262 + 0.693147) / 3, abs=1e-5)
    # a tie's gradient pushes the difference to 0 from either side
    d = torch.tensor([1.5], requires_grad=True)
    preference_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert d.grad.item() > 0  # descending the loss lowers d toward 0


def test_segments_stay_inside_episodes_and_keep_a_terminal_end_only():
    T, N = 7, 1
    trace = {"obs": np.arange(T * N * 2, dtype=np.float32).reshape(T, N, 2), "actions": np.zeros((T, N), np.int64),
             "true": np.ones((T, N), np.float32), "terminated": np.zeros((T, N)), "ends": np.zeros((T, N)),
             "frames": None}
    trace["terminated"][1, 0] = trace["ends"][1, 0] = 1  # terminated at t=1: steps 0-1 are a short segment
    trace["ends"][4, 0] = 1                               # truncated (time limit) at t=4: steps 2-4 are dropped
    segs = cut_segments(trace, 4)                         # steps 5-6: the rollout ends before 4 steps: dropped
    assert [(len(s.true_rewards), s.terminated) for s in segs] == [(2, True)]
    trace["ends"][4, 0] = 0                               # no time limit: 2-5 is a full segment, 6 is short
    segs = cut_segments(trace, 4)
    assert [(len(s.true_rewards), s.terminated, s.obs[0, 0]) for s in segs] == [(2, True, 0.0), (4, False, 4.0)]


def _seg(ret: float) -> Segment:
    return Segment(np.zeros((1, 2)), np.zeros(1), np.array([ret]), False)


def test_the_oracle_prefers_the_higher_true_return_with_b_pref_noise_knobs():
    pairs = [(_seg(3), _seg(1)), (_seg(1), _seg(3)), (_seg(2), _seg(2.05))]
    assert OracleTeacher().label(pairs) == [1.0, 0.0, 0.0]
    assert OracleTeacher(tie_threshold=0.1).label(pairs) == [1.0, 0.0, 0.5]
    assert OracleTeacher(mistake_rate=1.0).label(pairs[:2]) == [0.0, 1.0]
    assert OracleTeacher(skip_below=5).label(pairs[:1]) == [None]
    # Boltzmann-rational: P[first] = sigmoid((3 - 1) / 1) = 0.881
    noisy = OracleTeacher(temperature=1.0, seed=3).label([(_seg(3), _seg(1))] * 4000)
    assert sum(noisy) / 4000 == pytest.approx(1 / (1 + math.exp(-2)), abs=0.02)
    with pytest.raises(ConfigError, match="unknown option 'noise'"):
        load_teacher("oracle", {"noise": 1}, seed=0)
    with pytest.raises(ConfigError, match="oracle, app or module:function"):
        load_teacher("crowd", {}, seed=0)


def test_the_ensemble_learns_which_segments_are_preferred():
    ens = RewardEnsemble(2, "discrete", 2, members=2, hidden=[16], seed=0)
    rng = np.random.default_rng(0)
    # the true reward is obs[0]: a segment with larger obs[0] values is preferred
    xs = [ens.features(rng.normal(size=(5, 2)).astype(np.float32), np.zeros(5)) for _ in range(200)]
    a, b = pad_segments(xs[:100]), pad_segments(xs[100:])
    mu = (a.x[:, :, 0].sum(1) > b.x[:, :, 0].sum(1)).float()
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in ens.members]
    fit(ens, opts, a, b, mu, epochs=30, batch_size=32, generator=torch.Generator().manual_seed(0))
    assert ens.accuracy(a, b, mu) > 0.9
    held_a, held_b = pad_segments(xs[:50]), pad_segments(xs[150:])
    held_mu = (held_a.x[:, :, 0].sum(1) > held_b.x[:, :, 0].sum(1)).float()
    assert ens.accuracy(held_a, held_b, held_mu) > 0.8


def test_rating_loss_is_squared_error_on_standardized_scores_up_to_a_shift():
    # scores 1, 3, 5: mean 3, std 2 -> targets -1, 0, 1; returns 0, 0, 3: residuals 1, 0, 2 (mean 1)
    # -> ((1-1)^2 + (0-1)^2 + (2-1)^2) / 3 = 2/3, and the same for returns shifted by any constant
    target = standardize(torch.tensor([1.0, 3.0, 5.0]))
    assert target.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert float(rating_loss(torch.tensor([0.0, 0.0, 3.0]), target)) == pytest.approx(2 / 3)
    assert float(rating_loss(torch.tensor([10.0, 10.0, 13.0]), target)) == pytest.approx(2 / 3)
    assert standardize(torch.tensor([4.0, 4.0])).tolist() == [0.0, 0.0]  # nothing to tell apart yet


def test_the_ensemble_learns_from_scores_and_spread_ranks_where_members_disagree():
    ens = RewardEnsemble(2, "discrete", 2, members=3, hidden=[16], seed=0)
    rng = np.random.default_rng(1)
    xs = [ens.features(rng.normal(size=(5, 2)).astype(np.float32), np.zeros(5)) for _ in range(240)]
    seg = pad_segments(xs[:200])
    scores = 4 + 2 * seg.x[:, :, 0].sum(1)  # a person's scale: any offset and scale
    assert ens.spread(seg).shape == (200,)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in ens.members]
    fit_ratings(ens, opts, seg, scores, epochs=40, batch_size=32, generator=torch.Generator().manual_seed(0))
    held = pad_segments(xs[200:])
    assert ens.correlation(held, 4 + 2 * held.x[:, :, 0].sum(1)) > 0.9
    assert ens.correlation(seg, scores) > 0.95
    # far outside the data the members were fit on, they disagree more than on it
    far = pad_segments([x * 0 + 25.0 for x in xs[:20]])
    assert float(ens.spread(pad_segments(xs[:20] + [far.x[0]])).argmax()) == 20


def test_an_oracle_can_judge_by_what_a_person_sees_instead_of_the_return():
    def acrobot(angles: list[tuple[float, float]]) -> Segment:
        obs = np.array([[math.cos(a), math.sin(a), math.cos(b), math.sin(b), 0, 0] for a, b in angles])
        return Segment(obs, np.zeros(len(angles)), -np.ones(len(angles)), False)

    hanging, swung = acrobot([(0, 0), (0.3, 0)]), acrobot([(0, 0), (math.pi, 0)])
    assert acrobot_height(hanging) == pytest.approx(-2 * math.cos(0.3))  # both links hang: the tip at -2
    assert acrobot_height(swung) == pytest.approx(2.0)                    # both links up: the tip at 2
    # first link level (height 0), second turned back down from it: the tip one link below, at -1
    assert acrobot_height(acrobot([(math.pi / 2, -math.pi / 2)])) == pytest.approx(-1.0)
    judge = load_teacher("oracle", {"score": "rlhfkit.gym.teachers:acrobot_height"}, seed=0)
    assert OracleTeacher().label([(hanging, swung)]) == [0.5]  # the same true return: a tie
    assert judge.label([(hanging, swung), (swung, hanging)]) == [0.0, 1.0]
    assert judge.rate([swung]) == [2.0]
    with pytest.raises(ConfigError, match="cannot load 'rlhfkit.gym.teachers:nope'"):
        load_teacher("oracle", {"score": "rlhfkit.gym.teachers:nope"}, seed=0)


def test_the_oracle_rates_a_segment_by_its_true_return():
    assert OracleTeacher().rate([_seg(3), _seg(-1)]) == [3.0, -1.0]
    assert OracleTeacher(skip_below=0).rate([_seg(3), _seg(-1)]) == [3.0, None]
    noisy = OracleTeacher(rating_noise=2.0, seed=0).rate([_seg(1)] * 4000)
    assert np.mean(noisy) == pytest.approx(1.0, abs=0.1) and np.std(noisy) == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ConfigError, match="rating_noise >= 0"):
        OracleTeacher(rating_noise=-1)


def _args(out: Path, *extra: str) -> list[str]:
    return ["env.num_envs=4", "ppo.n_steps=64", "ppo.epochs=4", "ppo.minibatches=2", "progress=false",
            "tensorboard=false", f"output_dir={out}", "reward.epochs=5", "reward.hidden=[32]", *extra]


def test_the_schedule_asks_the_first_batch_at_once_and_the_budget_by_until():
    cfg = load_config(GymRLHFConfig, None, _args(Path("/nonexistent"), "ppo.total_steps=25600", "feedback.budget=100",
                                                 "feedback.initial=20", "feedback.until=0.5"))
    run = _RLHFRun(cfg, DistInfo(), torch.device("cpu"), OracleTeacher())
    assert run.updates == 100
    assert run.due(1) == 20 + round(80 * (1 - (1 - 1 / 50) ** 2)) and run.due(50) == 100 and run.due(99) == 100
    cfg.feedback.schedule = "constant"
    assert run.due(25) == 20 + 40
    run.envs.close()


def test_cartpole_learns_from_the_oracle_and_writes_agent_and_reward_model(tmp_path: Path):
    out = tmp_path / "run"
    train(load_config(GymRLHFConfig, None, _args(out, "ppo.total_steps=24576", "env.num_envs=8", "ppo.n_steps=128",
                                                 "feedback.budget=100", "feedback.initial=30", "eval.every=12288",
                                                 "reward.epochs=20", "reward.hidden=[64,64]")))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/return"] for r in rows if "eval/return" in r]
    assert evals[-1] > 100, evals  # a random policy holds the pole ~22 steps
    labeled = [r for r in rows if "feedback/labels" in r]
    assert labeled[0]["feedback/asked"] >= 30 and labeled[-1]["feedback/asked"] == 100  # the first batch at once
    assert any(r.get("reward/heldout_accuracy", 0) > 0.6 for r in labeled)
    assert (out / "agent" / "agent.json").is_file()
    spec = json.loads((out / "reward_model" / "reward_model.json").read_text())
    assert spec["members"] == 3 and spec["labels"] <= 100
    _check_outputs(out, "compare")


def _check_outputs(out: Path, mode: str) -> None:
    """labels.jsonl holds every answered query with raw segments; the saved reward model loads back and,
    scoring their raw observations and actions step by step, orders them like the labels."""
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    spec = json.loads((out / "reward_model" / "reward_model.json").read_text())
    assert len(labels) == spec["labels"] and spec["mode"] == mode
    assert [r["query"] for r in labels] == sorted(r["query"] for r in labels)
    assert {r["split"] for r in labels} == {"train", "heldout"}
    first = labels[0]
    segs = [first["a"], first["b"]] if mode == "compare" else [first["segment"]]
    for seg in segs:
        assert len(seg["obs"]) == len(seg["actions"]) and len(seg["obs"][0]) == 4
    if mode == "compare":
        truth = [float(np.sign(r["a"]["true_return"] - r["b"]["true_return"]) + 1) / 2 for r in labels]
        assert [r["label"] for r in labels] == truth  # the clean oracle; equal returns are a tie
    else:
        assert [r["score"] for r in labels] == [r["segment"]["true_return"] for r in labels]
    model = load_reward_model(out)

    def total(seg: dict) -> float:
        return float(model.score(np.array(seg["obs"], np.float32), np.array(seg["actions"])).sum())

    if mode == "compare":
        decided = [r for r in labels if r["label"] != 0.5]
        agree = [(total(r["a"]) > total(r["b"])) == (r["label"] == 1.0) for r in decided]
        assert np.mean(agree) > 0.8
    else:
        assert np.corrcoef([total(r["segment"]) for r in labels], [r["score"] for r in labels])[0, 1] > 0.8
    both = np.zeros((2, 4), np.float32)
    assert model.score(both, np.zeros(2, np.int64)).shape == (2,)
    with pytest.raises(RlhfkitError, match="pass the actions too"):
        model.score(both)
    with pytest.raises(RlhfkitError, match="4 values in the last dimension"):
        model.score(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(RlhfkitError, match="no reward_model.json"):
        load_reward_model(out / "agent")


def test_cartpole_learns_from_rated_segments(tmp_path: Path):
    out = tmp_path / "run"
    train(load_config(GymRLHFConfig, None, _args(out, "ppo.total_steps=24576", "env.num_envs=8", "ppo.n_steps=128",
                                                 "feedback.mode=rate", "feedback.budget=150", "feedback.initial=40",
                                                 "eval.every=12288", "reward.epochs=20", "reward.hidden=[64,64]")))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/return"] for r in rows if "eval/return" in r]
    assert evals[-1] > 100, evals
    assert any(r.get("reward/heldout_corr", 0) > 0.5 for r in rows)
    _check_outputs(out, "rate")


def test_resume_continues_exactly_with_labels_ensemble_and_schedule(tmp_path: Path):
    out = tmp_path / "run"
    args = _args(out, "ppo.total_steps=1536", "save_every=2", "save_total_limit=0", "eval.every=0",
                 "eval.episodes=1", "feedback.budget=40", "feedback.initial=10", "feedback.until=1.0")
    train(load_config(GymRLHFConfig, None, args))
    keys = ("train/policy_loss", "train/value_loss", "reward/loss")
    full = {k: _losses(out, k) for k in keys}
    rewind(out, 2, drop=(4, 6))
    res = _cli("gym", "rlhf", *args, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for key, values in full.items():
        again = _losses(out, key)
        for step in (3, 4, 5, 6):
            if step in values:
                assert again[step] == pytest.approx(values[step], abs=1e-6), (key, step)


@pytest.mark.parametrize("mode", ["compare", "rate"])
def test_people_label_clips_in_the_label_app_while_the_trainer_waits(tmp_path: Path, mode: str):
    """A scripted person answers through the real server's API with the oracle's rule for CartPole (the
    longer clip kept the pole up longer: its true return is its length), while `gym rlhf` waits. Rating,
    the person scores each clip 1-7 by its length."""
    from PIL import Image

    from rlhfkit.label.export import raw_rows
    from rlhfkit.label.store import Store
    from tests.label_server import LabelServer, make_project

    media = tmp_path / "media"
    media.mkdir()
    seed_clip = media / "seed.gif"
    Image.new("RGB", (8, 8)).save(seed_clip)
    project = make_project(tmp_path / "clips.db", [{"prompt": "warm-up", "responses": [{"media": "seed.gif"}, "text"]}],
                           kind=mode, media_dir=str(media))
    with LabelServer(project) as srv:
        person = srv.client(srv.add_annotator("pat"))
        stop = threading.Event()
        answered: dict[str, object] = {}

        def label_loop() -> None:
            while not stop.is_set():
                task = person.get("/api/next").json()["task"]
                if task is None:
                    time.sleep(0.2)
                    continue
                lengths = []
                for cand in task["candidates"]:
                    if "media_url" not in cand:
                        lengths.append(0)
                        continue
                    gif = Image.open(io.BytesIO(person.get(cand["media_url"]).content))
                    lengths.append(gif.n_frames)
                body: dict[str, object] = {"assignment_id": task["assignment_id"], "submission_id": uuid.uuid4().hex}
                if mode == "compare":
                    body["choice"] = "left" if lengths[0] > lengths[1] else "right" if lengths[1] > lengths[0] else "tie"
                else:  # shown in a shuffled order; scores go by each candidate's index
                    scores = [0] * len(lengths)
                    for cand, n in zip(task["candidates"], lengths):
                        scores[cand["index"]] = 1 + round(6 * min(n, 25) / 25)
                    body["ratings"] = {"overall": scores}
                r = person.post("/api/labels", params={"next": "false"}, json=body)
                assert r.status_code == 200, r.text
                answered[task["item"]] = body

        worker = threading.Thread(target=label_loop, daemon=True)
        worker.start()
        out = tmp_path / "run"
        budget = 40 if mode == "compare" else 80
        try:
            train(load_config(GymRLHFConfig, None, _args(
                out, "ppo.total_steps=12288", "env.num_envs=4", "ppo.n_steps=128", f"feedback.budget={budget}",
                "feedback.initial=20", "feedback.until=0.5", "feedback.teacher=app", f"feedback.mode={mode}",
                "eval.every=12288", "eval.episodes=5",
                f"feedback.teacher_options={{project: {project}, timeout: 120, poll: 0.2}}", "reward.epochs=20")))
        finally:
            stop.set()
            worker.join(timeout=10)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("feedback/asked", 0) for r in rows) == budget
    store = Store.open(project)
    labels = [r for r in raw_rows(store) if r["item"].startswith("rlhf-")]
    store.close()
    assert {r["item"] for r in labels} <= set(answered)
    used = max(r.get("feedback/labels", 0) for r in rows)
    if mode == "compare":
        assert len(labels) == used  # every label the trainer used is stored
    else:  # up to 4 clips per item, each clip's score one label for the trainer
        assert sum(len(r["ratings"]["overall"]) for r in labels) == used
        kept = [json.loads(x)["score"] for x in (out / "labels.jsonl").read_text().splitlines()]
        given = sorted(float(v) for r in labels for v in r["ratings"]["overall"])
        assert sorted(kept) == given
    evals = [r["eval/return"] for r in rows if "eval/return" in r]
    assert evals[-1] > 25, evals  # above a random policy (~22)


def test_two_processes_share_labels_and_resume_exactly(tmp_path: Path):
    """Under torchrun each rank asks its share of the queries from its own segments; every rank keeps
    the gathered labels, so the agents stay identical, and a resumed pair of ranks continues exactly."""
    out = tmp_path / "ddp"
    args = ("gym", "rlhf", *_args(out, "ppo.total_steps=2048", "env.num_envs=2", "save_every=2", "save_total_limit=0",
                                  "eval.every=0", "eval.episodes=1", "feedback.budget=31", "feedback.initial=9",
                                  "feedback.until=1.0", "seed=3"))
    res = _cli(*args, cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    assert max(_losses(out, "dist/param_divergence").values()) == 0.0
    # 8 updates (2 ranks x 2 envs x 64 steps each): 9 first + 22 x (1 - (7/8)^2) = 9 + 5 by the first
    assert _losses(out, "feedback/asked")[1] == 14 and max(_losses(out, "feedback/asked").values()) == 31
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 31 and [r["query"] for r in labels] == list(range(1, 32))
    keys = ("train/policy_loss", "reward/loss")
    full = {k: _losses(out, k) for k in keys}
    rewind(out, 4, drop=(6, 8))
    res = _cli(*args, "--resume", cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    for key, values in full.items():
        again = _losses(out, key)
        for step in (5, 6, 7, 8):
            if step in values:
                assert again[step] == pytest.approx(values[step], abs=1e-6), (key, step)
    res = _cli(*args, "--resume", cwd=tmp_path)  # one process cannot take over two ranks' picks
    assert res.returncode != 0 and "written by 2 process(es)" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_a_person_in_the_browser_labels_clips_while_the_trainer_waits(tmp_path: Path, page):
    """The human-in-the-loop check through the real pages: a scripted person in headless Chromium
    watches the two clips (reads their frame counts), presses 1, 2 or 3, and waits on the "nothing left"
    page for the trainer's next clips; `gym rlhf` (in a thread) learns from those answers."""
    from PIL import Image
    from playwright.sync_api import expect

    from rlhfkit.label.export import raw_rows
    from rlhfkit.label.store import Store
    from tests.label_server import LabelServer, make_project

    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (8, 8)).save(media / "seed.gif")
    project = make_project(tmp_path / "clips.db", [{"prompt": "warm-up", "responses": [{"media": "seed.gif"}, "text"]}],
                           kind="compare", media_dir=str(media))
    out = tmp_path / "run"
    errors: list[BaseException] = []

    def trainer() -> None:
        try:
            train(load_config(GymRLHFConfig, None, _args(
                out, "ppo.total_steps=12288", "env.num_envs=4", "ppo.n_steps=128", "feedback.budget=30",
                "feedback.initial=16", "feedback.until=0.5", "feedback.teacher=app", "eval.every=12288",
                "eval.episodes=5", f"feedback.teacher_options={{project: {project}, timeout: 300, poll: 0.2}}",
                "reward.epochs=20")))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with LabelServer(project) as srv:
        page.goto(srv.login_url(srv.add_annotator("pat")))
        worker = threading.Thread(target=trainer, daemon=True)
        worker.start()
        pressed = 0
        deadline = time.monotonic() + 600
        while worker.is_alive() and time.monotonic() < deadline:
            if page.locator("h1", has_text="Nothing left for you").count():
                page.wait_for_timeout(300)
                page.reload()
                continue
            prompt = page.inner_text(".prompt")
            clips = page.locator(".candidate img.clip")
            frames = []
            for i in range(clips.count()):
                body = page.request.get(clips.nth(i).evaluate("img => img.src")).body()
                frames.append(Image.open(io.BytesIO(body)).n_frames)
            if len(frames) < 2:  # the warm-up item (a clip beside a text): skip it
                page.keyboard.press("s")
            else:
                page.keyboard.press("1" if frames[0] > frames[1] else "2" if frames[1] > frames[0] else "3")
                pressed += 1
            expect(page.locator(".prompt, h1")).not_to_have_text(prompt, timeout=10_000)
        worker.join(timeout=60)
    assert not errors, errors
    assert not worker.is_alive()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    store = Store.open(project)
    labels = [r for r in raw_rows(store) if r["item"].startswith("rlhf-")]
    store.close()
    assert len(labels) == pressed == max(r.get("feedback/labels", 0) for r in rows) == 30
    evals = [r["eval/return"] for r in rows if "eval/return" in r]
    assert evals[-1] > 25, evals  # above a random policy (~22)


def test_a_mode_the_teacher_or_project_cannot_answer_is_refused(tmp_path: Path):
    from tests.label_server import make_project

    media = tmp_path / "media"
    media.mkdir()
    (media / "a.gif").write_bytes(b"GIF89a")
    project = make_project(tmp_path / "p.db", [{"prompt": "p", "responses": [{"media": "a.gif"}, "b"]}],
                           kind="compare", media_dir=str(media))
    cfg = load_config(GymRLHFConfig, None, _args(tmp_path / "run", "feedback.mode=rate"))
    teacher = load_teacher("app", {"project": project}, seed=0)
    with pytest.raises(ConfigError, match="rate, but the label project is a compare project"):
        _RLHFRun(cfg, DistInfo(), torch.device("cpu"), teacher)

    class OnlyCompares:
        def label(self, pairs):
            return [1.0] * len(pairs)

    with pytest.raises(ConfigError, match="rate needs a teacher with rate()"):
        _RLHFRun(cfg, DistInfo(), torch.device("cpu"), OnlyCompares())
    with pytest.raises(ConfigError, match="expected a compare or rate project"):
        load_teacher("app", {"project": make_project(tmp_path / "t.db", [{"prompt": "p", "responses": ["a", "b"]}],
                                                     kind="compare")}, seed=0)
