"""Open, create and write a label project: a SQLite file (default) or a PostgreSQL database (by URL).

    store = Store.create("feedback.db", settings, items)      # nothing is left behind if it fails
    store = Store.open("feedback.db")                         # or "postgresql://user@host/name"
    with store.write() as conn: ...                           # one transaction; committed on exit

SQLite runs in WAL mode with `synchronous=NORMAL`: a commit survives the server being killed (kill -9),
not a power cut (PostgreSQL, or `synchronous=FULL` via RLHFKIT_SQLITE_SYNC=FULL, for that). Writes
take the database lock up front (`BEGIN IMMEDIATE`) so that two writers never deadlock on upgrade, and
writers inside one process queue on a lock instead of SQLite's sleep-and-retry busy handler.
PostgreSQL uses READ COMMITTED; the "next item" query locks the row it hands out (FOR UPDATE SKIP
LOCKED), so concurrent annotators get different items without waiting on each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError

from rlhfkit.errors import RlhfkitError
from rlhfkit.label import schema as S
from rlhfkit.label.items import ItemSpec, Settings


class LabelError(RlhfkitError):
    """A label project cannot be created, opened or changed as asked."""


def is_url(target: str) -> bool:
    return "://" in target


def describe(target: str) -> str:
    """The target for messages, without a password."""
    if not is_url(target):
        return target
    try:
        return make_url(target).render_as_string(hide_password=True)
    except ArgumentError:
        return target.split("@")[-1]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _engine(target: str, must_exist: bool) -> Engine:
    if is_url(target):
        try:
            url = make_url(target)
        except ArgumentError:
            raise LabelError(f"--db {target!r}: not a database URL (expected postgresql://user@host[:port]/name)") from None
        if url.get_backend_name() != "postgresql":
            raise LabelError(f"--db {describe(target)}: only postgresql:// URLs or a SQLite file path are supported")
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)  # >= the server's 8 threads
    path = Path(os.path.expanduser(target)).absolute()
    if must_exist and not path.is_file():
        raise LabelError(f"{target}: no such label project (create it with `rlhfkit label init {target} --from FILE`)")
    mode = "rw" if must_exist else "rwc"
    engine = create_engine(f"sqlite+pysqlite:///file:{path}?mode={mode}&uri=true",
                           connect_args={"check_same_thread": False, "timeout": 60}, pool_size=20, max_overflow=40)
    sync = os.environ.get("RLHFKIT_SQLITE_SYNC", "NORMAL").upper()
    if sync not in ("NORMAL", "FULL"):
        raise LabelError(f"RLHFKIT_SQLITE_SYNC: expected NORMAL or FULL, got {sync!r}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        # WAL is a lasting property of the file: never set it on another application's database (open
        # refuses that one, and must leave it as it was)
        if not must_exist or cur.execute("SELECT 1 FROM sqlite_master WHERE name = 'label_meta'").fetchone():
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sync}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine


def _friendly(exc: Exception, target: str) -> LabelError:
    text = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_url(target):
        return LabelError(f"--db {describe(target)}: cannot use this PostgreSQL database: {text}")
    return LabelError(f"{target}: cannot open as a label project: {text}")


def check_new_file(target: str) -> None:
    """A new SQLite project's file must not exist yet, in a folder that does (URLs pass)."""
    if is_url(target):
        return
    path = Path(os.path.expanduser(target))
    if path.exists():
        raise LabelError(f"{target}: already exists; add items with `rlhfkit label add {target} --from FILE`, "
                         "or choose a new file")
    if not path.parent.is_dir():
        raise LabelError(f"{target}: the folder {path.parent} does not exist")


@contextlib.contextmanager
def _disposed_on_error(engine: Engine, target: str) -> Iterator[None]:
    """Close the engine on any failure; database errors become one LabelError naming the target."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        engine.dispose()
        raise _friendly(exc, target) from None
    except BaseException:
        engine.dispose()
        raise


class Store:
    """One project's database. Thread-safe: the server shares one Store between its worker threads."""

    def __init__(self, engine: Engine, target: str) -> None:
        self.engine = engine
        self.target = target
        self.sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock() if self.sqlite else None
        self.settings = Settings()
        self.secret = ""

    # --- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, target: str) -> Store:
        """Open an existing project; a missing file, another app's database or another schema version is
        one clear LabelError (nothing is created or changed, except a migration from an older version)."""
        engine = _engine(target, must_exist=True)
        store = cls(engine, target)
        with _disposed_on_error(engine, target), engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if S.meta.name not in tables:
                what = "an empty database" if not tables else "a database of another application"
                raise LabelError(f"{describe(target)}: {what}, not an rlhfkit label project "
                                 f"(create one with `rlhfkit label init`)")
            values = dict(conn.execute(select(S.meta.c.key, S.meta.c.value)).all())
        if values.get("app") != S.APP:
            engine.dispose()
            raise LabelError(f"{describe(target)}: not an rlhfkit label project (app {values.get('app')!r})")
        version = values.get("schema_version")
        if not isinstance(version, int) or version > S.SCHEMA_VERSION:
            engine.dispose()
            raise LabelError(f"{describe(target)}: label schema version {version} was written by a newer rlhfkit "
                             f"(this one reads up to {S.SCHEMA_VERSION}); upgrade rlhfkit to open it")
        if version < S.SCHEMA_VERSION:
            store._migrate(version)
            values = store.meta_values()
        store.settings = Settings.from_json(values["settings"])
        store.secret = values["secret"]
        return store

    def _migrate(self, version: int) -> None:
        with self.write() as conn:
            while version < S.SCHEMA_VERSION:
                step = S.MIGRATIONS.get(version)
                if step is None:
                    raise LabelError(f"{describe(self.target)}: no migration from label schema version {version}")
                step(conn)  # type: ignore[operator]
                version += 1
            conn.execute(update(S.meta).where(S.meta.c.key == "schema_version").values(value=version))

    @classmethod
    def create(cls, target: str, settings: Settings, specs: list[ItemSpec]) -> Store:
        """Create a project with its items in one step: for SQLite a temporary file renamed into place,
        for PostgreSQL one transaction (DDL included), so a failure leaves nothing behind."""
        settings.check()
        if is_url(target):
            engine = _engine(target, must_exist=False)
            with _disposed_on_error(engine, target), engine.begin() as conn:
                if inspect(conn).get_table_names():
                    raise LabelError(f"--db {describe(target)}: the database already has tables; "
                                     "use an empty database for a new project")
                _create_in(conn, settings, specs)
            engine.dispose()
            return cls.open(target)
        check_new_file(target)
        path = Path(os.path.expanduser(target))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        engine = _engine(str(tmp), must_exist=False)
        try:
            with engine.begin() as conn:
                _create_in(conn, settings, specs)
            engine.dispose()
            with contextlib.closing(sqlite3.connect(tmp)) as db:  # fold the WAL into the file before the rename
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            os.replace(tmp, path)
        except BaseException:
            engine.dispose()
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)
            raise
        for leftover in (Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        return cls.open(str(path))

    def close(self) -> None:
        self.engine.dispose()

    # --- transactions --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed when the block ends (rolled back on an exception)."""
        lock = self._write_lock or contextlib.nullcontext()
        with lock, self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def meta_values(self) -> dict[str, Any]:
        with self.read() as conn:
            return dict(conn.execute(select(S.meta.c.key, S.meta.c.value)).all())

    def set_meta(self, key: str, value: Any) -> None:
        with self.write() as conn:
            done = conn.execute(update(S.meta).where(S.meta.c.key == key).values(value=value)).rowcount
            if not done:
                conn.execute(insert(S.meta).values(key=key, value=value))

    # --- items ---------------------------------------------------------------------------------------

    def add_items(self, specs: list[ItemSpec]) -> list[int]:
        """Add items (all or none); a key already in the project is an error naming the row."""
        try:
            with self.write() as conn:
                keys = [s.key for s in specs]
                taken = set()
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    taken |= set(conn.scalars(select(S.items.c.key).where(S.items.c.key.in_(chunk))))
                if taken:
                    bad = [f"  {s.where}: item id {s.key!r} is already in the project" for s in specs if s.key in taken]
                    raise LabelError(f"{len(bad)} item(s) already exist (nothing was added):\n" + "\n".join(bad[:20]))
                return _insert_items(conn, specs, self.settings)
        except IntegrityError as exc:
            raise LabelError(f"items could not be added (nothing was added): {exc.orig}") from None

    def count_items(self, gold: bool = False) -> int:
        """How many items there are to label; `gold=True` counts the gold items too (all rows ever added)."""
        query = select(func.count()).select_from(S.items)
        with self.read() as conn:
            return conn.scalar(query if gold else query.where(S.items.c.is_gold.is_(False))) or 0

    # --- annotators ----------------------------------------------------------------------------------

    def add_annotator(self, name: str, role: str = "annotator") -> str:
        """Create a person and return their secret token (only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 100 or any(ch in name for ch in "\n\r\t/"):
            raise LabelError(f"annotator name {name!r}: expected 1-100 characters without tabs, newlines or '/'")
        if name == "admin" and role != "admin":  # `serve` gives this person the admin link
            raise LabelError("annotator name 'admin' is the project's admin (its link is printed by `rlhfkit label "
                             "serve`); choose another name")
        token = secrets.token_urlsafe(24)
        try:
            with self.write() as conn:
                conn.execute(insert(S.annotators).values(name=name, token_hash=hash_token(token), role=role,
                                                         active=True, created_at=time.time()))
        except IntegrityError:
            raise LabelError(f"annotator {name!r} already exists (give a new link with `rlhfkit label "
                             f"add-annotator {self.target} {name} --rotate`)") from None
        return token

    def annotator_names(self) -> list[str]:
        with self.read() as conn:
            return [r[0] for r in conn.execute(select(S.annotators.c.name))]

    def rotate_token(self, name: str) -> str:
        token = secrets.token_urlsafe(24)
        with self.write() as conn:
            done = conn.execute(update(S.annotators).where(S.annotators.c.name == name)
                                .values(token_hash=hash_token(token), active=True)).rowcount
        if not done:
            raise LabelError(f"no annotator named {name!r} in {describe(self.target)}")
        return token

    def admin_token(self) -> str:
        """A fresh admin token (the previous admin link stops working)."""
        with self.read() as conn:
            exists = conn.scalar(select(S.annotators.c.id).where(S.annotators.c.name == "admin"))
        return self.rotate_token("admin") if exists else self.add_annotator("admin", role="admin")

    def deactivate(self, name: str) -> None:
        with self.write() as conn:
            done = conn.execute(update(S.annotators).where(S.annotators.c.name == name).values(active=False)).rowcount
        if not done:
            raise LabelError(f"no annotator named {name!r} in {describe(self.target)}")

    def who(self, token: str) -> dict[str, Any] | None:
        """The active person holding `token` ({id, name, role}), or None."""
        if not token or len(token) > 200:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(S.annotators.c.id, S.annotators.c.name, S.annotators.c.role)
                               .where(S.annotators.c.token_hash == hash_token(token), S.annotators.c.active.is_(True))
                               ).first()
        return dict(row._mapping) if row else None


def _create_in(conn: Connection, settings: Settings, specs: list[ItemSpec]) -> None:
    S.metadata.create_all(conn)
    conn.execute(insert(S.meta), [
        {"key": "app", "value": S.APP},
        {"key": "schema_version", "value": S.SCHEMA_VERSION},
        {"key": "settings", "value": settings.to_json()},
        {"key": "secret", "value": secrets.token_hex(32)},
        {"key": "created_at", "value": time.time()},
    ])
    _insert_items(conn, specs, settings)


def _insert_items(conn: Connection, specs: list[ItemSpec], settings: Settings) -> list[int]:
    now = time.time()
    rows = [{"key": s.key, "prompt": s.prompt, "candidates": s.candidates, "gold": s.gold,
             "is_gold": s.gold is not None, "priority": s.priority,
             "slots_left": 0 if s.gold is not None else settings.overlap, "n_labels": 0,
             "source": s.source or None, "created_at": now} for s in specs]
    for start in range(0, len(rows), 1000):
        conn.execute(insert(S.items), rows[start : start + 1000])
    keys = [s.key for s in specs]
    ids: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        ids.update(conn.execute(select(S.items.c.key, S.items.c.id).where(S.items.c.key.in_(chunk))).all())
    return [ids[k] for k in keys]
