"""Write a JSONL data file that the trainers will accept, or nothing at all.

Every row is serialized first, written to a temporary file beside the target, read back with the same
reader and validator that training uses (`kind`), and only then renamed into place. On any failure the
target is untouched and no temporary file is left. `kind=None` checks only that each row is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rlhfkit.data.formats import Kind, validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import DataError
from rlhfkit.runtime.atomic import umask


def write_jsonl(rows: list[dict[str, Any]], path: str | Path, kind: Kind | None, *, what: str = "") -> Path:
    """Write `rows` to `path` (*.jsonl) atomically, after checking them as `kind` rows; return the path."""
    what = what or (f"{kind} rows" if kind else "rows")
    path = Path(os.path.expanduser(str(path)))
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: {kind or 'these'} files are written as JSONL; name the output file *.jsonl")
    if not rows:
        raise DataError(f"{path}: no {what} to write (nothing was written)")
    try:
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: a row cannot be written as JSON ({exc}); nothing was written") from None
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a file name (nothing was written)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.jsonl")
    except OSError as exc:
        raise DataError(f"{path}: cannot write here ({exc.strerror or exc}); nothing was written") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if kind is not None:
            _, problems = validate_rows(load_rows(str(tmp)), kind)
            if problems:
                shown = "\n".join("  " + p.replace(str(tmp), str(path)) for p in problems[:20])
                more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
                raise DataError(f"{len(problems)} row(s) are not valid {kind} rows (nothing was written):\n"
                                f"{shown}{more}", problems)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
