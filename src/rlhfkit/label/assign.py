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
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from rlhfkit.label import schema as S
from rlhfkit.label.items import STRENGTHS, Settings
from rlhfkit.label.store import LabelError, Store

SIDES = {"left": 0, "right": 1}
LABEL_FIELDS = ("choice", "strength", "ranking", "ratings", "rewrite", "comment", "duration_ms")


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


def _task(assignment_id: int, item: Any, order: list[int]) -> Task:
    """A Task from an item row (id, key, prompt, candidates, is_gold) and the order it is shown in."""
    cands = [{"index": i, **item.candidates[i]} for i in order]
    return Task(assignment_id, item.id, item.key, item.prompt, cands, list(order), item.is_gold)


_ITEM = (S.items.c.id, S.items.c.key, S.items.c.prompt, S.items.c.candidates, S.items.c.is_gold,
         S.items.c.slots_left)

# The statements of every answer, built once: SQLAlchemy then reuses their compiled form and cache key
# (building them per call was half of the time of an answer).
_A, _I, _L = S.assignments, S.items, S.labels
_MINE = (select(_A.c.id.label("assignment_id"), _A.c.shown_order, *_ITEM)
         .select_from(_A.join(_I, _I.c.id == _A.c.item_id))
         .where(_A.c.annotator_id == bindparam("ann"), _A.c.state == "open").order_by(_A.c.id).limit(1))
_PICK = (select(*_ITEM)
         .where(_I.c.slots_left > 0,
                ~exists().where(_A.c.item_id == _I.c.id, _A.c.annotator_id == bindparam("ann")))
         .order_by(_I.c.priority.desc(), _I.c.id).limit(1).with_for_update(skip_locked=True))
_NEW_ASSIGNMENT = _A.insert()
_TAKE_SLOT = update(_I).where(_I.c.id == bindparam("iid")).values(slots_left=_I.c.slots_left - 1)
_TASK_FOR_ANSWER = (select(_A.c.annotator_id, _A.c.item_id, _A.c.state, _A.c.shown_order, _I.c.candidates,
                           _I.c.is_gold, _I.c.slots_left)
                    .select_from(_A.join(_I, _I.c.id == _A.c.item_id))
                    .where(_A.c.id == bindparam("aid")).with_for_update(of=_A))
_PRIOR = select(_L.c.id, _L.c.annotator_id, _L.c.assignment_id).where(_L.c.submission_id == bindparam("sid"))
_NEW_LABEL = _L.insert()
_ANSWERED = update(_A).where(_A.c.id == bindparam("aid")).values(state=bindparam("state"))
_ITEM_AFTER = {  # (skip, late) -> the item's counters after an answer
    (False, False): update(_I).where(_I.c.id == bindparam("iid")).values(n_labels=_I.c.n_labels + 1),
    (True, False): update(_I).where(_I.c.id == bindparam("iid")).values(slots_left=_I.c.slots_left + 1),
    (False, True): update(_I).where(_I.c.id == bindparam("iid"))
    .values(n_labels=_I.c.n_labels + 1, slots_left=_I.c.slots_left - 1),
}


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

    def __init__(self, store: Store, free_ttl: float = 0.0) -> None:
        """`free_ttl`: seconds the count of items with a free slot (for `progress`) may be reused; the
        server uses 1 s, since the count scans every such item (20 ms with 100,000 of them)."""
        self.store = store
        self.free_ttl = free_ttl
        self._last_expiry = 0.0
        self._free = (-1e9, 0)  # (when counted, items with a free slot), kept current by _free_changed
        self._free_lock = threading.Lock()

    def _free_changed(self, delta: int) -> None:
        """This server moved an item in (+1) or out (-1) of "has a free slot": keep the count exact
        without counting again (changes by other processes show within free_ttl)."""
        with self._free_lock:
            self._free = (self._free[0], self._free[1] + delta)

    def _free_unknown(self) -> None:
        with self._free_lock:
            self._free = (-1e9, 0)

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
            self._free_unknown()
        a = S.assignments
        mine = conn.execute(_MINE, {"ann": annotator_id}).first()
        if mine is not None:
            return _task(mine.assignment_id, mine, mine.shown_order)
        seen = exists().where(a.c.item_id == S.items.c.id, a.c.annotator_id == annotator_id)
        item = None
        if settings.gold_rate > 0:
            n_all, n_gold = conn.execute(
                select(func.count(), func.coalesce(func.sum(case((S.items.c.is_gold.is_(True), 1), else_=0)), 0))
                .select_from(a.join(S.items, S.items.c.id == a.c.item_id))
                .where(a.c.annotator_id == annotator_id, a.c.state != "skipped")).one()
            if n_gold < settings.gold_rate * (n_all + 1):
                item = conn.execute(select(*_ITEM).where(S.items.c.is_gold.is_(True), ~seen)
                                    .order_by(S.items.c.id).limit(1)).first()
        if item is None:
            item = conn.execute(_PICK, {"ann": annotator_id}).first()
        if item is None:
            return None
        order = shown_order(self.store.secret, annotator_id, item.id, len(item.candidates))
        new_id = conn.execute(_NEW_ASSIGNMENT, {"item_id": item.id, "annotator_id": annotator_id,
                                                "shown_order": order, "state": "open", "created_at": now}
                              ).inserted_primary_key[0]
        if not item.is_gold:
            conn.execute(_TAKE_SLOT, {"iid": item.id})
            if item.slots_left == 1:
                self._free_changed(-1)
        return _task(new_id, item, order)

    # --- submissions ---------------------------------------------------------------------------------

    def submit(self, annotator_id: int, body: dict[str, Any]) -> tuple[int, bool]:
        """Store one label; return (label id, duplicate). `body` holds assignment_id, submission_id and
        the answer fields (see docs/label.md); a bad body is a SubmitError naming the field."""
        sid, aid = _ids(body)
        try:
            with self.store.write() as conn:
                return self._submit(conn, annotator_id, sid, aid, body)
        except IntegrityError:
            return self._answer_race(annotator_id, sid, aid)

    def _answer_race(self, annotator_id: int, sid: str, aid: int) -> tuple[int, bool]:
        """The label's insert hit a unique constraint: the submission id was stored already (by a
        concurrent retry: answer as the retry would; for another task: refuse), or the task has a label."""
        with self.store.read() as conn:
            prior = conn.execute(_PRIOR, {"sid": sid}).first()
        if prior is not None and prior.annotator_id == annotator_id and prior.assignment_id == aid:
            return prior.id, True
        if prior is not None:
            raise SubmitError("field 'submission_id': already used for another submission", 409)
        raise SubmitError("this item was already labeled by you; undo it first to change the label", 409)

    def _submit(self, conn: Connection, annotator_id: int, sid: str, aid: int, body: dict[str, Any]) -> tuple[int, bool]:
        # The assignment is locked first (PostgreSQL; SQLite writers take turns anyway): a retry of a
        # submission still being stored waits for it and then finds its submission id below, and a lease
        # expiring at the same moment waits and then finds the task answered.
        a = conn.execute(_TASK_FOR_ANSWER, {"aid": aid}).first()
        if a is None or a.annotator_id != annotator_id or a.state in ("done", "skipped"):
            prior = conn.execute(_PRIOR, {"sid": sid}).first()
            if prior is not None:  # a retry of an answer already stored
                if prior.annotator_id != annotator_id or prior.assignment_id != aid:
                    raise SubmitError("field 'submission_id': already used for another submission", 409)
                return prior.id, True
        if a is None or a.annotator_id != annotator_id:
            raise SubmitError(f"no task {aid} of yours (fetch the next task first)", 404)
        if a.state in ("done", "skipped"):
            raise SubmitError("this item was already labeled by you; undo it first to change the label", 409)
        fields = parse_answer(self.store.settings, body, list(a.shown_order), len(a.candidates))
        skip = fields.get("choice") == "skip"
        row = dict.fromkeys(LABEL_FIELDS)
        row.update(fields, submission_id=sid, assignment_id=aid, item_id=a.item_id, annotator_id=annotator_id,
                   created_at=time.time(), retracted_at=None)
        # a submission id used before for another task fails here (unique): see _answer_race
        label_id = conn.execute(_NEW_LABEL, row).inserted_primary_key[0]
        conn.execute(_ANSWERED, {"aid": aid, "state": "skipped" if skip else "done"})
        # a skip hands the slot back; a late label on an expired lease takes one again
        late = a.state == "expired" and not skip
        if skip and a.is_gold:
            return label_id, False
        conn.execute(_ITEM_AFTER[(skip, late and not a.is_gold)], {"iid": a.item_id})
        if not a.is_gold and ((skip and a.slots_left == 0) or (late and a.slots_left == 1)):
            self._free_changed(1 if skip else -1)
        return label_id, False

    def submit_and_next(self, annotator_id: int, body: dict[str, Any]) -> tuple[int, bool, Task | None]:
        """`submit`, then `next_for`, in one transaction when possible (what an annotator's client does
        after every answer). The label is stored whatever happens to the second part: a conflict while
        picking the next task is retried in a transaction of its own."""
        sid, aid = _ids(body)
        try:
            with self.store.write() as conn:
                label_id, duplicate = self._submit(conn, annotator_id, sid, aid, body)
                if self.store.sqlite:  # writers take turns: nothing can take the item we pick
                    return label_id, duplicate, self._next(conn, annotator_id)
                try:
                    with conn.begin_nested():
                        return label_id, duplicate, self._next(conn, annotator_id)
                except IntegrityError:
                    pass  # a concurrent request took the item we picked: pick after the commit
        except IntegrityError:
            label_id, duplicate = self._answer_race(annotator_id, sid, aid)
        return label_id, duplicate, self.next_for(annotator_id)

    def undo(self, annotator_id: int) -> int | None:
        """Retract the annotator's last live label and reopen its item for them (it comes next, before an
        item they have open); the item id, or None."""
        self._free_unknown()
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
            # free items = items with a free slot (counted at most every free_ttl seconds) minus
            # those this annotator was shown already, plus the ones they have open
            now = time.monotonic()
            if now - self._free[0] >= self.free_ttl:
                count = conn.scalar(select(func.count()).select_from(S.items).where(S.items.c.slots_left > 0)) or 0
                with self._free_lock:
                    self._free = (now, count)
            mine_free, open_ = conn.execute(
                select(func.coalesce(func.sum(case((S.items.c.slots_left > 0, 1), else_=0)), 0),
                       func.coalesce(func.sum(case((a.c.state == "open", 1), else_=0)), 0))
                .select_from(a.join(S.items, S.items.c.id == a.c.item_id))
                .where(a.c.annotator_id == annotator_id)).one()
            left = max(0, self._free[1] - int(mine_free))
        return {"done": int(total), "labeled": int(total) - int(skipped), "skipped": int(skipped),
                "left": left + int(open_)}


def _ids(body: dict[str, Any]) -> tuple[str, int]:
    sid = body.get("submission_id")
    if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
        raise SubmitError("field 'submission_id': expected a string of 8-64 characters (e.g. a UUID)")
    aid = body.get("assignment_id")
    if isinstance(aid, bool) or not isinstance(aid, int):
        raise SubmitError("field 'assignment_id': expected the integer from the task")
    return sid, aid


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
