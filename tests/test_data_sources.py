"""rlhfkit.data.sources.load_rows: every row knows where it came from (`file:line`), and parse errors
come back as rows with `error` set rather than exceptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rlhfkit.data.sources import Row, load_rows
from rlhfkit.errors import DataError
from tests.conftest import write_jsonl


def pairs(rows: list[Row]) -> list[tuple[str, dict | None, str | None]]:
    return [(r.where, r.data, r.error) for r in rows]


# --------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_rows_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    assert pairs(load_rows(str(path))) == [
        (f"{path}:1", {"prompt": "a", "completion": "b"}, None),
        (f"{path}:2", {"text": "c"}, None),
    ]


def test_jsonl_invalid_json_names_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "not json", '{"text": "x",, "y": 1}'])
    rows = load_rows(str(path))
    assert pairs(rows) == [
        (f"{path}:1", {"text": "ok"}, None),
        (f"{path}:2", None, "not valid JSON: Expecting value (column 1)"),
        (f"{path}:3", None, "not valid JSON: Expecting property name enclosed in double quotes (column 14)"),
    ]


def test_jsonl_unclosed_object_column_points_at_end_of_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "x"'])
    assert pairs(load_rows(str(path))) == [
        (f"{path}:1", None, "not valid JSON: Expecting ',' delimiter (column 13)"),
    ]


def test_jsonl_invalid_utf8_on_one_line_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n')
    assert pairs(load_rows(str(path))) == [
        (f"{path}:1", {"text": "one"}, None),
        (f"{path}:2", None, "not valid UTF-8 (byte 14 of the line)"),
        (f"{path}:3", {"text": "three"}, None),
    ]


@pytest.mark.parametrize(
    ("line", "kind"),
    [("[1, 2]", "a list"), ('"hi"', "a string"), ("3", "a number"), ("null", "null"), ("true", "a boolean")],
)
def test_jsonl_line_that_is_not_an_object(tmp_path, line, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [line])
    assert pairs(load_rows(str(path))) == [
        (f"{path}:1", None, f"expected a JSON object with named fields, got {kind}")
    ]


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\n{"text": "b"}\nbad\n\n', encoding="utf-8")
    assert pairs(load_rows(str(path))) == [
        (f"{path}:2", {"text": "a"}, None),
        (f"{path}:5", {"text": "b"}, None),
        (f"{path}:6", None, "not valid JSON: Expecting value (column 1)"),
    ]


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert pairs(load_rows(str(path))) == [(f"{path}:1", {"text": "a"}, None), (f"{path}:2", {"text": "b"}, None)]


def test_jsonl_utf8_bom_is_accepted(tmp_path):
    # Windows editors save "UTF-8 with BOM"; .json and .csv already accept it.
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert pairs(load_rows(str(path))) == [(f"{path}:1", {"text": "a"}, None), (f"{path}:2", {"text": "b"}, None)]


def test_max_samples_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(5)])
    rows = load_rows(str(path), max_samples=2)
    assert [r.data for r in rows] == [{"text": "0"}, {"text": "1"}]
    assert len(load_rows(str(path), max_samples=0)) == 5


def test_spec_is_stripped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    assert pairs(load_rows(f"  {path}\n")) == [(f"{path}:1", {"text": "a"}, None)]


# --------------------------------------------------------------------------------------------------
# JSON array


def test_json_array_where_is_the_line_each_object_starts_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n'
        '  {"text": "one"},\n'          # line 2
        '  {\n'                          # line 3
        '    "text": "two"\n'
        '  },\n'
        '\n'
        '  {"text": "three"}, [1]\n'     # line 7 (both)
        ']\n',
        encoding="utf-8",
    )
    assert pairs(load_rows(str(path))) == [
        (f"{path}:2", {"text": "one"}, None),
        (f"{path}:3", {"text": "two"}, None),
        (f"{path}:7", {"text": "three"}, None),
        (f"{path}:7", None, "expected a JSON object with named fields, got a list"),
    ]


def test_json_single_line_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert [r.where for r in load_rows(str(path))] == [f"{path}:1", f"{path}:1"]


def test_json_empty_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("  [ ]\n", encoding="utf-8")
    assert load_rows(str(path)) == []


def test_json_syntax_error_inside_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}:3: not valid JSON: Expecting value (column 12)"


def test_json_missing_comma_between_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}:3: not valid JSON: expected ',' or ']' after a row"


def test_json_top_level_object_wrapping_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == (
        f"{path}:1: expected a JSON array of row objects at the top level; "
        "found an object with key 'data' (use JSONL or a top-level array)"
    )


def test_json_top_level_scalar(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("42\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}:1: expected a JSON array of row objects, got a number"


def test_json_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n  {"text": "a"},\n  {"text": "\xff"}\n]\n')
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}:3: not valid UTF-8"
    assert info.value.problems == [f"{path}:3: not valid UTF-8"]


# --------------------------------------------------------------------------------------------------
# CSV


def test_csv_line_numbers_start_after_the_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq1,a1\nq2,a2\n", encoding="utf-8")
    assert pairs(load_rows(str(path))) == [
        (f"{path}:2", {"prompt": "q1", "completion": "a1"}, None),
        (f"{path}:3", {"prompt": "q2", "completion": "a2"}, None),
    ]


def test_csv_multiline_cell_and_blank_rows_keep_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"multi\nline",a1\n\nq3,a3\n', encoding="utf-8")
    assert pairs(load_rows(str(path))) == [
        (f"{path}:2", {"prompt": "multi\nline", "completion": "a1"}, None),
        (f"{path}:5", {"prompt": "q3", "completion": "a3"}, None),
    ]


def test_csv_wrong_column_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq1,a1\nq2,a2,extra\nonly\n", encoding="utf-8")
    assert pairs(load_rows(str(path))) == [
        (f"{path}:2", {"prompt": "q1", "completion": "a1"}, None),
        (f"{path}:3", None, "expected 2 columns (prompt, completion), got 3"),
        (f"{path}:4", None, "expected 2 columns (prompt, completion), got 1"),
    ]


def test_csv_invalid_utf8_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nok\nbad\xff\nfine\n")
    assert pairs(load_rows(str(path))) == [
        (f"{path}:2", {"text": "ok"}, None),
        (f"{path}:3", None, "not valid UTF-8"),
        (f"{path}:4", {"text": "fine"}, None),
    ]


def test_csv_header_bom_and_whitespace_are_stripped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffprompt , completion\nq,a\n".encode())
    assert load_rows(str(path))[0].data == {"prompt": "q", "completion": "a"}


def test_csv_json_message_list_cell_is_parsed(tmp_path):
    path = tmp_path / "d.csv"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cell = json.dumps(messages).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert load_rows(str(path))[0].data == {"messages": messages}


def test_csv_only_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\n", encoding="utf-8")
    assert load_rows(str(path)) == []


# --------------------------------------------------------------------------------------------------
# Parquet


def test_parquet_rows_are_numbered_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["q1", "q2"], "completion": ["a1", "a2"]}), path)
    assert pairs(load_rows(str(path))) == [
        (f"{path}: row 1", {"prompt": "q1", "completion": "a1"}, None),
        (f"{path}: row 2", {"prompt": "q2", "completion": "a2"}, None),
    ]


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}: not a readable Parquet file (")


# --------------------------------------------------------------------------------------------------
# Files that cannot be read at all, bundled datasets


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: unsupported file type '.txt'; expected one of .jsonl, .json, .csv, .parquet"


def test_suffix_is_case_insensitive(tmp_path):
    path = write_jsonl(tmp_path / "D.JSONL", [{"text": "a"}])
    assert load_rows(str(path))[0].data == {"text": "a"}


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing"])
def test_missing_file(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: file not found"


@pytest.mark.parametrize("name", ["x.jsonl", "data"])
def test_a_folder_is_not_a_file(tmp_path, monkeypatch, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # `data` alone would otherwise be looked up as a Hugging Face dataset name
    for spec in (str(folder), name, f"{name}/", f"./{name}"):
        with pytest.raises(DataError) as info:
            load_rows(spec)
        assert str(info.value) == (
            f"{spec}: is a folder, not a file; expected a .jsonl/.json/.csv/.parquet file, bundled:NAME or a "
            "Hugging Face dataset name"
        ), spec


def test_a_folder_saved_by_datasets_says_how_to_export_it(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(str(folder))
    assert str(info.value).endswith(
        "(this looks like a dataset saved with save_to_disk: export it with "
        "datasets.load_from_disk(...).to_json('FILE.jsonl') and pass the file)"
    )


def _load_rows_as_nobody(spec: str) -> subprocess.CompletedProcess:
    """load_rows(spec) in a child that drops root to user nobody (65534), printing the DataError.

    The child starts as root and drops after its imports: the interpreter may live under /root,
    which nobody cannot enter (so `subprocess.run(user=65534)` cannot even start it).
    """
    code = (
        "import os, sys\n"
        "import pyarrow.parquet\n"
        "from rlhfkit.data.sources import load_rows\n"
        "from rlhfkit.errors import DataError\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n    load_rows(sys.argv[1])\nexcept DataError as exc:\n    print(exc)\n"
    )
    return subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=120)


def _write_any(path: Path) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["a"]}), path)
    else:
        path.write_text({".jsonl": '{"text": "a"}\n', ".json": '[{"text": "a"}]', ".csv": "text\na\n"}[path.suffix])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_unreadable_file_is_a_data_error_naming_it(suffix):
    # Root reads any file whatever its mode, so as root the reading is done by user nobody; the
    # folder is private to the test (tmp_path's parents are root-only, which nobody cannot enter).
    folder = Path(tempfile.mkdtemp(prefix="rlhfkit-unreadable-"))
    try:
        path = folder / f"d{suffix}"
        _write_any(path)
        path.chmod(0o000 if os.geteuid() != 0 else 0o600)
        expected = (f"{path}: cannot read the file: permission denied (check the permissions of the file "
                    "and of its folders)")
        if os.geteuid() != 0:
            with pytest.raises(DataError) as info:
                load_rows(str(path))
            assert str(info.value) == expected
            return
        folder.chmod(0o755)  # nobody can see the file but not open it
        res = _load_rows_as_nobody(str(path))
        assert (res.returncode, res.stdout.strip(), res.stderr) == (0, expected, "")
        folder.chmod(0o700)  # nor even look inside the folder
        res = _load_rows_as_nobody(str(path))
        assert (res.returncode, res.stdout.strip(), res.stderr) == (0, expected, "")
    finally:
        folder.chmod(0o700)
        path.chmod(0o600)
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_empty_spec():
    with pytest.raises(DataError) as info:
        load_rows("  ")
    assert str(info.value) == (
        "no dataset given: set data.train to a file (.jsonl/.json/.csv/.parquet) or a dataset name"
    )


def test_bundled_instructions():
    rows = load_rows("bundled:instructions")
    assert len(rows) == 320
    assert all(r.error is None and r.data for r in rows)
    assert rows[0].where.endswith("instructions.jsonl:1")
    assert rows[0].data == {
        "prompt": "Why is the sky blue?",
        "completion": "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue "
        "light reaches our eyes from every direction.",
    }
    assert rows[-1].where.endswith("instructions.jsonl:320")


def test_unknown_bundled_dataset_lists_available():
    with pytest.raises(DataError) as info:
        load_rows("bundled:nope")
    # The list grows as datasets are bundled: check its form and that it is sorted, not its exact length.
    message = str(info.value)
    assert message.startswith("unknown bundled dataset 'bundled:nope'; available: bundled:demo_prompts, ")
    names = message.split("available: ", 1)[1].split(", ")
    assert "bundled:instructions" in names and names == sorted(names)


def test_hf_dataset_name_offline_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_rows("someorg/not-a-cached-dataset", split="validation")
    message = str(info.value)
    assert message.startswith("could not load Hugging Face dataset 'someorg/not-a-cached-dataset' (split 'validation')")
    assert "export it to a JSONL/Parquet file" in message
