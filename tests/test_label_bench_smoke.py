"""benchmarks/label_load.py runs end to end (its --smoke size, SQLite) and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_label_load_benchmark_smoke() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "label_load.py"), "--smoke", "--backend", "sqlite"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("| backend | items | clients | labels |") for line in lines), out.stdout
    row = next(line for line in lines if line.startswith("| sqlite |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["1000", "5", "100"], row  # items, clients, labels (5 x 20, all stored once)
    assert float(cells[5]) > 0 and all(re.fullmatch(r"\d+", c) for c in cells[7:10]), row  # labels/s, p50/p95/p99
