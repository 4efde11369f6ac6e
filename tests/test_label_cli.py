"""`rlhfkit label ...` as a user meets it: a bad input is one clear message (exit code 2) that names the
file, line and field, and nothing is created or changed; the happy path from a candidates file to a
validated export.

Commands run in-process through `rlhfkit.cli.main` (fast); one test runs the real `python -m rlhfkit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from rlhfkit.cli import main
from rlhfkit.data.formats import validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.label.assign import Queue
from rlhfkit.label.store import Store
from tests.label_server import REPO, compare_rows
from tests.label_services import free_port


def cli(capsys: pytest.CaptureFixture, *args: Any) -> tuple[int, str, str]:
    """Run `rlhfkit label ARGS`; (exit code, stdout, stderr)."""
    try:
        main(["label", *(str(a) for a in args)])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_gif(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (2, 2), (255, 0, 0)).save(path, format="GIF")


GOOD = {"prompt": "Why is the sky blue?", "responses": ["Rayleigh scattering.", "It reflects the sea."]}

# (rows of the candidates file, extra init options, the line the message names, what it says)
MALFORMED = {
    "bad JSON line": ([GOOD, '{"prompt": "q", "responses": ["a", '], [], 2, "not valid JSON"),
    "not an object": ([GOOD, GOOD, '["q", "a", "b"]'], [], 3, "expected a JSON object"),
    "missing prompt": ([GOOD, {"responses": ["a", "b"]}], [], 2, "field 'prompt' is missing"),
    "missing response_b": ([{"prompt": "q", "response_a": "a"}], [], 1, "field 'response_b' is missing"),
    "no responses at all": ([{"prompt": "q", "answer": "a"}], [], 1, "expected field 'responses'"),
    "responses not a list": ([{"prompt": "q", "responses": "a or b"}], [], 1,
                             "field 'responses' has the wrong type: expected a list, got a string"),
    "a response of the wrong type": ([GOOD, {"prompt": "q", "responses": ["a", 7]}], [], 2,
                                     "field 'responses' item 1 has the wrong type"),
    "prompt of the wrong type": ([{"prompt": 3, "responses": ["a", "b"]}], [], 1, "field 'prompt' has the wrong type"),
    "an empty response": ([{"prompt": "q", "responses": ["a", "  "]}], [], 1, "field 'responses' item 1 is empty"),
    "identical responses": ([GOOD, {"prompt": "q", "response_a": "same", "response_b": "same"}], [], 2,
                            "field 'response_b' is identical to field 'response_a'"),
    "identical in a list": ([{"prompt": "q", "responses": ["x", "y", "x"]}], ["--kind", "rank"], 1,
                            "field 'responses' item 2 is identical to field 'responses' item 0"),
    "duplicate id": ([{**GOOD, "id": "sky"}, GOOD, {**GOOD, "id": "sky"}], [], 3, "field 'id' 'sky' repeats"),
    "three responses to compare": ([{"prompt": "q", "responses": ["a", "b", "c"]}], [], 1,
                                   "a compare item needs exactly 2 responses"),
    "bad gold": ([{**GOOD, "gold": "left"}], [], 1, "field 'gold'"),
    "bad priority": ([{**GOOD, "priority": "high"}], [], 1, "field 'priority'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_candidates_file_is_exit_2_naming_file_line_and_field_and_no_database_is_left(case, tmp_path,
                                                                                                 capsys):
    rows, options, line, message = MALFORMED[case]
    source = write_lines(tmp_path / "candidates.jsonl", rows)
    code, out, err = cli(capsys, "init", tmp_path / "feedback.db", "--from", source, *options)
    assert code == 2, (out, err)
    assert f"{source}:{line}: {message}" in err, err
    assert "nothing was created" in err and "Traceback" not in err
    assert files_in(tmp_path) == {"candidates.jsonl"}  # no database, no temporary file


def test_every_bad_row_is_listed_at_once(tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD, {"prompt": "q"}, GOOD, {"prompt": "q", "responses": ["a", "a"]}])
    code, _, err = cli(capsys, "init", tmp_path / "f.db", "--from", source)
    assert code == 2 and "2 invalid row(s)" in err
    assert f"{source}:2: expected field 'responses'" in err
    assert f"{source}:4: field 'responses' item 1 is identical" in err
    assert files_in(tmp_path) == {"c.jsonl"}


@pytest.fixture
def media(tmp_path: Path) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    make_gif(folder / "ep1.gif")
    make_gif(folder / "ep2.gif")
    (tmp_path / "outside").mkdir()
    make_gif(tmp_path / "outside" / "secret.gif")
    os.symlink(tmp_path / "outside" / "secret.gif", folder / "link.gif")
    (folder / "notes.txt").write_text("not a clip")
    return folder


@pytest.mark.parametrize("path, message", [
    ("../outside/secret.gif", "expected a relative path inside the media folder"),
    ("sub/../ep1.gif", "expected a relative path inside the media folder"),
    ("ABSOLUTE", "expected a relative path inside the media folder"),
    ("link.gif", "points outside the media folder"),
    ("missing.gif", "no such file in the media folder"),
    ("notes.txt", "expected one of .gif"),
])
def test_a_media_candidate_outside_the_media_folder_is_refused_and_no_database_is_left(path, message, media, tmp_path,
                                                                                      capsys):
    if path == "ABSOLUTE":
        path = str(tmp_path / "outside" / "secret.gif")
    source = write_lines(tmp_path / "clips.jsonl", [
        {"prompt": "p", "responses": [{"media": "ep1.gif"}, {"media": "ep2.gif"}]},
        {"prompt": "p", "responses": [{"media": "ep1.gif"}, {"media": path}]}])
    before = files_in(tmp_path)
    code, _, err = cli(capsys, "init", tmp_path / "clips.db", "--from", source, "--media", media)
    assert code == 2
    assert f"{source}:2: field 'responses' item 1 {path!r}" in err and message in err, err
    assert files_in(tmp_path) == before


def test_media_candidates_without_a_media_folder_are_refused(tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [{"prompt": "p", "responses": [{"media": "a.gif"}, "text"]}])
    code, _, err = cli(capsys, "init", tmp_path / "f.db", "--from", source)
    assert code == 2 and f"{source}:1: field 'responses' item 0 is a media file" in err and "--media" in err


def test_a_bad_candidates_file_creates_no_tables_in_postgresql(postgres_url, tmp_path, capsys):
    from sqlalchemy import create_engine, inspect

    source = write_lines(tmp_path / "c.jsonl", [GOOD, {"prompt": "q", "responses": ["a", 1]}])
    code, _, err = cli(capsys, "init", postgres_url, "--from", source)
    assert code == 2 and f"{source}:2:" in err
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
    finally:
        engine.dispose()


def test_init_onto_an_existing_file_is_refused_and_leaves_it_as_it_was(tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    target = tmp_path / "feedback.db"
    target.write_text("my notes")
    code, _, err = cli(capsys, "init", target, "--from", source)
    assert code == 2 and "already exists" in err and "rlhfkit label add" in err
    assert target.read_text() == "my notes"
    project = tmp_path / "project.db"
    assert cli(capsys, "init", project, "--from", source)[0] == 0
    before = digest(project)
    code, _, err = cli(capsys, "init", project, "--from", source)
    assert code == 2 and "already exists" in err and digest(project) == before
    code, _, err = cli(capsys, "init", tmp_path / "no" / "such" / "folder.db", "--from", source)
    assert code == 2 and "does not exist" in err


def test_init_into_a_postgresql_database_with_tables_is_refused(postgres_url, tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    assert cli(capsys, "init", postgres_url, "--from", source)[0] == 0
    code, _, err = cli(capsys, "init", "--db", postgres_url, "--from", source)
    assert code == 2 and "already has tables" in err
    code, out, _ = cli(capsys, "status", postgres_url)
    assert code == 0 and "0/1 items done" in out


@pytest.mark.parametrize("command", [["serve", "{db}"], ["status", "{db}"], ["export", "{db}", "-o", "{out}"],
                                     ["add", "{db}", "--from", "{src}"], ["add-annotator", "{db}", "alice"],
                                     ["status", "--db", "{db}"]])
def test_commands_on_a_missing_project_say_so_and_create_nothing(command, tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    db = tmp_path / "missing.db"
    args = [a.format(db=db, out=tmp_path / "out.jsonl", src=source) for a in command]
    code, out, err = cli(capsys, *args)
    assert code == 2, (out, err)
    assert f"{db}: no such label project" in err and "rlhfkit label init" in err
    assert files_in(tmp_path) == {"c.jsonl"}


def test_a_sqlite_file_of_another_application_is_not_a_label_project_and_is_left_unchanged(tmp_path, capsys):
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('ann')")
    db.close()
    before = digest(other)
    for command in (["status", other], ["export", other, "-o", tmp_path / "x.jsonl"], ["add-annotator", other, "bob"],
                    ["serve", other, "--port", free_port()]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and f"{other}: a database of another application, not an rlhfkit label project" in err, err
    assert digest(other) == before and files_in(tmp_path) == {"app.db"}  # not even switched to WAL
    with sqlite3.connect(other) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    code, _, err = cli(capsys, "status", empty)
    assert code == 2 and "an empty database, not an rlhfkit label project" in err and empty.read_bytes() == b""


def test_a_project_written_by_a_newer_rlhfkit_is_refused(tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    target = tmp_path / "feedback.db"
    assert cli(capsys, "init", target, "--from", source)[0] == 0
    with sqlite3.connect(target) as db:
        db.execute("UPDATE label_meta SET value = '999' WHERE key = 'schema_version'")
    db.close()
    for command in (["status", target], ["export", target, "-o", tmp_path / "x.jsonl"], ["serve", target]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and "label schema version 999 was written by a newer rlhfkit" in err and "upgrade" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path, capsys):
    notes = tmp_path / "notes.db"
    notes.write_text("these are my notes, not a database\n" * 100)
    before = digest(notes)
    for command in (["status", notes], ["add-annotator", notes, "alice"], ["serve", notes]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and err.strip() == f"error: {notes}: cannot open as a label project: file is not a database"
    assert digest(notes) == before and files_in(tmp_path) == {"notes.db"}


def test_a_wrong_postgresql_url_is_one_clear_line_without_the_password(postgres_server, tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    nothing = f"postgresql://rlhfkit:hunter2-secret@127.0.0.1:{free_port()}/feedback"
    no_db = f"postgresql://rlhfkit:hunter2-secret@127.0.0.1:{postgres_server.port}/no_such_database"
    for url, says in ((nothing, "Connection refused"), (no_db, 'database "no_such_database" does not exist')):
        for command in (["status", url], ["init", url, "--from", source], ["add-annotator", url, "alice"],
                        ["export", url, "-o", tmp_path / "x.jsonl"]):
            code, out, err = cli(capsys, *command)
            assert code == 2, (command, err)
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("error: --db postgresql://rlhfkit:***@127.0.0.1:") and says in err, err
            assert "hunter2" not in err + out
    code, _, err = cli(capsys, "status", postgres_server.new_database(f"empty_{uuid.uuid4().hex[:8]}"))
    assert code == 2 and "an empty database, not an rlhfkit label project" in err
    code, _, err = cli(capsys, "status", "mysql://me:pw@host/db")
    assert code == 2 and "only postgresql:// URLs or a SQLite file path are supported" in err and "pw" not in err
    assert files_in(tmp_path) == {"c.jsonl"}


def test_serve_on_a_port_in_use_says_so_and_names_the_port_option(tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    target = tmp_path / "feedback.db"
    assert cli(capsys, "init", target, "--from", source)[0] == 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = cli(capsys, "serve", target, "--port", port)
    assert code == 2 and f"--port {port}: already in use" in err and "choose another --port" in err
    assert "admin" not in out  # it stopped before printing a link


@pytest.fixture
def labeled(tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    """A compare project of 3 items with alice's labels on two of them."""
    source = write_lines(tmp_path / "c.jsonl", compare_rows(3))
    target = tmp_path / "feedback.db"
    assert cli(capsys, "init", target, "--from", source)[0] == 0
    store = Store.open(str(target))
    try:
        queue = Queue(store)
        alice = store.who(store.add_annotator("alice"))["id"]  # type: ignore[index]
        for choice in ("left", "tie"):
            task = queue.next_for(alice)
            assert task is not None
            queue.submit(alice, {"assignment_id": task.assignment_id, "submission_id": uuid.uuid4().hex,
                                 "choice": choice})
    finally:
        store.close()
    return target


def test_export_to_a_json_name_is_refused_and_writes_nothing(labeled, tmp_path, capsys):
    before = files_in(tmp_path)
    for name in ("prefs.json", "prefs", "prefs.csv"):
        code, _, err = cli(capsys, "export", labeled, "-o", tmp_path / name)
        assert code == 2 and "name the output file *.jsonl" in err, err
    code, _, err = cli(capsys, "export", labeled, "-o", tmp_path, "--what", "raw")
    assert code == 2
    assert files_in(tmp_path) == before


def test_export_with_no_labels_is_an_error_and_writes_nothing(labeled, tmp_path, capsys):
    source = write_lines(tmp_path / "more.jsonl", compare_rows(1, "new "))
    empty = tmp_path / "empty.db"
    assert cli(capsys, "init", empty, "--from", source)[0] == 0
    before = files_in(tmp_path)
    for what in ("preferences", "sft", "raw"):
        code, _, err = cli(capsys, "export", empty, "-o", tmp_path / f"{what}.jsonl", "--what", what)
        assert code == 2 and "nothing was written" in err and "no labels yet" in err, err
    code, _, err = cli(capsys, "export", labeled, "-o", tmp_path / "s.jsonl", "--what", "sft")  # labels, no rewrites
    assert code == 2 and "nothing was written" in err
    code, _, err = cli(capsys, "export", labeled, "-o", tmp_path / "r.jsonl", "--what", "ratings")
    assert code == 2 and "ratings come from rate projects" in err
    code, _, err = cli(capsys, "export", labeled, "-o", tmp_path / "x.jsonl", "--what", "everything")
    assert code == 2 and "--what: expected one of preferences, ratings, sft, raw" in err
    code, _, err = cli(capsys, "export", labeled, "-o", tmp_path / "x.jsonl", "--ties", "maybe")
    assert code == 2 and "--ties: expected drop or keep" in err
    assert files_in(tmp_path) == before


def test_from_a_candidates_file_to_a_validated_export(tmp_path, capsys):
    source = write_lines(tmp_path / "candidates.jsonl", [{**r, "batch": 1} for r in compare_rows(2)])
    target = tmp_path / "feedback.db"
    code, out, _ = cli(capsys, "init", target, "--from", source, "--overlap", "1", "--title", "Sky")
    assert code == 0 and f"created {target}: compare project, 2 items, overlap 1" in out
    code, out, _ = cli(capsys, "add-annotator", target, "alice")
    assert code == 0 and out.startswith("alice: http://127.0.0.1:8765/login?token=")
    token = out.strip().rsplit("token=", 1)[1]
    code, _, err = cli(capsys, "add-annotator", target, "alice")
    assert code == 2 and "already exists" in err and "--rotate" in err
    code, _, err = cli(capsys, "add-annotator", target, "admin")
    assert code == 2 and "the project's admin" in err
    more = write_lines(tmp_path / "more.jsonl", compare_rows(2, "more "))
    code, out, _ = cli(capsys, "add", target, "--from", more)
    assert code == 0 and out.strip() == "added 2 items"
    code, out, _ = cli(capsys, "status", target)
    assert code == 0 and out.startswith("compare project: 0/4 items done (overlap 1, 0 started, 0 gold)")
    store = Store.open(str(target))
    try:
        assert store.settings.title == "Sky"
        alice = store.who(token)
        assert alice is not None and alice["name"] == "alice"
        queue = Queue(store)
        keys = []
        while (task := queue.next_for(alice["id"])) is not None:
            keys.append(task.key)
            queue.submit(alice["id"], {"assignment_id": task.assignment_id, "submission_id": uuid.uuid4().hex,
                                       "choice": "left", "strength": "clearly"})
    finally:
        store.close()
    assert keys == ["item-1", "item-2", "item-3", "item-4"]
    code, out, _ = cli(capsys, "status", target, "--json")
    status = json.loads(out)
    assert code == 0 and (status["items_done"], status["labels"]) == (4, 4)
    assert [a["name"] for a in status["annotators"]] == ["alice"]
    output = tmp_path / "out" / "prefs.jsonl"
    code, out, _ = cli(capsys, "export", target, "-o", output)
    assert code == 0 and out.strip() == f"wrote {output}: decided=4, rows=4"
    samples, problems = validate_rows(load_rows(str(output)), "preference")
    assert problems == [] and len(samples) == 4 and {s.margin for s in samples} == {1.0}
    assert [json.loads(line).get("batch") for line in output.read_text().splitlines()] == [1, 1, None, None]
    raw = tmp_path / "raw.jsonl"
    assert cli(capsys, "export", target, "-o", raw, "--what", "raw")[0] == 0
    assert len(load_rows(str(raw))) == 4
    code, out, _ = cli(capsys, "add-annotator", target, "alice", "--rotate")
    assert code == 0 and "token=" in out and token not in out
    code, out, _ = cli(capsys, "add-annotator", target, "alice", "--deactivate")
    assert code == 0 and out.strip() == "alice: link revoked"
    code, _, err = cli(capsys, "add-annotator", target, "nobody", "--deactivate")
    assert code == 2 and "no annotator named 'nobody'" in err
    store = Store.open(str(target))
    try:
        assert store.who(token) is None and store.who(out.strip().rsplit("token=", 1)[-1]) is None
    finally:
        store.close()


def test_items_added_after_gold_rows_get_keys_of_their_own(tmp_path, capsys):
    rows = compare_rows(2) + [{"prompt": "gold", "responses": ["yes", "no"], "gold": "a"}]
    target = tmp_path / "feedback.db"
    assert cli(capsys, "init", target, "--from", write_lines(tmp_path / "c.jsonl", rows), "--gold-rate", "0.1")[0] == 0
    code, out, err = cli(capsys, "add", target, "--from", write_lines(tmp_path / "more.jsonl", compare_rows(1, "new ")))
    assert code == 0 and out.strip() == "added 1 items", err
    store = Store.open(str(target))
    try:
        from sqlalchemy import select

        from rlhfkit.label import schema as S

        with store.read() as conn:
            keys = list(conn.scalars(select(S.items.c.key).order_by(S.items.c.id)))
    finally:
        store.close()
    assert keys == ["item-1", "item-2", "item-3", "item-4"]


def test_adding_a_bad_or_repeated_row_adds_nothing(labeled, tmp_path, capsys):
    status = json.loads(cli(capsys, "status", labeled, "--json")[1])
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD, {"prompt": "q", "responses": ["a"]}])
    code, _, err = cli(capsys, "add", labeled, "--from", bad)
    assert code == 2 and f"{bad}:2: a compare item needs exactly 2 responses" in err
    repeated = write_lines(tmp_path / "rep.jsonl", [GOOD, {**GOOD, "id": "item-2"}])
    code, _, err = cli(capsys, "add", labeled, "--from", repeated)
    assert code == 2 and f"{repeated}:2: item id 'item-2' is already in the project" in err
    assert "nothing was added" in err
    assert json.loads(cli(capsys, "status", labeled, "--json")[1])["items"] == status["items"] == 3


def test_the_project_is_given_once(tmp_path, capsys):
    code, _, err = cli(capsys, "status", tmp_path / "a.db", "--db", tmp_path / "b.db")
    assert code == 2 and "give the project once" in err
    code, _, err = cli(capsys, "status")
    assert code == 2 and "give the project once" in err


def test_bad_settings_are_refused_before_anything_is_created(tmp_path, capsys):
    source = write_lines(tmp_path / "c.jsonl", [GOOD])
    for options, says in ((["--kind", "sort"], "kind"), (["--overlap", "0"], "overlap"),
                          (["--scale", "7-1"], "scale"), (["--scale", "one-two"], "scale"),
                          (["--gold-rate", "1.5"], "gold_rate"), (["--gold-rate", "0.2"], "no row has a 'gold'"),
                          (["--media", tmp_path / "nowhere"], "--media"), (["--guidelines", tmp_path / "none.md"],
                                                                            "--guidelines"),
                          (["--criteria", "a,a"], "criteria"), (["--lease-minutes", "0.1"], "lease_seconds")):
        code, _, err = cli(capsys, "init", tmp_path / "f.db", "--from", source, *options)
        assert code == 2 and says in err, (options, err)
    assert files_in(tmp_path) == {"c.jsonl"}


def test_the_real_command_exits_2_with_one_error_line(tmp_path):
    db = tmp_path / "missing.db"
    out = subprocess.run([sys.executable, "-m", "rlhfkit", "label", "status", str(db)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: {db}: no such label project (create it with `rlhfkit label init {db} --from FILE`)"]
    assert not db.exists()
