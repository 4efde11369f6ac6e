"""The human-feedback loop through the label app on tiny models: a model writes candidates
(`label init --model`), people answer (the queue, as the server runs it), the export trains a reward
model and DPO, and the reward model orders the next batch (`label add --priority`)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.config import load_config
from rlhfkit.data.formats import validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.label.assign import Queue
from rlhfkit.label.store import Store
from tests.conftest import write_jsonl

PROMPTS = [{"prompt": f"Tell me about {t}."} for t in ("the sea", "bread", "trains", "music", "winter", "cats")]
TINY = ["model.name=tiny:llama", "train.max_steps=2", "train.batch_size=2", "data.max_length=96",
        "progress=false", "tensorboard=false"]


def cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exc:
        assert exc.code in (0, None), f"rlhfkit {' '.join(args)} exited {exc.code}"


def label_everything(target: str, people: list[str], prefer) -> int:  # noqa: ANN001
    """Each person answers every task they get with `prefer(task) -> answer fields`; returns labels stored."""
    store = Store.open(target)
    queue = Queue(store)
    n = 0
    for name in people:
        store.add_annotator(name)
        me = store.who(store.rotate_token(name))
        while (task := queue.next_for(me["id"])) is not None:
            queue.submit(me["id"], {"assignment_id": task.assignment_id, "submission_id": uuid.uuid4().hex,
                                    **prefer(task)})
            n += 1
    store.close()
    return n


def longest_first(task) -> dict:  # noqa: ANN001
    """A stand-in person who ranks longer answers higher."""
    order = sorted(task.candidates, key=lambda c: (-len(c["text"]), c["index"]))
    return {"ranking": [c["index"] for c in order]}


def test_model_candidates_people_export_reward_dpo_and_priority(tmp_path: Path):
    from rlhfkit.recipes.dpo import DPOConfig
    from rlhfkit.recipes.dpo import train as train_dpo
    from rlhfkit.recipes.reward import RewardConfig
    from rlhfkit.recipes.reward import train as train_reward

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    db = str(tmp_path / "feedback.db")
    cli("label", "init", db, "--model", "tiny:llama", "--prompts", str(prompts), "--samples", "3",
        "--kind", "rank", "--overlap", "2", "--max-new-tokens", "12", "--temperature", "1.5")
    store = Store.open(db)
    n_items = store.count_items()
    store.close()
    assert n_items >= 4  # a prompt whose 3 samples were not distinct would be left out

    assert label_everything(db, ["ann", "ben"], longest_first) == 2 * n_items
    prefs = tmp_path / "prefs.jsonl"
    cli("label", "export", db, "-o", str(prefs), "--rank-pairs", "best_worst")
    samples, problems = validate_rows(load_rows(str(prefs)), "preference")
    assert problems == [] and len(samples) >= 1
    assert all(len(s.chosen) >= len(s.rejected) for s in samples)  # the people's preference survived the vote
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert all(r["votes"]["chosen"] == 2 and r["agreement"] == 1.0 for r in rows)

    reward_run = train_reward(load_config(RewardConfig, None, [
        *TINY, f"data.train={prefs}", "data.eval_fraction=0", f"output_dir={tmp_path / 'reward'}"]))
    train_dpo(load_config(DPOConfig, None, [
        *TINY, f"data.train={prefs}", f"output_dir={tmp_path / 'dpo'}"]))
    assert (tmp_path / "dpo" / "model").is_dir()

    more = write_jsonl(tmp_path / "more.jsonl", [
        {"prompt": "Which is better?", "responses": ["yes", "no", "maybe so"], "id": "q1"},
        {"prompt": "Say something.", "responses": ["a long answer with many words", "short", "mid size"], "id": "q2"},
    ])
    cli("label", "add", db, "--from", str(more), "--priority", str(reward_run))
    store = Store.open(db)
    from sqlalchemy import select

    from rlhfkit.label import schema as S

    with store.read() as conn:
        added = conn.execute(select(S.items.c.key, S.items.c.priority, S.items.c.source)
                             .where(S.items.c.key.in_(["q1", "q2"]))).all()
    store.close()
    assert len(added) == 2
    for row in added:  # priority = -(smallest reward gap between the item's answers)
        assert row.source["reward_gap"] >= 0 and row.priority == pytest.approx(-row.source["reward_gap"], abs=1e-6)


def test_the_label_server_modules_load_no_training_code():
    import subprocess

    code = ("import sys, rlhfkit.label.app, rlhfkit.label.commands; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ratings_train_a_regression_reward_model_and_rewrites_train_sft(tmp_path: Path):
    from rlhfkit.recipes.reward import RewardConfig
    from rlhfkit.recipes.reward import train as train_reward
    from rlhfkit.recipes.sft import SFTConfig
    from rlhfkit.recipes.sft import train as train_sft

    rows = [{"prompt": f"Describe {t}.", "responses": [f"{t} is nice.", f"I do not know {t}."]}
            for t in ("rain", "bread", "trains", "cats")]
    db = str(tmp_path / "rate.db")
    cli("label", "init", db, "--from", str(write_jsonl(tmp_path / "c.jsonl", rows)), "--kind", "rate",
        "--scale", "1-5", "--criteria", "helpful,harmless", "--rewrite")

    def rate(task) -> dict:  # noqa: ANN001 - a person who likes confident answers and fixes the other one
        scores = [5 if "nice" in task.candidates[task.shown_order.index(i)]["text"] else 2
                  for i in range(len(task.candidates))]
        unsure = next(i for i in range(2) if scores[i] == 2)
        return {"ratings": {"helpful": scores, "harmless": [4, 4]},
                "rewrite": {"index": unsure, "text": "Here is what I know about it."}}

    assert label_everything(db, ["ann"], rate) == 4
    ratings, sft = tmp_path / "ratings.jsonl", tmp_path / "sft.jsonl"
    cli("label", "export", db, "--what", "ratings", "-o", str(ratings))
    cli("label", "export", db, "--what", "sft", "-o", str(sft))
    rated = [json.loads(line) for line in ratings.read_text().splitlines()]
    assert sorted(r["score"] for r in rated) == [3.0] * 4 + [4.5] * 4  # mean of helpful and harmless
    assert all(r["scores"]["harmless"] == 4 for r in rated)
    train_reward(load_config(RewardConfig, None, [*TINY, "mode=regression", f"data.train={ratings}",
                                                  "data.eval_fraction=0", f"output_dir={tmp_path / 'rm'}"]))
    train_sft(load_config(SFTConfig, None, [*TINY, f"data.train={sft}", f"output_dir={tmp_path / 'sft'}"]))
    assert (tmp_path / "rm" / "model").is_dir() and (tmp_path / "sft" / "model").is_dir()


def test_the_label_demo_samples_candidates_prints_working_links_and_serves(tmp_path: Path):
    """`rlhfkit demo --label` (make demo-label), here with a tiny model instead of the bundled one."""
    import re
    import subprocess
    import time

    import httpx

    from tests.label_services import free_port

    port = free_port()
    db = tmp_path / "demo" / "feedback.db"
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "demo", "--label", "model=tiny:llama",
                             "max_new_tokens=8", f"db={db}", f"port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        while "add annotators" not in out:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"the demo exited:\n{out}"
            out += line
        links = dict(re.findall(r"(alice|bob): (http://\S+)", out))
        assert set(links) == {"alice", "bob"} and f":{port}/login?token=" in links["alice"]
        for _ in range(100):  # the server starts after the links are printed
            try:
                r = httpx.get(links["alice"], follow_redirects=True, trust_env=False)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 200 and "Prompt" in r.text  # alice's first item
        store = Store.open(str(db))
        assert store.count_items() >= 1 and store.settings.overlap == 2 and "tie" in store.settings.guidelines
        store.close()
    finally:
        proc.kill()
        proc.wait()
