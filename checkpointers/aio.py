"""`aopen_backend`: the async twin of `open_backend`, for graphs run with ``ainvoke``.

Example:
    ```python
    import asyncio

    from checkpointers.aio import aopen_backend


    async def main() -> None:
        async with await aopen_backend("memory://") as backend:
            assert await backend.execute("SELECT 1 AS one") == [{"one": 1}]


    asyncio.run(main())
    ```
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from checkpointers._schema import MIGRATIONS, MIGRATIONS_TABLE, Dialect
from checkpointers._url import Kind, ParsedURL, parse_url
from checkpointers.backend import (
    CLOSE_TIMEOUT,
    Params,
    Row,
    _first_line,
    _socket_readable,
    _sqlite_reason,
    default_url,
    postgres_pool_kwargs,
)
from harness_nodes.errors import BackendUnavailable

if TYPE_CHECKING:
    import aiosqlite
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

__all__ = ["AsyncBackend", "AsyncTransaction", "aopen_backend"]

log = logging.getLogger(__name__)


async def _acheck_pooled_connection(conn: AsyncConnection[Any]) -> None:
    """`_check_pooled_connection` for the async pool: poll the socket, check only if readable."""
    from psycopg_pool import AsyncConnectionPool

    if _socket_readable(conn):
        await AsyncConnectionPool.check_connection(conn)


class AsyncTransaction(Protocol):
    """What `AsyncBackend.transaction()` yields."""

    async def execute(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement (``%s`` placeholders) and return its rows as dicts."""
        ...


class _AsqliteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._conn.execute(sql.replace("%s", "?"), tuple(params)) as cur:
            if cur.description is None:
                return []
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in await cur.fetchall()]


class _AsqliteDB:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        self._rollbacks: set[asyncio.Task[None]] = set()
        """Rollbacks of transactions cancelled before they began (see `transaction`)."""

    @classmethod
    async def open(cls, path: str) -> _AsqliteDB:
        import aiosqlite

        conn = await _daemon(aiosqlite.connect(path, timeout=30, isolation_level=None))
        await conn.execute("PRAGMA busy_timeout = 30000")
        if path != ":memory:":
            await conn.execute("PRAGMA journal_mode = WAL")
        db = cls(conn)
        await db.migrate()
        return db

    async def execute(self, sql: str, params: Params) -> list[Row]:
        async with self.lock:
            return await _AsqliteTx(self.conn).execute(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_AsqliteTx]:
        # aiosqlite runs a connection's statements in order in its own thread, and runs one
        # even when the task awaiting it was cancelled. So every way out queues a ROLLBACK
        # behind what may still be running, before the connection is anyone else's.
        await self.lock.acquire()
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            self.lock.release()  # the BEGIN ran and failed: no transaction to end
            raise
        except BaseException:
            # Cancelled (a client gone, a timeout) while the BEGIN waits for another
            # writer's lock, up to busy_timeout: it will still begin. A task of its own rolls
            # it back and frees the connection then, so the caller is let go now.
            rollback = asyncio.get_running_loop().create_task(self._rollback_and_release())
            self._rollbacks.add(rollback)
            rollback.add_done_callback(self._rollbacks.discard)
            raise
        try:
            yield _AsqliteTx(self.conn)
            await self.conn.execute("COMMIT")
        except BaseException:
            # The body failed or was cancelled, or the COMMIT did (a cancelled COMMIT still
            # runs: the ROLLBACK behind it then finds no transaction).
            await self._rollback()
            raise
        finally:
            self.lock.release()

    async def _rollback(self) -> None:
        # Queued as soon as this is called (a cancellation can only interrupt the wait for
        # it), so it runs before any statement of the lock's next holder.
        try:
            await self.conn.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            if "no transaction is active" not in str(e):
                log.warning("rollback failed: %s", e)
        except sqlite3.Error as e:  # never hide the error (or cancellation) being handled
            log.warning("rollback failed: %s", e)

    async def _rollback_and_release(self) -> None:
        try:
            await self._rollback()
        finally:
            self.lock.release()

    async def migrate(self) -> None:
        async with self.transaction() as tx:
            await tx.execute(MIGRATIONS_TABLE.format(float="REAL"))
            done = {r["name"] for r in await tx.execute("SELECT name FROM harness_migrations")}
            for m in MIGRATIONS:
                if m.name in done:
                    continue
                for stmt in m.sql("sqlite").split(";"):
                    if stmt.strip():
                        await tx.execute(stmt)
                await tx.execute(
                    "INSERT INTO harness_migrations (name, applied_at) VALUES (%s, %s)",
                    (m.name, time.time()),
                )

    async def close(self) -> None:
        # Closing is queued behind them anyway; waiting lets them end without an error.
        await asyncio.gather(*self._rollbacks, return_exceptions=True)
        await self.conn.close()


class _APgTx:
    def __init__(self, conn: AsyncConnection[Row]) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> list[Row]:
        cur = await self._conn.execute(sql, tuple(params) or None)
        return list(await cur.fetchall()) if cur.description is not None else []


class _APostgresDB:
    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Row]]) -> None:
        self.pool = pool
        self.wait: float | None = None
        """Seconds a statement waits for a connection (None: the pool's 30 s)."""

    async def execute(self, sql: str, params: Params) -> list[Row]:
        async with self.pool.connection(timeout=self.wait) as conn:
            return await _APgTx(conn).execute(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_APgTx]:
        async with self.pool.connection(timeout=self.wait) as conn, conn.transaction():
            yield _APgTx(conn)

    def closing(self, timeout: float) -> None:
        """`_PostgresDB.closing`."""
        self.wait = timeout

    async def close(self) -> None:
        await self.pool.close(timeout=min(5.0, self.wait or 5.0))


class AsyncBackend:
    """The async twin of `Backend`: an async LangGraph saver and the harness's tables.

    Get one from `aopen_backend`; pass ``backend.checkpointer`` to ``compile`` and run the
    graph with ``ainvoke``.

    Example:
        ```python
        import asyncio

        from langgraph.graph import END, START, MessagesState, StateGraph

        from checkpointers import aopen_backend


        async def main() -> None:
            async with await aopen_backend("memory://") as backend:
                builder = StateGraph(MessagesState)
                builder.add_node("echo", lambda state: {"messages": [("ai", "hi")]})
                builder.add_edge(START, "echo")
                builder.add_edge("echo", END)
                graph = builder.compile(checkpointer=backend.checkpointer)
                config = {"configurable": {"thread_id": "t-1"}}
                await graph.ainvoke({"messages": [("user", "hello")]}, config, durability="sync")
                assert len((await graph.aget_state(config)).values["messages"]) == 2


        asyncio.run(main())
        ```

    Attributes:
        url: The URL it was opened with, password masked.
        kind: ``"memory"``, ``"sqlite"`` or ``"postgres"``.
        checkpointer: The async LangGraph saver.
    """

    def __init__(
        self,
        *,
        url: str,
        kind: Kind,
        checkpointer: BaseCheckpointSaver[Any],
        db: _AsqliteDB | _APostgresDB,
        closers: Sequence[Any] = (),
    ) -> None:
        self.url = url
        self.kind = kind
        self.checkpointer = checkpointer
        self._db = db
        self._closers = list(closers)
        self._closed = False
        self._before_close: list[Callable[[], Awaitable[None]]] = []
        """Run first by `close` (the spend ledger writes its deferred settlements)."""
        self._exit_target: tuple[Literal["sqlite", "postgres"], str] | None = None
        """Where a sync connection reaches the harness tables (SQLite path, Postgres conninfo):
        what the spend ledger still holds when the process exits with the backend open is
        written through it (the event loop is gone by then). None for memory://."""

    @property
    def dialect(self) -> Dialect:
        """SQL dialect of the harness tables."""
        return "postgres" if self.kind == "postgres" else "sqlite"

    async def execute(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one autocommitted statement on the harness tables (``%s`` placeholders)."""
        return await self._db.execute(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransaction]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        async with self._db.transaction() as tx:
            yield tx

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close every connection. Safe to call twice.

        Args:
            timeout: Seconds closing waits for a database connection (see `Backend.close`).
        """
        if self._closed:
            return
        if isinstance(self._db, _APostgresDB):
            self._db.closing(timeout)
        for hook in self._before_close:
            try:
                await hook()
            except Exception as e:  # closing must go on; what could not be written is logged
                log.warning("before close: %s", e)
        self._closed = True
        for c in self._closers:
            await c.close()
        await self._db.close()

    async def __aenter__(self) -> AsyncBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncBackend(url={self.url!r}, kind={self.kind!r})"

    @classmethod
    @asynccontextmanager
    async def from_conn_string(cls, url: str, **kwargs: Any) -> AsyncIterator[AsyncBackend]:
        """Open a backend for the duration of an ``async with`` block."""
        backend = await aopen_backend(url, **kwargs)
        try:
            yield backend
        finally:
            await backend.close()


async def aopen_backend(
    url: str | None = None,
    *,
    pool_size: int = 10,
    connect_timeout: float = 10.0,
    max_idle: float = 300.0,
    max_lifetime: float = 1800.0,
) -> AsyncBackend:
    """Open (and set up) the async backend named by *url*. Same arguments as `open_backend`.

    Raises:
        BackendURLError: the URL is malformed or names an unknown scheme.
        BackendUnavailable: the database did not answer, or its schema could not be set up.

    Example:
        ```python
        import asyncio
        import tempfile
        from pathlib import Path

        from checkpointers import aopen_backend


        async def main(path: Path) -> None:
            async with await aopen_backend(f"sqlite:///{path}") as backend:
                assert backend.kind == "sqlite"
                async with backend.transaction() as tx:
                    await tx.execute("SELECT count(*) AS n FROM harness_runs")


        with tempfile.TemporaryDirectory() as d:
            asyncio.run(main(Path(d) / "harness.db"))
        ```
    """
    parsed = parse_url(url if url is not None else default_url())
    if parsed.kind == "memory":
        db = await _aopen_sqlite(parsed)
        return AsyncBackend(url=parsed.masked, kind="memory", checkpointer=InMemorySaver(), db=db)
    if parsed.kind == "sqlite":
        return await _aopen_sqlite_backend(parsed)
    return await _aopen_postgres_backend(parsed, pool_size, connect_timeout, max_idle, max_lifetime)


async def _aopen_sqlite(parsed: ParsedURL) -> _AsqliteDB:
    try:
        return await _AsqliteDB.open(parsed.target or ":memory:")
    except sqlite3.Error as e:
        raise BackendUnavailable(parsed.masked, _sqlite_reason(parsed, e)) from None


def _daemon(conn: aiosqlite.Connection) -> aiosqlite.Connection:
    """*conn* (not yet awaited) with its worker thread a daemon.

    aiosqlite's thread is not one: an `AsyncBackend` left open kept the interpreter from ever
    exiting (it waits for such threads before its exit hooks, which write the spend ledger's
    held settlements). SQLite rolls back whatever a thread stopped at exit left uncommitted.
    """
    thread = getattr(conn, "_thread", conn)  # aiosqlite < 0.21: the connection is the thread
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True
    return conn


async def _aopen_sqlite_backend(parsed: ParsedURL) -> AsyncBackend:
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    db = await _aopen_sqlite(parsed)
    try:
        conn = await _daemon(aiosqlite.connect(parsed.target, timeout=30))
        await conn.execute("PRAGMA busy_timeout = 30000")
        saver = AsyncSqliteSaver(conn)
        await saver.setup()
    except sqlite3.Error as e:
        await db.close()
        raise BackendUnavailable(parsed.masked, _sqlite_reason(parsed, e)) from None
    backend = AsyncBackend(
        url=parsed.masked, kind="sqlite", checkpointer=saver, db=db, closers=[conn]
    )
    backend._exit_target = ("sqlite", parsed.target)
    return backend


async def _aopen_postgres_backend(
    parsed: ParsedURL,
    pool_size: int,
    connect_timeout: float,
    max_idle: float,
    max_lifetime: float,
) -> AsyncBackend:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    from checkpointers.backend import setup_postgres

    # Schema set-up is rare and short: the sync code path, in a thread, so it exists once.
    await asyncio.to_thread(setup_postgres, parsed, connect_timeout)
    pool: AsyncConnectionPool[AsyncConnection[Row]] = AsyncConnectionPool(
        parsed.target,
        min_size=1,
        max_size=max(1, pool_size),
        kwargs=postgres_pool_kwargs(),
        check=_acheck_pooled_connection,
        max_idle=max_idle,
        max_lifetime=max_lifetime,
        open=False,
        name="langgraph-harness-async",
    )
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except PoolTimeout as e:
        await pool.close()
        raise BackendUnavailable(parsed.masked, parsed.redact(_first_line(e))) from None
    saver = AsyncPostgresSaver(pool)
    backend = AsyncBackend(
        url=parsed.masked, kind="postgres", checkpointer=saver, db=_APostgresDB(pool)
    )
    backend._exit_target = ("postgres", parsed.target)
    return backend
