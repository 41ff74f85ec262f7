"""The spend ledger: atomic reservations against per-task and per-type-window limits.

Tables (migrations ``0001_base`` and ``0301_spend_totals``):

- ``harness_spend``: one row per LLM call, ``reserved`` → ``settled`` | ``released``, with
  the reservation kept beside the actual usage and cost (integer nano-dollars); and one per
  budget lease, ``lease`` → ``lease_closed`` (migration ``0304_spend_leases``, below);
- ``harness_spend_tasks``: running totals per task — the row every reservation of the task
  locks, so parallel branches and concurrent calls cannot both take the last dollar;
- ``harness_spend_windows``: running totals per task type and tumbling time window (an
  aggregate cap such as $50/day for "research"), locked after the task row.

On Postgres a reservation is one round trip: a server-side function locks the rows
(``SELECT ... FOR UPDATE``) and checks and reserves in one statement. A settlement can be one
too (`SpendLedger.settle`), or be *deferred* (`SpendLedger.defer_settle`): it waits in the
backend's `PendingSettles` and the task's next ledger statement (its next reservation, or a
read of its totals) applies it first, in the same transaction — so a model call costs one
round trip — while a flusher writes whatever is still pending ``settle_delay`` seconds later
(and at ``close()`` and exit). A deferred settlement only lowers a booked worst case to the
truth, so until it lands the ledger errs on the safe side. Settlements commit without waiting
for their WAL flush (losing one in a server crash leaves the worst case booked, which is
conservative); a reservation waits unless ``sync_commit=False``. On SQLite the same steps run
from Python inside ``BEGIN IMMEDIATE``. The steps are written once, as a generator of SQL
statements, and driven by a sync or an async transaction.

With ``lease=k`` (Postgres) a reservation statement may also book room for ``k - 1`` more
calls like it; the process grants the next calls that fit from that room (`PendingSettles`
holds the leases), with no statement, and writes each one's row with its settlement. See
`SpendLedger` and docs/decisions/0004-cost-envelopes.md.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Generator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from checkpointers.errors import outage

if TYPE_CHECKING:
    from checkpointers.aio import AsyncBackend
    from checkpointers.backend import Backend, Params, Row

__all__ = [
    "AsyncSpendLedger",
    "Limits",
    "PendingSettle",
    "Reservation",
    "SpendLedger",
    "Totals",
    "aflush_pending",
    "flush_pending",
]

log = logging.getLogger(__name__)

SETTLE_DELAY = 0.05
"""Seconds a deferred settlement may wait for the task's next statement before it is flushed."""

LEASE_IDLE = 2.0
"""Seconds a budget lease may go unused before its unused rest is given back."""


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
    lease_id: int | None = None
    """The lease this call was granted from, with no statement (`SpendLedger` ``lease``)."""


@dataclass(frozen=True)
class PendingSettle:
    """A settlement not yet written: replace reservation *id* by the call's actual figures."""

    id: int
    task_id: str
    state: str
    model: str | None
    input_tokens: int
    output_tokens: int
    nanos: int
    at: float
    lease_id: int | None = None
    """A call granted from this lease: its row is written by the settlement."""
    reserved_nanos: int = 0
    """A leased call's worst case (or, for a lease's release, unused)."""
    reserved_tokens: int = 0
    calls: int = 0
    """A lease's release: call slots it gives back."""
    granted_at: float | None = None


LeaseKey = tuple[str, str, Limits]
"""A lease serves one task, task type and set of limits."""


@dataclass
class _Lease:
    """Room booked for calls this process grants from memory (see `SpendLedger` ``lease``)."""

    id: int
    key: LeaseKey
    ids: list[int]
    """Spend ids for the calls still to grant (taken from the ledger's sequence)."""
    nanos: int
    tokens: int
    window_start: float | None
    view: Totals
    """The task's totals as they would read without the lease's unused rest."""
    used: float


@dataclass(frozen=True)
class _Held:
    """A reservation this process holds and will settle (lease mode only)."""

    key: LeaseKey
    nanos: int
    tokens: int
    lease_id: int | None
    granted_at: float


def _release_of(lease: _Lease) -> PendingSettle:
    return PendingSettle(
        lease.id,
        lease.key[0],
        "lease_release",
        None,
        0,
        0,
        lease.nanos,
        time.time(),
        reserved_tokens=lease.tokens,
        calls=len(lease.ids),
    )


def _without(totals: Totals, lease: _Lease) -> Totals:
    """*totals* as read from the ledger, less *lease*'s unused rest."""
    return replace(
        totals,
        reserved_nanos=totals.reserved_nanos - lease.nanos,
        reserved_tokens=totals.reserved_tokens - lease.tokens,
        calls=totals.calls - len(lease.ids),
        window_nanos=totals.window_nanos - (lease.nanos if lease.window_start is not None else 0),
    )


class PendingSettles:
    """A backend's deferred settlements, by task; taken by exactly one statement each.

    It also holds the process's budget leases and the reservations granted from them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_task: dict[str, list[PendingSettle]] = {}
        self.wake: threading.Condition = threading.Condition(self._lock)
        self._views: dict[str, Totals] = {}
        self._leases: dict[LeaseKey, _Lease] = {}
        self._held: dict[int, _Held] = {}

    # -- leases ---------------------------------------------------------------------------

    def grant(
        self, key: LeaseKey, nanos: int, tokens: int, window_start: float | None
    ) -> Reservation | None:
        """A reservation from the key's lease, with no statement; None if it cannot serve."""
        if not self._leases:
            return None
        with self._lock:
            lease = self._leases.get(key)
            if (
                lease is None
                or not lease.ids
                or nanos > lease.nanos
                or tokens > lease.tokens
                or lease.window_start != window_start
            ):
                return None
            spend_id = lease.ids.pop()
            lease.nanos -= nanos
            lease.tokens -= tokens
            lease.used = time.monotonic()
            v = lease.view
            lease.view = replace(
                v,
                reserved_nanos=v.reserved_nanos + nanos,
                reserved_tokens=v.reserved_tokens + tokens,
                calls=v.calls + 1,
                window_nanos=v.window_nanos + (nanos if window_start is not None else 0),
            )
            self._held[spend_id] = _Held(key, nanos, tokens, lease.id, time.time())
            return Reservation(spend_id, None, lease.view, lease.id)

    def take_lease(self, key: LeaseKey) -> PendingSettle | None:
        """End the key's lease: its release, for the caller's statement to carry."""
        if not self._leases:
            return None
        with self._lock:
            lease = self._leases.pop(key, None)
        return None if lease is None else _release_of(lease)

    def reserved(
        self,
        key: LeaseKey,
        row: dict[str, Any],
        nanos: int,
        tokens: int,
        window_start: float | None,
    ) -> Reservation:
        """Record a reservation a statement made (and the lease it opened, if any)."""
        totals = Totals.from_row(row)
        spend_id = row.get("id")
        if spend_id is None:
            return Reservation(None, row.get("refused"), self.without_lease(key, totals))
        lease_row = row.get("lease")
        with self._lock:
            self._held[spend_id] = _Held(key, nanos, tokens, None, time.time())
            if not lease_row:
                lease = self._leases.get(key)
                return Reservation(
                    spend_id, None, totals if lease is None else _without(totals, lease)
                )
            lease = _Lease(
                int(lease_row["id"]),
                key,
                [int(i) for i in lease_row["ids"]],
                int(lease_row["nanos"]),
                int(lease_row["tokens"]),
                window_start,
                totals,
                time.monotonic(),
            )
            lease.view = _without(totals, lease)
            old = self._leases.pop(key, None)
            self._leases[key] = lease
            if old is not None:  # opened beside ours by a parallel branch: give its rest back
                self._by_task.setdefault(key[0], []).append(_release_of(old))
                self.wake.notify_all()
            return Reservation(spend_id, None, lease.view)

    def without_lease(self, key: LeaseKey, totals: Totals) -> Totals:
        """*totals* read from the ledger, as this process sees them (less its lease's rest)."""
        if not self._leases:
            return totals
        with self._lock:
            lease = self._leases.get(key)
            if lease is None:
                return totals
            lease.view = _without(totals, lease)
            return lease.view

    def held(self, spend_id: int, nanos: int, tokens: int, released: bool) -> _Held | None:
        """Forget a held reservation being settled at *nanos*/*tokens*; what it was."""
        if not self._held:
            return None
        with self._lock:
            held = self._held.pop(spend_id, None)
            lease = None if held is None else self._leases.get(held.key)
            if held is not None and lease is not None:
                v = lease.view
                lease.view = replace(
                    v,
                    reserved_nanos=v.reserved_nanos - held.nanos,
                    spent_nanos=v.spent_nanos + nanos,
                    reserved_tokens=v.reserved_tokens - held.tokens,
                    spent_tokens=v.spent_tokens + tokens,
                    calls=v.calls - (1 if released else 0),
                    window_nanos=v.window_nanos
                    + ((nanos - held.nanos) if lease.window_start is not None else 0),
                )
            return held

    def release_leases(
        self,
        task_id: str | None = None,
        *,
        idle: float | None = None,
        task_type: str | None = None,
    ) -> None:
        """End leases (of *task_id*, or all; or those unused for *idle* seconds; of *task_type*).

        Their unused rest waits with the settlements, to be written by the next flush.
        """
        if not self._leases:
            return
        now = time.monotonic()
        with self._lock:
            for key, lease in list(self._leases.items()):
                if task_id is not None and key[0] != task_id:
                    continue
                if task_type is not None and key[1] != task_type:
                    continue
                if idle is not None and now - lease.used < idle:
                    continue
                del self._leases[key]
                self._by_task.setdefault(key[0], []).append(_release_of(lease))
            self.wake.notify_all()

    def lease_idle_in(self) -> float | None:
        """Seconds until the next lease goes idle (None: no lease)."""
        if not self._leases:
            return None
        with self._lock:
            if not self._leases:
                return None
            oldest = min(lease.used for lease in self._leases.values())
        return max(0.0, oldest + LEASE_IDLE - time.monotonic())

    def note_view(self, task_id: str, totals: Totals) -> None:
        """Remember the latest totals this process saw for *task_id* (bounded)."""
        with self._lock:
            if len(self._views) > 4096:
                self._views.clear()
            self._views[task_id] = totals

    def view(self, task_id: str) -> Totals | None:
        """This process's latest view of the task's totals, if any (may be stale)."""
        return self._views.get(task_id)

    def forget_view(self, task_id: str) -> None:
        """Drop the view: something wrote the task's totals without telling it."""
        with self._lock:
            self._views.pop(task_id, None)

    def add(self, settle: PendingSettle) -> bool:
        """Queue *settle*; True when the queue was empty (a flusher should be woken)."""
        with self._lock:
            was_empty = not self._by_task
            queue = self._by_task.setdefault(settle.task_id, [])
            if any(st.id == settle.id for st in queue):
                return False  # one settlement per reservation
            queue.append(settle)
            if was_empty:
                self.wake.notify_all()
            return was_empty

    def take(self, task_id: str) -> list[PendingSettle]:
        """Remove and return the task's pending settlements (the caller must write them)."""
        if not self._by_task:  # the common case, without the lock
            return []
        with self._lock:
            return self._by_task.pop(task_id, [])

    def take_all(self) -> dict[str, list[PendingSettle]]:
        """Remove and return every pending settlement, by task."""
        with self._lock:
            taken, self._by_task = self._by_task, {}
            return taken

    def peek_batches(self, task_id: str | None = None) -> list[list[PendingSettle]]:
        """The pending settlements of *task_id* (or all), one batch per task, left in place.

        A flush writes them *then* `discard`s them: until its commit the task's next statement
        still sees them and carries them too (settling twice is a no-op), so a reservation
        never runs beside a settlement that is half written.
        """
        with self._lock:
            if task_id is not None:
                return [list(self._by_task[task_id])] if self._by_task.get(task_id) else []
            return [list(batch) for batch in self._by_task.values() if batch]

    def discard(self, settles: list[PendingSettle]) -> None:
        """Forget *settles* (written); those a statement took meanwhile are gone already."""
        with self._lock:
            for st in settles:
                queue = self._by_task.get(st.task_id)
                if queue is None:
                    continue
                queue[:] = [q for q in queue if q.id != st.id]
                if not queue:
                    del self._by_task[st.task_id]

    def put_back(self, settles: list[PendingSettle]) -> None:
        """Return settlements a failed statement did not write (they are not lost)."""
        if not settles:
            return
        with self._lock:
            for st in settles:
                self._by_task.setdefault(st.task_id, []).append(st)
            self.wake.notify_all()

    def __bool__(self) -> bool:
        return bool(self._by_task)


def _settles_json(settles: list[PendingSettle]) -> str | None:
    return json.dumps([asdict(st) for st in settles]) if settles else None


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


def _sqlite_settle_many(settles: list[PendingSettle]) -> Steps:
    for st in sorted(settles, key=lambda x: x.id):
        yield from _sqlite_settle(
            st.id, st.state, st.model, st.input_tokens, st.output_tokens, st.nanos, st.at
        )


def _sqlite_then(settles: list[PendingSettle], steps: Steps) -> Steps:
    """Apply *settles*, then run *steps*, in one transaction."""
    yield from _sqlite_settle_many(settles)
    return (yield from steps)


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


# --- where deferred settlements wait -------------------------------------------------------


def _write_sync(backend: Backend, settles: list[PendingSettle]) -> None:
    """Write one task's *settles* in one transaction."""
    if backend.dialect == "postgres":
        backend.execute(
            "SELECT harness_spend_flush(%s::jsonb, %s)",
            (_settles_json(settles), settles[0].task_id),
        )
        return
    with backend.transaction() as tx:
        _run_sync(tx, _sqlite_settle_many(settles))


async def _write_async(backend: AsyncBackend, settles: list[PendingSettle]) -> None:
    if backend.dialect == "postgres":
        await backend.execute(
            "SELECT harness_spend_flush(%s::jsonb, %s)",
            (_settles_json(settles), settles[0].task_id),
        )
        return
    async with backend.transaction() as tx:
        await _run_async(tx, _sqlite_settle_many(settles))


def _write_at_exit(
    target: tuple[str, str], batches: list[list[PendingSettle]], pending: PendingSettles
) -> None:
    """Write *batches* through a connection of their own, sync (the event loop is gone).

    Each batch is forgotten once written; a failure leaves the rest pending.
    """
    kind, where = target
    if kind == "postgres":
        import psycopg

        # Exiting must end: a database that does not answer is given seconds, not forever.
        with psycopg.connect(
            where,
            autocommit=True,
            prepare_threshold=0,
            connect_timeout=5,
            options="-c statement_timeout=5000",
        ) as conn:
            for settles in batches:
                conn.execute(
                    "SELECT harness_spend_flush(%s::jsonb, %s)",
                    (_settles_json(settles), settles[0].task_id),
                )
                pending.discard(settles)
        return
    from checkpointers.backend import _SqliteDB

    db = _SqliteDB(where)
    try:
        for settles in batches:
            with db.transaction() as tx:
                _run_sync(tx, _sqlite_settle_many(settles))
            pending.discard(settles)
    finally:
        db.close()


# A reservation whose statement an interrupt cut short (a ``KeyboardInterrupt`` as its COMMIT
# returned, a task cancelled while aiosqlite ran it): the caller never got it, so no call is
# made on it, yet its worst case stayed booked for good. SQLite committed or rolled back by
# then, so the row, if there (known by its task and time), is released. On Postgres a
# cut-short statement may still land later: it stays booked (the safe side).
_CUT_SHORT = (
    "SELECT id FROM harness_spend WHERE task_id = %s AND state = 'reserved' AND created_at = %s"
)


def _cut_short_on_sqlite(dialect: str, error: BaseException) -> bool:
    """An interrupt, not an error (those the caller sees), cut a SQLite statement short."""
    return dialect == "sqlite" and not isinstance(error, Exception)


def _write_failed(error: BaseException, strict: bool) -> bool:
    """A flush's write failed (what it did not write is still pending): raise or say False."""
    if strict or not isinstance(error, Exception):
        raise error
    log.warning("spend settlements kept pending, write failed: %s", error)
    return False


class _SyncPending:
    """A `Backend`'s pending settlements and the daemon thread that flushes them."""

    def __init__(self, backend: Backend) -> None:
        self.pending = PendingSettles()
        self.delay = SETTLE_DELAY
        self._backend = weakref.ref(backend)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, settle: PendingSettle) -> None:
        self.pending.add(settle)
        if self._thread is None and not self._stopped:
            with self.pending.wake:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="harness-spend-flusher", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        cond = self.pending.wake
        while True:
            with cond:
                while not self.pending and not self._stopped:
                    if self.pending._leases:  # wake when the oldest lease goes idle
                        oldest = min(lease.used for lease in self.pending._leases.values())
                        left = oldest + LEASE_IDLE - time.monotonic()
                        if left <= 0:
                            break
                        cond.wait(left)
                    else:
                        cond.wait()
                if not self._stopped and self.pending:
                    # Give the task's next statement `delay` seconds to carry them (not cut
                    # short by new arrivals: only a stop ends the wait early).
                    deadline = time.monotonic() + self.delay
                    while not self._stopped and (left := deadline - time.monotonic()) > 0:
                        cond.wait(left)
                if self._stopped:
                    return
            self.pending.release_leases(idle=LEASE_IDLE)
            if self.pending and not self.flush():
                time.sleep(1.0)  # the database is unreachable: retry later, keep them pending

    def flush(self, task_id: str | None = None, *, strict: bool = False) -> bool:
        """Write the pending settlements (of *task_id*, or all), a transaction per task.

        They stay pending until written (`PendingSettles.peek_batches`). On a failed write:
        False, or the error when *strict*.
        """
        backend = self._backend()
        if backend is None or backend._closed:
            return True
        for settles in self.pending.peek_batches(task_id):
            try:
                _write_sync(backend, settles)
            except BaseException as e:
                return _write_failed(e, strict)
            self.pending.discard(settles)
        return True

    def close(self) -> None:
        """Stop the flusher, end the leases, write what is pending (before the backend closes)."""
        with self.pending.wake:
            self._stopped = True
            self.pending.wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        self.pending.release_leases()
        self.flush()


class _AsyncPending:
    """An `AsyncBackend`'s pending settlements, flushed by a timer on the event loop."""

    close_timeout = 10.0
    """Seconds `close` waits for a flush in flight (the sync flusher's thread: the same)."""

    def __init__(self, backend: AsyncBackend) -> None:
        self.pending = PendingSettles()
        self.delay = SETTLE_DELAY
        self._backend = weakref.ref(backend)
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exit_target = backend._exit_target
        self._closed = False

    def add(self, settle: PendingSettle) -> None:
        self.pending.add(settle)
        self._schedule(self.delay)

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer.when() <= loop.time() + delay:
                return
            self._timer.cancel()  # a lease's idle check, later than this flush is due
        self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._flush_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_later(self) -> None:
        self.pending.release_leases(idle=LEASE_IDLE)
        if not await self.flush():
            self._schedule(1.0)
        elif (idle_in := self.pending.lease_idle_in()) is not None:
            self._schedule(idle_in + 0.01)  # end the lease once idle

    async def flush(self, task_id: str | None = None, *, strict: bool = False) -> bool:
        """`_SyncPending.flush`, on the event loop."""
        backend = self._backend()
        if backend is None or backend._closed:
            return True
        for settles in self.pending.peek_batches(task_id):
            try:
                await _write_async(backend, settles)
            except BaseException as e:
                return _write_failed(e, strict)
            self.pending.discard(settles)
        return True

    async def close(self) -> None:
        """Let a flush in flight finish, cancel the timer, end the leases, write what is pending.

        Before the backend closes: a flush still writing when the connection closed under it
        failed, and what it carried was kept pending in a store about to go away. A flush that
        hangs (a database that stopped answering) is waited for `close_timeout` seconds, as
        the sync flusher's thread is: closing must end.
        """
        self._closed = True
        if self._tasks:
            _, hung = await asyncio.wait(set(self._tasks), timeout=self.close_timeout)
            if hung:
                log.warning("a spend settlement flush did not finish in %gs", self.close_timeout)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pending.release_leases()
        await self.flush()

    def write_at_exit(self) -> None:
        """The process exits with the backend never closed: write what is pending anyway.

        ``asyncio.run`` returns right after the last call, the timer's flush never runs and
        the loop is closed, so the settlements go through a sync connection of their own (as
        the sync backend's go at exit). What cannot be written is logged: those calls stay
        booked at their reserved worst case until their tasks resume (the checkpointed answers
        settle them) and leases keep their unused rest. memory:// has nothing to write: its
        ledger ends with the process.
        """
        if self._closed:
            return  # close() wrote them, or logged why it could not
        self.pending.release_leases()
        batches = self.pending.peek_batches()
        if not batches or self._exit_target is None:
            return
        try:
            _write_at_exit(self._exit_target, batches, self.pending)
        except Exception as e:
            lost = self.pending.peek_batches()
            tasks = sorted({settles[0].task_id for settles in lost})
            log.warning(
                "an AsyncBackend left open at exit: %d spend settlement(s) of task(s) %s could "
                "not be written (%s); the ledger keeps those calls at their reserved worst case "
                "until the tasks resume. Close the backend (async with) to write them.",
                sum(map(len, lost)),
                ", ".join(tasks[:10]) + (" ..." if len(tasks) > 10 else ""),
                e,
            )
            return
        log.info(
            "an AsyncBackend left open at exit: wrote its %d pending spend settlement(s)",
            sum(map(len, batches)),
        )


_ORPHANED: list[_AsyncPending] = []
"""Stores of AsyncBackends collected unclosed with settlements pending: written at exit."""


def _orphaned(store: _AsyncPending) -> None:
    """An AsyncBackend was collected unclosed: keep its store if it holds anything unwritten."""
    if not store._closed and (store.pending or store.pending._leases):
        _ORPHANED.append(store)


_REGISTRY_LOCK = threading.Lock()
_SYNC_PENDING: weakref.WeakKeyDictionary[Any, _SyncPending] = weakref.WeakKeyDictionary()
_ASYNC_PENDING: weakref.WeakKeyDictionary[Any, _AsyncPending] = weakref.WeakKeyDictionary()


def _sync_pending(backend: Backend) -> _SyncPending:
    store = _SYNC_PENDING.get(backend)
    if store is None:
        with _REGISTRY_LOCK:
            store = _SYNC_PENDING.get(backend)
            if store is None:
                store = _SYNC_PENDING[backend] = _SyncPending(backend)
                backend._before_close.append(store.close)
    return store


def _async_pending(backend: AsyncBackend) -> _AsyncPending:
    store = _ASYNC_PENDING.get(backend)
    if store is None:
        with _REGISTRY_LOCK:
            store = _ASYNC_PENDING.get(backend)
            if store is None:
                store = _ASYNC_PENDING[backend] = _AsyncPending(backend)
                backend._before_close.append(store.close)
                # A backend dropped without close() (collected with main()'s locals when
                # asyncio.run returns) takes the registry's entry with it: keep its store.
                weakref.finalize(backend, _orphaned, store).atexit = False
    return store


@atexit.register
def _flush_at_exit() -> None:
    for store in list(_SYNC_PENDING.values()):
        store.close()
    stores = {id(s): s for s in [*_ASYNC_PENDING.values(), *_ORPHANED]}
    for astore in stores.values():
        astore.write_at_exit()


def flush_pending(backend: Backend, task_id: str | None = None) -> None:
    """Write *backend*'s deferred settlements now (of *task_id*, or all), before reading spend.

    Budget leases end too (their unused rest is given back), so the ledger reads exact.
    Raises what the database raises (an outage: `BackendUnavailable`); the settlements stay
    pending then.
    """
    with outage(backend, "spend ledger"):
        store = _SYNC_PENDING.get(backend)
        if store is not None:
            store.pending.release_leases(task_id)
            if store.pending:
                store.flush(task_id, strict=True)


async def aflush_pending(backend: AsyncBackend, task_id: str | None = None) -> None:
    """`flush_pending` for an `AsyncBackend`."""
    with outage(backend, "spend ledger"):
        store = _ASYNC_PENDING.get(backend)
        if store is not None:
            store.pending.release_leases(task_id)
            if store.pending:
                await store.flush(task_id, strict=True)


# --- the ledgers ---------------------------------------------------------------------------

_TOTALS_PG = "SELECT harness_spend_totals_v2(%s::jsonb, %s, %s, %s, %s) AS r"
_RESERVE_PG = (
    "SELECT harness_spend_reserve_v3(%s::jsonb, "
    "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) AS r"
)
_SETTLE_PG = "SELECT harness_spend_settle_v2(%s, %s, %s, %s, %s, %s, %s) AS r"
_LEASE_PG = (
    "SELECT harness_spend_reserve_v4(%s::jsonb, "
    "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) AS r"
)


def _reserve_params(
    settles: list[PendingSettle],
    task_id: str,
    task_type: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    nanos: int,
    limits: Limits,
    now: float,
    sync: bool,
) -> tuple[Any, ...]:
    return (
        _settles_json(settles),
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
        sync,
    )


def _pending_settle(
    pending: PendingSettles,
    task_id: str,
    spend_id: int,
    input_tokens: int,
    output_tokens: int,
    nanos: int,
    model: str | None,
    released: bool,
    lease: tuple[int, int, int] | None,
) -> PendingSettle:
    state = "released" if released else "settled"
    held = pending.held(spend_id, nanos, input_tokens + output_tokens, released)
    if held is not None and held.lease_id is not None:
        lease = (held.lease_id, held.nanos, held.tokens)
    if lease is None:
        return PendingSettle(
            spend_id, task_id, state, model, input_tokens, output_tokens, nanos, time.time()
        )
    return PendingSettle(
        spend_id,
        task_id,
        state,
        model,
        input_tokens,
        output_tokens,
        nanos,
        time.time(),
        lease_id=lease[0],
        reserved_nanos=lease[1],
        reserved_tokens=lease[2],
        granted_at=None if held is None else held.granted_at,
    )


class _Ledger:
    """What `SpendLedger` and `AsyncSpendLedger` share: everything but the I/O."""

    backend: Any
    _store: _SyncPending | _AsyncPending

    def __init__(self, backend: Any, *, sync_commit: bool, lease: int) -> None:
        self.backend = backend
        self.sync_commit = sync_commit
        """Postgres: wait for each reservation's WAL flush (settlements never wait)."""
        self.lease = lease
        """Calls' worth of room a reservation may book at once (1: no lease)."""
        self._leasing = lease > 1 and backend.dialect == "postgres"

    def _totals_statement(
        self, settles: list[PendingSettle], task_id: str, task_type: str, limits: Limits, now: float
    ) -> tuple[str, tuple[Any, ...]]:
        start = limits.window_start(now)
        return _TOTALS_PG, (
            _settles_json(settles),
            task_id,
            limits.window_seconds,
            start,
            task_type,
        )

    def _totals_read(self, key: LeaseKey, rows: list[Row]) -> Totals:
        return self._store.pending.without_lease(key, Totals.from_row(_pg_json(rows)))

    def _granted(self, key: LeaseKey, tokens: int, nanos: int, now: float) -> Reservation | None:
        """A reservation from this process's lease, with no statement (lease mode)."""
        if not self._leasing:
            return None
        return self._store.pending.grant(key, nanos, tokens, key[2].window_start(now))

    def _carried(self, key: LeaseKey) -> list[PendingSettle]:
        """What the task's next statement carries: its settlements and a spent lease's release."""
        settles = self._store.pending.take(key[0])
        if self._leasing and (ended := self._store.pending.take_lease(key)) is not None:
            settles.append(ended)
        return settles

    def _hold_back(self, task_type: str) -> bool:
        """Whether this process holds spend the ledger still books above the truth.

        Settlements not yet written (calls of any task, each still at its worst case) and
        leases of *task_type* (their unused rest): a window of the type reads that much too
        high. The leases end here; their rest waits with the settlements, for the flush that
        follows to give back.
        """
        pending = self._store.pending
        pending.release_leases(task_type=task_type)
        return bool(pending)

    def _reserve_statement(
        self,
        settles: list[PendingSettle],
        key: LeaseKey,
        model: str,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        now: float,
    ) -> tuple[str, tuple[Any, ...]]:
        task_id, task_type, limits = key
        params = _reserve_params(
            settles,
            task_id,
            task_type,
            model,
            input_tokens,
            output_tokens,
            nanos,
            limits,
            now,
            self.sync_commit,
        )
        if not self._leasing:
            return _RESERVE_PG, params
        return _LEASE_PG, (*params, self.lease - 1)

    def _reserved(
        self, key: LeaseKey, rows: list[Row], tokens: int, nanos: int, now: float
    ) -> Reservation:
        r = _pg_json(rows)
        if not self._leasing:
            return Reservation(r.get("id"), r.get("refused"), Totals.from_row(r))
        return self._store.pending.reserved(key, r, nanos, tokens, key[2].window_start(now))

    def _sqlite_reserve_steps(
        self,
        settles: list[PendingSettle],
        key: LeaseKey,
        model: str,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        now: float,
    ) -> Steps:
        task_id, task_type, limits = key
        return _sqlite_then(
            settles,
            _sqlite_reserve(
                task_id, task_type, model, input_tokens, output_tokens, nanos, limits, now
            ),
        )

    def _held_key(self, spend_id: int) -> LeaseKey | None:
        """Lease mode: the key of a reservation this process holds (settled via the totals)."""
        held = self._store.pending._held.get(spend_id)
        return None if held is None else held.key

    def defer_settle(
        self,
        task_id: str,
        spend_id: int,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        *,
        model: str | None = None,
        released: bool = False,
        lease: tuple[int, int, int] | None = None,
    ) -> None:
        """`settle`, carried by the task's next statement (or flushed shortly after).

        *lease* — ``(lease id, reserved nanos, reserved tokens)`` — settles a call granted
        from a lease that this process does not hold (recovered from a checkpoint). With an
        `AsyncBackend`, call it from the backend's event loop (the flush timer runs there).
        """
        self._store.add(
            _pending_settle(
                self._store.pending,
                task_id,
                spend_id,
                input_tokens,
                output_tokens,
                nanos,
                model,
                released,
                lease,
            )
        )


class SpendLedger(_Ledger):
    """Spend of tasks, in a `Backend`'s ``harness_spend*`` tables.

    With ``lease=k`` (Postgres), a reservation that needs a statement also books room for
    ``k - 1`` more calls like it (when that leaves at least as much again under every limit);
    the next calls of the task that fit are granted from that room in memory, with no round
    trip, and each one's row is written with its settlement. The unused rest goes back when
    the lease cannot serve a call, after `LEASE_IDLE` seconds unused, on `flush_pending`, at
    ``close()`` and at exit; a process killed holding a lease leaves that rest booked (the
    safe side: the task has less room, never more).

    A statement that cannot reach the database (a dropped connection, the pool's wait for
    one running out) raises `BackendUnavailable`, chained from the driver's error. Each
    statement is one transaction, so a reservation or settlement is written whole or not at
    all (one committed just before the connection dropped stays booked at its worst case: the
    safe side); the deferred settlements it carried stay pending.
    """

    backend: Backend
    _store: _SyncPending

    def __init__(self, backend: Backend, *, sync_commit: bool = True, lease: int = 1) -> None:
        super().__init__(backend, sync_commit=sync_commit, lease=lease)
        self._store = _sync_pending(backend)

    def totals(self, task_id: str, task_type: str, limits: Limits) -> Totals:
        """The task's current totals (and its type's window), deferred settlements applied."""
        with outage(self.backend, "spend ledger"):
            now = time.time()
            settles = self._store.pending.take(task_id)
            try:
                if self.backend.dialect == "postgres":
                    sql, params = self._totals_statement(settles, task_id, task_type, limits, now)
                    return self._totals_read(
                        (task_id, task_type, limits), self.backend.execute(sql, params)
                    )
                with self.backend.transaction() as tx:
                    result: Totals = _run_sync(
                        tx, _sqlite_then(settles, _sqlite_totals(task_id, task_type, limits, now))
                    )
                return result
            except BaseException:
                self._store.pending.put_back(settles)
                raise

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
        """Reserve *nanos* and the tokens for one call if every limit still holds, atomically.

        The task's deferred settlements are applied first, in the same transaction. A window
        refusal is final only once this process holds nothing the window still books above
        the truth (`flush_held`): other tasks' calls settled here but not yet written.
        """
        now, key, tokens = time.time(), (task_id, task_type, limits), input_tokens + output_tokens
        granted = self._granted(key, tokens, nanos, now)
        if granted is not None:
            return granted
        r = self._reserve(key, model, input_tokens, output_tokens, nanos, now)
        if r.refused == "window_usd" and self.flush_held(task_type):
            r = self._reserve(key, model, input_tokens, output_tokens, nanos, time.time())
        return r

    def _reserve(
        self,
        key: LeaseKey,
        model: str,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        now: float,
    ) -> Reservation:
        """One reservation statement, carrying the task's deferred settlements."""
        with outage(self.backend, "spend ledger"):
            settles = self._carried(key)
            try:
                if self.backend.dialect == "postgres":
                    sql, params = self._reserve_statement(
                        settles, key, model, input_tokens, output_tokens, nanos, now
                    )
                    rows = self.backend.execute(sql, params)
                    return self._reserved(key, rows, input_tokens + output_tokens, nanos, now)
                steps = self._sqlite_reserve_steps(
                    settles, key, model, input_tokens, output_tokens, nanos, now
                )
                with self.backend.transaction() as tx:
                    res: Reservation = _run_sync(tx, steps)
                return res
            except BaseException as e:
                self._store.pending.put_back(settles)
                if _cut_short_on_sqlite(self.backend.dialect, e):
                    for spend_id in self._reserved_at(key[0], now):
                        self.settle(spend_id, 0, 0, 0, released=True)
                raise

    def _reserved_at(self, task_id: str, now: float) -> list[int]:
        """The reservation written at *now*, if its transaction committed (see `_CUT_SHORT`)."""
        with contextlib.suppress(Exception):  # the interrupt is what is reported
            return [int(r["id"]) for r in self.backend.execute(_CUT_SHORT, (task_id, now))]
        return []

    def flush_held(self, task_type: str) -> bool:
        """Write what this process holds that the ledger books above the truth; True if any.

        Before a window refusal or a stop is final: a call settled in this process waits
        ``SETTLE_DELAY`` for its own task's next statement, and until then every *other* task
        of the type reads the window with that call's worst case in it. So the settlements of
        every task are written (a transaction each) and this process's leases of
        *task_type* end (their unused rest goes back). True means a new read or reservation
        may now fit; False, that nothing was held (or a write failed: it stays pending).
        """
        return self._hold_back(task_type) and self._store.flush()

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
        """Replace a reservation by the call's actual usage (or release it), now. Idempotent."""
        with outage(self.backend, "spend ledger"):
            now = time.time()
            state = "released" if released else "settled"
            key = self._held_key(spend_id)
            if key is not None:  # lease mode: through the task's totals, which carry it
                self.defer_settle(
                    key[0],
                    spend_id,
                    input_tokens,
                    output_tokens,
                    nanos,
                    model=model,
                    released=released,
                )
                return self.totals(*key)
            if self.backend.dialect == "postgres":
                rows = self.backend.execute(
                    _SETTLE_PG, (spend_id, state, model, input_tokens, output_tokens, nanos, now)
                )
                return Totals.from_row(_pg_json(rows))
            with self.backend.transaction() as tx:
                result: Totals = _run_sync(
                    tx,
                    _sqlite_settle(spend_id, state, model, input_tokens, output_tokens, nanos, now),
                )
            return result

    def flush(self, task_id: str | None = None) -> None:
        """Write deferred settlements now (of *task_id*, or all); leases end too."""
        flush_pending(self.backend, task_id)

    def by_model(self, task_id: str) -> list[Row]:
        """Settled spend per model: ``model, input_tokens, output_tokens, nanos, calls``."""
        with outage(self.backend, "spend ledger"):
            if self._store.pending:
                self._store.flush(task_id, strict=True)
            return self.backend.execute(_BY_MODEL_SQL, (task_id,))


class AsyncSpendLedger(_Ledger):
    """`SpendLedger` over an `AsyncBackend`."""

    backend: AsyncBackend
    _store: _AsyncPending

    def __init__(self, backend: AsyncBackend, *, sync_commit: bool = True, lease: int = 1) -> None:
        super().__init__(backend, sync_commit=sync_commit, lease=lease)
        self._store = _async_pending(backend)

    async def totals(self, task_id: str, task_type: str, limits: Limits) -> Totals:
        """The task's current totals (and its type's window), deferred settlements applied."""
        with outage(self.backend, "spend ledger"):
            now = time.time()
            settles = self._store.pending.take(task_id)
            try:
                if self.backend.dialect == "postgres":
                    sql, params = self._totals_statement(settles, task_id, task_type, limits, now)
                    rows = await self.backend.execute(sql, params)
                    return self._totals_read((task_id, task_type, limits), rows)
                async with self.backend.transaction() as tx:
                    result: Totals = await _run_async(
                        tx, _sqlite_then(settles, _sqlite_totals(task_id, task_type, limits, now))
                    )
                return result
            except BaseException:
                self._store.pending.put_back(settles)
                raise

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
        """`SpendLedger.reserve`: a window refusal is final once nothing is held here."""
        now, key, tokens = time.time(), (task_id, task_type, limits), input_tokens + output_tokens
        granted = self._granted(key, tokens, nanos, now)
        if granted is not None:
            return granted
        r = await self._reserve(key, model, input_tokens, output_tokens, nanos, now)
        if r.refused == "window_usd" and await self.flush_held(task_type):
            r = await self._reserve(key, model, input_tokens, output_tokens, nanos, time.time())
        return r

    async def _reserve(
        self,
        key: LeaseKey,
        model: str,
        input_tokens: int,
        output_tokens: int,
        nanos: int,
        now: float,
    ) -> Reservation:
        """One reservation statement, carrying the task's deferred settlements."""
        with outage(self.backend, "spend ledger"):
            settles = self._carried(key)
            try:
                if self.backend.dialect == "postgres":
                    sql, params = self._reserve_statement(
                        settles, key, model, input_tokens, output_tokens, nanos, now
                    )
                    rows = await self.backend.execute(sql, params)
                    return self._reserved(key, rows, input_tokens + output_tokens, nanos, now)
                steps = self._sqlite_reserve_steps(
                    settles, key, model, input_tokens, output_tokens, nanos, now
                )
                async with self.backend.transaction() as tx:
                    res: Reservation = await _run_async(tx, steps)
                return res
            except BaseException as e:
                self._store.pending.put_back(settles)
                if _cut_short_on_sqlite(self.backend.dialect, e):
                    for spend_id in await self._reserved_at(key[0], now):
                        await self.settle(spend_id, 0, 0, 0, released=True)
                raise

    async def _reserved_at(self, task_id: str, now: float) -> list[int]:
        """`SpendLedger._reserved_at`: queued behind the transaction's COMMIT or ROLLBACK."""
        with contextlib.suppress(Exception):
            rows = await self.backend.execute(_CUT_SHORT, (task_id, now))
            return [int(r["id"]) for r in rows]
        return []

    async def flush_held(self, task_type: str) -> bool:
        """`SpendLedger.flush_held`, on the event loop."""
        return self._hold_back(task_type) and await self._store.flush()

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
        """Replace a reservation by the call's actual usage (or release it), now. Idempotent."""
        with outage(self.backend, "spend ledger"):
            now = time.time()
            state = "released" if released else "settled"
            key = self._held_key(spend_id)
            if key is not None:  # lease mode: through the task's totals, which carry it
                self.defer_settle(
                    key[0],
                    spend_id,
                    input_tokens,
                    output_tokens,
                    nanos,
                    model=model,
                    released=released,
                )
                return await self.totals(*key)
            if self.backend.dialect == "postgres":
                rows = await self.backend.execute(
                    _SETTLE_PG, (spend_id, state, model, input_tokens, output_tokens, nanos, now)
                )
                return Totals.from_row(_pg_json(rows))
            async with self.backend.transaction() as tx:
                result: Totals = await _run_async(
                    tx,
                    _sqlite_settle(spend_id, state, model, input_tokens, output_tokens, nanos, now),
                )
            return result

    async def flush(self, task_id: str | None = None) -> None:
        """Write deferred settlements now (of *task_id*, or all); leases end too."""
        await aflush_pending(self.backend, task_id)

    async def by_model(self, task_id: str) -> list[Row]:
        """Settled spend per model: ``model, input_tokens, output_tokens, nanos, calls``."""
        with outage(self.backend, "spend ledger"):
            if self._store.pending:
                await self._store.flush(task_id, strict=True)
            return await self.backend.execute(_BY_MODEL_SQL, (task_id,))
