"""The dashboard's numbers (page, `rlhfkit label status`, GET /api/status), from the live labels.

Agreement is computed on the item's own candidate order (never the shown order), per kind:
- compare: one unit per item, nominal values a / b / tie / both_bad (a tie is its own category, not
  half a win; skips are not values);
- rank: one unit per (item, candidate pair), the value is which of the two was ranked higher;
- rate: one unit per (item, candidate, criterion), interval values; kappa is quadratic-weighted.
Cohen's kappa is given per annotator pair (with the number of shared units), Krippendorff's alpha over
everyone. Position bias is the share of decided comparisons won by the answer shown on the left (0.5
means none). For items made from a preference file (`chosen`/`rejected` rows), `audit.agree_with_file` is the share of
decided comparisons that picked the file's `chosen` answer. Gold accuracy per annotator: compare, the gold choice; rank, the share of candidate pairs
ordered as in the gold ranking; rate, every score within 1 of the gold score (first criterion).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any

from sqlalchemy import func, select

from rlhfkit.label import schema as S
from rlhfkit.label.agreement import (
    krippendorff_alpha,
    majority,
    pairwise_kappas,
    position_bias,
    ranking_units,
)
from rlhfkit.label.store import Store


def labels_with_context(store: Store, live_only: bool = True, after: int = 0, limit: int = 0) -> list[Any]:
    """Labels (every column) with their assignment's shown order, the item and the annotator's name,
    oldest first; `live_only` leaves out retracted (undone) ones; `after`/`limit` page by label id."""
    L, A, T, P = S.labels, S.assignments, S.items, S.annotators
    query = (select(L, A.c.shown_order, T.c.key, T.c.is_gold, T.c.gold, T.c.prompt, T.c.source,
                    P.c.name.label("annotator"))
             .select_from(L.join(A, A.c.id == L.c.assignment_id).join(T, T.c.id == L.c.item_id)
                          .join(P, P.c.id == L.c.annotator_id)).order_by(L.c.id))
    if live_only:
        query = query.where(L.c.retracted_at.is_(None))
    if after:
        query = query.where(L.c.id > after)
    if limit:
        query = query.limit(limit)
    with store.read() as conn:
        return conn.execute(query).all()


def live_labels(store: Store) -> list[Any]:
    return labels_with_context(store, live_only=True)


def _units(kind: str, label: Any) -> dict[Any, Any]:
    """The agreement units one label gives a value to: {unit key: value}."""
    if label.choice == "skip":
        return {}
    if kind == "compare":
        return {label.item_id: label.choice}
    if kind == "rank":
        return {(label.item_id, *pair): v for pair, v in ranking_units(label.ranking).items()}
    return {(label.item_id, cand, crit): score for crit, scores in (label.ratings or {}).items()
            for cand, score in enumerate(scores)}


def _gold_correct(kind: str, label: Any) -> float | None:
    if label.choice == "skip" or label.gold is None:
        return None
    if kind == "compare":
        return float(label.choice == label.gold)
    if kind == "rank":
        mine, gold = ranking_units(label.ranking), ranking_units(label.gold)
        return sum(mine[p] == gold[p] for p in gold) / max(len(gold), 1)
    first = next(iter((label.ratings or {}).values()), None)
    if first is None:
        return None
    return float(all(abs(s - g) <= 1 for s, g in zip(first, label.gold)))


def project_status(store: Store, disputed: int = 10) -> dict[str, Any]:
    settings = store.settings
    kind = settings.kind
    labels = live_labels(store)
    with store.read() as conn:
        n_items = conn.scalar(select(func.count()).select_from(S.items).where(S.items.c.is_gold.is_(False))) or 0
        n_gold = conn.scalar(select(func.count()).select_from(S.items).where(S.items.c.is_gold.is_(True))) or 0
        done = conn.scalar(select(func.count()).select_from(S.items).where(
            S.items.c.is_gold.is_(False), S.items.c.n_labels >= settings.overlap)) or 0
        started = conn.scalar(select(func.count()).select_from(S.items).where(
            S.items.c.is_gold.is_(False), S.items.c.n_labels > 0)) or 0
        people = conn.execute(select(S.annotators.c.name, S.annotators.c.role, S.annotators.c.active)
                              .order_by(S.annotators.c.id)).all()
        retracted = conn.scalar(select(func.count()).select_from(S.labels)
                                .where(S.labels.c.retracted_at.is_not(None))) or 0

    per: dict[str, dict[str, Any]] = {p.name: {"name": p.name, "role": p.role, "active": p.active, "labels": 0,
                                               "skips": 0, "gold_seen": 0, "gold_correct": 0.0, "times": [],
                                               "durations": []} for p in people}
    values: dict[tuple[str, Any], Any] = {}
    by_item: dict[int, list[Any]] = defaultdict(list)
    left_won = decided = 0
    audited = agreed = 0  # items made from a preference file: votes for the file's chosen answer
    for lab in labels:
        p = per[lab.annotator]
        if lab.choice == "skip":
            p["skips"] += 1
            continue
        p["labels"] += 1
        p["times"].append(lab.created_at)
        if lab.duration_ms is not None:
            p["durations"].append(lab.duration_ms)
        if lab.is_gold:
            score = _gold_correct(kind, lab)
            if score is not None:
                p["gold_seen"] += 1
                p["gold_correct"] += score
            continue  # gold items are a check on people, not data: no agreement, no export
        by_item[lab.item_id].append(lab)
        for unit, value in _units(kind, lab).items():
            values[(lab.annotator, unit)] = value
        if kind == "compare" and lab.choice in ("a", "b"):
            decided += 1
            left_won += int(lab.shown_order[0] == "ab".index(lab.choice))
            if (lab.source or {}).get("original") == "chosen_first":
                audited += 1
                agreed += int(lab.choice == "a")

    units: dict[Any, list[Any]] = defaultdict(list)
    for (_, unit), value in values.items():
        units[unit].append(value)
    metric = "interval" if kind == "rate" else "nominal"
    kappas = pairwise_kappas(values, weights="quadratic" if kind == "rate" else "none")

    annotators = []
    for p in per.values():
        if p["role"] == "admin" and not p["labels"]:
            continue
        times = p.pop("times")
        durations = sorted(p.pop("durations"))
        hours = max((times[-1] - times[0]) / 3600, 1 / 60) if times else None
        p["per_hour"] = round(len(times) / hours, 1) if hours else 0.0
        p["median_seconds"] = round(durations[len(durations) // 2] / 1000, 1) if durations else None
        p["gold_accuracy"] = round(p["gold_correct"] / p["gold_seen"], 3) if p["gold_seen"] else None
        p["gold_correct"] = round(p["gold_correct"], 3)
        annotators.append(p)

    return {
        "kind": kind, "overlap": settings.overlap, "items": n_items, "gold_items": n_gold, "items_done": done,
        "items_started": started, "labels": sum(p["labels"] for p in annotators),
        "skips": sum(p["skips"] for p in annotators), "retracted": retracted,
        "annotators": annotators,
        "agreement": {
            "metric": metric,
            "alpha": _round(krippendorff_alpha(dict(units), metric=metric)),
            "pairable_units": sum(1 for v in units.values() if len(v) >= 2),
            "kappa": [{"a": a, "b": b, "kappa": _round(k), "shared": n} for (a, b), (k, n) in sorted(kappas.items())],
        },
        "position_bias": {"left_share": _round(position_bias(left_won, decided)), "decided": decided},
        "audit": {"agree_with_file": _round(agreed / audited) if audited else None, "decided": audited},
        "disputed": _disputed(kind, by_item, disputed),
        "computed_at": time.time(),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _disputed(kind: str, by_item: dict[int, list[Any]], top: int) -> list[dict[str, Any]]:
    """Items with at least two labels, the least agreed first (share of the most common answer)."""
    out = []
    for item_id, labs in by_item.items():
        if len(labs) < 2:
            continue
        if kind == "compare":
            votes = [lab.choice for lab in labs]
        elif kind == "rank":
            votes = [tuple(lab.ranking)[0] for lab in labs]  # who was ranked best
        else:
            votes = [round(sum(s for scores in (lab.ratings or {}).values() for s in scores), 1) for lab in labs]
        top_vote, share = majority(votes)
        if kind == "rate":
            spread = max(votes) - min(votes)
            share = 1.0 / (1.0 + spread)
        out.append({"item_id": item_id, "key": labs[0].key, "labels": len(labs), "share": round(share, 3),
                    "votes": dict(Counter(str(v) for v in votes)), "majority": top_vote})
    out.sort(key=lambda d: (d["share"], -d["labels"], d["item_id"]))
    return out[:top]


def pair_counts(annotators: list[str]) -> list[tuple[str, str]]:
    return list(combinations(sorted(annotators), 2))
