"""benchmarks/gpu_suite.sh in its CPU dry-run mode: the suite a lent GPU machine will run, checked end to
end on a tiny random model (both benchmark parts run, the table and gpu_suite.json are complete)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--skip-trl", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for measure in ("DPO pairs/s, same work (live reference, padded)", "DPO pairs/s, each trainer's defaults",
                    "rollout new tokens/s (engine vs model.generate)", "RLOO step s", "PPO (GAE, value head) step s"):
        line = next((x for x in out.splitlines() if x.startswith(f"| {measure}")), None)
        assert line is not None, f"no row {measure!r} in:\n{out}"
        assert float(line.split("|")[2]) > 0
    assert "TRL: skipped" in out
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert summary["status"]["dpo"] == "ok" and summary["status"]["online_rl"] == "ok"
    assert summary["device"] == "cpu" and summary["model"] == "tiny-random"
    r = summary["online_rl"]["results"]
    assert r["rlhfkit rloo"]["new_tokens_per_s"] > 0 and r["model.generate"]["new_tokens_per_s"] > 0
    assert "===== dpo: ok" in (tmp_path / "gpu_suite.log").read_text()


def test_gpu_suite_refuses_cuda_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        return
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device here" in res.stderr
