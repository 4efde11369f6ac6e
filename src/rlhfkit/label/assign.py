"""Who labels what: the queue, submissions and undo, each one transaction.

Rules (each enforced in the database, so they hold across threads, processes and servers):
- an annotator first gets back an item they were shown and have not labeled (a reload, a new tab);
- otherwise the highest-priority item that still needs annotators (`slots_left > 0`) and that they
  have never been shown; with `gold_rate` r, a gold item they have not seen comes instead whenever
  their gold share would fall below r;
- the order the candidates are shown in is drawn per (annotator, item) and stored with the assignment;
- a submission carries a client-chosen `submission_id`: a retry with the same id returns the first
  result and stores nothing new; a second, different submission for one assignment is refused;
- a skip frees the item's slot for someone else; an undo retracts the annotator's last label (kept
  in the raw export) and gives the item back to them, first (an item they had open comes after it).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, case, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from rlhfkit.label import schema as S
from rlhfkit.label.items import STRENGTHS, Settings
from rlhfkit.label.store import LabelError, Store

SIDES = {"left": 0, "right": 1}


class SubmitError(LabelError):
    """A submission that cannot be accepted; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Task:
    assignment_id: int
    item_id: int
    key: str
    prompt: Any
    candidates: list[dict[str, Any]]  # in the order shown, each with its `index` in the item
    shown_order: list[int]
    is_gold: bool


def shown_order(secret: str, annotator_id: int, item_id: int, n: int) -> list[int]:
    """A per-(annotator, item) random order of the n candidates, reproducible from the project secret."""
    order = list(range(n))
    random.Random(f"{secret}:{annotator_id}:{item_id}").shuffle(order)
    return order


def _task(conn: Connection, assignment: Any) -> Task:
    item = conn.execute(select(S.items).where(S.items.c.id == assignment.item_id)).one()
    cands = [{"index": i, **item.candidates[i]} for i in assignment.shown_order]
    return Task(assignment.id, item.id, item.key, item.prompt, cands, list(assignment.shown_order), item.is_gold)


def _expire(conn: Connection, settings: Settings) -> None:
    """Give items shown but not labeled within the lease back to the queue."""
    cutoff = time.time() - settings.lease_seconds
    stale = conn.execute(select(S.assignments.c.id, S.assignments.c.item_id).where(
        S.assignments.c.state == "open", S.assignments.c.created_at < cutoff)).all()
    for a in stale:
        # only if still open: another server may have expired it (or its label come in) since the select
        if conn.execute(update(S.assignments).where(S.assignments.c.id == a.id, S.assignments.c.state == "open")
                        .values(state="expired")).rowcount:
            conn.execute(update(S.items).where(S.items.c.id == a.item_id, S.items.c.is_gold.is_(False))
                         .values(slots_left=S.items.c.slots_left + 1))


class Queue:
    """The assignment logic over one Store (one per server; holds no per-annotator state)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._last_expiry = 0.0

    def next_for(self, annotator_id: int) -> Task | None:
        for _ in range(20):  # an IntegrityError means a concurrent request took the slot: pick again
            try:
                with self.store.write() as conn:
                    return self._next(conn, annotator_id)
            except IntegrityError:
                continue
        raise SubmitError("the queue is too busy; retry", status=503)

    def _next(self, conn: Connection, annotator_id: int) -> Task | None:
        settings = self.store.settings
        now = time.time()
        if now - self._last_expiry > 30:
            self._last_expiry = now
            _expire(conn, settings)
        a = S.assignments
        mine = conn.execute(select(a).where(a.c.annotator_id == annotator_id, a.c.state == "open")
                            .order_by(a.c.id).limit(1)).first()
        if mine is not None:
            return _task(conn, mine)
        seen = exists().where(a.c.item_id == S.items.c.id, a.c.annotator_id == annotator_id)
        item = None
        if settings.gold_rate > 0:
            n_all, n_gold = conn.execute(
                select(func.count(), func.coalesce(func.sum(case((S.items.c.is_gold.is_(True), 1), else_=0)), 0))
                .select_from(a.join(S.items, S.items.c.id == a.c.item_id))
                .where(a.c.annotator_id == annotator_id, a.c.state != "skipped")).one()
            if n_gold < settings.gold_rate * (n_all + 1):
                item = conn.execute(select(S.items.c.id, S.items.c.candidates, S.items.c.is_gold)
                                    .where(S.items.c.is_gold.is_(True), ~seen).order_by(S.items.c.id).limit(1)).first()
        if item is None:
            item = conn.execute(
                select(S.items.c.id, S.items.c.candidates, S.items.c.is_gold)
                .where(S.items.c.slots_left > 0, ~seen)
                .order_by(S.items.c.priority.desc(), S.items.c.id).limit(1)
                .with_for_update(skip_locked=True)).first()
        if item is None:
            return None
        order = shown_order(self.store.secret, annotator_id, item.id, len(item.candidates))
        new_id = conn.execute(a.insert().values(item_id=item.id, annotator_id=annotator_id, shown_order=order,
                                                state="open", created_at=now)).inserted_primary_key[0]
        if not item.is_gold:
            conn.execute(update(S.items).where(S.items.c.id == item.id).values(slots_left=S.items.c.slots_left - 1))
        return _task(conn, conn.execute(select(a).where(a.c.id == new_id)).one())

    # --- submissions ---------------------------------------------------------------------------------

    def submit(self, annotator_id: int, body: dict[str, Any]) -> tuple[int, bool]:
        """Store one label; return (label id, duplicate). `body` holds assignment_id, submission_id and
        the answer fields (see docs/label.md); a bad body is a SubmitError naming the field."""
        sid = body.get("submission_id")
        if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
            raise SubmitError("field 'submission_id': expected a string of 8-64 characters (e.g. a UUID)")
        aid = body.get("assignment_id")
        if isinstance(aid, bool) or not isinstance(aid, int):
            raise SubmitError("field 'assignment_id': expected the integer from the task")
        try:
            with self.store.write() as conn:
                return self._submit(conn, annotator_id, sid, aid, body)
        except IntegrityError:
            # A concurrent retry with the same submission id won the race: answer as the retry would.
            with self.store.read() as conn:
                prior = conn.execute(select(S.labels.c.id, S.labels.c.annotator_id)
                                     .where(S.labels.c.submission_id == sid)).first()
            if prior is not None and prior.annotator_id == annotator_id:
                return prior.id, True
            raise SubmitError("this item was already labeled by you; undo it first to change the label", 409) from None

    def _submit(self, conn: Connection, annotator_id: int, sid: str, aid: int, body: dict[str, Any]) -> tuple[int, bool]:
        # The assignment is locked first (PostgreSQL; SQLite writers take turns anyway): a retry of a
        # submission still being stored waits for it and then finds its submission id below, and a lease
        # expiring at the same moment waits and then finds the task answered.
        a = conn.execute(select(S.assignments).where(S.assignments.c.id == aid).with_for_update()).first()
        prior = conn.execute(select(S.labels.c.id, S.labels.c.annotator_id, S.labels.c.assignment_id)
                             .where(S.labels.c.submission_id == sid)).first()
        if prior is not None:
            if prior.annotator_id != annotator_id or prior.assignment_id != aid:
                raise SubmitError("field 'submission_id': already used for another submission", 409)
            return prior.id, True
        if a is None or a.annotator_id != annotator_id:
            raise SubmitError(f"no task {aid} of yours (fetch the next task first)", 404)
        if a.state in ("done", "skipped"):
            raise SubmitError("this item was already labeled by you; undo it first to change the label", 409)
        item = conn.execute(select(S.items.c.candidates, S.items.c.is_gold).where(S.items.c.id == a.item_id)).one()
        fields = parse_answer(self.store.settings, body, list(a.shown_order), len(item.candidates))
        skip = fields.get("choice") == "skip"
        now = time.time()
        label_id = conn.execute(S.labels.insert().values(
            submission_id=sid, assignment_id=aid, item_id=a.item_id, annotator_id=annotator_id, created_at=now,
            **fields)).inserted_primary_key[0]
        conn.execute(update(S.assignments).where(S.assignments.c.id == aid)
                     .values(state="skipped" if skip else "done"))
        values: dict[str, Any] = {} if skip else {"n_labels": S.items.c.n_labels + 1}
        if not item.is_gold and (skip or a.state == "expired"):
            # a skip hands the slot back; a late label on an expired lease takes one again
            values["slots_left"] = S.items.c.slots_left + (1 if skip else -1)
        if values:
            conn.execute(update(S.items).where(S.items.c.id == a.item_id).values(**values))
        return label_id, False

    def undo(self, annotator_id: int) -> int | None:
        """Retract the annotator's last live label and reopen its item for them (it comes next, before an
        item they have open); the item id, or None."""
        with self.store.write() as conn:
            last = conn.execute(select(S.labels.c.id, S.labels.c.assignment_id, S.labels.c.item_id, S.labels.c.choice)
                                .where(S.labels.c.annotator_id == annotator_id, S.labels.c.retracted_at.is_(None))
                                .order_by(S.labels.c.id.desc()).limit(1)).first()
            if last is None:
                return None
            # An item they have open stays theirs: open tasks are handed out oldest first, so the undone
            # one (shown before it) comes first and the open one after it.
            now = time.time()
            if not conn.execute(update(S.labels).where(S.labels.c.id == last.id, S.labels.c.retracted_at.is_(None))
                                .values(retracted_at=now)).rowcount:
                return None  # a concurrent undo (another tab) retracted it first
            conn.execute(update(S.assignments).where(S.assignments.c.id == last.assignment_id)
                         .values(state="open", created_at=now))
            gold = conn.scalar(select(S.items.c.is_gold).where(S.items.c.id == last.item_id))
            values: dict[str, Any] = {}
            if last.choice == "skip":
                if not gold:
                    values["slots_left"] = S.items.c.slots_left - 1
            else:
                values["n_labels"] = S.items.c.n_labels - 1
            if values:
                conn.execute(update(S.items).where(S.items.c.id == last.item_id).values(**values))
            return last.item_id

    def progress(self, annotator_id: int) -> dict[str, int]:
        """This annotator's live labels (`labeled`), skips (`skipped`), their sum (`done`), and how many
        more items they could get now (`left`, their open ones included)."""
        a, L = S.assignments, S.labels
        with self.store.read() as conn:
            skip = case((L.c.choice == "skip", 1), else_=0)
            total, skipped = conn.execute(select(func.count(), func.coalesce(func.sum(skip), 0)).where(
                L.c.annotator_id == annotator_id, L.c.retracted_at.is_(None))).one()
            seen = exists().where(a.c.item_id == S.items.c.id, a.c.annotator_id == annotator_id)
            left = conn.scalar(select(func.count()).select_from(S.items).where(
                and_(S.items.c.slots_left > 0, ~seen))) or 0
            open_ = conn.scalar(select(func.count()).select_from(a).where(
                a.c.annotator_id == annotator_id, a.c.state == "open")) or 0
        return {"done": int(total), "labeled": int(total) - int(skipped), "skipped": int(skipped), "left": left + open_}


def parse_answer(settings: Settings, body: dict[str, Any], order: list[int], n: int) -> dict[str, Any]:
    """The label columns for `body`, checked against the project; candidate positions in the answer are
    the ones shown (`left`/`right`, or indices as given in the task), stored as item indices."""
    out: dict[str, Any] = {}
    comment = body.get("comment")
    if comment is not None:
        if not isinstance(comment, str) or len(comment) > 5000:
            raise SubmitError("field 'comment': expected text of at most 5000 characters")
        out["comment"] = comment.strip() or None
    duration = body.get("duration_ms")
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, int) or not 0 <= duration < 10**9:
            raise SubmitError("field 'duration_ms': expected a non-negative integer")
        out["duration_ms"] = duration
    choice = body.get("choice")
    if choice == "skip":
        return {**out, "choice": "skip"}
    if settings.kind == "compare":
        if choice in SIDES:
            choice = "ab"[order[SIDES[choice]]]
        elif choice not in ("tie", "both_bad"):
            raise SubmitError("field 'choice': expected left, right, tie, both_bad or skip")
        out["choice"] = choice
        strength = body.get("strength")
        if strength is not None:
            if not settings.strength or choice not in ("a", "b") or strength not in STRENGTHS:
                raise SubmitError("field 'strength': expected slightly or clearly, with a left or right choice"
                                  if settings.strength else "field 'strength': this project does not ask for it")
            out["strength"] = strength
    elif choice is not None:
        raise SubmitError(f"field 'choice': a {settings.kind} project takes only 'skip' as a choice")
    if settings.kind == "rank":
        ranking = body.get("ranking")
        if not (isinstance(ranking, list) and sorted(ranking) == list(range(n))
                and all(isinstance(r, int) and not isinstance(r, bool) for r in ranking)):
            raise SubmitError(f"field 'ranking': expected every candidate index 0..{n - 1} once, best first")
        out["ranking"] = ranking
    if settings.kind == "rate":
        out["ratings"] = _ratings(settings, body.get("ratings"), n)
    rewrite = body.get("rewrite")
    if rewrite is not None:
        if not settings.rewrite:
            raise SubmitError("field 'rewrite': this project does not take rewrites")
        if not (isinstance(rewrite, dict) and isinstance(rewrite.get("index"), int) and 0 <= rewrite["index"] < n
                and isinstance(rewrite.get("text"), str) and rewrite["text"].strip() and len(rewrite["text"]) <= 50000):
            raise SubmitError(f"field 'rewrite': expected {{\"index\": 0..{n - 1}, \"text\": \"...\"}} (non-empty)")
        out["rewrite"] = {"index": rewrite["index"], "text": rewrite["text"]}
    return out


def _ratings(settings: Settings, ratings: Any, n: int) -> dict[str, list[int]]:
    lo, hi = settings.scale
    if not isinstance(ratings, dict):
        raise SubmitError(f"field 'ratings': expected {{criterion: [score per candidate index]}} for "
                          f"{', '.join(settings.criteria)}")
    unknown = set(ratings) - set(settings.criteria)
    if unknown:
        raise SubmitError(f"field 'ratings': unknown criterion {sorted(unknown)[0]!r}; expected "
                          f"{', '.join(settings.criteria)}")
    out = {}
    for crit in settings.criteria:
        scores = ratings.get(crit)
        if not (isinstance(scores, list) and len(scores) == n and all(
                isinstance(s, int) and not isinstance(s, bool) and lo <= s <= hi for s in scores)):
            raise SubmitError(f"field 'ratings.{crit}': expected {n} whole scores in {lo}..{hi}, one per candidate "
                              "index")
        out[crit] = scores
    return out
