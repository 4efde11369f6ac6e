"""Concurrent annotators against a real label server: the client loop shared by tests/test_label_load.py
and benchmarks/label_load.py.

    clients = [LoadClient(f"a{i}", srv.add_annotator(f"a{i}"), srv.url) for i in range(50)]
    run_clients(clients, lambda c: c.label(200, last_next=False))   # one thread (and httpx.Client) each
    check_labels(target, clients, expected=10_000, overlap=1)         # nothing lost, nothing twice

Each client loops "POST /api/labels for the task it holds (a fresh submission id) -> keep the `next`
task of the answer". A connection error, a timeout or a 5xx is retried with the same submission id
(as a real client must); every `resend_every`-th submission is sent a second time on purpose. Every
2xx answer is recorded (`acked`: submission id -> label id), so a check can tell what the server
acknowledged from what it stored. Loops are bounded in count and time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import json as _json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

CHOICES = ("left", "right", "tie", "both_bad")


class _RawResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content = status, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class RawHTTP:
    """A keep-alive HTTP/1.1 client on http.client: a fifth of httpx's CPU per request, so that load
    clients sharing the machine with the server take less of it (benchmarks/label_load.py --client raw).
    Connection problems are raised as httpx.TransportError, like httpx does."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parsed.hostname, parsed.port, timeout
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, params: dict[str, str] | None = None, json: Any = None) -> _RawResponse:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        body = None if json is None else _json.dumps(json).encode()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request(method, path, body=body, headers=self.headers)
            r = self.conn.getresponse()
            return _RawResponse(r.status, r.read())
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class LoadError(AssertionError):
    """The server answered something a correct server never would (a 4xx, a changed duplicate...)."""


@dataclass
class Ack:
    label_id: int
    assignment_id: int
    item_id: int
    duplicate: bool


@dataclass
class LoadClient:
    name: str
    token: str
    url: str
    resend_every: int = 20          # every n-th submission is sent twice with the same submission id
    retry_seconds: float = 60.0     # how long one submission is retried on connection errors / 5xx
    timeout: float = 30.0
    killed: threading.Event | None = None  # set by the test before it kills the server: park, don't retry
    transport: str = "httpx"        # or "raw" (RawHTTP)
    interval: float = 0.0           # > 0: one submission per `interval` seconds, on a fixed schedule
    acked: dict[str, Ack] = field(default_factory=dict)
    task: dict[str, Any] | None = None      # the task this client holds (answered next)
    pending: dict[str, Any] | None = None   # a submission sent whose answer never came (server killed)
    latencies: list[float] = field(default_factory=list)   # seconds per acknowledged submit+next
    done_at: list[float] = field(default_factory=list)     # time.perf_counter() when each came back
    counts: Counter = field(default_factory=Counter)        # resent, retried, status_5xx, transport
    submitted: int = 0              # new submissions acknowledged (not counting resends)

    def __post_init__(self) -> None:
        self.http = self._client()

    def _client(self) -> httpx.Client | RawHTTP:
        if self.transport == "raw":
            return RawHTTP(self.url, self.token, self.timeout)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                            timeout=self.timeout, trust_env=False)

    def reconnect(self, url: str) -> None:
        """Point at a (restarted) server."""
        self.http.close()
        self.url = url
        self.http = self._client()

    def close(self) -> None:
        self.http.close()

    # --- requests ------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """The first non-5xx answer; None when the server was killed meanwhile (the test's `killed`)."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.01
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
                if r.status_code < 500:
                    return r
                self.counts["status_5xx"] += 1
                self.counts[f"status_{r.status_code}: {r.text[:120]}"] += 1
            except httpx.TransportError as exc:
                if self.killed is not None and self.killed.is_set():
                    return None
                self.counts["transport"] += 1
                self.counts[f"transport: {type(exc).__name__}"] += 1
            if time.monotonic() > deadline:
                raise LoadError(f"{self.name}: {method} {path} failed for {self.retry_seconds} s: {dict(self.counts)}")
            self.counts["retried"] += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def next_task(self) -> dict[str, Any] | None:
        r = self._request("GET", "/api/next")
        if r is None:
            raise LoadError(f"{self.name}: GET /api/next: the server is gone")
        if r.status_code != 200:
            raise LoadError(f"{self.name}: GET /api/next -> {r.status_code} {r.text[:300]}")
        return r.json()["task"]

    def submit(self, body: dict[str, Any], item_id: int, want_next: bool) -> dict[str, Any] | None:
        """POST one answer (retried with the same submission id); its JSON, or None if the server died."""
        self.pending = {"body": body, "item_id": item_id, "want_next": want_next}
        start = time.perf_counter()
        r = self._request("POST", "/api/labels", params={"next": "true" if want_next else "false"}, json=body)
        if r is None:
            return None  # self.pending stays: its outcome is unknown
        if r.status_code != 200:
            raise LoadError(f"{self.name}: POST /api/labels {body} -> {r.status_code} {r.text[:300]}")
        now = time.perf_counter()
        self.latencies.append(now - start)
        self.done_at.append(now)
        answer = r.json()
        self._record(body, item_id, answer)
        self.pending = None
        return answer

    def _record(self, body: dict[str, Any], item_id: int, answer: dict[str, Any]) -> None:
        sid = body["submission_id"]
        ack = Ack(answer["label_id"], body["assignment_id"], item_id, answer["duplicate"])
        prior = self.acked.get(sid)
        if prior is not None and prior.label_id != ack.label_id:
            raise LoadError(f"{self.name}: submission {sid} answered with label {prior.label_id}, then {ack.label_id}")
        if prior is None:
            self.acked[sid] = ack

    # --- the loop ------------------------------------------------------------------------------------

    def label(self, n: int, *, last_next: bool = True, stop: threading.Event | None = None) -> None:
        """Submit n new labels (fewer if the queue runs dry, `stop` is set or the server is killed).
        `last_next=False` asks for no next task with the last one, so no item is left held."""
        if self.task is None and self.pending is None:
            self.task = self.next_task()
        slot = time.perf_counter()
        for k in range(n):
            if self.task is None or (stop is not None and stop.is_set()):
                return
            if self.interval:  # paced: wait for this submission's slot (late ones go at once)
                slot += self.interval
                time.sleep(max(0.0, slot - time.perf_counter()))
            task = self.task
            body = {"assignment_id": task["assignment_id"], "submission_id": uuid.uuid4().hex, "choice": CHOICES[(task["item_id"] + k) % len(CHOICES)]}
            want_next = last_next or k < n - 1
            answer = self.submit(body, task["item_id"], want_next)
            if answer is None:
                return
            if answer["duplicate"]:
                raise LoadError(f"{self.name}: a fresh submission {body['submission_id']} answered as a duplicate")
            self.submitted += 1
            if self.resend_every and self.submitted % self.resend_every == 0:
                self.counts["resent"] += 1
                again = self.submit(body, task["item_id"], want_next)
                if again is None:
                    return
                if not again["duplicate"] or again["label_id"] != answer["label_id"]:
                    raise LoadError(f"{self.name}: resending {body['submission_id']} gave {again}, first {answer}")
                if (again.get("next") or {}).get("assignment_id") != (answer.get("next") or {}).get("assignment_id"):
                    raise LoadError(f"{self.name}: resend got another next task: {again.get('next')} vs {answer.get('next')}")
            self.task = answer.get("next")


def run_clients(clients: list[LoadClient], work: Callable[[LoadClient], None], timeout: float = 600) -> float:
    """Run `work(client)` in one thread per client; re-raise the first failure; the wall time."""
    errors: list[BaseException] = []

    def main(c: LoadClient) -> None:
        try:
            work(c)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(c,), name=f"load-{c.name}", daemon=True) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - start
    if any(t.is_alive() for t in threads):
        raise LoadError(f"clients still running after {timeout} s")
    if errors:
        raise errors[0]
    return elapsed


def drain(server: Any) -> list[str]:
    """The server's output lines so far (LabelServer keeps reading its pipe, so it never blocks)."""
    return server.log


def stored_labels(target: str) -> list[Any]:
    """Every label row in the project (retracted ones too), oldest first."""
    from sqlalchemy import select

    from rlhfkit.label import schema as S
    from rlhfkit.label.store import Store

    store = Store.open(target)
    try:
        with store.read() as conn:
            return conn.execute(select(S.labels.c.id, S.labels.c.submission_id, S.labels.c.item_id,
                                       S.labels.c.annotator_id, S.labels.c.assignment_id, S.labels.c.retracted_at)
                                .order_by(S.labels.c.id)).all()
    finally:
        store.close()


def check_labels(target: str, clients: list[LoadClient], *, expected: int | None = None,
                 overlap: int | None = 1, exact: bool = True) -> list[Any]:
    """Nothing lost, nothing twice: every acknowledged submission stored with the label id it was
    answered with, one row per submission id, no (item, annotator) twice (no item twice for overlap
    1); with `exact`, nothing stored that no client was told about. Returns the stored rows."""
    rows = stored_labels(target)
    problems = []
    live = [r for r in rows if r.retracted_at is None]
    if len(live) != len(rows):
        problems.append(f"{len(rows) - len(live)} retracted labels (no client undoes)")
    if expected is not None and len(rows) != expected:
        problems.append(f"{len(rows)} labels stored, expected {expected}")
    by_sid = Counter(r.submission_id for r in rows)
    twice = [s for s, k in by_sid.items() if k > 1]
    if twice:
        problems.append(f"{len(twice)} submission ids stored twice, e.g. {twice[:3]}")
    pairs = Counter((r.item_id, r.annotator_id) for r in rows)
    if any(k > 1 for k in pairs.values()):
        problems.append(f"{sum(k > 1 for k in pairs.values())} (item, annotator) pairs labeled twice")
    if overlap is not None:
        items = Counter(r.item_id for r in rows)
        over = [i for i, k in items.items() if k > overlap]
        if over:
            problems.append(f"{len(over)} items labeled more than {overlap} times, e.g. {over[:5]}")
    stored = {r.submission_id: r for r in rows}
    acked = {sid: ack for c in clients for sid, ack in c.acked.items()}
    lost = [sid for sid in acked if sid not in stored]
    if lost:
        problems.append(f"{len(lost)} acknowledged labels missing (lost), e.g. {lost[:3]}")
    wrong = [sid for sid, ack in acked.items() if sid in stored and (stored[sid].id != ack.label_id
                                                                        or stored[sid].assignment_id != ack.assignment_id
                                                                        or stored[sid].item_id != ack.item_id)]
    if wrong:
        problems.append(f"{len(wrong)} acknowledged labels stored under another id/assignment, e.g. {wrong[:3]}")
    if exact:
        unknown = [sid for sid in stored if sid not in acked]
        if unknown:
            problems.append(f"{len(unknown)} stored labels no client was answered for, e.g. {unknown[:3]}")
    if problems:
        raise LoadError("; ".join(problems))
    return rows


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def summary(clients: list[LoadClient]) -> Counter:
    total: Counter = Counter()
    for c in clients:
        total.update(c.counts)
    return total
