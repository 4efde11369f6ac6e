"""The real-service fixtures work: PostgreSQL round trip, Chromium dialogs, skip/fail rules."""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from tests.label_services import (
    find_chromium,
    find_pg_bindir,
    free_port,
    missing_service,
    wait_http,
)

# ---------------------------------------------------------------------------------------------
# PostgreSQL


def test_postgres_round_trip_in_a_fresh_database(postgres_url):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE labels (id serial PRIMARY KEY, text text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO labels (text) VALUES (:a), (:b)"), {"a": "good", "b": "héllo"})
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, text FROM labels ORDER BY id")).all()
            server_version = conn.execute(sa.text("SHOW server_version")).scalar()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, "good"), (2, "héllo")]
    assert server_version  # a real server answered


def test_new_database_is_empty_and_separate(postgres_server, postgres_url):
    import sqlalchemy as sa

    assert postgres_server.url.startswith("postgresql+psycopg://rlhfkit@127.0.0.1:")
    assert postgres_server.url.endswith("/postgres")
    other = postgres_server.new_database("t_other_" + os.urandom(4).hex())
    with pytest.raises(ValueError):
        postgres_server.new_database('bad"; DROP DATABASE postgres; --')
    first, second = sa.create_engine(postgres_url), sa.create_engine(other)
    try:
        with first.begin() as conn:
            conn.execute(sa.text("CREATE TABLE only_here (x int)"))
        with second.connect() as conn:
            tables = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).all()
    finally:
        first.dispose()
        second.dispose()
    assert tables == []


# ---------------------------------------------------------------------------------------------
# Chromium


PAGES = {
    "/alert": "<!doctype html><title>alert</title><script>alert(1)</script><p>after</p>",
    "/text": (
        "<!doctype html><title>text</title><div id=out></div><script>"
        "document.getElementById('out').textContent ="
        " '<script>window.ran = true; alert(2)<\\/script><img src=x onerror=\"alert(3)\">';"
        "</script>"
    ),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/favicon.ico":  # Chromium asks; a 404 would be a console error
            self.send_response(204)
            self.end_headers()
            return
        body = PAGES.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write((body or "not found").encode())

    def log_message(self, *args):  # keep pytest's output quiet
        pass


@pytest.fixture(scope="module")
def site():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert wait_http(base + "/missing", timeout=5) == 404  # any status counts as an answer
        yield base
    finally:
        server.shutdown()
        server.server_close()


def test_alert_is_recorded_and_dismissed(page, site):
    page.goto(site + "/alert")
    assert page.locator("p").text_content() == "after"  # the page went on after the dismissal
    assert [(d.type, d.message) for d in page.dialogs] == [("alert", "1")]
    assert page.console_errors == []


def test_script_in_text_content_does_not_run(page, site):
    page.goto(site + "/text")
    page.wait_for_timeout(100)  # give a (wrongly) created <img> the time to fire its onerror
    out = page.locator("#out")
    assert out.text_content().startswith("<script>window.ran = true")
    assert out.evaluate("el => el.children.length") == 0
    assert page.evaluate("window.ran") is None
    assert page.dialogs == []


# ---------------------------------------------------------------------------------------------
# Finders and the skip/fail rule (no system files hidden: the finders take their inputs)


def test_chromium_finder(tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_chromium({"RLHFKIT_CHROMIUM": str(fake)}, path="") == (str(fake), "")
    found, why = find_chromium({"RLHFKIT_CHROMIUM": str(tmp_path / "nope")}, path=str(tmp_path))
    assert found is None and "RLHFKIT_CHROMIUM" in why  # a wrong setting is not replaced
    if not os.path.exists("/usr/bin/chromium"):
        assert find_chromium({}, path=str(tmp_path)) == (str(fake), "")
        found, why = find_chromium({}, path=str(tmp_path / "empty"))
        assert found is None and "not found" in why


def test_pg_finder(tmp_path):
    bindir = tmp_path / "lib" / "15" / "bin"
    bindir.mkdir(parents=True)
    (tmp_path / "lib" / "9.6" / "bin").mkdir(parents=True)
    for folder in (bindir, tmp_path / "lib" / "9.6" / "bin"):
        (folder / "initdb").write_text("#!/bin/sh\n")
        (folder / "initdb").chmod(0o755)
    pattern = str(tmp_path / "lib" / "*" / "bin")
    assert find_pg_bindir(path=str(tmp_path), debian_glob=pattern) == (str(bindir), "")
    found, why = find_pg_bindir(path=str(tmp_path), debian_glob=str(tmp_path / "none" / "*"))
    assert found is None and "initdb" in why


def test_missing_service_skips_or_fails():
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        missing_service("no chromium", environ={})
    with pytest.raises(pytest.skip.Exception):
        missing_service("no chromium", environ={"RLHFKIT_REQUIRE_SERVICES": "0"})
    with pytest.raises(pytest.fail.Exception, match="no chromium.*RLHFKIT_REQUIRE_SERVICES=1"):
        missing_service("no chromium", environ={"RLHFKIT_REQUIRE_SERVICES": "1"})


def test_wait_http_times_out_on_a_closed_port():
    with pytest.raises(TimeoutError, match="no HTTP answer"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.3)
