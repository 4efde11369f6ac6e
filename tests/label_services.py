"""Real services for the label-server tests: a throw-away PostgreSQL cluster and a headless Chromium.

How to use: this module is a pytest plugin, registered for the whole suite by the line
``pytest_plugins = ["tests.label_services"]`` in tests/conftest.py (a plugin, not a plain import, so
that its ``pytest_runtest_makereport`` hook is found). A test module just names the fixtures::

    def test_save(postgres_url, page): ...

Fixtures:

* ``postgres_server`` (session): a PostgreSQL cluster started for this test session in a temporary
  folder, on 127.0.0.1 and a free port, with trust authentication for the user ``rlhfkit``. It has
  ``.url`` (``postgresql+psycopg://rlhfkit@127.0.0.1:PORT/postgres``) and ``.new_database(name)``,
  which creates a database and returns its URL. Stopped (``pg_ctl -m immediate stop``) and its
  folder removed at session end, also when tests failed. As root, the cluster runs as the
  ``postgres`` user (PostgreSQL refuses root), or as ``rlhfkit-pg``, created when neither exists.
* ``postgres_url`` (function): the URL of a fresh, empty database for this one test.
* ``browser`` (session): Playwright's sync API driving the system Chromium, headless.
* ``page`` (function): a fresh browser context and page. ``page.dialogs`` lists every dialog
  (alert, confirm, prompt, beforeunload) as Playwright ``Dialog`` objects; each is dismissed.
  ``page.console_errors`` lists the text of console errors and of uncaught page errors (these as
  ``"pageerror: ..."``). When the test fails, a screenshot goes to
  ``test-artifacts/screenshots/<test name>.png`` under the repository root.

Helpers: ``free_port()``, ``wait_http(url, timeout=20)``, ``find_pg_bindir()``, ``find_chromium()``.

A missing service (PostgreSQL binaries, Chromium, or the Python packages sqlalchemy, psycopg,
playwright) skips the tests that need it, with the reason, unless ``RLHFKIT_REQUIRE_SERVICES=1``
is set: then those tests fail (CI sets it, so a missing service never passes silently). Chromium is
``$RLHFKIT_CHROMIUM`` when set (a wrong value counts as missing, it is not silently replaced),
else /usr/bin/chromium, else ``chromium`` or ``chromium-browser`` on PATH.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = REPO_ROOT / "test-artifacts" / "screenshots"
REQUIRE_ENV = "RLHFKIT_REQUIRE_SERVICES"
CHROMIUM_ENV = "RLHFKIT_CHROMIUM"
PG_USER = "rlhfkit"  # the database superuser that initdb creates (not a system user)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm; Chromium then crashes
]


# ---------------------------------------------------------------------------------------------
# Helpers


def services_required(environ=None) -> bool:
    """Whether a missing service must fail the tests (``RLHFKIT_REQUIRE_SERVICES=1``)."""
    value = (os.environ if environ is None else environ).get(REQUIRE_ENV, "")
    return value.strip().lower() in ("1", "true", "yes")


def missing_service(reason: str, environ=None):
    """Skip the test for a missing service, or fail it when services are required."""
    if services_required(environ):
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> int:
    """Poll ``url`` until an HTTP server answers (any status); return that status.

    Proxies from the environment are bypassed (the servers under test are local). Raises
    TimeoutError, with the last connection error, when nothing answers within ``timeout`` seconds.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            with opener.open(url, timeout=max(0.1, min(2.0, deadline - time.monotonic()))) as resp:
                return resp.status
        except urllib.error.HTTPError as err:  # an answer, whatever its status
            return err.code
        except (urllib.error.URLError, OSError) as err:
            last_error = err
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no HTTP answer from {url} within {timeout} s (last error: {last_error})")
        time.sleep(0.05)


def _is_executable_file(path) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _version_key(bindir: str):
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    return [int(part) if part.isdigit() else -1 for part in re.split(r"[.]", version)]


def find_pg_bindir(path=None, debian_glob="/usr/lib/postgresql/*/bin") -> tuple[str | None, str]:
    """PostgreSQL's server binaries: ``(bindir, "")`` or ``(None, why not)``.

    ``pg_config --bindir`` when it names a folder with initdb (a lone libpq-dev pg_config does not),
    else the newest /usr/lib/postgresql/<version>/bin with initdb. ``path`` replaces $PATH (tests).
    """
    pg_config = shutil.which("pg_config", path=path)
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            bindir = out.stdout.strip()
            if out.returncode == 0 and _is_executable_file(os.path.join(bindir, "initdb")):
                return bindir, ""
        except (OSError, subprocess.SubprocessError):
            pass
    candidates = [d for d in glob.glob(debian_glob) if _is_executable_file(os.path.join(d, "initdb"))]
    if candidates:
        return max(candidates, key=_version_key), ""
    return None, (
        "PostgreSQL server binaries not found (no initdb via `pg_config --bindir` nor in "
        f"{debian_glob}); on Debian: apt-get install postgresql"
    )


def find_chromium(environ=None, path=None) -> tuple[str | None, str]:
    """The Chromium executable: ``(path, "")`` or ``(None, why not)``.

    ``$RLHFKIT_CHROMIUM`` when set (a wrong value is reported, not replaced by another Chromium),
    else /usr/bin/chromium, else ``chromium`` or ``chromium-browser`` on PATH. ``environ`` and
    ``path`` replace os.environ and $PATH (for tests).
    """
    environ = os.environ if environ is None else environ
    override = environ.get(CHROMIUM_ENV, "").strip()
    if override:
        found = override if os.sep in override else shutil.which(override, path=path)
        if _is_executable_file(found):
            return found, ""
        return None, f"{CHROMIUM_ENV}={override!r} is not an executable file"
    if _is_executable_file("/usr/bin/chromium"):
        return "/usr/bin/chromium", ""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name, path=path)
        if found:
            return found, ""
    return None, f"Chromium not found (set {CHROMIUM_ENV}, or install it: apt-get install chromium)"


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as err:
        return f"(no server log: {err})"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _service_user() -> pwd.struct_passwd:
    """The system user the cluster runs as when we are root: postgres, else rlhfkit-pg (created)."""
    for name in ("postgres", "rlhfkit-pg"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    out = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "rlhfkit-pg"],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"running as root, and creating the user rlhfkit-pg for PostgreSQL "
                           f"failed: {out.stderr.strip() or out.stdout.strip()}")
    return pwd.getpwnam("rlhfkit-pg")


def _world_traversable(folder: str) -> bool:
    """Whether every folder from / down to ``folder`` lets other users through (o+x)."""
    path = Path(folder).resolve()
    for part in [path, *path.parents]:
        try:
            if not os.stat(part).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


class PostgresServer:
    """A throw-away PostgreSQL cluster; see the module docstring."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.port: int | None = None
        self.url = ""
        self._user = _service_user() if os.geteuid() == 0 else None
        base = tempfile.gettempdir()
        if self._user is not None and not _world_traversable(base):
            base = "/tmp"  # e.g. TMPDIR under /root: the postgres user could not reach the cluster
        self.root = Path(tempfile.mkdtemp(prefix="rlhfkit-pg-", dir=base))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"  # a short path: a Unix socket path is at most 107 bytes
        self.log = self.root / "server.log"
        self.sockets.mkdir()
        if self._user is not None:
            for folder in (self.root, self.sockets):
                os.chown(folder, self._user.pw_uid, self._user.pw_gid)
        self._engine = None
        self._running = False

    def _run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self._user is not None:
            cmd = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self._user.pw_name, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        # cwd: the cluster's own folder, which its user can enter (our cwd may be under /root)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=self.root, timeout=timeout)

    def start(self, attempts: int = 3) -> None:
        out = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync",
                        "-E", "UTF8", "--locale=C")
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
        for attempt in range(1, attempts + 1):
            port = free_port()  # another process may take it before the server binds: retry
            opts = (f"-F -c listen_addresses=127.0.0.1 -p {port} -k {self.sockets} -c fsync=off")
            out = self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log),
                            "-o", opts, "start")
            if out.returncode == 0:
                self.port = port
                self._running = True
                self.url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/postgres"
                return
            if attempt == attempts or "could not bind" not in _log_tail(self.log):
                raise RuntimeError(
                    f"PostgreSQL did not start (pg_ctl exit {out.returncode}): "
                    f"{out.stderr.strip() or out.stdout.strip()}\n--- {self.log} (tail) ---\n"
                    f"{_log_tail(self.log)}"
                )

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (letters, digits, underscores) and return its URL."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use letters, digits and _ (at most 63)")
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                                    poolclass=sqlalchemy.pool.NullPool)
        with self._engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        return self.url_for(name)

    def stop(self) -> None:
        """Stop the server at once and remove its folder; safe to call twice."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._running and self.data.exists():
            self._running = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _import_or_missing(module: str, pip_name: str):
    try:
        return __import__(module)
    except ImportError:
        missing_service(f"Python package {pip_name} is not installed (pip install {pip_name})")


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL cluster for the session (``.url``, ``.new_database(name)``)."""
    _import_or_missing("sqlalchemy", "sqlalchemy")
    _import_or_missing("psycopg", "psycopg[binary]")
    bindir, why = find_pg_bindir()
    if bindir is None:
        missing_service(why)
    server = PostgresServer(bindir)
    atexit.register(server.stop)  # a backstop if the session dies before its teardown
    try:
        server.start()
        yield server
    finally:
        server.stop()
        atexit.unregister(server.stop)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The URL of a fresh, empty database for this test."""
    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")[:40]
    return postgres_server.new_database(f"t_{stem}_{uuid.uuid4().hex[:8]}")


# ---------------------------------------------------------------------------------------------
# Chromium


@pytest.fixture(scope="session")
def browser():
    """Headless system Chromium driven by Playwright's sync API (one for the session)."""
    executable, why = find_chromium()
    if executable is None:
        missing_service(why)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("Python package playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def page(browser, request):
    """A fresh context and page; ``page.dialogs``, ``page.console_errors``; screenshot on failure."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    pg = context.new_page()
    pg.dialogs = []
    pg.console_errors = []

    def on_dialog(dialog):
        pg.dialogs.append(dialog)
        dialog.dismiss()

    def on_console(message):
        if message.type == "error":
            pg.console_errors.append(message.text)

    pg.on("dialog", on_dialog)
    pg.on("console", on_console)
    pg.on("pageerror", lambda error: pg.console_errors.append(f"pageerror: {error}"))
    try:
        yield pg
    finally:
        report = request.node.stash.get(_REPORTS, {}).get("call")
        if report is not None and report.failed:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_") or "test"
            try:
                SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
                pg.screenshot(path=str(SCREENSHOT_DIR / f"{name}.png"), full_page=True)
            except Exception as err:  # a broken page must not hide the test's own failure
                print(f"screenshot of {request.node.nodeid} failed: {err}")
        context.close()
