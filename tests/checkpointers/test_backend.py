from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph

from checkpointers import Backend, aopen_backend, mask_url, open_backend
from checkpointers._schema import MIGRATIONS
from checkpointers.aio import _AsqliteDB
from checkpointers.backend import _SqliteDB
from harness_nodes import BackendUnavailable, BackendURLError, HarnessState

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("", "the URL is empty", id="empty"),
        pytest.param("harness.db", "no scheme", id="no-scheme"),
        pytest.param("mysql://root@localhost/db", "unknown scheme 'mysql'", id="unknown-scheme"),
        pytest.param("sqlite://", "a sqlite URL needs a path", id="sqlite-no-path"),
        pytest.param("sqlite:////no/such/dir/x.db", "does not exist", id="sqlite-missing-dir"),
        pytest.param("postgresql://u:p@host:notaport/db", "Port could not be cast", id="bad-port"),
        pytest.param("postgresql:///db", "no host", id="pg-no-host"),
    ],
)
def test_bad_url_is_one_typed_error(url: str, reason: str) -> None:
    with pytest.raises(BackendURLError, match=re.escape(reason)) as exc:
        open_backend(url)
    assert "Expected memory://" in str(exc.value)


def test_bad_url_masks_password() -> None:
    with pytest.raises(BackendURLError) as exc:
        open_backend("mysql://admin:hunter2@db.example/prod")
    assert "hunter2" not in str(exc.value)
    assert exc.value.url == "mysql://admin:***@db.example/prod"


def test_unreachable_postgres_names_url_with_password_masked() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    url = "postgresql://postgres:s3cret@127.0.0.1:1/postgres"
    with pytest.raises(BackendUnavailable) as exc:
        open_backend(url, connect_timeout=2)
    assert exc.value.url == "postgresql://postgres:***@127.0.0.1:1/postgres"
    assert "s3cret" not in str(exc.value)
    assert "Cannot open backend" in str(exc.value)


@pytest.mark.parametrize(
    "url",
    [
        # libpq echoes a malformed percent-encoded password in its message
        "postgresql://app:p%zzMYSECRET@127.0.0.1:1/postgres",
        # a password given as a query parameter, not in the user part
        "postgresql://app@127.0.0.1:1/postgres?password=MYSECRET",
    ],
)
def test_passwords_reach_no_backend_error(url: str) -> None:
    with pytest.raises(BackendUnavailable) as exc:
        open_backend(url, connect_timeout=2)
    assert "MYSECRET" not in str(exc.value) and "MYSECRET" not in exc.value.url
    assert "***" in exc.value.url


@pytest.mark.postgres
def test_missing_postgres_database_is_backend_unavailable(postgres_server: str) -> None:
    url = postgres_server.rsplit("/", 1)[0] + f"/no_such_db_{uuid.uuid4().hex[:6]}"
    with pytest.raises(BackendUnavailable, match="does not exist"):
        open_backend(url)


@pytest.mark.parametrize("url", [123, b"memory://"])
def test_a_url_that_is_not_a_string_says_so(url: Any) -> None:
    with pytest.raises(BackendURLError, match="expected a URL string, got"):
        open_backend(url)


async def test_async_bad_url_is_typed() -> None:
    with pytest.raises(BackendURLError):
        await aopen_backend("redis://localhost")


def test_mask_url_leaves_passwordless_urls_alone() -> None:
    assert mask_url("postgresql://postgres@h:5432/db") == "postgresql://postgres@h:5432/db"
    assert mask_url("postgresql://h/db?sslmode=require") == "postgresql://h/db?sslmode=require"
    assert (
        mask_url("postgresql://u:pw@h/db?sslmode=require&password=x")
        == "postgresql://u:***@h/db?sslmode=require&password=***"
    )


def test_harness_schema_is_created_and_versioned(backend: Backend) -> None:
    names = [r["name"] for r in backend.execute("SELECT name FROM harness_migrations")]
    assert sorted(names) == sorted(m.name for m in MIGRATIONS) and "0001_base" in names
    for table in ("harness_runs", "harness_spend", "harness_effects", "harness_reviews"):
        assert backend.execute(f"SELECT count(*) AS n FROM {table}") == [{"n": 0}]


def test_reopening_is_idempotent(durable_url: str) -> None:
    with open_backend(durable_url) as a:
        a.execute(
            "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s)",
            ("t1", "running", 1.0, 1.0),
        )
    with open_backend(durable_url) as b:
        assert b.execute("SELECT thread_id FROM harness_runs") == [{"thread_id": "t1"}]
        assert len(b.execute("SELECT name FROM harness_migrations")) == len(MIGRATIONS)


def test_transaction_rolls_back_on_error(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with backend.transaction() as tx:
            tx.execute(
                "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s)",
                ("t-rollback", "running", 1.0, 1.0),
            )
            raise RuntimeError("boom")
    assert backend.execute("SELECT * FROM harness_runs WHERE thread_id = %s", ("t-rollback",)) == []


def _counter_graph() -> StateGraph[HarnessState]:
    def step(state: HarnessState) -> dict[str, Any]:
        return {"messages": [HumanMessage(f"step {len(state['messages'])}")]}

    builder = StateGraph(HarnessState)
    builder.add_node("a", step)
    builder.add_node("b", step)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    return builder


def test_checkpointer_persists_graph_state(backend: Backend) -> None:
    graph = _counter_graph().compile(checkpointer=backend.checkpointer)
    config = {"configurable": {"thread_id": "persist-1"}}
    graph.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    snapshot = graph.get_state(config)
    assert [m.content for m in snapshot.values["messages"]] == ["go", "step 1", "step 2"]
    history = list(graph.get_state_history(config))
    assert len(history) >= 3


async def test_async_backend_persists_graph_state(backend_url: str) -> None:
    async with await aopen_backend(backend_url) as backend:
        graph = _counter_graph().compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": "persist-async"}}
        await graph.ainvoke({"messages": [HumanMessage("go")]}, config, durability="sync")
        snapshot = await graph.aget_state(config)
        assert len(snapshot.values["messages"]) == 3
        rows = await backend.execute("SELECT name FROM harness_migrations")
        assert sorted(r["name"] for r in rows) == sorted(m.name for m in MIGRATIONS)
        async with backend.transaction() as tx:
            await tx.execute(
                "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s)",
                ("a1", "running", 1.0, 1.0),
            )
        assert await backend.execute("SELECT status FROM harness_runs") == [{"status": "running"}]


_INSERT_RUN = (
    "INSERT INTO harness_runs (thread_id, status, created_at, updated_at) VALUES (%s, %s, %s, %s)"
)


async def _cancel_by_task(transaction: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(transaction())
    await asyncio.sleep(0.2)  # the task waits on BEGIN IMMEDIATE (busy_timeout)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _cancel_by_timeout(transaction: Callable[[], Awaitable[None]]) -> None:
    # anyio cancels again at every await until the scope exits (Starlette, FastAPI).
    with anyio.move_on_after(0.2) as scope:
        await transaction()
    assert scope.cancelled_caught


def _write_from_another_connection(path: Path, thread_id: str) -> None:
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute(_INSERT_RUN.replace("%s", "?"), (thread_id, "running", 1.0, 1.0))
    finally:
        conn.close()


@pytest.mark.parametrize(
    "cancel",
    [
        pytest.param(_cancel_by_task, id="task-cancel"),
        pytest.param(_cancel_by_timeout, id="anyio-timeout"),
    ],
)
async def test_a_transaction_cancelled_while_it_waits_for_the_write_lock_leaves_none_open(
    tmp_path: Path, cancel: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]
) -> None:
    path = tmp_path / "harness.db"
    async with await aopen_backend(f"sqlite:///{path}") as backend:
        # Another writer (a worker process, the saver's connection) holds the file's lock.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")

        async def transaction() -> None:
            async with backend.transaction() as tx:
                await tx.execute(_INSERT_RUN, ("cancelled", "running", 1.0, 1.0))

        started = time.monotonic()
        await cancel(transaction)
        # The caller is let go at once, not when the other writer is done (up to 30 s).
        assert time.monotonic() - started < 5
        other.execute("COMMIT")
        other.close()

        # The BEGIN the cancelled caller queued ran once the lock was free: nothing of it
        # stays open, so later writes commit, and other connections can write.
        await backend.execute(_INSERT_RUN, ("autocommitted", "running", 1.0, 1.0))
        async with backend.transaction() as tx:
            await tx.execute(_INSERT_RUN, ("transaction", "running", 1.0, 1.0))
        await anyio.to_thread.run_sync(_write_from_another_connection, path, "elsewhere")
    with sqlite3.connect(path) as fresh:
        rows = fresh.execute("SELECT thread_id FROM harness_runs ORDER BY thread_id").fetchall()
    assert rows == [("autocommitted",), ("elsewhere",), ("transaction",)]


@pytest.mark.postgres
@pytest.mark.parametrize(
    "cancel",
    [
        pytest.param(_cancel_by_task, id="task-cancel"),
        pytest.param(_cancel_by_timeout, id="anyio-timeout"),
    ],
)
async def test_a_postgres_transaction_cancelled_while_it_waits_for_a_row_lock_leaves_none_open(
    postgres_url: str, cancel: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]
) -> None:
    update = "UPDATE harness_runs SET status = %s WHERE thread_id = %s"
    async with await aopen_backend(postgres_url, pool_size=2) as backend:
        await backend.execute(_INSERT_RUN, ("t-locked", "running", 1.0, 1.0))
        other = psycopg.connect(postgres_url)  # holds the row's lock until it rolls back
        try:
            other.execute("SELECT 1 FROM harness_runs WHERE thread_id = 't-locked' FOR UPDATE")

            async def transaction() -> None:
                async with backend.transaction() as tx:
                    await tx.execute(_INSERT_RUN, ("t-cancelled", "running", 1.0, 1.0))
                    await tx.execute(update, ("cancelled", "t-locked"))  # waits for the lock

            started = time.monotonic()
            await cancel(transaction)
            assert time.monotonic() - started < 5
        finally:
            other.rollback()
            other.close()
        # psycopg cancels the statement on the server (or, cancelled again while it does,
        # closes the connection: the server session then ends once it has the lock), and
        # the pool rolls back or drops the connection it gets back.
        await backend.execute(update, ("autocommitted", "t-locked"))
        async with backend.transaction() as tx:
            await tx.execute(_INSERT_RUN, ("t-transaction", "running", 1.0, 1.0))
    with psycopg.connect(postgres_url) as fresh:
        rows = fresh.execute("SELECT thread_id, status FROM harness_runs ORDER BY 1").fetchall()
    assert rows == [("t-locked", "autocommitted"), ("t-transaction", "running")]


def _settlement_pending(backend: Any, task_id: str) -> Any:
    """A budgeted call whose settlement is still pending when the backend closes."""
    from harness_nodes import Envelope, budgeted
    from harness_nodes.testing import ScriptedChatModel, ai

    model = ScriptedChatModel(
        script=[ai("Paris.", usage={"input_tokens": 10, "output_tokens": 2})],
        model_name="gpt-4o",
    )
    return budgeted(model, envelope=Envelope(max_usd=1), backend=backend), {
        "configurable": {"thread_id": task_id}
    }


def _reserved(url: str, task_id: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT state FROM harness_spend WHERE task_id = %s", (task_id,)
        ).fetchall()
    return [r[0] for r in rows]


def _away_keeping_the_pool_wait(backend: Any, url: str) -> None:
    """The database goes away; the pool keeps its 30 s wait for a connection."""
    from tests.conftest import DEAD_PORT_URL, drop_connections

    backend._db.pool.conninfo = DEAD_PORT_URL
    drop_connections(url)


@pytest.mark.postgres
def test_closing_with_the_database_away_is_bounded(postgres_url: str) -> None:
    from checkpointers._spend import _sync_pending

    backend = open_backend(postgres_url)
    _sync_pending(backend).delay = 3600.0  # the settlement is left to close()
    llm, config = _settlement_pending(backend, "closing-away")
    llm.invoke("capital of France?", config)
    _away_keeping_the_pool_wait(backend, postgres_url)
    started = time.monotonic()
    backend.close()
    # The pool's wait is 30 s; closing waits CLOSE_TIMEOUT (5 s) for the settlement's write.
    assert time.monotonic() - started < 8
    assert _reserved(postgres_url, "closing-away") == ["reserved"]  # kept at its worst case


@pytest.mark.postgres
async def test_async_closing_with_the_database_away_is_bounded(postgres_url: str) -> None:
    from checkpointers._spend import _async_pending

    backend = await aopen_backend(postgres_url)
    _async_pending(backend).delay = 3600.0
    llm, config = _settlement_pending(backend, "aclosing-away")
    await llm.ainvoke("capital of France?", config)
    _away_keeping_the_pool_wait(backend, postgres_url)
    started = time.monotonic()
    await backend.close(timeout=1)
    assert time.monotonic() - started < 4
    assert _reserved(postgres_url, "aclosing-away") == ["reserved"]


def test_sqlite_file_that_cannot_be_opened_says_where_and_why(tmp_path: Path) -> None:
    # SQLite's own "unable to open database file" names neither the path nor the cause (a
    # read-only directory; here, a path that is a directory): the error names both.
    target = tmp_path / "harness.db"
    target.mkdir()
    expected = f"unable to open database file ('{target}' must be a file, or not exist yet"
    with pytest.raises(BackendUnavailable, match=re.escape(expected)) as exc:
        open_backend(f"sqlite:///{target}")
    assert "directory this process can write" in str(exc.value)


def _rows_from_a_fresh_connection(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path, timeout=5)) as fresh:
        return fresh.execute("SELECT thread_id FROM harness_runs ORDER BY thread_id").fetchall()


def _hold_a_read_transaction(path: Path) -> sqlite3.Connection:
    """Another process (`harness show`, a notebook) in the middle of a read."""
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM harness_runs").fetchall()
    return reader


def test_a_reader_does_not_hold_up_a_commit_in_wal_mode(tmp_path: Path) -> None:
    # The backend puts the file in WAL mode: a COMMIT there never waits on readers.
    path = tmp_path / "harness.db"
    with open_backend(f"sqlite:///{path}") as backend:
        assert backend.execute("PRAGMA journal_mode") == [{"journal_mode": "wal"}]
        reader = _hold_a_read_transaction(path)
        started = time.monotonic()
        with backend.transaction() as tx:
            tx.execute(_INSERT_RUN, ("committed", "running", 1.0, 1.0))
        assert time.monotonic() - started < 1
        assert reader.execute("SELECT thread_id FROM harness_runs").fetchall() == []
        reader.execute("COMMIT")
        reader.close()
        assert _rows_from_a_fresh_connection(path) == [("committed",)]


def _rollback_journal_db(path: Path) -> _SqliteDB:
    # In rollback-journal mode (a file system without WAL support, a file another tool
    # switched) a COMMIT needs every reader gone; SQLite refuses it after the busy timeout,
    # shortened here, and leaves the transaction open.
    db = _SqliteDB(str(path))
    db.migrate()
    assert db.execute("PRAGMA journal_mode = DELETE", ()) == [{"journal_mode": "delete"}]
    db.execute("PRAGMA busy_timeout = 200", ())
    return db


def test_a_commit_refused_by_a_reader_leaves_no_transaction_open(tmp_path: Path) -> None:
    path = tmp_path / "harness.db"
    db = _rollback_journal_db(path)
    try:
        reader = _hold_a_read_transaction(path)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            with db.transaction() as tx:
                tx.execute(_INSERT_RUN, ("refused", "running", 1.0, 1.0))
        reader.execute("COMMIT")
        reader.close()

        # Rolled back, not left open on the connection: holding the file's lock (no other
        # process could read or write) and taking every later statement into it, uncommitted.
        db.execute(_INSERT_RUN, ("autocommitted", "running", 1.0, 1.0))
        with db.transaction() as tx:
            tx.execute(_INSERT_RUN, ("transaction", "running", 1.0, 1.0))
        _write_from_another_connection(path, "elsewhere")
        assert _rows_from_a_fresh_connection(path) == [
            ("autocommitted",),
            ("elsewhere",),
            ("transaction",),
        ]
    finally:
        db.close()


async def test_async_a_commit_refused_by_a_reader_leaves_no_transaction_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "harness.db"
    db = await _AsqliteDB.open(str(path))
    try:
        assert await db.execute("PRAGMA journal_mode = DELETE", ()) == [{"journal_mode": "delete"}]
        await db.execute("PRAGMA busy_timeout = 200", ())
        reader = _hold_a_read_transaction(path)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            async with db.transaction() as tx:
                await tx.execute(_INSERT_RUN, ("refused", "running", 1.0, 1.0))
        reader.execute("COMMIT")
        reader.close()

        await db.execute(_INSERT_RUN, ("autocommitted", "running", 1.0, 1.0))
        async with db.transaction() as tx:
            await tx.execute(_INSERT_RUN, ("transaction", "running", 1.0, 1.0))
        await anyio.to_thread.run_sync(_write_from_another_connection, path, "elsewhere")
        assert _rows_from_a_fresh_connection(path) == [
            ("autocommitted",),
            ("elsewhere",),
            ("transaction",),
        ]
    finally:
        await db.close()


def test_a_statement_sqlite_rolled_back_itself_keeps_its_own_error(tmp_path: Path) -> None:
    # On a full disk SQLite rolls the whole transaction back itself: the error raised is the
    # disk's, not "cannot rollback - no transaction is active" from the ROLLBACK after it.
    path = tmp_path / "harness.db"
    with open_backend(f"sqlite:///{path}") as backend:
        pages = backend.execute("PRAGMA page_count")[0]["page_count"]
        backend.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            with backend.transaction() as tx:
                tx.execute(_INSERT_RUN, ("small", "running", 1.0, 1.0))
                tx.execute(_INSERT_RUN, ("x" * 100_000, "running", 1.0, 1.0))
        backend.execute(f"PRAGMA max_page_count = {2**30}")
        with backend.transaction() as tx:
            tx.execute(_INSERT_RUN, ("after", "running", 1.0, 1.0))
        assert _rows_from_a_fresh_connection(path) == [("after",)]


async def test_async_a_statement_sqlite_rolled_back_itself_keeps_its_own_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "harness.db"
    async with await aopen_backend(f"sqlite:///{path}") as backend:
        pages = (await backend.execute("PRAGMA page_count"))[0]["page_count"]
        await backend.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            async with backend.transaction() as tx:
                await tx.execute(_INSERT_RUN, ("small", "running", 1.0, 1.0))
                await tx.execute(_INSERT_RUN, ("x" * 100_000, "running", 1.0, 1.0))
        await backend.execute(f"PRAGMA max_page_count = {2**30}")
        async with backend.transaction() as tx:
            await tx.execute(_INSERT_RUN, ("after", "running", 1.0, 1.0))
        assert _rows_from_a_fresh_connection(path) == [("after",)]
