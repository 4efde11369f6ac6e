"""Read rows from JSONL, JSON, CSV and Parquet files, bundled datasets and Hugging Face datasets.

Every row carries `where`, the place a person should look when it is wrong: `file.jsonl:12` (the
line), `file.json:40` (the line the object starts on), `file.csv:7`, `file.parquet: row 3`, or
`hf:name[train]: row 3`. Rows that cannot even be parsed (invalid JSON, invalid UTF-8, not an object)
come back with `error` set instead of `data`, so validation can list them with everything else.
A file that cannot be read at all (a folder, no permission, an I/O error) is a DataError naming it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlhfkit.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Row:
    where: str
    data: dict[str, Any] | None = None
    error: str | None = None


def bundled_dataset_path(name: str) -> Path:
    """Path of a dataset shipped inside the package (`bundled:instructions`)."""
    folder = resources.files("rlhfkit.data") / "bundled"
    path = Path(str(folder / f"{name}.jsonl"))
    if not path.is_file():
        known = sorted(p.name.removesuffix(".jsonl") for p in Path(str(folder)).glob("*.jsonl"))
        raise DataError(f"unknown bundled dataset 'bundled:{name}'; available: " + ", ".join(f"bundled:{k}" for k in known))
    return path


def load_rows(spec: str, split: str = "train", max_samples: int = 0) -> list[Row]:
    """Read every row of `spec` (a file, `bundled:NAME`, or a Hugging Face dataset name)."""
    spec = spec.strip()
    if not spec:
        raise DataError("no dataset given: set data.train to a file (.jsonl/.json/.csv/.parquet) or a dataset name")
    if spec.startswith("bundled:"):
        rows = _read_file(bundled_dataset_path(spec.split(":", 1)[1]))
    else:
        path = Path(os.path.expanduser(spec))
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError as exc:  # e.g. a folder on the way that this user may not enter
            raise _unreadable(path, exc) from None
        if is_file:
            rows = _read_file(path)
        elif is_dir:
            # Checked before the hub name: datasets.load_dataset would read a local folder of that name
            # anyway, guessing its files, so a folder is never a hub dataset here.
            raise DataError(f"{spec}: is a folder, not a file; expected a .jsonl/.json/.csv/.parquet file, "
                            "bundled:NAME or a Hugging Face dataset name" + _saved_dataset_hint(path))
        elif path.suffix.lower() in SUFFIXES or spec.startswith((".", "/", "~")) or not _HF_NAME.match(spec):
            raise DataError(f"{spec}: file not found")
        else:
            rows = _read_hf(spec, split)
    if max_samples > 0:
        rows = rows[:max_samples]
    return rows


def _saved_dataset_hint(folder: Path) -> str:
    """What to do with a folder written by `datasets`' save_to_disk, which is not read directly."""
    try:
        saved = (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
    except OSError:
        return ""
    if not saved:
        return ""
    return (" (this looks like a dataset saved with save_to_disk: export it with "
            "datasets.load_from_disk(...).to_json('FILE.jsonl') and pass the file)")


def _unreadable(path: Path, exc: OSError) -> DataError:
    """A file that exists but cannot be opened or read, named with the reason."""
    if isinstance(exc, PermissionError):
        return DataError(f"{path}: cannot read the file: permission denied (check the permissions of the file "
                         "and of its folders)")
    return DataError(f"{path}: cannot read the file: {exc.strerror or exc}")


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; expected one of {', '.join(SUFFIXES)}")
    try:
        return readers[suffix](path)
    except OSError as exc:  # permission denied, an I/O error, a file removed since it was found
        raise _unreadable(path, exc) from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                # utf-8-sig drops a byte-order mark on line 1 (Windows editors write one), as .json/.csv do
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                rows.append(Row(where, error=f"not valid UTF-8 (byte {exc.start + 1} of the line)"))
                continue
            if not text.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                rows.append(Row(where, error=f"not valid JSON: {exc.msg} (column {exc.colno})"))
                continue
            rows.append(_as_object(where, obj))
    return rows


def _as_object(where: str, obj: Any) -> Row:
    if not isinstance(obj, dict):
        return Row(where, error=f"expected a JSON object with named fields, got {_kind(obj)}")
    return Row(where, data=obj)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8", [f"{path}:{line}: not valid UTF-8"]) from None


def _read_json(path: Path) -> list[Row]:
    """A JSON array of objects; each row's `where` is the line its object starts on."""
    text = _decode_whole(path)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            raise DataError(f"{path}:1: expected a JSON array of row objects at the top level; "
                            f"found an object with key '{next(iter(obj))}' (use JSONL or a top-level array)")
        raise DataError(f"{path}:1: expected a JSON array of row objects, got {_kind(obj)}")
    rows = []
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return rows
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        rows.append(_as_object(f"{path}:{line}", obj))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            break
        line = text.count("\n", 0, pos) + 1
        raise DataError(f"{path}:{line}: not valid JSON: expected ',' or ']' after a row")
    return rows


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path) -> list[Row]:
    """CSV with a header row. Cells holding a JSON list (chat messages) are parsed as JSON."""
    raw_lines = path.read_bytes().splitlines(keepends=True)
    bad_lines: set[int] = set()
    decoded = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            decoded.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            bad_lines.add(number)
            decoded.append(raw.decode("utf-8", errors="replace"))
    reader = csv.reader(io.StringIO("".join(decoded), newline=""))
    rows: list[Row] = []
    try:
        header = next(reader)
    except StopIteration:
        return rows
    header = [h.strip() for h in header]
    start = reader.line_num + 1
    for record in reader:
        end = reader.line_num
        where = f"{path}:{start}"
        if any(n in bad_lines for n in range(start, end + 1)):
            rows.append(Row(where, error="not valid UTF-8"))
        elif not any(cell.strip() for cell in record):
            pass
        elif len(record) != len(header):
            rows.append(Row(where, error=f"expected {len(header)} columns ({', '.join(header)}), got {len(record)}"))
        else:
            data: dict[str, Any] = {}
            for key, cell in zip(header, record):
                stripped = cell.strip()
                if stripped.startswith("[{") and stripped.endswith("}]"):
                    try:
                        data[key] = json.loads(stripped)
                        continue
                    except json.JSONDecodeError:
                        pass
                data[key] = cell
            rows.append(Row(where, data=data))
        start = end + 1
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    # Opened here so that a file without read permission gets the same message as the other formats.
    with open(path, "rb") as handle:
        try:
            table = pq.read_table(handle)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [Row(f"{path}: row {i}", data=obj) for i, obj in enumerate(table.to_pylist(), start=1)]


def _read_hf(name: str, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("loading a Hugging Face dataset needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing split, unknown name
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise DataError(
            f"could not load Hugging Face dataset '{name}' (split '{split}'): {first}\n"
            "Without network access, export it to a JSONL/Parquet file on a connected machine and pass the file."
        ) from None
    return [Row(f"hf:{name}[{split}]: row {i}", data=dict(obj)) for i, obj in enumerate(ds, start=1)]
