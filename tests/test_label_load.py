"""The label server under load, on SQLite and PostgreSQL: many annotators at once against one real
`rlhfkit label serve` process, with retries, duplicate sends and a kill -9 in the middle.

Nothing acknowledged may be lost and nothing may be stored twice: every label id a client got a 2xx
for is in the database under that id, one row per submission id, no item labeled twice (overlap 1),
and the items' counters agree with the labels. See tests/label_load.py for the client loop.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import func, select

from rlhfkit.label import schema as S
from rlhfkit.label.store import Store
from tests.label_load import LoadClient, check_labels, drain, percentile, run_clients, stored_labels, summary
from tests.label_server import LabelServer, compare_rows

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


def _annotators(srv: LabelServer, n: int, **kwargs) -> list[LoadClient]:
    return [LoadClient(f"load{i}", srv.add_annotator(f"load{i}"), srv.url, **kwargs) for i in range(n)]


def _counters(target: str) -> dict[str, int]:
    store = Store.open(target)
    try:
        with store.read() as conn:
            t, a = S.items, S.assignments
            return {
                "n_labels": conn.scalar(select(func.coalesce(func.sum(t.c.n_labels), 0))),
                "slots_left": conn.scalar(select(func.coalesce(func.sum(t.c.slots_left), 0))),
                "open": conn.scalar(select(func.count()).select_from(a).where(a.c.state == "open")),
                "done": conn.scalar(select(func.count()).select_from(a).where(a.c.state == "done")),
                "assignments": conn.scalar(select(func.count()).select_from(a)),
            }
    finally:
        store.close()


def _report(name: str, clients: list[LoadClient], labels: int, seconds: float) -> None:
    lat = [x for c in clients for x in c.latencies]
    print(f"\n{name}: {labels} labels in {seconds:.1f} s = {labels / seconds:.0f} labels/s; submit+next "
          f"p50 {1000 * percentile(lat, 50):.0f} ms, p99 {1000 * percentile(lat, 99):.0f} ms; {dict(summary(clients))}")


def test_many_annotators_nothing_lost_nothing_twice(project, backend: str) -> None:
    n_clients, per_client = 50, 200
    n_items = n_clients * per_client
    target = project(compare_rows(n_items), overlap=1)
    with LabelServer(target) as srv:
        drain(srv)
        clients = _annotators(srv, n_clients)
        try:
            # last_next=False: a client's 200th answer asks for no next task, so no item is left held
            # and the 10,000 items are exactly enough for 50 x 200.
            seconds = run_clients(clients, lambda c: c.label(per_client, last_next=False), timeout=300)
        finally:
            for c in clients:
                c.close()
        _report(f"{backend} load", clients, n_items, seconds)
        assert all(c.submitted == per_client for c in clients), [c.submitted for c in clients]
        assert sum(c.counts["resent"] for c in clients) == n_items // 20
        rows = check_labels(target, clients, expected=n_items, overlap=1)
        assert len({r.item_id for r in rows}) == n_items
        assert _counters(target) == {"n_labels": n_items, "slots_left": 0, "open": 0, "done": n_items,
                                     "assignments": n_items}
        # the API's own view agrees: the raw export holds every label once
        with srv.client(srv.admin_token) as admin:
            raw = admin.get("/api/export/raw", timeout=120)
        assert raw.status_code == 200, raw.text[:300]
        exported = raw.json()["rows"]
        assert len(exported) == n_items
        assert {r["submission_id"] for r in exported} == {sid for c in clients for sid in c.acked}
        assert all(r["retracted_at"] is None for r in exported)


def test_kill_9_mid_load_loses_nothing_and_clients_continue(project, backend: str) -> None:
    n_clients, kill_after, before_cap, after = 20, 1500, 150, 25
    n_items = n_clients * (before_cap + after) + 2 * n_clients
    target = project(compare_rows(n_items), overlap=1)
    killed = threading.Event()
    srv = LabelServer(target)
    drain(srv)
    clients = _annotators(srv, n_clients, killed=killed)
    try:
        def killer() -> None:
            deadline = time.monotonic() + 120
            while sum(c.submitted for c in clients) < kill_after and time.monotonic() < deadline:
                time.sleep(0.005)
            killed.set()
            srv.kill()  # SIGKILL: no shutdown, no flush, open transactions just vanish

        kt = threading.Thread(target=killer, daemon=True)
        kt.start()
        run_clients(clients, lambda c: c.label(before_cap), timeout=180)
        kt.join(130)
        assert killed.is_set() and srv.proc.returncode == -9, "the server was not killed mid-load"
        acked_before = sum(len(c.acked) for c in clients)
        in_flight = [c for c in clients if c.pending is not None]
        assert kill_after <= acked_before < n_clients * before_cap, acked_before  # killed mid-load
        print(f"\n{backend}: killed after {acked_before} acknowledged labels; {len(in_flight)} requests in flight")

        # Everything acknowledged before the kill survived it; an in-flight submission may or may not be
        # there (its client never heard), but nothing is there twice.
        rows = check_labels(target, clients, overlap=1, exact=False)
        stored = {r.submission_id for r in rows}
        unknown = stored - {sid for c in clients for sid in c.acked}
        assert unknown <= {c.pending["body"]["submission_id"] for c in in_flight}

        landed = sum(c.pending["body"]["submission_id"] in stored for c in in_flight)
        print(f"{backend}: {landed} of the {len(in_flight)} in-flight submissions had been stored")
        with LabelServer(target) as srv2:
            drain(srv2)
            for c in clients:
                c.reconnect(srv2.url)
                c.killed = None
                task = c.next_task()  # the open assignment comes back after the restart
                assert task is not None, c.name
                if c.pending is None:
                    assert task["assignment_id"] == c.task["assignment_id"], (c.name, task, c.task)
                    continue
                sid = c.pending["body"]["submission_id"]
                if sid not in stored:
                    # its answer never committed: the item it was answering is still its open task
                    assert task["assignment_id"] == c.pending["body"]["assignment_id"], (c.name, task, c.pending)
                else:
                    assert task["assignment_id"] != c.pending["body"]["assignment_id"], (c.name, task, c.pending)
                # the retry with the same submission id: stored once, whether or not it got through before
                answer = c.submit(c.pending["body"], c.pending["item_id"], want_next=True)
                assert answer is not None and answer["duplicate"] == (sid in stored), (c.name, answer, sid in stored)
                if sid in stored:  # the open task it got from /api/next is the one it is handed again
                    assert answer["next"]["assignment_id"] == task["assignment_id"], (c.name, answer, task)
                c.task = answer["next"]
            run_clients(clients, lambda c: c.label(after, last_next=False), timeout=180)
            assert all(c.submitted >= after for c in clients)
            total = sum(len(c.acked) for c in clients)
            rows = check_labels(target, clients, expected=total, overlap=1, exact=True)
            counters = _counters(target)
            assert counters["n_labels"] == counters["done"] == total
            assert counters["open"] == 0
            assert counters["slots_left"] == n_items - total
            print(f"{backend}: {total} labels after the restart, {dict(summary(clients))}")
    finally:
        srv.kill()
        for c in clients:
            c.close()


def test_concurrent_retries_of_one_submission(project, backend: str) -> None:
    """A client that retries while its first request is still being processed (a timeout, two tabs):
    the same submission id sent 8 times at once is stored once and every copy gets a 2xx with that
    label id; 8 different submission ids for one task store one label and the other 7 get a 409."""
    target = project(compare_rows(200), overlap=1)
    rounds, copies = 30, 8
    with LabelServer(target) as srv:
        drain(srv)
        token = srv.add_annotator("retrier")
        clients = [srv.client(token) for _ in range(copies)]
        problems = []
        try:
            for rnd in range(rounds):
                for same_id in (True, False):
                    task = clients[0].get("/api/next").json()["task"]
                    sid = uuid.uuid4().hex
                    start = threading.Barrier(copies)
                    answers: list = [None] * copies

                    def send(i: int, task=task, sid=sid, start=start, answers=answers, same_id=same_id) -> None:
                        body = {"assignment_id": task["assignment_id"], "choice": "left",
                                "submission_id": sid if same_id else uuid.uuid4().hex}
                        start.wait(10)
                        r = clients[i].post("/api/labels", json=body)
                        answers[i] = (r.status_code, r.json())

                    threads = [threading.Thread(target=send, args=(i,)) for i in range(copies)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(60)
                    codes = sorted(a[0] for a in answers)
                    ok = [a[1] for a in answers if a[0] == 200]
                    if same_id and (codes != [200] * copies or len({a["label_id"] for a in ok}) != 1
                                    or sum(a["duplicate"] for a in ok) != copies - 1):
                        problems.append(("same id", rnd, codes, [a[1] for a in answers if a[0] != 200][:1]))
                    if not same_id and codes != [200] + [409] * (copies - 1):
                        problems.append(("other ids", rnd, codes))
        finally:
            for c in clients:
                c.close()
        rows = stored_labels(target)
        assert len(rows) == 2 * rounds and len({r.assignment_id for r in rows}) == 2 * rounds
        assert not problems, f"{len(problems)} of {2 * rounds} rounds: {problems[:3]}"
