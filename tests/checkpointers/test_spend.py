from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
import pytest

from checkpointers import AsyncBackend, Backend, open_backend
from checkpointers._spend import AsyncSpendLedger, Limits, SpendLedger
from harness_nodes import BackendUnavailable
from tests.conftest import database_away

pytestmark = pytest.mark.anyio

LIMITS = Limits(max_nanos=1000, max_tokens=100, max_calls=3)


def test_reservation_is_refused_when_it_would_cross_the_limit(backend: Backend) -> None:
    ledger = SpendLedger(backend)
    first = ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
    assert first.id is not None and first.refused is None
    second = ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
    assert second.id is None and second.refused == "usd"
    assert second.totals.committed_nanos == 600
    # Another task has its own envelope.
    assert ledger.reserve("t2", "default", "gpt-4o", 10, 20, 600, LIMITS).refused is None


def test_settle_replaces_the_reservation_by_actual_usage_once(backend: Backend) -> None:
    ledger = SpendLedger(backend)
    r = ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
    assert r.id is not None
    totals = ledger.settle(r.id, 7, 3, 120, model="gpt-4o-2024-08-06")
    assert (totals.reserved_nanos, totals.spent_nanos, totals.spent_tokens) == (0, 120, 10)
    again = ledger.settle(r.id, 7, 3, 120)
    assert again.spent_nanos == 120  # idempotent: a retried settle does not double count
    rows = ledger.by_model("t1")
    assert rows == [
        {
            "model": "gpt-4o-2024-08-06",
            "input_tokens": 7,
            "output_tokens": 3,
            "nanos": 120,
            "calls": 1,
        }
    ]


def test_release_returns_the_reservation_and_the_call(backend: Backend) -> None:
    ledger = SpendLedger(backend)
    r = ledger.reserve("t1", "default", "gpt-4o", 10, 20, 900, LIMITS)
    assert r.id is not None
    totals = ledger.settle(r.id, 0, 0, 0, released=True)
    assert totals == ledger.totals("t1", "default", LIMITS)
    assert (totals.committed_nanos, totals.calls) == (0, 0)
    assert ledger.reserve("t1", "default", "gpt-4o", 10, 20, 900, LIMITS).refused is None


@pytest.mark.parametrize(
    ("limits", "refused"),
    [
        pytest.param(Limits(max_calls=1), "calls", id="calls"),
        pytest.param(Limits(max_tokens=40), "tokens", id="tokens"),
        pytest.param(Limits(window_seconds=86400, window_max_nanos=700), "window_usd", id="window"),
    ],
)
def test_each_limit_refuses(backend: Backend, limits: Limits, refused: str) -> None:
    ledger = SpendLedger(backend)
    assert ledger.reserve("t1", "research", "m", 10, 20, 600, limits).refused is None
    # The window cap is per task type: a different task of the same type is refused too.
    task = "t2" if refused == "window_usd" else "t1"
    assert ledger.reserve(task, "research", "m", 10, 20, 600, limits).refused == refused


def test_window_cap_is_shared_by_tasks_of_one_type_only(backend: Backend) -> None:
    ledger = SpendLedger(backend)
    cap = Limits(window_seconds=3600, window_max_nanos=1000)
    for i in range(10):
        ledger.reserve(f"t{i}", "research", "m", 1, 1, 100, cap)
    assert ledger.reserve("t10", "research", "m", 1, 1, 100, cap).refused == "window_usd"
    assert ledger.reserve("t10", "support", "m", 1, 1, 100, cap).refused is None
    assert ledger.totals("t0", "research", cap).window_nanos == 1000


def test_concurrent_reservations_never_exceed_the_limit(backend: Backend) -> None:
    ledger = SpendLedger(backend)
    limits = Limits(max_nanos=10_000)
    granted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            r = ledger.reserve("shared", "default", "m", 1, 1, 700, limits)
            if r.id is not None:
                with lock:
                    granted.append(r.id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 14  # floor(10_000 / 700)
    assert ledger.totals("shared", "default", limits).committed_nanos == 14 * 700


async def test_async_ledger_matches_the_sync_one(abackend: AsyncBackend) -> None:
    ledger = AsyncSpendLedger(abackend)
    r = await ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
    assert r.id is not None
    assert (await ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)).refused == "usd"
    totals = await ledger.settle(r.id, 7, 3, 120)
    assert totals.spent_nanos == 120 and totals.reserved_nanos == 0
    assert (await ledger.totals("t1", "default", LIMITS)) == totals
    assert (await ledger.by_model("t1"))[0]["nanos"] == 120


def test_reservations_without_waiting_for_disk_enforce_the_same_limits(backend: Backend) -> None:
    ledger = SpendLedger(backend, sync_commit=False)
    first = ledger.reserve("t1", "default", "m", 10, 20, 600, LIMITS)
    assert first.id is not None
    assert ledger.reserve("t1", "default", "m", 10, 20, 600, LIMITS).refused == "usd"
    assert ledger.settle(first.id, 1, 1, 10).spent_nanos == 10
    assert SpendLedger(backend).totals("t1", "default", LIMITS).spent_nanos == 10


def _spend_rows(url: str, task_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        sql = "SELECT id, state FROM harness_spend WHERE task_id = %s ORDER BY id"
        return conn.execute(sql, (task_id,)).fetchall()


def _unavailable(backend: Backend | AsyncBackend) -> str:
    return re.escape(f"Cannot open backend {backend.url!r}: spend ledger: PoolTimeout")


@pytest.mark.postgres
def test_ledger_statements_with_the_database_away_raise_backend_unavailable(
    postgres_url: str,
) -> None:
    with open_backend(postgres_url) as backend:
        ledger = SpendLedger(backend)
        r = ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
        assert r.id is not None
        with database_away(backend, postgres_url):
            with pytest.raises(BackendUnavailable, match=_unavailable(backend)) as exc:
                ledger.reserve("t1", "default", "gpt-4o", 10, 20, 300, LIMITS)
            assert isinstance(exc.value.__cause__, psycopg.OperationalError)
            assert exc.value.url == backend.url
            with pytest.raises(BackendUnavailable, match=_unavailable(backend)):
                ledger.totals("t1", "default", LIMITS)
            with pytest.raises(BackendUnavailable, match=_unavailable(backend)):
                ledger.settle(r.id, 7, 3, 120)
        # Nothing half-written: the first reservation stands, the refused ones left no row.
        assert _spend_rows(postgres_url, "t1") == [(r.id, "reserved")]


@pytest.mark.postgres
async def test_async_ledger_statements_with_the_database_away_raise_backend_unavailable(
    postgres_url: str,
) -> None:
    async with AsyncBackend.from_conn_string(postgres_url) as backend:
        ledger = AsyncSpendLedger(backend)
        r = await ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
        assert r.id is not None
        with database_away(backend, postgres_url):
            with pytest.raises(BackendUnavailable, match=_unavailable(backend)) as exc:
                await ledger.reserve("t1", "default", "gpt-4o", 10, 20, 300, LIMITS)
            assert isinstance(exc.value.__cause__, psycopg.OperationalError)
            with pytest.raises(BackendUnavailable, match=_unavailable(backend)):
                await ledger.totals("t1", "default", LIMITS)
            with pytest.raises(BackendUnavailable, match=_unavailable(backend)):
                await ledger.settle(r.id, 7, 3, 120)
        assert _spend_rows(postgres_url, "t1") == [(r.id, "reserved")]


class _InterruptedReserveCommit:
    """A SQLite connection whose reservation's COMMIT runs, then is interrupted.

    Sync: a ``KeyboardInterrupt`` as the COMMIT returns. Async: the task cancelled while
    aiosqlite runs the queued COMMIT (it runs even so).
    """

    def __init__(self, conn: Any, *, cancel: bool) -> None:
        self._conn, self.cancel, self.seen, self.done = conn, cancel, False, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        self.seen = self.seen or sql.startswith("INSERT INTO harness_spend (")
        if sql != "COMMIT" or not self.seen or self.done:
            return self._conn.execute(sql, *args)
        self.done = True
        if self.cancel:
            return self._cancelled_commit()
        self._conn.execute(sql)
        raise KeyboardInterrupt

    async def _cancelled_commit(self) -> None:
        import asyncio

        commit = asyncio.ensure_future(self._conn.execute("COMMIT"))
        await asyncio.sleep(0)  # queued on aiosqlite's thread
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await commit


def test_a_reservation_whose_sqlite_commit_was_interrupted_is_released(tmp_path: Any) -> None:
    # SQLite committed it, the interrupt came as the COMMIT returned: the caller never got the
    # reservation, so no call was made on it, yet its worst case stayed booked for good.
    with open_backend(f"sqlite:///{tmp_path / 'h.db'}") as backend:
        ledger = SpendLedger(backend)
        db: Any = backend._db  # pyright: ignore[reportPrivateUsage]
        db.conn = _InterruptedReserveCommit(db.conn, cancel=False)
        with pytest.raises(KeyboardInterrupt):
            ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
        rows = backend.execute("SELECT state FROM harness_spend WHERE task_id = 't1'")
        assert [r["state"] for r in rows] == ["released"]
        assert ledger.totals("t1", "default", LIMITS).committed_nanos == 0


async def test_a_reservation_whose_sqlite_commit_was_cancelled_is_released(tmp_path: Any) -> None:
    import asyncio

    from checkpointers import aopen_backend

    async with await aopen_backend(f"sqlite:///{tmp_path / 'h.db'}") as backend:
        ledger = AsyncSpendLedger(backend)
        db: Any = backend._db  # pyright: ignore[reportPrivateUsage]
        db.conn = _InterruptedReserveCommit(db.conn, cancel=True)
        reserve = asyncio.ensure_future(
            ledger.reserve("t1", "default", "gpt-4o", 10, 20, 600, LIMITS)
        )
        with pytest.raises(asyncio.CancelledError):
            await reserve
        rows = await backend.execute("SELECT state FROM harness_spend WHERE task_id = 't1'")
        assert [r["state"] for r in rows] == ["released"]
        assert (await ledger.totals("t1", "default", LIMITS)).committed_nanos == 0
