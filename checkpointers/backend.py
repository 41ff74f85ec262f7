"""`open_backend`: one URL → a LangGraph checkpointer plus the harness's own tables.

The backend owns the LangGraph saver, configured as its maintainers require (for Postgres:
a pool of ``autocommit=True, prepare_threshold=0, row_factory=dict_row`` connections, checked
on checkout — by a poll of the socket, not a round trip — and recycled after idling, so a
connection the server dropped is replaced), and
a small SQL executor for the harness's ledgers in the same database.

Example:
    ```python
    from checkpointers import open_backend

    with open_backend("memory://") as backend:
        rows = backend.execute("SELECT name FROM harness_migrations")
        assert {"name": "0001_base"} in rows
    ```
"""

from __future__ import annotations

import logging
import os
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from checkpointers._schema import MIGRATIONS, MIGRATIONS_TABLE, Dialect
from checkpointers._url import Kind, ParsedURL, parse_url
from harness_nodes.errors import BackendUnavailable

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg_pool import ConnectionPool

__all__ = ["DEFAULT_URL", "Backend", "Transaction", "default_url", "open_backend"]

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///harness.db"
"""The embedded default: a SQLite file in the working directory."""

ADVISORY_LOCK_KEY = 0x6C67_6861  # "lgha": serialises schema set-up across processes
SETUP_LOCK_TIMEOUT = 120.0  # seconds to wait for another process's schema set-up

Row = dict[str, Any]
T = TypeVar("T")
Params = Sequence[Any]


def default_url() -> str:
    """The backend URL to use when none is given: ``$HARNESS_DATABASE_URL`` or SQLite.

    Example:
        ```python
        from checkpointers import default_url

        assert default_url().split("://")[0] in {"sqlite", "postgresql", "memory", "postgres"}
        ```
    """
    return os.environ.get("HARNESS_DATABASE_URL") or DEFAULT_URL


class Transaction(Protocol):
    """What `Backend.transaction()` yields: ``execute`` inside one database transaction.

    Example:
        ```python
        from checkpointers import Transaction, open_backend


        def move_credit(tx: Transaction, amount: int) -> None:
            tx.execute("UPDATE credits SET n = n - %s WHERE who = %s", (amount, "alice"))
            tx.execute("UPDATE credits SET n = n + %s WHERE who = %s", (amount, "bob"))


        with open_backend("sqlite:///example.db") as backend:
            backend.execute("CREATE TABLE credits (who TEXT PRIMARY KEY, n INTEGER)")
            backend.execute("INSERT INTO credits VALUES (%s, %s), (%s, %s)", ("alice", 5, "bob", 0))
            with backend.transaction() as tx:
                move_credit(tx, 2)
            try:
                with backend.transaction() as tx:
                    move_credit(tx, 2)
                    raise RuntimeError("crash mid-transaction")
            except RuntimeError:
                pass  # rolled back: neither update happened
            rows = backend.execute("SELECT who, n FROM credits ORDER BY who")
        assert rows == [{"who": "alice", "n": 3}, {"who": "bob", "n": 2}]
        ```
    """

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement (``%s`` placeholders) and return its rows as dicts."""
        ...


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --- SQLite (also backs memory://) ---------------------------------------------------------


def _sqlite_reason(parsed: ParsedURL, e: sqlite3.Error) -> str:
    """SQLite's one-line error, with the likely cause when it could not open or write the file.

    "unable to open database file" names neither the path nor why: a read-only directory (the
    file and its ``-wal``/``-shm`` journal are created beside it), or a path that is a directory.
    """
    reason = parsed.redact(_first_line(e))
    on_disk = parsed.target not in ("", ":memory:")
    if on_disk and ("unable to open database file" in reason or "readonly database" in reason):
        where = Path(parsed.target).expanduser().resolve()
        reason += (
            f" ({str(where)!r} must be a file, or not exist yet, in a directory this process "
            "can write: SQLite creates its -wal and -shm files beside it)"
        )
    return reason


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        cur = self._conn.execute(sql.replace("%s", "?"), tuple(params))
        if cur.description is None:
            return []
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


class _SqliteDB:
    """One autocommit connection guarded by a lock; write transactions use BEGIN IMMEDIATE."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        if path != ":memory:":
            self.conn.execute("PRAGMA journal_mode = WAL")
        self.lock = threading.RLock()

    def execute(self, sql: str, params: Params) -> list[Row]:
        with self.lock:
            return _SqliteTx(self.conn).execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[_SqliteTx]:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                # The body failed, or the COMMIT did: a refused COMMIT ("database is locked"
                # while a reader holds a rollback journal) leaves the transaction open, with
                # the file's lock, for every later statement on this connection to join.
                self._rollback()
                raise

    def _rollback(self) -> None:
        if not self.conn.in_transaction:
            return  # SQLite rolled it back itself (a full disk, an I/O error): keep its error
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error as e:  # never hide the error being handled
            log.warning("rollback failed: %s", e)

    def migrate(self) -> None:
        with self.transaction() as tx:
            tx.execute(MIGRATIONS_TABLE.format(float="REAL"))
            done = {r["name"] for r in tx.execute("SELECT name FROM harness_migrations")}
            for m in MIGRATIONS:
                if m.name in done:
                    continue
                for stmt in m.sql("sqlite").split(";"):
                    if stmt.strip():
                        tx.execute(stmt)
                tx.execute(
                    "INSERT INTO harness_migrations (name, applied_at) VALUES (%s, %s)",
                    (m.name, time.time()),
                )

    def close(self) -> None:
        self.conn.close()


# --- Postgres ------------------------------------------------------------------------------


class _PgTx:
    def __init__(self, conn: Connection[Row]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        cur = self._conn.execute(sql, tuple(params) or None)
        return list(cur.fetchall()) if cur.description is not None else []


class _PostgresDB:
    def __init__(self, pool: ConnectionPool[Connection[Row]]) -> None:
        self.pool = pool
        self.wait: float | None = None
        """Seconds a statement waits for a connection (None: the pool's 30 s)."""

    def execute(self, sql: str, params: Params) -> list[Row]:
        with self.pool.connection(timeout=self.wait) as conn:
            return _PgTx(conn).execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[_PgTx]:
        with self.pool.connection(timeout=self.wait) as conn, conn.transaction():
            yield _PgTx(conn)

    def closing(self, timeout: float) -> None:
        """From now on (the backend is closing) wait at most *timeout* s for a connection."""
        self.wait = timeout

    def close(self) -> None:
        self.pool.close(timeout=min(5.0, self.wait or 5.0))


def _migrate_postgres(conn: Connection[Any]) -> None:
    conn.execute(MIGRATIONS_TABLE.format(float="DOUBLE PRECISION"))
    done = {r[0] for r in conn.execute("SELECT name FROM harness_migrations").fetchall()}
    for m in MIGRATIONS:
        if m.name in done:
            continue
        with conn.transaction():
            conn.execute(m.sql("postgres"))  # DDL, no parameters
            conn.execute(
                "INSERT INTO harness_migrations (name, applied_at) VALUES (%s, %s)",
                (m.name, time.time()),
            )


def _socket_readable(conn: Any) -> bool:
    """Whether an idle connection's socket has something to read (no round trip, one poll).

    An idle connection in the pool has nothing pending: if its socket is readable, the server
    has sent something unasked — a FATAL before closing (restart, ``pg_terminate_backend``,
    idle reaper), an EOF, or a notification. A closed socket counts as readable.
    """
    if conn.closed or conn.broken:
        return True
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _check_pooled_connection(conn: Connection[Any]) -> None:
    """The pool's checkout check, without a round trip on a healthy connection.

    `ConnectionPool.check_connection` sends an empty query on every checkout: a full round
    trip before each statement. Here a poll of the socket decides, and only a connection with
    unexpected input gets the real check (which raises on a dead one, so the pool replaces it).
    """
    from psycopg_pool import ConnectionPool

    if _socket_readable(conn):
        ConnectionPool.check_connection(conn)


def postgres_pool_kwargs() -> dict[str, Any]:
    """The connection settings `PostgresSaver` requires (see its README's ❌/✅ warning)."""
    from psycopg.rows import dict_row

    return {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}


# --- the backend ---------------------------------------------------------------------------

CLOSE_TIMEOUT = 5.0
"""Seconds `Backend.close` waits for the database (psycopg_pool's ``close`` waits as long)."""


class Backend:
    """A LangGraph checkpointer and the harness's tables, in one database.

    Get one from `open_backend`; close it (or use it as a context manager) when done.

    Attributes:
        url: The URL it was opened with, password masked.
        kind: ``"memory"``, ``"sqlite"`` or ``"postgres"``.
        checkpointer: The LangGraph saver to pass to ``builder.compile(checkpointer=...)``.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langgraph.graph import START, MessagesState, StateGraph

        from checkpointers import Backend, open_backend
        from harness_nodes.testing import ScriptedChatModel, ai

        model = ScriptedChatModel(script=[ai("Hello!")], model_name="gpt-4o-mini")
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_edge(START, "agent")
        config = {"configurable": {"thread_id": "ticket-1"}}

        with open_backend("sqlite:///harness.db") as backend:  # or memory://, postgresql://...
            assert isinstance(backend, Backend) and backend.kind == "sqlite"
            graph = builder.compile(checkpointer=backend.checkpointer)
            graph.invoke({"messages": [HumanMessage("hi")]}, config)

        with open_backend("sqlite:///harness.db") as backend:  # later, in another process
            graph = builder.compile(checkpointer=backend.checkpointer)
            state = graph.get_state(config)
            assert [m.content for m in state.values["messages"]] == ["hi", "Hello!"]
            assert backend.execute("SELECT count(*) AS n FROM harness_runs") == [{"n": 0}]
        ```
    """

    def __init__(
        self,
        *,
        url: str,
        kind: Kind,
        checkpointer: BaseCheckpointSaver[Any],
        db: _SqliteDB | _PostgresDB,
        closers: Sequence[Any] = (),
    ) -> None:
        self.url = url
        self.kind = kind
        self.checkpointer = checkpointer
        self._db = db
        self._closers = list(closers)
        self._closed = False
        self._before_close: list[Callable[[], None]] = []
        """Run first by `close` (the spend ledger writes its deferred settlements)."""

    @property
    def dialect(self) -> Dialect:
        """SQL dialect of the harness tables (memory:// keeps them in an in-memory SQLite)."""
        return "postgres" if self.kind == "postgres" else "sqlite"

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement on the harness tables (``%s`` placeholders), autocommitted.

        Example:
            ```python
            from checkpointers import open_backend

            with open_backend("memory://") as backend:
                assert backend.execute("SELECT 1 AS one") == [{"one": 1}]
            ```
        """
        return self._db.execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction: ``BEGIN IMMEDIATE`` on SQLite, a real transaction on Postgres.

        Rows read inside it with ``SELECT ... FOR UPDATE`` (Postgres) stay locked until it ends.

        Example:
            ```python
            from checkpointers import open_backend

            with open_backend("memory://") as backend:
                with backend.transaction() as tx:
                    tx.execute("SELECT count(*) AS n FROM harness_runs")
            ```
        """
        with self._db.transaction() as tx:
            yield tx

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the saver's connections and the harness's. Safe to call twice.

        Args:
            timeout: Seconds closing waits for a database connection, to write what is
                pending (spend settlements). With the database away, what cannot be written
                is logged and closing goes on: a process shutting down during an outage
                is not held for the pool's 30 s wait.
        """
        if self._closed:
            return
        if isinstance(self._db, _PostgresDB):
            self._db.closing(timeout)
        for hook in self._before_close:
            try:
                hook()
            except Exception as e:  # closing must go on; what could not be written is logged
                log.warning("before close: %s", e)
        self._closed = True
        for c in self._closers:
            c.close()
        self._db.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Backend(url={self.url!r}, kind={self.kind!r})"

    @classmethod
    @contextmanager
    def from_conn_string(cls, url: str, **kwargs: Any) -> Iterator[Backend]:
        """Open a backend for the duration of a ``with`` block (like ``PostgresSaver``).

        Example:
            ```python
            from checkpointers import Backend

            with Backend.from_conn_string("memory://") as backend:
                assert backend.kind == "memory"
            ```
        """
        backend = open_backend(url, **kwargs)
        try:
            yield backend
        finally:
            backend.close()


def open_backend(
    url: str | None = None,
    *,
    pool_size: int = 10,
    connect_timeout: float = 10.0,
    max_idle: float = 300.0,
    max_lifetime: float = 1800.0,
) -> Backend:
    """Open (and set up) the backend named by *url*.

    Args:
        url: ``memory://``, ``sqlite:///path.db`` or ``postgresql://user@host:port/db``.
            Defaults to `default_url()` (``$HARNESS_DATABASE_URL`` or ``sqlite:///harness.db``).
        pool_size: Postgres only: the connection pool's maximum size.
        connect_timeout: Seconds to wait for the database before failing.
        max_idle: Postgres only: close pooled connections idle this long.
        max_lifetime: Postgres only: recycle pooled connections after this long.

    Raises:
        BackendURLError: the URL is malformed or names an unknown scheme.
        BackendUnavailable: the database did not answer, or its schema could not be set up.

    Example:
        ```python
        import tempfile
        from pathlib import Path

        from checkpointers import open_backend

        with tempfile.TemporaryDirectory() as d:
            with open_backend(f"sqlite:///{Path(d) / 'harness.db'}") as backend:
                assert backend.kind == "sqlite"
        ```
    """
    parsed = parse_url(url if url is not None else default_url())
    if parsed.kind == "memory":
        return Backend(
            url=parsed.masked, kind="memory", checkpointer=InMemorySaver(), db=_open_sqlite(parsed)
        )
    if parsed.kind == "sqlite":
        return _open_sqlite_backend(parsed)
    return _open_postgres_backend(parsed, pool_size, connect_timeout, max_idle, max_lifetime)


def _retry_locked(setup: Callable[[], T]) -> T:
    """Run a SQLite set-up step, retrying while another process holds the file's lock.

    SQLite answers "database is locked" at once, without its busy handler, when two
    connections race to upgrade a read lock (as concurrent ``CREATE TABLE IF NOT EXISTS`` on a
    fresh file do); backing off and retrying resolves it.
    """
    pause = 0.05
    for attempt in range(8):
        try:
            return setup()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 7:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _open_sqlite(parsed: ParsedURL) -> _SqliteDB:
    def setup() -> _SqliteDB:
        db = _SqliteDB(parsed.target or ":memory:")
        try:
            db.migrate()
        except BaseException:
            db.close()
            raise
        return db

    try:
        return _retry_locked(setup)
    except sqlite3.Error as e:
        raise BackendUnavailable(parsed.masked, _sqlite_reason(parsed, e)) from None


def _open_sqlite_backend(parsed: ParsedURL) -> Backend:
    from langgraph.checkpoint.sqlite import SqliteSaver

    db = _open_sqlite(parsed)

    def setup() -> tuple[sqlite3.Connection, SqliteSaver]:
        conn = sqlite3.connect(parsed.target, check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            saver = SqliteSaver(conn)
            saver.setup()
        except BaseException:
            conn.close()
            raise
        return conn, saver

    try:
        conn, saver = _retry_locked(setup)
    except sqlite3.Error as e:
        db.close()
        raise BackendUnavailable(parsed.masked, _sqlite_reason(parsed, e)) from None
    return Backend(url=parsed.masked, kind="sqlite", checkpointer=saver, db=db, closers=[conn])


def _take_setup_lock(conn: Connection[Any], parsed: ParsedURL) -> None:
    """Take the set-up advisory lock by polling ``pg_try_advisory_lock``, never by blocking.

    A blocking ``pg_advisory_lock`` deadlocks here: the winner's ``PostgresSaver.setup()``
    runs ``CREATE INDEX CONCURRENTLY``, which waits for every open transaction to end —
    including the losers' ``SELECT pg_advisory_lock(...)``, which wait for the winner. Polling
    keeps the losers' statements short, so the index build proceeds (observed: 4 processes
    hung for good on a fresh database with the blocking call).
    """
    deadline = time.monotonic() + SETUP_LOCK_TIMEOUT
    pause = 0.005
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()
        if row is not None and row[0]:
            return
        if time.monotonic() > deadline:
            raise BackendUnavailable(
                parsed.masked,
                f"another process held the schema set-up lock for over {SETUP_LOCK_TIMEOUT:g} s",
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


HARNESS_MARKER_TABLES = ("harness_migrations", "checkpoints")
"""Tables whose presence says something has run against a database (harness or LangGraph)."""


def has_harness_data(parsed: ParsedURL, connect_timeout: float = 10.0) -> bool:
    """Whether the existing database *parsed* names holds the harness's tables or checkpoints.

    Looks without creating anything (a SQLite file is opened read-only), so a command that
    only reads what runs wrote can refuse a database nothing has run against instead of
    setting the schema up in it. ``memory://`` and ``sqlite:///:memory:`` hold nothing.

    Raises:
        BackendUnavailable: the database did not answer, or is not a database.
    """
    if parsed.kind == "memory" or parsed.target == ":memory:":
        return False
    if parsed.kind == "sqlite":
        uri = f"{Path(parsed.target).resolve().as_uri()}?mode=ro"
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=connect_timeout)) as conn:
                rows = conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                    HARNESS_MARKER_TABLES,
                ).fetchall()
        except sqlite3.Error as e:
            raise BackendUnavailable(parsed.masked, parsed.redact(_first_line(e))) from None
        return bool(rows)
    import psycopg

    try:
        with psycopg.connect(
            parsed.target, autocommit=True, connect_timeout=max(1, int(connect_timeout))
        ) as pg:
            row = pg.execute(
                "SELECT to_regclass(%s) IS NOT NULL OR to_regclass(%s) IS NOT NULL",
                HARNESS_MARKER_TABLES,
            ).fetchone()
    except psycopg.Error as e:
        raise BackendUnavailable(parsed.masked, parsed.redact(_first_line(e))) from None
    return bool(row and row[0])


def setup_postgres(parsed: ParsedURL, connect_timeout: float) -> None:
    """Create LangGraph's and the harness's tables, serialised across processes.

    Concurrent set-up races on ``CREATE TABLE IF NOT EXISTS`` (duplicate ``pg_type`` keys); a
    session-level advisory lock serialises it (taken by polling: see `_take_setup_lock`), and
    closing the session releases the lock even if set-up fails half-way. Set-up runs on plain
    autocommit connections, never a pipeline.
    """
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    timeout = max(1, int(connect_timeout))
    try:
        # A direct connection gives the server's own reason on failure (bad password,
        # unknown database) where a pool would only time out.
        lock_conn = psycopg.connect(parsed.target, autocommit=True, connect_timeout=timeout)
    except psycopg.Error as e:
        raise BackendUnavailable(parsed.masked, parsed.redact(_first_line(e))) from None
    try:
        _take_setup_lock(lock_conn, parsed)
        with psycopg.connect(
            parsed.target, connect_timeout=timeout, **postgres_pool_kwargs()
        ) as setup_conn:
            PostgresSaver(setup_conn).setup()
        _migrate_postgres(lock_conn)
    except psycopg.Error as e:
        raise BackendUnavailable(parsed.masked, parsed.redact(_first_line(e))) from None
    finally:
        lock_conn.close()


def _open_postgres_backend(
    parsed: ParsedURL,
    pool_size: int,
    connect_timeout: float,
    max_idle: float,
    max_lifetime: float,
) -> Backend:
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg_pool import ConnectionPool, PoolTimeout

    setup_postgres(parsed, connect_timeout)
    pool: ConnectionPool[Connection[Row]] = ConnectionPool(
        parsed.target,
        min_size=1,
        max_size=max(1, pool_size),
        kwargs=postgres_pool_kwargs(),
        check=_check_pooled_connection,
        max_idle=max_idle,
        max_lifetime=max_lifetime,
        open=False,
        name="langgraph-harness",
    )
    try:
        pool.open(wait=True, timeout=connect_timeout)
    except PoolTimeout as e:
        pool.close()
        raise BackendUnavailable(parsed.masked, parsed.redact(_first_line(e))) from None
    saver = PostgresSaver(pool)
    return Backend(url=parsed.masked, kind="postgres", checkpointer=saver, db=_PostgresDB(pool))
