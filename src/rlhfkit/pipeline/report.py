"""The pipeline's final report: the last round's eval report, every round side by side, and the
compression table; output_dir/report.html and output_dir/summary.json (every number)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfkit.evaluate.lm_report import build_report, headline
from rlhfkit.runtime.atomic import write_atomic


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def rounds_table(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for s in summaries:
        for r in headline(s):
            rows.append([s.get("round"), *r])
    return {"columns": ["round", "model", "scorer", "base", "tuned", "win rate", "length-matched win", "KL/token",
                        "length"], "rows": rows, "caption": "Every round against the base model (greedy answers)"}


def compress_rows(table: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for fmt, result in table.items():
        b, a = result["before"], result["after"]
        quality = sorted(set(b.get("quality", {})) | set(a.get("quality", {})))
        q = quality[0] if quality else None
        rows.append([fmt, b.get("size_mib"), a.get("size_mib"), b.get("tokens_per_s"), a.get("tokens_per_s"),
                     b.get("perplexity"), a.get("perplexity"), None if q is None else b["quality"].get(q),
                     None if q is None else a["quality"].get(q), "ok" if result["check"]["ok"] else "FAILED"])
    return {"columns": ["format", "MiB before", "MiB after", "tokens/s before", "tokens/s after", "perplexity before",
                        "perplexity after", "held-out sentiment before", "after", "load-back check"],
            "rows": rows, "caption": "Compression of the final policy (rlhfkit compress)"}


def final_report(cfg: Any, steps: list[Any]) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    summaries = [s for s in (_load(Path(step.folder) / "summary.json") for step in steps if step.stage == "eval") if s]
    table = None
    comp = [s for s in steps if s.stage == "compress"]
    if comp:
        table = _load(Path(comp[0].folder) / "compress.json")
    result: dict[str, Any] = {"output_dir": str(out), "rounds": summaries, "compress": table}
    if summaries:
        last = dict(summaries[-1])
        texts_file = Path([s for s in steps if s.stage == "eval"][-1].folder) / "answers.jsonl"
        last["texts"] = [json.loads(x) for x in texts_file.read_text(encoding="utf-8").splitlines()] if texts_file.is_file() else []
        extra = list(last.get("extra_tables", []))
        if len(summaries) > 1:
            extra.append(rounds_table(summaries))
        if table:
            extra.append(compress_rows(table))
        last["extra_tables"] = extra
        runs = [str(Path(s.folder)) for s in steps if s.stage in ("sft", "reward", "dpo", "ppo")]
        report = build_report(last, runs, title=f"rlhfkit pipeline: {out.name}")
        path = report.write(out / "report.html")
        result["report"] = str(path)
    write_atomic(out / "summary.json", json.dumps(result, indent=2, default=float) + "\n")
    return result
