"""Labels -> the files the trainers read, each checked by the trainers' own validator and written atomically.

| what          | rows                                                                          | read by            |
| ------------- | ----------------------------------------------------------------------------- | ------------------ |
| `preferences` | `prompt`, `chosen`, `rejected`, [`margin`], `votes`, `agreement`, `id`, ...   | reward, dpo        |
| `ratings`     | `prompt`, `response`, `score` (mean over annotators), `scores`, `votes`, `id`  | reward (regression)|
| `sft`         | `prompt`, `completion` from annotators' rewrites                              | sft                |
| `raw`         | every label, retracted ones included, with annotator, time and shown order    | you                |

After a message-list prompt, `chosen`, `rejected` and `completion` are one assistant message each (what the
trainers' tokenizers expect); after a text prompt they are text.

Preferences are aggregated per item by majority vote over the live, non-skip labels of non-gold items:
- compare: votes a / b / tie / both_bad; the most common wins (an even split between the top votes is
  undecided and dropped). A win for a or b becomes a row; `margin` is the mean strength of the winning
  votes that gave one (slightly 0.5, clearly 1.0). A tie or both-bad majority is dropped, or with
  `ties="keep"` / `both_bad="keep"` written with `"tie": true` (`"label": "both_bad"`) so that a reader
  can tell them apart (rlhfkit's trainers skip tie rows).
- rank: every candidate pair whose order a majority agrees on (`rank_pairs="all"`), or one row of the
  best against the worst by Borda count (`rank_pairs="best_worst"`).
- rewrites (any kind): the corrected text as `chosen` over the original answer, `"source": "rewrite"`.
`votes` counts the answers, `agreement` is the winning share; `min_votes` drops items with fewer labels.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import select

from rlhfkit.data.write import write_jsonl
from rlhfkit.label import schema as S
from rlhfkit.label.agreement import majority, ranking_pairs
from rlhfkit.label.stats import labels_with_context, live_labels
from rlhfkit.label.store import LabelError, Store

MARGINS = {"slightly": 0.5, "clearly": 1.0}
WHAT = ("preferences", "ratings", "sft", "raw")


def _answer(cand: dict[str, Any]) -> str:
    return cand.get("text", cand.get("media", ""))


def _reply(prompt: Any, text: str) -> Any:
    """An answer as the trainers read it: text after a text prompt, one assistant message after a message
    list (the SFT and pair tokenizers want prompt and answer both text or both messages)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _items(store: Store) -> dict[int, Any]:
    with store.read() as conn:
        return {r.id: r for r in conn.execute(select(S.items.c.id, S.items.c.key, S.items.c.prompt,
                                                     S.items.c.candidates, S.items.c.source)
                                              .where(S.items.c.is_gold.is_(False)))}


# Fields the exports write or the trainers read: an input row's own value would pass for the labels'
# (a re-labeled preference file's stale margin, a "tie" flag, a "messages" list the SFT reader prefers),
# so the input's value is kept as `input_<name>`.
OWN_FIELDS = {"margin", "tie", "label", "votes", "agreement", "source", "annotator", "borda", "score", "scores",
              "response", "completion", "candidate", "messages", "text"}


def _base(item: Any) -> dict[str, Any]:
    extra = {(f"input_{k}" if k in OWN_FIELDS else k): v for k, v in (item.source or {}).items() if k != "original"}
    return {**extra, "id": item.key}


def preference_rows(store: Store, *, ties: str = "drop", both_bad: str = "drop", rank_pairs: str = "all",
                    min_votes: int = 1, rewrites: bool = True) -> tuple[list[dict[str, Any]], dict[str, int]]:
    for name, value, allowed in (("ties", ties, ("drop", "keep")), ("both_bad", both_bad, ("drop", "keep")),
                                 ("rank_pairs", rank_pairs, ("all", "best_worst"))):
        if value not in allowed:
            raise LabelError(f"--{name.replace('_', '-')}: expected {' or '.join(allowed)}, got {value!r}")
    kind = store.settings.kind
    items = _items(store)
    by_item: dict[int, list[Any]] = defaultdict(list)
    rows: list[dict[str, Any]] = []
    stats = Counter()
    for lab in live_labels(store):
        if lab.is_gold or lab.item_id not in items:
            continue
        if rewrites and lab.rewrite:
            item = items[lab.item_id]
            original = _answer(item.candidates[lab.rewrite["index"]])
            if lab.rewrite["text"] != original:
                rows.append({**_base(item), "prompt": item.prompt, "chosen": lab.rewrite["text"], "rejected": original,
                             "source": "rewrite", "annotator": lab.annotator})
                stats["rewrites"] += 1
        if lab.choice != "skip":
            by_item[lab.item_id].append(lab)
    for item_id, labs in sorted(by_item.items()):
        item = items[item_id]
        if len(labs) < min_votes:
            stats["too_few_votes"] += 1
            continue
        if kind == "compare":
            rows.extend(_compare_rows(item, labs, ties, both_bad, stats))
        elif kind == "rank":
            rows.extend(_rank_rows(item, labs, rank_pairs, stats))
    for row in rows:
        row["chosen"], row["rejected"] = _reply(row["prompt"], row["chosen"]), _reply(row["prompt"], row["rejected"])
    stats["rows"] = len(rows)
    return rows, dict(stats)


def _compare_rows(item: Any, labs: list[Any], ties: str, both_bad: str, stats: Counter) -> list[dict[str, Any]]:
    votes = [lab.choice for lab in labs]
    winner, share = majority(votes)
    count = Counter(votes)
    a, b = (_answer(c) for c in item.candidates)
    if winner is None:
        stats["undecided"] += 1
        return []
    if winner in ("tie", "both_bad"):
        keep = ties if winner == "tie" else both_bad
        stats[f"{winner}_{'kept' if keep == 'keep' else 'dropped'}"] += 1
        if keep == "drop":
            return []
        return [{**_base(item), "prompt": item.prompt, "chosen": a, "rejected": b, "tie": True, "label": winner,
                 "votes": dict(count), "agreement": round(share, 4)}]
    chosen, rejected = (a, b) if winner == "a" else (b, a)
    loser = "b" if winner == "a" else "a"
    row = {**_base(item), "prompt": item.prompt, "chosen": chosen, "rejected": rejected,
           "votes": {"chosen": count[winner], "rejected": count[loser], "tie": count["tie"],
                     "both_bad": count["both_bad"]},
           "agreement": round(share, 4)}
    strengths = [MARGINS[lab.strength] for lab in labs if lab.choice == winner and lab.strength]
    if strengths:
        row["margin"] = round(sum(strengths) / len(strengths), 4)
    stats["decided"] += 1
    return [row]


def _rank_rows(item: Any, labs: list[Any], mode: str, stats: Counter) -> list[dict[str, Any]]:
    n = len(item.candidates)
    texts = [_answer(c) for c in item.candidates]
    if mode == "best_worst":
        borda = [0] * n
        for lab in labs:
            for pos, idx in enumerate(lab.ranking):
                borda[idx] += n - 1 - pos
        order = sorted(range(n), key=lambda i: (-borda[i], i))
        best, worst = order[0], order[-1]
        if borda[best] == borda[order[1]] or borda[worst] == borda[order[-2]]:
            stats["undecided"] += 1
            return []
        share = sum(lab.ranking.index(best) < lab.ranking.index(worst) for lab in labs) / len(labs)
        stats["decided"] += 1
        return [{**_base(item), "prompt": item.prompt, "chosen": texts[best], "rejected": texts[worst],
                 "votes": {"chosen": round(share * len(labs)), "rejected": len(labs) - round(share * len(labs))},
                 "agreement": round(share, 4), "borda": borda}]
    above: Counter = Counter()
    for lab in labs:
        above.update(ranking_pairs(lab.ranking))
    rows = []
    for i in range(n):
        for j in range(i + 1, n):
            wi, wj = above[(i, j)], above[(j, i)]
            if wi == wj:
                stats["undecided_pairs"] += 1
                continue
            win, lose, k = (i, j, wi) if wi > wj else (j, i, wj)
            rows.append({**_base(item), "prompt": item.prompt, "chosen": texts[win], "rejected": texts[lose],
                         "votes": {"chosen": k, "rejected": wi + wj - k}, "agreement": round(k / (wi + wj), 4)})
    stats["decided"] += 1 if rows else 0
    return rows


def rating_rows(store: Store, criterion: str = "") -> list[dict[str, Any]]:
    """One row per (item, answer): the mean score over annotators; `criterion` picks one, the default is
    the only criterion or the mean over all of them (each is also in `scores`)."""
    settings = store.settings
    if settings.kind != "rate":
        raise LabelError(f"--what ratings: this is a {settings.kind} project; ratings come from rate projects")
    if criterion and criterion not in settings.criteria:
        raise LabelError(f"--criterion: expected one of {', '.join(settings.criteria)}, got {criterion!r}")
    items = _items(store)
    sums: dict[tuple[int, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for lab in live_labels(store):
        if lab.is_gold or lab.choice == "skip" or lab.item_id not in items:
            continue
        for crit, scores in lab.ratings.items():
            for cand, score in enumerate(scores):
                sums[(lab.item_id, cand)][crit].append(score)
    rows = []
    for (item_id, cand), per in sorted(sums.items()):
        item = items[item_id]
        means = {c: round(sum(v) / len(v), 4) for c, v in per.items()}
        score = means[criterion] if criterion else round(sum(means.values()) / len(means), 4)
        rows.append({**_base(item), "prompt": item.prompt, "response": _answer(item.candidates[cand]),
                     "score": score, "scores": means, "votes": len(next(iter(per.values()))), "candidate": cand})
    return rows


def sft_rows(store: Store) -> list[dict[str, Any]]:
    items = _items(store)
    rows = []
    for lab in live_labels(store):
        if lab.rewrite and lab.item_id in items:
            item = items[lab.item_id]
            rows.append({**_base(item), "prompt": item.prompt, "completion": _reply(item.prompt, lab.rewrite["text"]),
                         "annotator": lab.annotator, "candidate": lab.rewrite["index"]})
    return rows


def raw_rows(store: Store, after: int = 0, limit: int = 0) -> list[dict[str, Any]]:
    """Every label ever submitted (undone ones have `retracted_at`), lossless; `after`/`limit` page by
    label id."""
    rows = labels_with_context(store, live_only=False, after=after, limit=limit)
    out = []
    for r in rows:
        side = None
        if r.choice in ("a", "b"):
            side = "left" if r.shown_order[0] == "ab".index(r.choice) else "right"
        out.append({"label_id": r.id, "submission_id": r.submission_id, "assignment_id": r.assignment_id,
                    "item": r.key, "item_id": r.item_id,
                    "annotator": r.annotator, "kind": store.settings.kind, "gold_item": r.is_gold,
                    "created_at": _iso(r.created_at), "shown_order": r.shown_order, "choice": r.choice,
                    "chosen_side": side, "strength": r.strength, "margin": MARGINS.get(r.strength or ""),
                    "ranking": r.ranking, "ratings": r.ratings, "rewrite": r.rewrite, "comment": r.comment,
                    "duration_ms": r.duration_ms, "retracted_at": _iso(r.retracted_at)})
    return out


def _iso(t: float | None) -> str | None:
    return None if t is None else _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def export_rows(store: Store, what: str, **options: Any) -> tuple[list[dict[str, Any]], str | None, dict[str, int]]:
    """(rows, validator kind, counts) for `what`."""
    if what == "preferences":
        rows, stats = preference_rows(store, **options)
        return rows, "preference", stats
    if what == "ratings":
        rows = rating_rows(store, options.get("criterion", ""))
        return rows, "rating", {"rows": len(rows)}
    if what == "sft":
        rows = sft_rows(store)
        return rows, "sft", {"rows": len(rows)}
    if what == "raw":
        rows = raw_rows(store)
        return rows, None, {"rows": len(rows)}
    raise LabelError(f"--what: expected one of {', '.join(WHAT)}, got {what!r}")


def export(store: Store, what: str, path: str, **options: Any) -> dict[str, int]:
    """Write the `what` export to `path` (JSONL, atomic, validated); return the counts."""
    rows, kind, stats = export_rows(store, what, **options)
    if kind == "preference":
        rows = [r for r in rows if not r.get("tie")] + [r for r in rows if r.get("tie")]
    write_jsonl(rows, path, kind, what=f"{what} (no labels yet?)")
    return stats
