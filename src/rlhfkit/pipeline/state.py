"""The pipeline's memory: `output_dir/pipeline.json` records, per stage, the hash of everything that
went into it and whether it finished.

A stage's hash covers its resolved settings, the content of the files it reads that come from outside
the pipeline (prompt files, a starting model folder: name, size and modification time of each file),
and the hashes of the stages it reads from. So a finished stage with the same hash is skipped; a
changed setting or input changes its hash, and through the chain the hash of every stage after it,
which therefore run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.runtime.atomic import write_atomic

STATE_FILE = "pipeline.json"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def path_fingerprint(spec: str) -> Any:
    """What identifies an input named by `spec`: a file's sha256, a folder's listing (relative name, size,
    mtime of every file), or the spec itself (bundled:, tiny:, hub ids)."""
    path = Path(spec).expanduser()
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"file": spec, "sha256": h.hexdigest()}
    if path.is_dir():
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return {"folder": spec, "sha256": hashlib.sha256(_canonical(listing).encode()).hexdigest()}
    return {"spec": spec}


def stage_hash(name: str, settings: dict[str, Any], external: list[str], upstream: list[str]) -> str:
    payload = {"stage": name, "settings": settings, "external": [path_fingerprint(s) for s in external],
               "upstream": upstream}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


class State:
    """pipeline.json: {"stages": {key: {"hash", "status": running|done, "outputs", "seconds", "finished"}}}."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.stages = dict(data["stages"])
            except (ValueError, KeyError, TypeError) as exc:
                raise RlhfkitError(f"{self.path}: not a pipeline state file ({exc}); move it away to start over") from None

    def get(self, key: str) -> dict[str, Any]:
        return self.stages.get(key, {})

    def is_done(self, key: str, digest: str) -> bool:
        entry = self.get(key)
        if entry.get("status") != "done" or entry.get("hash") != digest:
            return False
        return all(Path(p).exists() for p in entry.get("outputs", {}).values())

    def started(self, key: str, digest: str) -> None:
        self.stages[key] = {"hash": digest, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._save()

    def finished(self, key: str, digest: str, outputs: dict[str, str], seconds: float) -> None:
        self.stages[key] = {"hash": digest, "status": "done", "outputs": outputs, "seconds": round(seconds, 1),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"stages": self.stages}, indent=2) + "\n")
