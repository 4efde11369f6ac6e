"""The label app's rules, on SQLite and on a real PostgreSQL: queue, submissions, undo, dashboard numbers,
exports; and its security through a real `rlhfkit label serve` process.

Queue, submission, stats and export tests run in-process on the Store and Queue the server uses (each
test twice: `backend` sqlite and postgres); the security tests start one real server (SQLite) and talk
to it over HTTP the way a browser or a script would.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from rlhfkit.data.formats import validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import RlhfkitError
from rlhfkit.label import schema as S
from rlhfkit.label.assign import Queue, SubmitError, Task
from rlhfkit.label.export import export, export_rows, preference_rows, rating_rows, raw_rows, sft_rows
from rlhfkit.label.stats import project_status
from rlhfkit.label.store import LabelError, Store
from tests.label_server import REPO, LabelServer, compare_rows, make_project

BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def open_project(project):  # noqa: ANN201
    """`open_project(rows, **settings) -> (store, queue)` on the parametrized backend; closed afterwards."""
    opened: list[Store] = []

    def make(rows: list[dict[str, Any]], **settings: Any) -> tuple[Store, Queue]:
        store = Store.open(project(rows, **settings))
        opened.append(store)
        return store, Queue(store)

    yield make
    for store in opened:
        store.close()


def person(store: Store, name: str) -> int:
    return store.who(store.add_annotator(name))["id"]  # type: ignore[index]


def side(task: Task, index: int) -> str:
    """The side (left/right) that candidate `index` of the item was shown on."""
    return "left" if task.shown_order[0] == index else "right"


def submit(queue: Queue, who: int, task: Task, sid: str | None = None, **answer: Any) -> tuple[int, bool]:
    return queue.submit(who, {"assignment_id": task.assignment_id, "submission_id": sid or uuid.uuid4().hex,
                              **answer})


def choose(queue: Queue, who: int, choice: str, strength: str | None = None, order: list[int] | None = None,
           **extra: Any) -> Task:
    """Take `who`'s next compare task and answer it: choice a / b (the item's own candidates, whatever
    side they were shown on), tie, both_bad or skip. `order` first replaces the shown order."""
    task = queue.next_for(who)
    assert task is not None, "expected a task"
    if order is not None:
        with queue.store.write() as conn:
            conn.execute(update(S.assignments).where(S.assignments.c.id == task.assignment_id)
                         .values(shown_order=order))
        task.shown_order = order
    body: dict[str, Any] = {"choice": side(task, "ab".index(choice)) if choice in ("a", "b") else choice, **extra}
    if strength:
        body["strength"] = strength
    submit(queue, who, task, **body)
    return task


def keys_of(store: Store) -> dict[int, str]:
    with store.read() as conn:
        return dict(conn.execute(select(S.items.c.id, S.items.c.key)).all())


def item_rows(store: Store) -> dict[str, Any]:
    with store.read() as conn:
        return {r.key: r for r in conn.execute(select(S.items))}


def live_label_count(store: Store) -> int:
    with store.read() as conn:
        return len(conn.execute(select(S.labels.c.id).where(S.labels.c.retracted_at.is_(None))).all())


def written_rows(path: Path, kind: str | None) -> list[dict[str, Any]]:
    """The rows of an exported file, read back with rlhfkit's own reader and validator."""
    rows = load_rows(str(path))
    if kind is not None:
        samples, problems = validate_rows(rows, kind)  # type: ignore[arg-type]
        assert problems == []
        assert len(samples) == len(rows)
    return [r.data for r in rows]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ people


@BOTH
def test_people_have_unique_names_and_admin_is_the_admins(open_project):
    store, _ = open_project(compare_rows(1))
    token = store.add_annotator("alice")
    with pytest.raises(LabelError, match="already exists"):
        store.add_annotator(" alice ")
    with pytest.raises(LabelError, match="the project's admin"):
        store.add_annotator("admin")
    for bad in ("", "a/b", "tab\there", "x" * 101):
        with pytest.raises(LabelError, match="annotator name"):
            store.add_annotator(bad)
    admin = store.admin_token()
    assert store.who(admin)["role"] == "admin" and store.who(token)["role"] == "annotator"
    again = store.admin_token()  # each serve start: a new admin link, the old one stops working
    assert store.who(admin) is None and store.who(again)["name"] == "admin"
    store.deactivate("alice")
    assert store.who(token) is None
    new = store.rotate_token("alice")
    assert store.who(new)["name"] == "alice" and store.who(token) is None
    with pytest.raises(LabelError, match="no annotator named 'bob'"):
        store.rotate_token("bob")


# ------------------------------------------------------------------------------------------ the queue


@BOTH
def test_overlap_two_gives_each_item_to_exactly_two_different_annotators_then_it_is_full(open_project):
    store, queue = open_project(compare_rows(3), overlap=2)
    alice, bob, carol = (person(store, n) for n in ("alice", "bob", "carol"))
    for who in (alice, bob):
        for _ in range(3):
            choose(queue, who, "a")
        assert queue.next_for(who) is None
    assert queue.next_for(carol) is None  # every item already has its two annotators
    assert queue.progress(carol) == {"done": 0, "labeled": 0, "skipped": 0, "left": 0}
    with store.read() as conn:
        per_item = Counter(conn.scalars(select(S.labels.c.item_id)))
        pairs = conn.execute(select(S.labels.c.item_id, S.labels.c.annotator_id)).all()
    assert sorted(per_item.values()) == [2, 2, 2]
    assert len(set(pairs)) == 6  # two different people per item
    assert all(r.slots_left == 0 and r.n_labels == 2 for r in item_rows(store).values())
    assert project_status(store)["items_done"] == 3


@BOTH
def test_nobody_gets_the_same_item_twice_also_after_a_skip_or_an_undo(open_project):
    store, queue = open_project(compare_rows(3), overlap=2)
    alice = person(store, "alice")
    shown = []
    first = choose(queue, alice, "skip")
    shown.append(first.item_id)
    second = choose(queue, alice, "a")
    shown.append(second.item_id)
    assert queue.undo(alice) == second.item_id
    again = queue.next_for(alice)
    assert again is not None and again.assignment_id == second.assignment_id  # the same task, not a new one
    submit(queue, alice, again, choice="tie")
    while (task := queue.next_for(alice)) is not None:
        shown.append(task.item_id)
        submit(queue, alice, task, choice="left")
    assert len(shown) == len(set(shown)) == 3  # the skipped item never came back to her
    with store.read() as conn:
        mine = conn.execute(select(S.assignments.c.item_id).where(S.assignments.c.annotator_id == alice)).all()
    assert len(mine) == 3


@BOTH
def test_an_annotator_gets_their_open_item_back_on_reload(open_project):
    store, queue = open_project(compare_rows(2), overlap=1)
    alice, bob = person(store, "alice"), person(store, "bob")
    first = queue.next_for(alice)
    reload = queue.next_for(alice)
    assert reload is not None and first is not None
    assert (reload.assignment_id, reload.shown_order) == (first.assignment_id, first.shown_order)
    other = queue.next_for(bob)
    assert other is not None and other.item_id != first.item_id  # her open item holds its only slot


@BOTH
def test_a_skip_hands_the_slot_to_someone_else(open_project):
    store, queue = open_project(compare_rows(1), overlap=1)
    alice, bob = person(store, "alice"), person(store, "bob")
    task = queue.next_for(alice)
    assert queue.next_for(bob) is None  # alice holds the only slot
    submit(queue, alice, task, choice="skip")
    theirs = queue.next_for(bob)
    assert theirs is not None and theirs.item_id == task.item_id
    assert queue.next_for(alice) is None
    status = project_status(store)
    assert (status["labels"], status["skips"], status["items_started"]) == (0, 1, 0)


@BOTH
def test_an_expired_lease_returns_the_item_to_the_queue(open_project):
    store, queue = open_project(compare_rows(1), overlap=1, lease_seconds=10)
    alice, bob = person(store, "alice"), person(store, "bob")
    task = queue.next_for(alice)
    assert task is not None and queue.next_for(bob) is None
    with store.write() as conn:  # alice opened it 11 s ago and went for coffee
        conn.execute(update(S.assignments).values(created_at=time.time() - 11))
    later = Queue(store)  # a queue looks for expired leases on its first call (then every 30 s)
    theirs = later.next_for(bob)
    assert theirs is not None and theirs.item_id == task.item_id
    assert later.next_for(alice) is None  # her lease is gone and she is not shown the item twice
    with store.read() as conn:
        states = dict(conn.execute(select(S.assignments.c.annotator_id, S.assignments.c.state)).all())
    assert states == {alice: "expired", bob: "open"}


@BOTH
def test_two_servers_expiring_the_same_lease_at_once_free_its_slot_once(open_project):
    from rlhfkit.label.assign import _expire

    store, queue = open_project(compare_rows(1), overlap=1, lease_seconds=10)
    alice = person(store, "alice")
    queue.next_for(alice)
    with store.write() as conn:
        conn.execute(update(S.assignments).values(created_at=time.time() - 11))
    other = Store.open(store.target)  # a second server on the same database
    try:
        second: list[BaseException] = []

        def expire_there() -> None:
            try:
                with other.write() as conn:
                    _expire(conn, other.settings)
            except BaseException as exc:  # noqa: BLE001 (reported below)
                second.append(exc)

        thread = threading.Thread(target=expire_there)
        with store.write() as conn:
            _expire(conn, store.settings)
            thread.start()  # it finds the same stale lease, and waits for this transaction
            time.sleep(0.5)
        thread.join(30)
        assert second == []
    finally:
        other.close()
    assert item_rows(store)["item-1"].slots_left == 1  # freed once: one more annotator, not two


@BOTH
def test_gold_items_are_mixed_in_at_about_the_gold_rate_and_never_exported(open_project, tmp_path):
    rows = compare_rows(12) + [{**r, "id": f"gold-{i}", "gold": "a"} for i, r in enumerate(compare_rows(4, "g "))]
    store, queue = open_project(rows, overlap=1, gold_rate=0.25)
    alice, bob = person(store, "alice"), person(store, "bob")
    gold_seen = []
    for _ in range(8):
        task = choose(queue, alice, "a")
        gold_seen.append(task.is_gold)
    # a gold item whenever her gold share would fall below 0.25: tasks 1 and 5 of 8
    assert gold_seen == [True, False, False, False, True, False, False, False]
    bob_task = queue.next_for(bob)  # gold items take no slot: bob gets the first gold item too
    assert bob_task is not None and bob_task.is_gold and bob_task.key == "gold-0"
    status = project_status(store)
    assert (status["items"], status["gold_items"], status["labels"]) == (12, 4, 8)
    assert status["agreement"]["pairable_units"] == 0 and status["position_bias"]["decided"] == 6
    rows_out, _ = preference_rows(store)
    assert len(rows_out) == 6 and not any(r["id"].startswith("gold") or "g question" in r["prompt"] for r in rows_out)
    raw = raw_rows(store)
    assert [r["gold_item"] for r in raw] == gold_seen  # the raw audit file keeps them, marked
    path = tmp_path / "prefs.jsonl"
    export(store, "preferences", str(path))
    assert len(written_rows(path, "preference")) == 6


@BOTH
def test_higher_priority_items_are_labeled_first(open_project):
    rows = [{**r, "id": f"p{i}", "priority": p} for i, (r, p) in enumerate(zip(compare_rows(5), [0, 5, -1, 5, 2.5]))]
    store, queue = open_project(rows, overlap=1)
    alice = person(store, "alice")
    order = []
    while (task := queue.next_for(alice)) is not None:
        order.append(task.key)
        submit(queue, alice, task, choice="left")
    assert order == ["p1", "p3", "p4", "p0", "p2"]  # equal priorities in the order they were added


# ------------------------------------------------------------------------------------------ submissions


@BOTH
def test_a_retry_with_the_same_submission_id_returns_the_same_label_and_stores_one_row(open_project):
    store, queue = open_project(compare_rows(2), overlap=1)
    alice = person(store, "alice")
    task = queue.next_for(alice)
    first = submit(queue, alice, task, sid="retry-0001", choice="left", strength="clearly")
    again = submit(queue, alice, task, sid="retry-0001", choice="left", strength="clearly")
    assert first == (first[0], False) and again == (first[0], True)
    assert live_label_count(store) == 1
    assert item_rows(store)[task.key].n_labels == 1


@BOTH
def test_a_retry_sent_while_the_first_submission_is_still_being_stored_gets_the_duplicate_answer(open_project):
    store, queue = open_project(compare_rows(2), overlap=1)
    alice = person(store, "alice")
    task = queue.next_for(alice)
    body = {"assignment_id": task.assignment_id, "submission_id": "slow-first-0001", "choice": "left"}
    other = Store.open(store.target)  # the retry reaches another worker (or server)
    try:
        answers: list[Any] = []

        def retry() -> None:
            try:
                answers.append(Queue(other).submit(alice, dict(body)))
            except BaseException as exc:  # noqa: BLE001 (reported below)
                answers.append(exc)

        thread = threading.Thread(target=retry)
        with store.write() as conn:  # the first request, inside its transaction
            first_id, _ = queue._submit(conn, alice, body["submission_id"], task.assignment_id, body)
            thread.start()
            time.sleep(0.5)
        thread.join(30)
    finally:
        other.close()
    assert answers == [(first_id, True)]
    assert live_label_count(store) == 1


@BOTH
def test_a_second_different_submission_for_a_labeled_assignment_is_refused_with_409(open_project):
    store, queue = open_project(compare_rows(2), overlap=1)
    alice = person(store, "alice")
    task = queue.next_for(alice)
    submit(queue, alice, task, choice="left")
    with pytest.raises(SubmitError, match="already labeled") as exc:
        submit(queue, alice, task, choice="right")
    assert exc.value.status == 409
    other = queue.next_for(alice)
    with pytest.raises(SubmitError, match="submission_id") as exc:  # a used id for another task
        submit(queue, alice, other, sid=store_sid(store), choice="left")
    assert exc.value.status == 409
    assert live_label_count(store) == 1


def store_sid(store: Store) -> str:
    with store.read() as conn:
        return conn.scalar(select(S.labels.c.submission_id).limit(1))  # type: ignore[return-value]


@BOTH
def test_someone_elses_assignment_is_404(open_project):
    store, queue = open_project(compare_rows(2), overlap=1)
    alice, bob = person(store, "alice"), person(store, "bob")
    task = queue.next_for(alice)
    for who, aid in ((bob, task.assignment_id), (alice, task.assignment_id + 1000)):
        with pytest.raises(SubmitError, match="no task") as exc:
            queue.submit(who, {"assignment_id": aid, "submission_id": uuid.uuid4().hex, "choice": "left"})
        assert exc.value.status == 404
    assert live_label_count(store) == 0


@BOTH
def test_bad_answers_are_422_and_name_the_field(open_project):
    compare, cq = open_project(compare_rows(1), overlap=1)
    rank, rq = open_project([{"prompt": "order", "responses": ["x", "y", "z"]}], kind="rank")
    rate, tq = open_project([{"prompt": "score", "responses": ["x", "y"]}], kind="rate", scale=(1, 5),
                            criteria=["helpful", "honest"])
    good_ratings = {"helpful": [1, 5], "honest": [3, 3]}
    cases = [
        (cq, compare, {"choice": "a"}, "'choice'"),
        (cq, compare, {"choice": "middle"}, "'choice'"),
        (cq, compare, {"choice": "tie", "strength": "clearly"}, "'strength'"),
        (cq, compare, {"choice": "left", "strength": "very"}, "'strength'"),
        (cq, compare, {"choice": "left", "rewrite": {"index": 0, "text": "better"}}, "'rewrite'"),
        (cq, compare, {"choice": "left", "comment": 5}, "'comment'"),
        (cq, compare, {"choice": "left", "duration_ms": -1}, "'duration_ms'"),
        (rq, rank, {"ranking": [0, 1]}, "'ranking'"),
        (rq, rank, {"ranking": [0, 1, 1]}, "'ranking'"),
        (rq, rank, {"ranking": [0, 1, 3]}, "'ranking'"),
        (rq, rank, {"ranking": "012"}, "'ranking'"),
        (rq, rank, {"choice": "left", "ranking": [0, 1, 2]}, "'choice'"),
        (tq, rate, {"ratings": {"helpful": [1, 6], "honest": [3, 3]}}, "'ratings.helpful'"),
        (tq, rate, {"ratings": {"helpful": [0, 5], "honest": [3, 3]}}, "'ratings.helpful'"),
        (tq, rate, {"ratings": {"helpful": [1.5, 5], "honest": [3, 3]}}, "'ratings.helpful'"),
        (tq, rate, {"ratings": {"helpful": [1, 5]}}, "'ratings.honest'"),
        (tq, rate, {"ratings": {**good_ratings, "funny": [1, 1]}}, "unknown criterion 'funny'"),
        (tq, rate, {"ratings": [1, 5]}, "'ratings'"),
    ]
    people = {id(s): person(s, "alice") for s in (compare, rank, rate)}
    for queue, store, body, field in cases:
        who = people[id(store)]
        task = queue.next_for(who)
        with pytest.raises(SubmitError) as exc:
            submit(queue, who, task, **body)
        assert exc.value.status == 422, body
        assert field in str(exc.value), (body, str(exc.value))
    for queue, store, body in ((cq, compare, {"choice": "left"}), (rq, rank, {"ranking": [2, 0, 1]}),
                               (tq, rate, {"ratings": good_ratings})):
        who = people[id(store)]
        assert live_label_count(store) == 0  # nothing was stored by the refused answers
        submit(queue, who, queue.next_for(who), **body)
        assert live_label_count(store) == 1
    for body in ({"submission_id": "short", "assignment_id": 1}, {"submission_id": "x" * 10, "assignment_id": "1"}):
        with pytest.raises(SubmitError, match="submission_id|assignment_id") as exc:
            cq.submit(people[id(compare)], body)
        assert exc.value.status == 422


# ------------------------------------------------------------------------------------------ undo


@BOTH
def test_undo_retracts_the_label_keeps_it_in_the_raw_export_and_gives_the_item_back_first(open_project, tmp_path):
    store, queue = open_project(compare_rows(3), overlap=1)
    alice, bob = person(store, "alice"), person(store, "bob")
    first = choose(queue, alice, "a", strength="clearly")
    pending = queue.next_for(alice)  # she has the next item open when she presses undo
    assert queue.undo(alice) == first.item_id
    back = queue.next_for(alice)
    assert back is not None and back.assignment_id == first.assignment_id  # the undone item comes first
    theirs = queue.next_for(bob)  # the item she had open is still hers: bob gets the third
    assert theirs is not None and theirs.item_id not in (first.item_id, pending.item_id)
    submit(queue, alice, back, choice=side(back, 1))  # she changes her mind: b
    after = queue.next_for(alice)  # and then the item she had open comes back to her
    assert after is not None and after.assignment_id == pending.assignment_id
    raw = raw_rows(store)
    assert [(r["item_id"], r["choice"], r["retracted_at"] is not None) for r in raw] == [
        (first.item_id, "a", True), (first.item_id, "b", False)]
    assert raw[0]["strength"] == "clearly" and raw[0]["retracted_at"] >= raw[0]["created_at"]
    rows, _ = preference_rows(store)
    assert [r["chosen"] for r in rows] == ["answer 0 b"]
    path = tmp_path / "raw.jsonl"
    export(store, "raw", str(path))
    assert [r["retracted_at"] is not None for r in written_rows(path, None)] == [True, False]
    assert queue.undo(bob) is None  # nothing to undo


@BOTH
def test_undos_give_items_back_newest_first_and_the_open_item_is_not_lost(open_project):
    store, queue = open_project([{**r, "id": f"q{i}"} for i, r in enumerate(compare_rows(4))], overlap=1)
    alice = person(store, "alice")
    choose(queue, alice, "skip")  # q0
    choose(queue, alice, "a")  # q1
    assert queue.next_for(alice).key == "q2"  # open when she presses undo twice
    queue.undo(alice)
    queue.undo(alice)
    seen = []
    while (task := queue.next_for(alice)) is not None:
        seen.append(task.key)
        submit(queue, alice, task, choice="tie")
    assert seen == ["q0", "q1", "q2", "q3"]
    status = project_status(store)
    assert (status["labels"], status["skips"], status["retracted"], status["items_done"]) == (4, 0, 2, 4)


@BOTH
def test_undo_lowers_the_counts_in_status(open_project):
    store, queue = open_project(compare_rows(3), overlap=1)
    alice = person(store, "alice")
    choose(queue, alice, "a")
    choose(queue, alice, "b")
    before = project_status(store)
    assert (before["labels"], before["items_done"], before["items_started"], before["retracted"]) == (2, 2, 2, 0)
    assert queue.progress(alice) == {"done": 2, "labeled": 2, "skipped": 0, "left": 1}
    queue.undo(alice)
    after = project_status(store)
    assert (after["labels"], after["items_done"], after["items_started"], after["retracted"]) == (1, 1, 1, 1)
    assert after["annotators"][0]["labels"] == 1 and after["position_bias"]["decided"] == 1
    assert queue.progress(alice) == {"done": 1, "labeled": 1, "skipped": 0, "left": 2}
    choose(queue, alice, "skip")  # an undone skip gives the slot back to her, too
    assert project_status(store)["skips"] == 1
    queue.undo(alice)
    assert project_status(store)["skips"] == 0
    back = queue.next_for(alice)
    assert back is not None and back.key == "item-2"


# ------------------------------------------------------------------------------------------ dashboard numbers


@BOTH
def test_status_numbers_match_kappa_alpha_and_position_bias_computed_by_hand(open_project):
    rows = [{**r, "id": f"i{i}"} for i, r in enumerate(compare_rows(5))]
    store, queue = open_project(rows, overlap=2)
    alice, bob = person(store, "alice"), person(store, "bob")
    # item: (alice's choice, order shown to her), (bob's ...); order [1, 0] shows b on the left.
    plan = {"i0": (("a", [0, 1]), ("a", [0, 1])),
            "i1": (("b", [1, 0]), ("b", [0, 1])),
            "i2": (("a", [1, 0]), ("b", [1, 0])),
            "i3": (("tie", [0, 1]), ("a", [0, 1])),
            "i4": (("a", [0, 1]), ("skip", [0, 1]))}
    for key, answers in plan.items():
        for who, (choice, order) in zip((alice, bob), answers):
            assert choose(queue, who, choice, order=order).key == key
    status = project_status(store)
    # Cohen's kappa over the 4 items both labeled, i4 has one value (bob skipped it):
    #   pairs (a,a) (b,b) (a,b) (tie,a): p_o = 2/4; alice a 2, b 1, tie 1; bob a 2, b 2
    #   p_e = (2*2 + 1*2 + 1*0) / 16 = 6/16; kappa = (8/16 - 6/16) / (10/16) = 0.2
    assert status["agreement"]["kappa"] == [{"a": "alice", "b": "bob", "kappa": 0.2, "shared": 4}]
    # Krippendorff's alpha, nominal: 4 pairable units of 2 values: n_a = 4, n_b = 3, n_tie = 1, n = 8;
    #   disagreeing ordered pairs (weight 1/(m-1) = 1): a-b, b-a (i2), tie-a, a-tie (i3) -> D_o sum = 4
    #   expected: sum_{c != k} n_c n_k = 2 (4*3 + 4*1 + 3*1) = 38; alpha = 1 - (n - 1) * 4 / 38 = 10/38
    assert status["agreement"]["alpha"] == round(10 / 38, 4) and status["agreement"]["pairable_units"] == 4
    assert status["agreement"]["metric"] == "nominal"
    # position bias over decided (a/b) labels: alice i0 a on the left (won), i1 b left (won), i2 a right,
    #   i4 a left (won); bob i0 a left (won), i1 b right, i2 b left (won), i3 a left (won) -> 6 of 8
    assert status["position_bias"] == {"left_share": 0.75, "decided": 8}
    assert (status["items"], status["items_done"], status["items_started"]) == (5, 4, 5)
    assert (status["labels"], status["skips"], status["retracted"]) == (9, 1, 0)
    per = {a["name"]: a for a in status["annotators"]}
    assert set(per) == {"alice", "bob"} and (per["alice"]["labels"], per["bob"]["labels"]) == (5, 4)
    assert per["bob"]["skips"] == 1 and per["alice"]["gold_accuracy"] is None
    # disputed: i2 (a vs b) and i3 (tie vs a) are split 50/50, i0 and i1 agree; i4 has one label
    assert [(d["key"], d["share"]) for d in status["disputed"]] == [("i2", 0.5), ("i3", 0.5), ("i0", 1.0),
                                                                     ("i1", 1.0)]
    assert status["disputed"][0]["votes"] == {"a": 1, "b": 1} and status["disputed"][0]["majority"] is None


@BOTH
def test_gold_accuracy_per_annotator(open_project):
    rows = compare_rows(2) + [{"prompt": "gold one", "responses": ["right", "wrong"], "gold": "a"},
                              {"prompt": "gold two", "responses": ["wrong", "right"], "gold": "b"}]
    store, queue = open_project(rows, overlap=2, gold_rate=0.5)
    alice, bob = person(store, "alice"), person(store, "bob")
    # with gold_rate 0.5 the order is gold, item, gold, item
    for who, answers in ((alice, ["a", "a", "b", "a"]), (bob, ["a", "b", "a", "a"])):
        assert [choose(queue, who, c).is_gold for c in answers] == [True, False, True, False]
    per = {a["name"]: a for a in project_status(store)["annotators"]}
    assert (per["alice"]["gold_seen"], per["alice"]["gold_accuracy"]) == (2, 1.0)
    assert (per["bob"]["gold_seen"], per["bob"]["gold_accuracy"]) == (2, 0.5)
    status = project_status(store)
    assert status["agreement"]["pairable_units"] == 2  # gold labels are no agreement data


@BOTH
def test_gold_accuracy_of_a_ranking_is_the_share_of_pairs_in_the_gold_order(open_project):
    rows = [{"prompt": "p", "responses": ["x", "y", "z"]},
            {"prompt": "g", "responses": ["1", "2", "3"], "gold": [0, 1, 2]}]
    store, queue = open_project(rows, kind="rank", gold_rate=0.5)
    alice = person(store, "alice")
    task = queue.next_for(alice)
    assert task.is_gold
    submit(queue, alice, task, ranking=[0, 2, 1])  # (0,1) and (0,2) as in gold, (1,2) not: 2/3
    per = project_status(store)["annotators"][0]
    assert per["gold_accuracy"] == round(2 / 3, 3)


# ------------------------------------------------------------------------------------------ exports


@BOTH
def test_preference_export_majority_ties_both_bad_margin_votes_agreement_and_min_votes(open_project, tmp_path):
    rows = [{**r, "id": f"i{i}", "source_run": "r1"} for i, r in enumerate(compare_rows(6))]
    store, queue = open_project(rows, overlap=3)
    alice, bob, carol = (person(store, n) for n in ("alice", "bob", "carol"))
    plan = {"i0": [("a", "clearly"), ("a", "slightly"), ("b", None)],   # a wins, margin (1.0 + 0.5) / 2
            "i1": [("tie", None), ("tie", None), ("a", "clearly")],      # a tie majority
            "i2": [("both_bad", None), ("both_bad", None), ("b", None)],  # both bad
            "i3": [("a", None), ("b", None), ("tie", None)],             # undecided: dropped always
            "i4": [("b", None), ("b", None), ("b", None)],               # b, no strength: no margin
            "i5": [("a", "slightly"), ("skip", None), ("skip", None)]}   # one vote
    for key, answers in plan.items():
        for who, (choice, strength) in zip((alice, bob, carol), answers):
            assert choose(queue, who, choice, strength).key == key
    rows_out, stats = preference_rows(store)
    by_id = {r["id"]: r for r in rows_out}
    assert set(by_id) == {"i0", "i4", "i5"}
    assert by_id["i0"] == {"id": "i0", "source_run": "r1", "prompt": "question 0", "chosen": "answer 0 a",
                           "rejected": "answer 0 b", "margin": 0.75, "agreement": round(2 / 3, 4),
                           "votes": {"chosen": 2, "rejected": 1, "tie": 0, "both_bad": 0}}
    assert (by_id["i4"]["chosen"], by_id["i4"]["agreement"], "margin" in by_id["i4"]) == ("answer 4 b", 1.0, False)
    assert by_id["i5"]["votes"]["chosen"] == 1 and by_id["i5"]["margin"] == 0.5
    assert stats["undecided"] == 1 and stats["tie_dropped"] == 1 and stats["both_bad_dropped"] == 1
    kept, stats = preference_rows(store, ties="keep", both_bad="keep", min_votes=2)
    by_id = {r["id"]: r for r in kept}
    assert set(by_id) == {"i0", "i1", "i2", "i4"} and stats["too_few_votes"] == 1
    assert (by_id["i1"]["tie"], by_id["i1"]["label"], by_id["i1"]["votes"]) == (True, "tie", {"tie": 2, "a": 1})
    assert (by_id["i2"]["tie"], by_id["i2"]["label"], by_id["i2"]["agreement"]) == (True, "both_bad", round(2 / 3, 4))
    assert not any("tie" in by_id[k] for k in ("i0", "i4"))
    with pytest.raises(LabelError, match="--ties"):
        preference_rows(store, ties="half")
    # the file: rlhfkit's own validator accepts every row; the trainers' loader skips the tie rows
    from rlhfkit.data.prepare import load_examples

    path = tmp_path / "prefs.jsonl"
    export(store, "preferences", str(path), ties="keep", both_bad="keep", min_votes=2)
    written = written_rows(path, "preference")
    assert [r.get("tie", False) for r in written] == [False, False, True, True]  # tie rows last
    examples, skipped = load_examples(str(path), "preference", lambda s: s)
    assert (len(examples), skipped) == (2, [])
    assert {(e.chosen, e.margin) for e in examples} == {("answer 0 a", 0.75), ("answer 4 b", None)}


@BOTH
def test_rank_export_gives_all_majority_pairs_or_best_against_worst(open_project, tmp_path):
    rows = [{"prompt": "p0", "responses": ["x0", "x1", "x2"], "id": "clear"},
            {"prompt": "p1", "responses": ["y0", "y1", "y2"], "id": "cycle"}]
    store, queue = open_project(rows, kind="rank", overlap=3)
    plan = {"clear": [[0, 1, 2], [0, 2, 1], [1, 0, 2]], "cycle": [[0, 1, 2], [1, 2, 0], [2, 0, 1]]}
    people = [person(store, n) for n in ("alice", "bob", "carol")]
    for key, rankings in plan.items():
        for who, ranking in zip(people, rankings):
            task = queue.next_for(who)
            assert task.key == key
            submit(queue, who, task, ranking=ranking)
    rows_out, _ = preference_rows(store)
    pairs = [(r["id"], r["chosen"], r["rejected"], r["votes"]["chosen"], r["agreement"]) for r in rows_out]
    # clear: x0 over x1 in 2 of 3 rankings, x0 over x2 in 3, x1 over x2 in 2
    # cycle (a Condorcet cycle): y0 > y1 (2 of 3), y2 > y0 (2 of 3), y1 > y2 (2 of 3)
    assert pairs == [("clear", "x0", "x1", 2, round(2 / 3, 4)), ("clear", "x0", "x2", 3, 1.0),
                     ("clear", "x1", "x2", 2, round(2 / 3, 4)), ("cycle", "y0", "y1", 2, round(2 / 3, 4)),
                     ("cycle", "y2", "y0", 2, round(2 / 3, 4)), ("cycle", "y1", "y2", 2, round(2 / 3, 4))]
    best_worst, stats = preference_rows(store, rank_pairs="best_worst")
    # Borda (2, 1, 0 points by place): clear x0 2+2+1 = 5, x1 1+0+2 = 3, x2 0+1+0 = 1; cycle 3, 3, 3: undecided
    assert [(r["id"], r["chosen"], r["rejected"], r["borda"], r["agreement"]) for r in best_worst] == [
        ("clear", "x0", "x2", [5, 3, 1], 1.0)]
    assert stats["undecided"] == 1
    path = tmp_path / "rank.jsonl"
    export(store, "preferences", str(path))
    assert len(written_rows(path, "preference")) == 6


@BOTH
def test_rating_export_is_the_mean_score_per_answer_overall_or_for_one_criterion(open_project, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "rate these"}], "responses": ["good", "bad"], "id": "r0"}]
    store, queue = open_project(rows, kind="rate", scale=(1, 5), criteria=["helpful", "honest"], overlap=2)
    for name, ratings in (("alice", {"helpful": [4, 2], "honest": [5, 1]}),
                          ("bob", {"helpful": [2, 2], "honest": [5, 3]})):
        who = person(store, name)
        submit(queue, who, queue.next_for(who), ratings=ratings)
    rows_out = rating_rows(store)
    # good: helpful (4+2)/2 = 3, honest 5 -> score 4; bad: helpful 2, honest 2 -> score 2
    assert [(r["response"], r["score"], r["scores"], r["votes"]) for r in rows_out] == [
        ("good", 4.0, {"helpful": 3.0, "honest": 5.0}, 2), ("bad", 2.0, {"helpful": 2.0, "honest": 2.0}, 2)]
    assert [r["score"] for r in rating_rows(store, "helpful")] == [3.0, 2.0]
    with pytest.raises(LabelError, match="--criterion"):
        rating_rows(store, "funny")
    path = tmp_path / "ratings.jsonl"
    export(store, "ratings", str(path), criterion="honest")
    assert [r["score"] for r in written_rows(path, "rating")] == [5.0, 2.0]
    status = project_status(store)
    # interval alpha over 4 units (answer x criterion) of 2 values: (4,2) (2,2) (5,5) (1,3); n = 8
    #   D_o sum: the disagreeing ordered pairs, weight 1/(m-1) = 1: 4-2, 2-4 (2^2 each), 1-3, 3-1 -> 16
    #   counts n_1 = 1, n_2 = 3, n_3 = 1, n_4 = 1, n_5 = 2; D_e sum = 2 * sum_{c<k} n_c n_k (c-k)^2
    #   = 2 * (3 + 4 + 9 + 32 + 3 + 12 + 54 + 1 + 8 + 2) = 256; alpha = 1 - (n - 1) 16 / 256 = 0.5625
    assert status["agreement"]["alpha"] == pytest.approx(1 - 7 * 16 / 256, abs=1e-4)
    compare, _ = open_project(compare_rows(1))
    with pytest.raises(LabelError, match="rate projects"):
        rating_rows(compare)


@BOTH
def test_rewrites_become_sft_rows_and_pairs_of_the_rewrite_chosen_over_the_original(open_project, tmp_path):
    store, queue = open_project(compare_rows(2), overlap=1, rewrite=True)
    alice = person(store, "alice")
    first = choose(queue, alice, "a", rewrite={"index": 1, "text": "a corrected answer"})
    choose(queue, alice, "b", rewrite={"index": 0, "text": "answer 1 a"})  # "corrected" to the same text
    sft = sft_rows(store)
    assert [(r["id"], r["prompt"], r["completion"], r["candidate"]) for r in sft] == [
        (first.key, "question 0", "a corrected answer", 1), ("item-2", "question 1", "answer 1 a", 0)]
    prefs, stats = preference_rows(store)
    rewrites = [r for r in prefs if r.get("source") == "rewrite"]
    assert [(r["chosen"], r["rejected"]) for r in rewrites] == [("a corrected answer", "answer 0 b")]
    assert stats["rewrites"] == 1 and len(prefs) == 3
    assert len(preference_rows(store, rewrites=False)[0]) == 2
    path = tmp_path / "sft.jsonl"
    export(store, "sft", str(path))
    assert len(written_rows(path, "sft")) == 2
    export(store, "preferences", str(tmp_path / "p.jsonl"))
    assert len(written_rows(tmp_path / "p.jsonl", "preference")) == 3


@BOTH
def test_exports_after_a_chat_prompt_are_assistant_messages_the_trainers_can_tokenize(open_project, tmp_path,
                                                                                       tokenizer):
    from rlhfkit.data.prepare import load_examples
    from rlhfkit.data.tokenize import tokenize_preference, tokenize_sft

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    store, queue = open_project([{"prompt": chat, "responses": ["Hello!", "hi"]}], rewrite=True)
    alice = person(store, "alice")
    choose(queue, alice, "a", rewrite={"index": 1, "text": "Hi there!"})
    prefs, sft = tmp_path / "prefs.jsonl", tmp_path / "sft.jsonl"
    export(store, "preferences", str(prefs))
    export(store, "sft", str(sft))
    rows = written_rows(prefs, "preference")
    assert sorted((r["chosen"][0]["content"], r["rejected"]) for r in rows) == [
        ("Hello!", [{"role": "assistant", "content": "hi"}]), ("Hi there!", [{"role": "assistant", "content": "hi"}])]
    assert written_rows(sft, "sft")[0]["completion"] == [{"role": "assistant", "content": "Hi there!"}]
    pairs, skipped = load_examples(str(prefs), "preference",
                                   lambda s: tokenize_preference(s, tokenizer, max_length=128))
    assert (len(pairs), skipped) == (2, [])
    examples, skipped = load_examples(str(sft), "sft", lambda s: tokenize_sft(s, tokenizer, max_length=128))
    assert (len(examples), skipped) == (1, [])


@BOTH
def test_relabeling_a_preference_file_exports_the_new_labels_not_the_files_margin_or_tie(open_project, tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 3.0, "tie": True, "messages": "x",
             "batch": 7}]
    store, queue = open_project(rows, rewrite=True)
    alice = person(store, "alice")
    choose(queue, alice, "b", rewrite={"index": 1, "text": "better"})  # she prefers the file's rejected answer
    prefs, _ = preference_rows(store)
    pair = next(r for r in prefs if r.get("source") != "rewrite")
    assert (pair["chosen"], pair["rejected"], "margin" in pair, "tie" in pair) == ("bad", "good", False, False)
    assert (pair["input_margin"], pair["input_tie"], pair["batch"]) == (3.0, True, 7)  # kept, under another name
    assert "messages" not in sft_rows(store)[0]
    path = tmp_path / "prefs.jsonl"
    export(store, "preferences", str(path))
    from rlhfkit.data.prepare import load_examples

    examples, _ = load_examples(str(path), "preference", lambda s: s)
    assert sorted((e.chosen, e.margin) for e in examples) == [("bad", None), ("better", None)]


@BOTH
def test_raw_export_keeps_every_field_of_every_label(open_project, tmp_path):
    store, queue = open_project(compare_rows(2), overlap=1, rewrite=True)
    alice = person(store, "alice")
    choose(queue, alice, "a", "slightly", order=[1, 0], comment="close call", duration_ms=4321,
           rewrite={"index": 0, "text": "fixed"})
    queue.undo(alice)
    choose(queue, alice, "tie")
    choose(queue, alice, "skip")
    with store.read() as conn:
        labels = conn.execute(select(S.labels).order_by(S.labels.c.id)).all()
    path = tmp_path / "raw.jsonl"
    export(store, "raw", str(path))
    raw = written_rows(path, None)
    assert raw == raw_rows(store) and len(raw) == len(labels) == 3
    keys = keys_of(store)
    for lab, row in zip(labels, raw):
        mapped = {"id": row["label_id"], "submission_id": row["submission_id"],
                  "assignment_id": row.get("assignment_id"),
                  "item_id": row["item_id"], "annotator_id": alice if row["annotator"] == "alice" else None,
                  "choice": row["choice"], "strength": row["strength"], "ranking": row["ranking"],
                  "ratings": row["ratings"], "rewrite": row["rewrite"], "comment": row["comment"],
                  "duration_ms": row["duration_ms"], "created_at": _epoch(row["created_at"]),
                  "retracted_at": _epoch(row["retracted_at"])}
        assert set(mapped) == set(S.labels.c.keys())  # a new column must be added to the raw export
        for column, value in mapped.items():
            stored = getattr(lab, column)
            if column in ("created_at", "retracted_at") and stored is not None:
                assert value == pytest.approx(stored, abs=0.001), column
            else:
                assert value == stored, column
        assert row["item"] == keys[lab.item_id] and row["kind"] == "compare" and row["gold_item"] is False
    first = raw[0]
    assert (first["shown_order"], first["choice"], first["chosen_side"], first["margin"]) == ([1, 0], "a", "right", 0.5)
    assert first["rewrite"] == {"index": 0, "text": "fixed"} and first["comment"] == "close call"
    assert raw[1]["choice"] == "tie" and raw[1]["chosen_side"] is None and raw[2]["choice"] == "skip"


def _epoch(iso: str | None) -> float | None:
    import datetime as dt

    return None if iso is None else dt.datetime.fromisoformat(iso).timestamp()


@BOTH
def test_an_export_with_nothing_to_write_is_an_error_and_writes_nothing(open_project, tmp_path):
    store, queue = open_project(compare_rows(2), overlap=1)
    for what in ("preferences", "sft", "raw"):
        with pytest.raises(RlhfkitError, match="nothing was written"):
            export(store, what, str(tmp_path / f"{what}.jsonl"))
    with pytest.raises(RlhfkitError, match="JSONL"):
        export(store, "raw", str(tmp_path / "raw.json"))
    with pytest.raises(LabelError, match="--what"):
        export_rows(store, "everything")
    assert [p.name for p in tmp_path.iterdir() if ".json" in p.name] == []


# ------------------------------------------------------------------------------------------ the real server


GIF_NAMES = ("a.gif", "b.gif", "c.gif", "d.gif")


def make_gif(path: Path, color: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), color).save(path, format="GIF")


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):  # noqa: ANN201
    """One real server for the security tests: a compare project of two GIF-clip items and three text ones."""
    root = tmp_path_factory.mktemp("media-project")
    media = root / "media"
    media.mkdir()
    for i, name in enumerate(GIF_NAMES):
        make_gif(media / name, (60 * i, 0, 0))
    outside = root / "outside"
    outside.mkdir()
    make_gif(outside / "secret.gif", (0, 255, 0))
    rows = [{"prompt": "Which clip is better?", "responses": [{"media": "a.gif"}, {"media": "b.gif"}], "id": "clip-1"},
            {"prompt": "And now?", "responses": [{"media": "c.gif"}, {"media": "d.gif", "caption": "ep 4"}],
             "id": "clip-2"}]
    rows += [{**r, "id": f"text-{i}"} for i, r in enumerate(compare_rows(3))]
    # overlap 10: every annotator gets the items in file order (clip-1 first), whatever other tests took
    target = make_project(root / "feedback.db", rows, overlap=10, media_dir=str(media), guidelines="Be *kind*.")
    with LabelServer(target) as srv:
        srv.root, srv.media, srv.outside = root, media, outside  # type: ignore[attr-defined]
        srv.tokens = {name: srv.add_annotator(name) for name in ("alice", "bob")}  # type: ignore[attr-defined]
        yield srv


ROUTES = [("GET", "/"), ("GET", "/label"), ("POST", "/label"), ("POST", "/label/undo"), ("GET", "/guidelines"),
          ("GET", "/media/1/0"), ("GET", "/media/2/1"), ("GET", "/admin"),
          ("POST", "/admin/annotators"), ("GET", "/admin/export/raw"), ("GET", "/admin/export/preferences"),
          ("GET", "/api/next"), ("POST", "/api/labels"), ("GET", "/api/labels"), ("POST", "/api/undo"),
          ("GET", "/api/me"), ("GET", "/api/status"), ("POST", "/api/items"), ("GET", "/api/export/raw"),
          ("GET", "/api/export/preferences"), ("POST", "/api/annotators"), ("GET", "/api/openapi.json")]
ADMIN_ONLY = [("GET", "/admin"), ("POST", "/admin/annotators"), ("GET", "/admin/export/raw"),
              ("GET", "/admin/export/sft"), ("GET", "/api/status"), ("GET", "/api/labels"),
              ("GET", "/api/export/raw"), ("GET", "/api/export/preferences"), ("POST", "/api/items"),
              ("POST", "/api/annotators"), ("GET", "/api/openapi.json")]


def test_every_page_and_api_route_answers_401_without_a_valid_token(media_server):
    srv = media_server
    with _login(srv, srv.tokens["alice"]) as (_, set_cookie):
        pass
    cookie = {set_cookie.split("=", 1)[0]: "not-a-token"}  # the project's cookie name, a wrong token
    with srv.client() as anon, srv.client("not-a-token") as wrong, srv.client(srv.tokens["alice"] + "x") as close:
        for method, path in ROUTES:
            for client in (anon, wrong, close):
                r = client.request(method, path)
                assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            with srv.client(cookies=cookie) as cookied:
                assert cookied.request(method, path).status_code == 401, (method, path)
        r = anon.get("/api/me")
        assert r.json()["error"] and "token" not in r.headers.get("set-cookie", "")
        assert anon.get("/login", params={"token": "wrong"}).status_code == 401
        assert anon.get("/login").status_code == 401
        for hidden in ("/docs", "/redoc", "/openapi.json"):  # FastAPI's public docs are switched off
            assert anon.get(hidden).status_code == 404
        # public: the app's own script and style sheet (the bad-link page uses them), and nothing else there
        assert [anon.get(f"/static/{n}").status_code for n in ("app.js", "style.css")] == [200, 200]
        for other in ("/static/..%2fapp.py", "/static/../app.py", "/static/label_compare.html", "/static/%2e%2e"):
            r = anon.get(other)
            assert r.status_code == 404 and "create_app" not in r.text, other


def test_an_annotator_token_is_refused_403_on_every_admin_route(media_server):
    srv = media_server
    with srv.client(srv.tokens["bob"]) as bob, srv.client(srv.admin_token) as admin:
        before = admin.get("/api/status").json()["items"]
        bodies = {"/api/items": [{"prompt": "sneaky", "responses": ["x", "y"]}], "/api/annotators": {"name": "mallory"}}
        for method, path in ADMIN_ONLY:
            r = bob.request(method, path, json=bodies.get(path)) if method == "POST" else bob.get(path)
            assert r.status_code == 403, (method, path, r.status_code)
            assert "question 0" not in r.text  # no data in the refusal
        assert admin.get("/api/status").json()["items"] == before
        assert "mallory" not in [a["name"] for a in admin.get("/api/status").json()["annotators"]]
        assert bob.get("/api/me").json()["role"] == "annotator"
        assert admin.get("/api/openapi.json").status_code == 200


@contextlib.contextmanager
def _login(srv: LabelServer, token: str):  # noqa: ANN202
    """A cookie-only client (as a browser after /login), and the Set-Cookie header it got."""
    with srv.client() as client:
        r = client.get("/login", params={"token": token}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] in ("/label", "/admin")
        yield client, r.headers["set-cookie"]


def test_the_login_cookie_is_httponly_and_samesite_strict_and_the_token_leaves_the_address(media_server):
    with _login(media_server, media_server.tokens["alice"]) as (client, set_cookie):
        attrs = [a.strip().lower() for a in set_cookie.split(";")]
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
        r = client.get("/label")
        assert r.status_code == 200 and media_server.tokens["alice"] not in r.text
        assert client.get("/api/me").json()["name"] == "alice"
        assert "secure" not in attrs  # plain HTTP: a Secure cookie would never come back
    with media_server.client() as via_proxy:  # behind a TLS proxy on this machine (X-Forwarded-Proto)
        r = via_proxy.get("/login", params={"token": media_server.tokens["alice"]},
                          headers={"X-Forwarded-Proto": "https"})
        assert "secure" in [a.strip().lower() for a in r.headers["set-cookie"].split(";")]


def test_cookie_requests_that_change_something_need_the_csrf_value_and_the_same_origin(media_server):
    srv = media_server
    store = Store.open(srv.target)
    try:
        from rlhfkit.label.web import csrf_value

        csrf = csrf_value(store, srv.tokens["bob"])
        admin_csrf = csrf_value(store, srv.admin_token)
    finally:
        store.close()
    with _login(srv, srv.tokens["bob"]) as (client, _), _login(srv, srv.admin_token) as (admin, _):
        task = client.get("/api/next").json()["task"]
        body = {"assignment_id": task["assignment_id"], "submission_id": uuid.uuid4().hex, "choice": "left"}
        form = {"assignment_id": str(task["assignment_id"]), "submission_id": uuid.uuid4().hex, "choice": "left",
                "n_candidates": "2"}
        refused = [client.post("/api/labels", json=body), client.post("/api/undo"),
                   client.post("/label", data=form), client.post("/label/undo", data={}),
                   client.post("/api/labels", json=body, headers={"X-CSRF-Token": "0" * 32}),
                   client.post("/label", data={**form, "csrf": "0" * 32}),
                   admin.post("/admin/annotators", data={"name": "eve"}),
                   admin.post("/api/annotators", json={"name": "eve"})]
        foreign = {"Origin": "https://evil.example", "X-CSRF-Token": csrf}
        refused += [client.post("/api/labels", json=body, headers=foreign),
                    client.post("/label", data={**form, "csrf": csrf}, headers={"Origin": "https://evil.example"}),
                    admin.post("/admin/annotators", data={"name": "eve", "csrf": admin_csrf},
                               headers={"Origin": "http://127.0.0.1:1"})]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert client.get("/api/next").json()["task"]["assignment_id"] == task["assignment_id"]  # nothing stored
        ok = client.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf, "Origin": srv.url})
        assert ok.status_code == 200 and ok.json()["duplicate"] is False
        assert client.post("/api/undo", headers={"X-CSRF-Token": csrf}).json()["undone_item_id"] == task["item_id"]
    with srv.client(srv.tokens["bob"]) as bearer:  # a script's bearer token needs no CSRF value
        assert bearer.post("/api/labels", json={**body, "submission_id": uuid.uuid4().hex}).status_code == 200


def test_the_api_answers_duplicate_409_404_and_422_with_the_field(media_server):
    srv = media_server
    with srv.client(srv.add_annotator("carol")) as carol, srv.client(srv.add_annotator("dan")) as dan:
        task = carol.get("/api/next").json()["task"]
        body = {"assignment_id": task["assignment_id"], "submission_id": uuid.uuid4().hex, "choice": "left"}
        bad = carol.post("/api/labels", json={**body, "choice": "middle"})
        assert bad.status_code == 422 and "'choice'" in bad.json()["error"]
        first = carol.post("/api/labels", json=body, params={"next": "false"}).json()
        retry = carol.post("/api/labels", json=body, params={"next": "false"}).json()
        assert retry == {"label_id": first["label_id"], "duplicate": True}
        other = carol.post("/api/labels", json={**body, "submission_id": uuid.uuid4().hex, "choice": "right"})
        assert other.status_code == 409
        theirs = dan.post("/api/labels", json={**body, "submission_id": uuid.uuid4().hex})
        assert theirs.status_code == 404
        assert carol.post("/api/undo").json()["undone_item_id"] == task["item_id"]


def test_responses_carry_the_csp_nosniff_and_no_referrer_headers(media_server):
    srv = media_server
    with srv.client() as anon, srv.client(srv.admin_token) as admin:
        responses = [anon.get("/label"), anon.get("/api/next"), anon.get("/login", params={"token": "x"}),
                     admin.get("/admin"), admin.get("/api/status"), admin.get("/media/1/0"),
                     admin.get("/static/app.js"), admin.get("/guidelines"), admin.get("/nowhere")]
        for r in responses:
            assert r.headers["content-security-policy"].startswith("default-src 'none'"), r.url
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff", r.url
            assert r.headers["referrer-policy"] == "no-referrer", r.url
        assert responses[5].status_code == 200 and responses[5].headers["content-type"] == "image/gif"


def _raw_get(srv: LabelServer, path: str, token: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client normalizes `..` away)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_media_cannot_escape_the_media_folder_or_reach_items_never_assigned(media_server):
    srv = media_server
    secret = (srv.outside / "secret.gif").read_bytes()
    passwd = b"root:"
    with srv.client(srv.tokens["alice"]) as alice, srv.client(srv.admin_token) as admin:
        task = alice.get("/api/next").json()["task"]
        mine = task["candidates"][0]
        assert mine["media_url"].startswith(f"/media/{task['item_id']}/") and mine["media_type"] == "image/gif"
        assert (task["item"], task["item_id"]) == ("clip-1", 1)
        ok = alice.get(mine["media_url"])
        assert ok.status_code == 200 and ok.content == (srv.media / GIF_NAMES[mine["index"]]).read_bytes()
        never = 2  # clip-2: she has not got there yet
        assert alice.get(f"/media/{never}/0").status_code == 404  # an item she was never given
        assert admin.get(f"/media/{never}/0").status_code == 200
        for path in ("/media/../../../../etc/passwd", "/media/1/../../../etc/passwd", "/media/%2e%2e/%2e%2e/etc/passwd",
                     "/media/1/..%2f..%2f..%2fetc%2fpasswd", "//etc/passwd", "/media//etc/passwd",
                     "/media/1/%2Fetc%2Fpasswd", f"/media/1/{srv.outside / 'secret.gif'}", "/media/1/2",
                     "/media/1/-1", "/media/3/0", "/media/99/0", "/media/../0", "/media/%2e%2e/0"):
            for token in (srv.tokens["alice"], srv.admin_token):
                status, body = _raw_get(srv, path, token)
                assert status in (404, 422), (path, status)
                assert passwd not in body and secret not in body, path
        # an item whose file became a link out of the folder after init is not served, even to the admin
        os.replace(srv.media / "c.gif", srv.root / "c-moved.gif")
        os.symlink(srv.outside / "secret.gif", srv.media / "c.gif")
        r = admin.get("/media/2/0")
        assert r.status_code == 404 and secret not in r.content
        # items added through the API cannot point outside the folder either
        for media in ("../outside/secret.gif", str(srv.outside / "secret.gif"), "c.gif", "sub/../a.gif", "nothing.gif"):
            r = admin.post("/api/items", json=[{"prompt": "p", "responses": [{"media": media}, {"media": "a.gif"}]}])
            assert r.status_code == 422, (media, r.text)
            assert "item 0: field 'responses' item 0" in r.json()["error"] and "media folder" in r.json()["error"]


def test_a_deactivated_annotator_loses_access_within_six_seconds(media_server):
    srv = media_server
    token = srv.add_annotator("erin")
    with srv.client(token) as erin, _login(srv, token) as (browser, _):
        assert erin.get("/api/me").status_code == 200  # now in the server's token cache
        assert browser.get("/label").status_code == 200
        out = subprocess.run([sys.executable, "-m", "rlhfkit", "label", "add-annotator", srv.target, "erin",
                              "--deactivate"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0 and "revoked" in out.stdout, out.stderr
        revoked_at = time.monotonic()
        while erin.get("/api/me").status_code == 200:
            assert time.monotonic() - revoked_at < 6.5, "still let in 6.5 s after --deactivate"
            time.sleep(0.25)
        assert erin.get("/api/next").status_code == 401 and erin.get("/label").status_code == 401
        assert browser.get("/label").status_code == 401  # her browser's cookie, too
    with srv.client() as anon:
        assert anon.get("/login", params={"token": token}).status_code == 401


def test_a_malformed_json_body_without_a_token_is_401_not_422(media_server):
    with media_server.client() as anon:
        for path in ("/api/labels", "/api/items", "/api/annotators"):
            r = anon.post(path, content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 401, (path, r.status_code, r.text[:200])


@BOTH
def test_items_added_through_the_api_after_gold_rows_get_keys_of_their_own(project):
    from fastapi.testclient import TestClient

    from rlhfkit.label.app import create_app

    store = Store.open(project(compare_rows(2) + [{"prompt": "gold", "responses": ["yes", "no"], "gold": "a"}]))
    try:
        admin = store.admin_token()
        with TestClient(create_app(store)) as client:
            r = client.post("/api/items", json=compare_rows(1, "new "), headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200, r.text
        assert sorted(keys_of(store).values()) == ["item-1", "item-2", "item-3", "item-4"]
    finally:
        store.close()


@BOTH
def test_relabeling_a_preference_file_reports_how_often_people_agree_with_it(open_project):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    store, queue = open_project(rows, overlap=1)
    alice = person(store, "alice")
    for choice in ("a", "a", "a", "b"):  # canonical a = the file's chosen answer
        choose(queue, alice, choice)
    audit = project_status(store)["audit"]
    assert audit == {"agree_with_file": 0.75, "decided": 4}  # 3 of 4 decided votes for the file's chosen
