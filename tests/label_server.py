"""Start a real `rlhfkit label serve` process for a test, and make projects to serve.

    target = make_project(tmp_path / "f.db", rows, kind="compare", overlap=2)   # or a postgres URL
    with LabelServer(target) as srv:
        alice = srv.client(srv.add_annotator("alice"))      # httpx client with alice's bearer token
        srv.url, srv.admin_token, srv.kill()                # kill() is SIGKILL (no clean shutdown)

The `project` fixture gives `target(rows, **settings)` on SQLite or PostgreSQL: parametrize a test
module with `@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.label_services import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]


def make_project(target: str | Path, rows: list[dict[str, Any]], **settings: Any) -> str:
    from rlhfkit.data.sources import Row
    from rlhfkit.label.items import Settings, parse_rows
    from rlhfkit.label.store import Store

    s = Settings(**settings)
    store = Store.create(str(target), s, parse_rows([Row(f"row {i + 1}", r) for i, r in enumerate(rows)], s, "rows"))
    store.close()
    return str(target)


def compare_rows(n: int, prefix: str = "") -> list[dict[str, Any]]:
    return [{"prompt": f"{prefix}question {i}", "responses": [f"{prefix}answer {i} a", f"{prefix}answer {i} b"]}
            for i in range(n)]


class LabelServer:
    def __init__(self, target: str, *, port: int | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rlhfkit", "label", "serve", target, "--port", str(self.port), "--quiet",
               *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.output = ""
        deadline = time.monotonic() + 60
        while "add annotators" not in self.output:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"label server exited ({self.proc.wait()}):\n{self.output}")
            self.output += line
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"label server did not start:\n{self.output}")
        self.admin_token = re.search(r"token=(\S+)", self.output).group(1)  # type: ignore[union-attr]
        # Keep reading its output: a server that logs a lot must never block on a full pipe.
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        wait_http(self.url + "/favicon.ico")

    def _drain(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append(line)

    def add_annotator(self, name: str) -> str:
        r = self.client(self.admin_token).post("/api/annotators", json={"name": name})
        r.raise_for_status()
        return r.json()["token"]

    def client(self, token: str | None = None, **kwargs: Any):  # noqa: ANN201
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, trust_env=False, **kwargs)

    def login_url(self, token: str) -> str:
        return f"{self.url}/login?token={token}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LabelServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def project(backend: str, request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    """`project(rows, **settings) -> target` on the parametrized backend (a new database each call)."""
    counter = iter(range(1000))

    def make(rows: list[dict[str, Any]], **settings: Any) -> str:
        if backend == "postgres":
            server = request.getfixturevalue("postgres_server")
            target = server.new_database(f"label_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}_{next(counter)}")
        else:
            target = str(tmp_path / f"project{next(counter)}.db")
        return make_project(target, rows, **settings)

    return make
