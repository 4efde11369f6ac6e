"""Metrics to JSONL and TensorBoard, and a rich progress bar. Rank 0 only; other ranks get no-ops.

`metrics.jsonl` holds one object per logged step (`{"step": 10, "train/loss": 2.3, ...}`);
`samples.jsonl` holds generated text. On resume, rows newer than the checkpoint are dropped from both
and TensorBoard purges its events after that step, so the logs read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _truncate_jsonl(path: Path, after_step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from an interrupted write
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        if not enabled:
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if resume_step is not None:
            _truncate_jsonl(self.metrics_path, resume_step)
            _truncate_jsonl(self.samples_path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def logged(self, step: int, prefix: str) -> bool:
        """Whether metrics.jsonl already has a row for `step` with a key starting with `prefix`."""
        if not self.enabled or not self.metrics_path.is_file():
            return False
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step") == step and any(k.startswith(prefix) for k in row):
                return True
        return False

    def samples(self, step: int, tag: str, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, "tag": tag, **row}, ensure_ascii=False) + "\n")
        if self.writer is not None:
            # Markdown table in TensorBoard's text tab; escape pipes so text cannot break the table.
            body = "\n".join(
                "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row.values()) + " |"
                for row in rows
            )
            header = "| " + " | ".join(rows[0].keys()) + " |\n|" + "---|" * len(rows[0]) + "\n" if rows else ""
            self.writer.add_text(tag, header + body, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """Steps, throughput (tokens/s, or another `unit`), last loss and ETA. Silent when disabled
    (non-zero ranks, progress=false)."""

    def __init__(self, total: int, *, enabled: bool, start: int = 0, description: str = "train", unit: str = "tok"):
        self.enabled, self.unit = enabled, unit
        self.tokens = 0
        self.seconds = 0.0
        if not enabled:
            self.progress = None
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, completed=start, info="")
        self.progress.start()

    def update(self, steps: int, tokens: int, seconds: float, info: str) -> None:
        """Advance by `steps` that processed `tokens` in `seconds` of training (eval time excluded)."""
        self.tokens += tokens
        self.seconds += seconds
        if self.progress is None:
            return
        rate = self.tokens / max(self.seconds, 1e-9)
        self.progress.update(self.task, advance=steps, info=f"{rate:,.0f} {self.unit}/s  {info}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
