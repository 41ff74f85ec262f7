"""The spend ledger: atomic reservations against per-task and per-type-window limits.

Tables (migrations ``0001_base`` and ``0301_spend_totals``):

- ``harness_spend``: one row per LLM call, ``reserved`` → ``settled`` | ``released``, with
  the reservation kept beside the actual usage and cost (integer nano-dollars);
- ``harness_spend_tasks``: running totals per task — the row every reservation of the task
  locks, so parallel branches and concurrent calls cannot both take the last dollar;
- ``harness_spend_windows``: running totals per task type and tumbling time window (an
  aggregate cap such as $50/day for "research"), locked after the task row.

On Postgres a reservation and a settlement are one round trip each: server-side functions
lock the rows (``SELECT ... FOR UPDATE``) and check-and-reserve in one statement. A
settlement commits without waiting for its WAL flush (losing one in a server crash leaves the
worst case booked, which is conservative); a reservation waits unless ``sync_commit=False``.
On SQLite the same steps run from Python inside ``BEGIN IMMEDIATE``. The steps are written
once, as a generator of SQL statements, and driven by a sync or an async transaction.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from checkpointers.aio import AsyncBackend
    from checkpointers.backend import Backend, Params, Row

__all__ = ["AsyncSpendLedger", "Limits", "Reservation", "SpendLedger", "Totals"]


@dataclass(frozen=True)
class Limits:
    """What a reservation must fit in (``None`` = unlimited)."""

    max_nanos: int | None = None
    max_tokens: int | None = None
    max_calls: int | None = None
    window_seconds: float | None = None
    window_max_nanos: int | None = None

    def window_start(self, now: float) -> float | None:
        """Start of the tumbling window *now* falls in (aligned to the epoch, so UTC days)."""
        if self.window_seconds is None:
            return None
        return math.floor(now / self.window_seconds) * self.window_seconds


@dataclass(frozen=True)
class Totals:
    """A task's running totals (and its type's window), as the ledger last saw them."""

    reserved_nanos: int = 0
    spent_nanos: int = 0
    reserved_tokens: int = 0
    spent_tokens: int = 0
    calls: int = 0
    window_nanos: int = 0

    @property
    def committed_nanos(self) -> int:
        """Spent plus in flight: what no further reservation may take."""
        return self.reserved_nanos + self.spent_nanos

    @property
    def committed_tokens(self) -> int:
        """Tokens spent plus reserved."""
        return self.reserved_tokens + self.spent_tokens

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Totals:
        """Build from a totals row / JSON object (missing keys are zero)."""
        return cls(
            reserved_nanos=int(row.get("reserved_nanos") or 0),
            spent_nanos=int(row.get("spent_nanos") or 0),
            reserved_tokens=int(row.get("reserved_tokens") or 0),
            spent_tokens=int(row.get("spent_tokens") or 0),
            calls=int(row.get("calls") or 0),
            window_nanos=int(row.get("window_nanos") or 0),
        )


@dataclass(frozen=True)
class Reservation:
    """The ledger's answer to a reservation: an id, or which limit refused it."""

    id: int | None
    refused: str | None
    totals: Totals


Steps = Generator[tuple[str, "Params"], "list[Row]", Any]

_TASK_COLS = "reserved_nanos, spent_nanos, reserved_tokens, spent_tokens, calls"


def _sqlite_totals(task_id: str, task_type: str, limits: Limits, now: float) -> Steps:
    rows = yield (f"SELECT {_TASK_COLS} FROM harness_spend_tasks WHERE task_id = %s", (task_id,))
    totals = dict(rows[0]) if rows else {}
    start = limits.window_start(now)
    if start is not None:
        w = yield (
            "SELECT reserved_nanos + spent_nanos AS used FROM harness_spend_windows "
            "WHERE task_type = %s AND window_seconds = %s AND starts_at = %s",
            (task_type, limits.window_seconds, start),
        )
        totals["window_nanos"] = w[0]["used"] if w else 0
    return Totals.from_row(totals)


def _sqlite_reserve(
    task_id: str,
    task_type: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    nanos: int,
    limits: Limits,
    now: float,
) -> Steps:
    tokens = input_tokens + output_tokens
    yield (
        "INSERT INTO harness_spend_tasks (task_id, task_type, updated_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (task_id) DO NOTHING",
        (task_id, task_type, now),
    )
    rows = yield (f"SELECT {_TASK_COLS} FROM harness_spend_tasks WHERE task_id = %s", (task_id,))
    t = rows[0]
    start = limits.window_start(now)
    w_used = 0
    if start is not None:
        yield (
            "INSERT INTO harness_spend_windows (task_type, window_seconds, starts_at) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (task_type, limits.window_seconds, start),
        )
        w = yield (
            "SELECT reserved_nanos + spent_nanos AS used FROM harness_spend_windows "
            "WHERE task_type = %s AND window_seconds = %s AND starts_at = %s",
            (task_type, limits.window_seconds, start),
        )
        w_used = int(w[0]["used"])
    refused: str | None = None
    if limits.max_calls is not None and t["calls"] + 1 > limits.max_calls:
        refused = "calls"
    elif limits.max_nanos is not None and t["reserved_nanos"] + t["spent_nanos"] + nanos > (
        limits.max_nanos
    ):
        refused = "usd"
    elif limits.max_tokens is not None and t["reserved_tokens"] + t["spent_tokens"] + tokens > (
        limits.max_tokens
    ):
        refused = "tokens"
    elif limits.window_max_nanos is not None and w_used + nanos > limits.window_max_nanos:
        refused = "window_usd"
    if refused is not None:
        return Reservation(None, refused, Totals.from_row({**t, "window_nanos": w_used}))
    rows = yield (
        "UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos + %s, "
        "reserved_tokens = reserved_tokens + %s, calls = calls + 1, updated_at = %s "
        f"WHERE task_id = %s RETURNING {_TASK_COLS}",
        (nanos, tokens, now, task_id),
    )
    t = rows[0]
    if start is not None:
        yield (
            "UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos + %s "
            "WHERE task_type = %s AND window_seconds = %s AND starts_at = %s",
            (nanos, task_type, limits.window_seconds, start),
        )
        w_used += nanos
    ins = yield (
        "INSERT INTO harness_spend (task_id, task_type, model, state, input_tokens, "
        "output_tokens, cost_nanos, created_at, reserved_nanos, reserved_tokens, "
        "window_seconds, window_starts_at) "
        "VALUES (%s, %s, %s, 'reserved', %s, %s, 0, %s, %s, %s, %s, %s) RETURNING id",
        (
            task_id,
            task_type,
            model,
            input_tokens,
            output_tokens,
            now,
            nanos,
            tokens,
            limits.window_seconds,
            start,
        ),
    )
    return Reservation(int(ins[0]["id"]), None, Totals.from_row({**t, "window_nanos": w_used}))


def _sqlite_settle(
    spend_id: int,
    state: str,
    model: str | None,
    input_tokens: int,
    output_tokens: int,
    nanos: int,
    now: float,
) -> Steps:
    rows = yield (
        "UPDATE harness_spend SET state = %s, model = COALESCE(%s, model), input_tokens = %s, "
        "output_tokens = %s, cost_nanos = %s, settled_at = %s "
        "WHERE id = %s AND state = 'reserved' "
        "RETURNING task_id, task_type, reserved_nanos, reserved_tokens, window_seconds, "
        "window_starts_at",
        (state, model, input_tokens, output_tokens, nanos, now, spend_id),
    )
    if not rows:  # settled or released already: settling is idempotent
        s = yield ("SELECT task_id FROM harness_spend WHERE id = %s", (spend_id,))
        if not s:
            return Totals()
        t = yield (
            f"SELECT {_TASK_COLS} FROM harness_spend_tasks WHERE task_id = %s",
            (s[0]["task_id"],),
        )
        return Totals.from_row(t[0] if t else {})
    row = rows[0]
    t = yield (
        "UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos - %s, "
        "spent_nanos = spent_nanos + %s, reserved_tokens = reserved_tokens - %s, "
        "spent_tokens = spent_tokens + %s, calls = calls - %s, updated_at = %s "
        f"WHERE task_id = %s RETURNING {_TASK_COLS}",
        (
            row["reserved_nanos"],
            nanos,
            row["reserved_tokens"],
            input_tokens + output_tokens,
            1 if state == "released" else 0,
            now,
            row["task_id"],
        ),
    )
    w_used = 0
    if row["window_seconds"] is not None:
        w = yield (
            "UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos - %s, "
            "spent_nanos = spent_nanos + %s "
            "WHERE task_type = %s AND window_seconds = %s AND starts_at = %s "
            "RETURNING reserved_nanos + spent_nanos AS used",
            (
                row["reserved_nanos"],
                nanos,
                row["task_type"],
                row["window_seconds"],
                row["window_starts_at"],
            ),
        )
        w_used = int(w[0]["used"]) if w else 0
    return Totals.from_row({**t[0], "window_nanos": w_used})


def _pg_json(rows: list[Row]) -> dict[str, Any]:
    value = next(iter(rows[0].values()))
    return dict(json.loads(value) if isinstance(value, str) else value)


_BY_MODEL_SQL = (
    "SELECT model, CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, "
    "CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, "
    "CAST(SUM(cost_nanos) AS BIGINT) AS nanos, "
    "COUNT(*) AS calls FROM harness_spend WHERE task_id = %s AND state = 'settled' "
    "GROUP BY model ORDER BY model"
)


def _run_sync(tx: Any, steps: Steps) -> Any:
    rows: list[Row] | None = None
    try:
        while True:
            sql, params = steps.send(rows)  # type: ignore[arg-type]
            rows = tx.execute(sql, params)
    except StopIteration as stop:
        return stop.value


async def _run_async(tx: Any, steps: Steps) -> Any:
    rows: list[Row] | None = None
    try:
        while True:
            sql, params = steps.send(rows)  # type: ignore[arg-type]
            rows = await tx.execute(sql, params)
    except StopIteration as stop:
        return stop.value


class SpendLedger:
    """Spend of tasks, in a `Backend`'s ``harness_spend*`` tables."""

    def __init__(self, backend: Backend, *, sync_commit: bool = True) -> None:
        self.backend = backend
        self.sync_commit = sync_commit
        """Postgres: wait for each reservation's WAL flush (settlements never wait)."""

    def totals(self, task_id: str, task_type: str, limits: Limits) -> Totals:
        """The task's current totals (and its type's current window)."""
        now = time.time()
        if self.backend.dialect == "postgres":
            rows = self.backend.execute(
                "SELECT harness_spend_totals(%s, %s, %s, %s) AS r",
                (task_id, limits.window_seconds, limits.window_start(now), task_type),
            )
            return Totals.from_row(_pg_json(rows))
        with self.backend.transaction() as tx:
            result: Totals = _run_sync(tx, _sqlite_totals(task_id, task_type, limits, now))
        return result

    def reserve(
        self,
        task_id: str,
        task_type: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        limits: Limits,
    ) -> Reservation:
        """Reserve *nanos* and the tokens for one call if every limit still holds, atomically."""
        now = time.time()
        if self.backend.dialect == "postgres":
            rows = self.backend.execute(
                "SELECT harness_spend_reserve_v2("
                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) AS r",
                (
                    task_id,
                    task_type,
                    model,
                    input_tokens,
                    output_tokens,
                    nanos,
                    limits.max_nanos,
                    limits.max_tokens,
                    limits.max_calls,
                    limits.window_seconds,
                    limits.window_start(now),
                    limits.window_max_nanos,
                    now,
                    self.sync_commit,
                ),
            )
            r = _pg_json(rows)
            return Reservation(r.get("id"), r.get("refused"), Totals.from_row(r))
        with self.backend.transaction() as tx:
            res: Reservation = _run_sync(
                tx,
                _sqlite_reserve(
                    task_id, task_type, model, input_tokens, output_tokens, nanos, limits, now
                ),
            )
        return res

    def settle(
        self,
        spend_id: int,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        *,
        model: str | None = None,
        released: bool = False,
    ) -> Totals:
        """Replace a reservation by the call's actual usage (or release it). Idempotent."""
        now = time.time()
        state = "released" if released else "settled"
        if self.backend.dialect == "postgres":
            rows = self.backend.execute(
                "SELECT harness_spend_settle_v2(%s, %s, %s, %s, %s, %s, %s) AS r",
                (spend_id, state, model, input_tokens, output_tokens, nanos, now),
            )
            return Totals.from_row(_pg_json(rows))
        with self.backend.transaction() as tx:
            result: Totals = _run_sync(
                tx, _sqlite_settle(spend_id, state, model, input_tokens, output_tokens, nanos, now)
            )
        return result

    def by_model(self, task_id: str) -> list[Row]:
        """Settled spend per model: ``model, input_tokens, output_tokens, nanos, calls``."""
        return self.backend.execute(_BY_MODEL_SQL, (task_id,))


class AsyncSpendLedger:
    """`SpendLedger` over an `AsyncBackend`."""

    def __init__(self, backend: AsyncBackend, *, sync_commit: bool = True) -> None:
        self.backend = backend
        self.sync_commit = sync_commit
        """Postgres: wait for each reservation's WAL flush (settlements never wait)."""

    async def totals(self, task_id: str, task_type: str, limits: Limits) -> Totals:
        """The task's current totals (and its type's current window)."""
        now = time.time()
        if self.backend.dialect == "postgres":
            rows = await self.backend.execute(
                "SELECT harness_spend_totals(%s, %s, %s, %s) AS r",
                (task_id, limits.window_seconds, limits.window_start(now), task_type),
            )
            return Totals.from_row(_pg_json(rows))
        async with self.backend.transaction() as tx:
            result: Totals = await _run_async(tx, _sqlite_totals(task_id, task_type, limits, now))
        return result

    async def reserve(
        self,
        task_id: str,
        task_type: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        limits: Limits,
    ) -> Reservation:
        """Reserve *nanos* and the tokens for one call if every limit still holds, atomically."""
        now = time.time()
        if self.backend.dialect == "postgres":
            rows = await self.backend.execute(
                "SELECT harness_spend_reserve_v2("
                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) AS r",
                (
                    task_id,
                    task_type,
                    model,
                    input_tokens,
                    output_tokens,
                    nanos,
                    limits.max_nanos,
                    limits.max_tokens,
                    limits.max_calls,
                    limits.window_seconds,
                    limits.window_start(now),
                    limits.window_max_nanos,
                    now,
                    self.sync_commit,
                ),
            )
            r = _pg_json(rows)
            return Reservation(r.get("id"), r.get("refused"), Totals.from_row(r))
        async with self.backend.transaction() as tx:
            res: Reservation = await _run_async(
                tx,
                _sqlite_reserve(
                    task_id, task_type, model, input_tokens, output_tokens, nanos, limits, now
                ),
            )
        return res

    async def settle(
        self,
        spend_id: int,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        *,
        model: str | None = None,
        released: bool = False,
    ) -> Totals:
        """Replace a reservation by the call's actual usage (or release it). Idempotent."""
        now = time.time()
        state = "released" if released else "settled"
        if self.backend.dialect == "postgres":
            rows = await self.backend.execute(
                "SELECT harness_spend_settle_v2(%s, %s, %s, %s, %s, %s, %s) AS r",
                (spend_id, state, model, input_tokens, output_tokens, nanos, now),
            )
            return Totals.from_row(_pg_json(rows))
        async with self.backend.transaction() as tx:
            result: Totals = await _run_async(
                tx, _sqlite_settle(spend_id, state, model, input_tokens, output_tokens, nanos, now)
            )
        return result

    async def by_model(self, task_id: str) -> list[Row]:
        """Settled spend per model: ``model, input_tokens, output_tokens, nanos, calls``."""
        return await self.backend.execute(_BY_MODEL_SQL, (task_id,))
