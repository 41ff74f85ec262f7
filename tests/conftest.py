"""Shared fixtures: one backend fixture over memory | sqlite | postgres.

Postgres cases get a fresh database per test, dropped afterwards. Where no server answers
they skip with a loud reason locally, and **fail** under ``CI=true``: CI must never go green
without having touched a real database.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver

from checkpointers import AsyncBackend, Backend, aopen_backend, open_backend

PG_URI = os.environ.get(
    "HARNESS_TEST_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REPO_ROOT = Path(__file__).resolve().parent.parent

_SECRET_ENV = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "GOOGLE_API_KEY",
    "LANGFUSE_PUBLIC_KEY",
    "LANGFUSE_SECRET_KEY",
    "LANGFUSE_HOST",
    "LANGFUSE_BASE_URL",
    "HARNESS_DATABASE_URL",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real provider or pick up a developer's database by accident."""
    for name in _SECRET_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _postgres_problem() -> str | None:
    try:
        with psycopg.connect(PG_URI, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return f"PostgreSQL at {PG_URI} is not reachable: {str(e).splitlines()[0]}"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of a live PostgreSQL; skip loudly (fail under CI) when there is none."""
    problem = _postgres_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} — CI=true requires a real database", pytrace=False)
        pytest.skip(f"!!! POSTGRES TESTS SKIPPED: {problem}")
    return PG_URI


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


_DB_PREFIX = "harness_test_"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Dropper:
    """Drops test databases off the tests' critical path, and sweeps leftovers of dead runs.

    ``DROP DATABASE`` forces a server checkpoint (0.7-2 s here). Several drops in flight share
    checkpoints, so a small thread pool keeps up with the suite; the session waits for every
    drop at the end. Database names carry the creating process's pid, so a run killed before
    its drops finished is cleaned up by the next run on this machine — never a live run's.
    """

    def __init__(self, admin_url: str) -> None:
        self._admin_url = admin_url
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="db-dropper")
        self._futures: list[Future[None]] = []

    def _drop_now(self, name: str) -> None:
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(self._admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop(self, name: str) -> None:
        self._futures.append(self._pool.submit(self._drop_now, name))

    def sweep_dead_runs(self) -> None:
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s", (_DB_PREFIX + "%",)
                )
            ]
        for name in names:
            pid, _, suffix = name[len(_DB_PREFIX) :].partition("_")
            # Only names of the form harness_test_<pid>_<hex> are ours to sweep.
            if suffix and pid.isdigit() and int(pid) < 2**22 and not _pid_alive(int(pid)):
                self.drop(name)

    def close(self) -> None:
        for f in self._futures:
            f.result()
        self._pool.shutdown()


@pytest.fixture(scope="session")
def _db_dropper(postgres_server: str) -> Iterator[_Dropper]:
    dropper = _Dropper(postgres_server)
    dropper.sweep_dead_runs()
    yield dropper
    dropper.close()


@pytest.fixture
def postgres_url(postgres_server: str, _db_dropper: _Dropper) -> Iterator[str]:
    """A fresh, empty database for this test; dropped afterwards (in the background)."""
    name = f"{_DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(postgres_server, name)
    finally:
        _db_dropper.drop(name)


BACKEND_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKEND_KINDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for each backend kind: memory://, a temp SQLite file, a fresh Postgres db."""
    kind: str = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'harness.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=BACKEND_KINDS[1:])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like `backend_url`, for the backends that outlive a process (sqlite, postgres)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'harness.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def backend(backend_url: str) -> Iterator[Backend]:
    with open_backend(backend_url) as b:
        yield b


@pytest.fixture
def checkpointer(backend: Backend) -> BaseCheckpointSaver[Any]:
    return backend.checkpointer


@pytest.fixture
async def abackend(backend_url: str) -> AsyncIterator[AsyncBackend]:
    b = await aopen_backend(backend_url)
    try:
        yield b
    finally:
        await b.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python process that imports this checkout's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


DEAD_PORT_URL = "postgresql://postgres@127.0.0.1:1/gone"
"""Where nothing listens: a pool pointed here cannot reconnect."""


def drop_connections(url: str, dbname: str | None = None) -> int:
    """Kill every other connection to *dbname* (default: *url*'s database); how many.

    ``pg_terminate_backend`` only signals: this waits until the server has closed them, so
    they are connections the server dropped, as an outage or a failover leaves them.
    """
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = COALESCE(%s, current_database()) AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
        pids = [pid for pid, ok in rows if ok]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()
            if alive is not None and alive[0] == 0:
                break
            time.sleep(0.01)
    return len(pids)


@contextlib.contextmanager
def database_away(
    backend: Backend | AsyncBackend, url: str, *, drop: bool = True
) -> Iterator[None]:
    """The database at *url* goes away under *backend* (Postgres), the server staying up.

    The backend's connections are dropped (unless *drop* is False: the caller drops them) and
    its pool reconnects to a port nothing listens on, waiting 0.3 s for a connection instead
    of 30 s. On exit the pool points at the database again.
    """
    pool: Any = backend._db.pool  # type: ignore[union-attr]
    conninfo, timeout = pool.conninfo, pool.timeout
    pool.conninfo, pool.timeout = DEAD_PORT_URL, 0.3
    try:
        if drop:
            drop_connections(url)
        yield
    finally:
        pool.conninfo, pool.timeout = conninfo, timeout
