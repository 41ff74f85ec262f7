"""Deferred settlements: one ledger statement per model call, and no settlement lost.

A budgeted call's settlement is not a statement of its own: it waits in the backend's
pending settlements and the task's next ledger statement applies it first (or the flusher
writes it ``SETTLE_DELAY`` seconds later, or ``close()`` does). These tests pin that down on
every backend, and the recovery of a settlement that died with its process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from checkpointers import AsyncBackend, Backend, open_backend
from checkpointers._spend import (
    SETTLE_DELAY,
    _async_pending,
    _sync_pending,
    aflush_pending,
    flush_pending,
)
from harness_nodes import Envelope, budgeted
from harness_nodes.pricing import Pricing
from harness_nodes.testing import ScriptedChatModel, ai

USAGE = {"input_tokens": 1_000, "output_tokens": 200}
COST = Pricing().cost_nanos("gpt-4o", 1_000, 200)


def _model() -> ScriptedChatModel:
    return ScriptedChatModel(script=[ai("Paris.", usage=USAGE)], loop=True, model_name="gpt-4o")


def _rows(backend: Backend, task_id: str) -> list[dict[str, Any]]:
    return backend.execute(
        "SELECT state, cost_nanos FROM harness_spend WHERE task_id = %s ORDER BY id", (task_id,)
    )


def _totals(backend: Backend, task_id: str) -> dict[str, Any]:
    rows = backend.execute(
        "SELECT reserved_nanos, spent_nanos, calls FROM harness_spend_tasks WHERE task_id = %s",
        (task_id,),
    )
    return rows[0]


class _Counting:
    """Counts the statements *backend* runs on the calling thread (transactions count once)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.caller, self.sent = backend, threading.get_ident(), 0
        self._execute, self._transaction = backend.execute, backend.transaction
        self.reads = 0  # statements other than a reservation

    def __enter__(self) -> _Counting:
        def execute(sql: str, params: Any = ()) -> Any:
            if threading.get_ident() == self.caller:
                self.sent += 1
                self.reads += "reserve" not in sql
            return self._execute(sql, params)

        def transaction() -> Any:  # SQLite: reservations and reads are transactions
            self.sent += threading.get_ident() == self.caller
            return self._transaction()

        self.backend.execute = execute  # type: ignore[method-assign]
        self.backend.transaction = transaction  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.execute = self._execute  # type: ignore[method-assign]
        self.backend.transaction = self._transaction  # type: ignore[method-assign]


def test_a_call_costs_one_ledger_statement_and_its_settlement_rides_on_the_next(
    backend: Backend,
) -> None:
    llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    config: Any = {"configurable": {"thread_id": "fold"}}
    with _Counting(backend) as counting:
        for _ in range(5):
            assert llm.invoke("capital of France?", config).content == "Paris."
    assert counting.sent == 5  # one reservation each; settlements carried, not sent
    flush_pending(backend)
    assert _rows(backend, "fold") == [{"state": "settled", "cost_nanos": COST}] * 5
    assert _totals(backend, "fold") == {"reserved_nanos": 0, "spent_nanos": 5 * COST, "calls": 5}


def test_the_flusher_writes_a_settlement_no_statement_carried(backend: Backend) -> None:
    llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    llm.invoke("hi", {"configurable": {"thread_id": "idle"}})
    deadline = time.monotonic() + 5
    while _rows(backend, "idle")[0]["state"] == "reserved" and time.monotonic() < deadline:
        time.sleep(SETTLE_DELAY / 5)
    assert _rows(backend, "idle") == [{"state": "settled", "cost_nanos": COST}]
    assert _totals(backend, "idle")["reserved_nanos"] == 0


def test_closing_the_backend_writes_pending_settlements(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        store = _sync_pending(backend)
        store.delay = 3600.0  # the flusher would not get to them before close
        llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
        llm.invoke("hi", {"configurable": {"thread_id": "closing"}})
        assert store.pending  # still pending when the backend closes
    with open_backend(durable_url) as backend:
        assert _rows(backend, "closing") == [{"state": "settled", "cost_nanos": COST}]


def test_a_settlement_lost_with_its_process_is_recovered_from_the_checkpointed_answer(
    backend: Backend,
) -> None:
    config: Any = {"configurable": {"thread_id": "died"}}
    first = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    answer = first.invoke([HumanMessage("hi")], config)
    lost = _sync_pending(backend).pending.take_all()  # what a kill -9 does to memory
    assert [st.id for sts in lost.values() for st in sts] == [
        answer.additional_kwargs["harness"]["budget"]["spend_id"]
    ]
    flush_pending(backend)
    assert _rows(backend, "died")[0]["state"] == "reserved"  # the worst case stays booked
    # A new process resumes the task with the checkpointed history (the answer included).
    history: list[BaseMessage] = [HumanMessage("hi"), answer, HumanMessage("and Spain?")]
    second = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    second.invoke(history, config)
    flush_pending(backend)
    assert _rows(backend, "died") == [{"state": "settled", "cost_nanos": COST}] * 2
    assert _totals(backend, "died") == {"reserved_nanos": 0, "spent_nanos": 2 * COST, "calls": 2}


def test_an_answer_of_another_task_is_not_settled_against_this_one(backend: Backend) -> None:
    llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    answer = llm.invoke("hi", {"configurable": {"thread_id": "a"}})
    _sync_pending(backend).pending.take_all()  # task a's settlement is lost
    other = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    other.invoke(
        [HumanMessage("hi"), answer, HumanMessage("more")], {"configurable": {"thread_id": "b"}}
    )
    flush_pending(backend)
    assert _rows(backend, "a")[0]["state"] == "reserved"  # b's call did not touch a's row
    assert _rows(backend, "b") == [{"state": "settled", "cost_nanos": COST}]


@pytest.mark.postgres
def test_a_failed_statement_keeps_the_settlements_it_carried(postgres_url: str) -> None:
    with open_backend(postgres_url) as backend:
        llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
        config: Any = {"configurable": {"thread_id": "broken"}}
        store = _sync_pending(backend)
        store.delay = 3600.0
        llm.invoke("hi", config)
        backend.execute("ALTER FUNCTION harness_spend_reserve_v3 RENAME TO reserve_v3_away")
        try:
            with pytest.raises(Exception, match="harness_spend_reserve_v3"):
                llm.invoke("hi", config)
        finally:
            backend.execute("ALTER FUNCTION reserve_v3_away RENAME TO harness_spend_reserve_v3")
        assert store.pending  # the first call's settlement was put back, not lost
        assert isinstance(llm.invoke("hi", config), AIMessage)
        flush_pending(backend)
        assert _rows(backend, "broken") == [{"state": "settled", "cost_nanos": COST}] * 2


@pytest.mark.anyio
async def test_async_settlements_ride_on_the_next_statement_and_the_timer_flushes(
    abackend: AsyncBackend,
) -> None:
    llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=abackend)
    for _ in range(3):
        await llm.ainvoke("hi", {"configurable": {"thread_id": "async"}})
    deadline = time.monotonic() + 5
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = await abackend.execute(
            "SELECT state FROM harness_spend WHERE task_id = %s", ("async",)
        )
        if all(r["state"] == "settled" for r in rows):
            break
        await _sleep(SETTLE_DELAY / 5)
    assert rows == [{"state": "settled"}] * 3
    await llm.ainvoke("hi", {"configurable": {"thread_id": "async"}})
    await aflush_pending(abackend)
    total = await abackend.execute(
        "SELECT spent_nanos, reserved_nanos FROM harness_spend_tasks WHERE task_id = %s",
        ("async",),
    )
    assert total == [{"spent_nanos": 4 * COST, "reserved_nanos": 0}]


@pytest.mark.anyio
async def test_closing_an_async_backend_while_its_flusher_writes_loses_nothing(
    durable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The app shuts down just as the flusher's timer fires: close() must not close the
    # connection under the flush in flight (its write failed, "kept pending" in a backend
    # that is going away: the settlement was lost, the call left at its reservation).
    from checkpointers import aopen_backend

    backend = await aopen_backend(durable_url)
    store = _async_pending(backend)
    store.delay = 3600.0
    llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    await llm.ainvoke("hi", {"configurable": {"thread_id": "closing-async"}})
    assert store.pending
    store._fire()  # the timer's flush starts...
    with caplog.at_level("WARNING"):
        await backend.close()  # ...and the backend closes
    assert "write failed" not in caplog.text
    with open_backend(durable_url) as reopened:
        assert _rows(reopened, "closing-async") == [{"state": "settled", "cost_nanos": COST}]


@pytest.mark.anyio
async def test_closing_an_async_backend_does_not_wait_for_a_hung_flush_forever(
    durable_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The database stopped answering the flusher's write: close() waits for it a while (as
    # the sync flusher's thread is joined with a timeout), then writes what is pending itself.
    import asyncio

    import checkpointers._spend as spend
    from checkpointers import aopen_backend

    backend = await aopen_backend(durable_url)
    store = _async_pending(backend)
    store.delay, store.close_timeout = 3600.0, 0.2
    llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
    await llm.ainvoke("hi", {"configurable": {"thread_id": "hung"}})
    write, hung = spend._write_async, asyncio.Event()

    async def first_write_hangs(*args: Any) -> None:
        if not hung.is_set():
            hung.set()
            await asyncio.Event().wait()  # never answers
        await write(*args)

    monkeypatch.setattr(spend, "_write_async", first_write_hangs)
    store._fire()
    await asyncio.sleep(0)
    with caplog.at_level("WARNING"):
        await asyncio.wait_for(backend.close(), timeout=10)
    assert hung.is_set() and "did not finish in 0.2s" in caplog.text
    with open_backend(durable_url) as reopened:
        assert _rows(reopened, "hung") == [{"state": "settled", "cost_nanos": COST}]


@pytest.mark.anyio
async def test_leaving_an_async_backend_s_context_writes_pending_settlements(
    durable_url: str,
) -> None:
    from checkpointers import aopen_backend

    async with await aopen_backend(durable_url) as backend:
        store = _async_pending(backend)
        store.delay = 3600.0  # the timer would not get to them before the block ends
        llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
        await llm.ainvoke("hi", {"configurable": {"thread_id": "leaving"}})
        assert store.pending
    with open_backend(durable_url) as reopened:
        assert _rows(reopened, "leaving") == [{"state": "settled", "cost_nanos": COST}]


_EXITS_UNCLOSED = """
import asyncio, sys
from checkpointers import aopen_backend
from checkpointers._spend import _async_pending
from harness_nodes import Envelope, budgeted
from harness_nodes.testing import ScriptedChatModel, ai

async def main(url: str) -> None:
    backend = await aopen_backend(url)
    model = ScriptedChatModel(script=[ai("Paris.", usage={usage!r})], model_name="gpt-4o")
    llm = budgeted(model, envelope=Envelope(max_usd=10), backend=backend)
    await llm.ainvoke("hi", {{"configurable": {{"thread_id": "exited"}}}})
    if sys.argv[2] == "kept":
        globals()["kept"] = backend  # still open at exit; else collected with main's locals
    if sys.argv[2] == "unreachable":  # the database is gone by the time the process exits
        _async_pending(backend)._exit_target = ("postgres", "postgresql://postgres@127.0.0.1:9/x")

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("backend_ref", ["kept", "dropped", "unreachable"])
def test_a_process_that_exits_with_its_async_backend_open_writes_its_settlements(
    postgres_url: str, backend_ref: str
) -> None:
    # asyncio.run(main()) returns right after the last call, its settlement still pending (the
    # timer's flush never runs: the loop is closed). The sync Backend writes its pending
    # settlements at exit; an AsyncBackend's were lost, leaving a call that finished at its
    # reserved worst case in the ledger.
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    script = _EXITS_UNCLOSED.format(usage=USAGE)
    done = subprocess.run(
        [sys.executable, "-c", script, postgres_url, backend_ref],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with open_backend(postgres_url) as backend:
        rows = _rows(backend, "exited")
    if backend_ref == "unreachable":  # what is lost is said, with the tasks it belongs to
        assert rows == [{"state": "reserved", "cost_nanos": 0}]
        assert "1 spend settlement(s) of task(s) exited could not be written" in done.stderr
    else:
        assert rows == [{"state": "settled", "cost_nanos": COST}]


@pytest.mark.anyio
async def test_what_an_async_backend_left_open_holds_at_exit_is_written_sync(
    durable_url: str,
) -> None:
    # The exit hook's write, called in this process as it would be at exit, while the loop is
    # not used (the child-process tests above show the hook runs).
    from checkpointers import aopen_backend

    backend = await aopen_backend(durable_url)
    try:
        store = _async_pending(backend)
        store.delay = 3600.0
        llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
        await llm.ainvoke("hi", {"configurable": {"thread_id": "at-exit"}})
        store.write_at_exit()
        assert not store.pending
        with open_backend(durable_url) as reopened:
            assert _rows(reopened, "at-exit") == [{"state": "settled", "cost_nanos": COST}]
    finally:
        await backend.close()


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


# --- the guard's edge reads nothing on the common path --------------------------------------


def test_the_guard_reads_the_ledger_only_when_it_may_stop(backend: Backend) -> None:
    from langgraph.graph import END, START, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    from harness_nodes import BudgetGuard, HarnessState
    from tests.harness_nodes._budget_graphs import runaway_llm, search

    llm = runaway_llm(backend)  # $0.50 against ~18 KB of tool results a turn
    guard = BudgetGuard(llm)
    builder = StateGraph(HarnessState)
    builder.add_node("agent", lambda s: {"messages": [llm.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([search]))
    builder.add_node("budget_exhausted", guard.finish)
    routes = {"ok": "agent", "degrade": "agent", "stop": "budget_exhausted"}
    builder.add_conditional_edges(START, guard.route, routes)
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_conditional_edges("tools", guard.route, routes)
    builder.add_edge("budget_exhausted", END)
    graph = builder.compile()  # no checkpointer: only the ledger talks to the backend
    config: Any = {"configurable": {"thread_id": "edges"}, "recursion_limit": 1000}
    with _Counting(backend) as counting:
        out = graph.invoke({"messages": [HumanMessage("research forever")]}, config)
    calls = sum(1 for m in out["messages"] if isinstance(m, AIMessage) and m.tool_calls)
    assert out["outcome"]["status"] == "budget_exhausted" and calls >= 5
    # One statement per call, its reservation. Reads: the first edge (no view yet), the edge
    # where the view says the next call may not fit (the stop, confirmed fresh) and
    # `finish`'s three (totals, then spend: totals and rows by model) — none per call.
    if backend.dialect == "postgres":
        assert counting.reads == 5
    assert counting.sent == calls + 5


def test_spend_by_another_process_is_caught_by_the_reservation_and_ends_the_task(
    durable_url: str,
) -> None:
    from harness_nodes import Envelope, build_harnessed_agent
    from tests.harness_nodes._budget_graphs import runaway_model, search

    with open_backend(durable_url) as backend, open_backend(durable_url) as elsewhere:
        graph = build_harnessed_agent(
            runaway_model(), [search], envelope=Envelope(max_usd=0.50), backend=backend
        )
        config: Any = {"configurable": {"thread_id": "shared"}, "recursion_limit": 1000}
        graph.invoke({"messages": [HumanMessage("go")]}, config, interrupt_after=["agent"])
        # Another process (its own backend, so its own view) spends most of the envelope.
        other = budgeted(_model(), envelope=Envelope(max_usd=0.50), backend=elsewhere)
        while (
            other.invoke("burn", {"configurable": {"thread_id": "shared"}})
            .additional_kwargs["harness"]["budget"]
            .get("stopped")
            is None
        ):
            pass
        out = graph.invoke(None, config)  # this process's view still says "ok"
    assert out["outcome"]["status"] == "budget_exhausted"
    refused = [m for m in out["messages"] if str(m.content).startswith("Budget exhausted for")]
    assert len(refused) == 1  # the wrapper's reservation refused; the edge had let it through
    with open_backend(durable_url) as backend:
        flush_pending(backend)
        assert _totals(backend, "shared")["spent_nanos"] <= 0.50 * 1e9


@pytest.mark.postgres
def test_a_failed_flush_keeps_every_task_s_settlements(postgres_url: str) -> None:
    with open_backend(postgres_url) as backend:
        _sync_pending(backend).delay = 3600.0
        llm = budgeted(_model(), envelope=Envelope(max_usd=10), backend=backend)
        for task in ("one", "two", "three"):
            llm.invoke("hi", {"configurable": {"thread_id": task}})
        backend.execute("ALTER FUNCTION harness_spend_flush RENAME TO flush_away")
        try:
            with pytest.raises(Exception, match="harness_spend_flush"):
                flush_pending(backend)  # the first task's write fails
        finally:
            backend.execute("ALTER FUNCTION flush_away RENAME TO harness_spend_flush")
        kept = _sync_pending(backend).pending.take_all()
        assert sorted(kept) == ["one", "three", "two"]  # none dropped, the unwritten ones too
        for batch in kept.values():
            _sync_pending(backend).pending.put_back(batch)
        flush_pending(backend)
        for task in ("one", "two", "three"):
            assert _rows(backend, task) == [{"state": "settled", "cost_nanos": COST}]


def test_a_reservation_never_runs_beside_a_half_written_settlement(backend: Backend) -> None:
    import checkpointers._spend as spend

    # Two worst cases do not fit; the first call's actual cost and a worst case do.
    envelope = Envelope(max_usd=0.05, max_output_tokens=4096, min_output_tokens=4096)
    llm = budgeted(_model(), envelope=envelope, backend=backend)
    config: Any = {"configurable": {"thread_id": "race"}}
    store = _sync_pending(backend)
    store.delay = 3600.0
    llm.invoke("hi", config)
    writing, release = threading.Event(), threading.Event()
    real_write = spend._write_sync

    def slow_write(b: Backend, settles: Any) -> None:
        writing.set()
        release.wait(10)
        real_write(b, settles)

    spend._write_sync = slow_write  # type: ignore[assignment]
    try:
        flusher = threading.Thread(target=store.flush)
        flusher.start()
        assert writing.wait(10)  # the flusher holds the settlement, not yet written
        answer = llm.invoke("again", config)  # carries it too: fits, no spurious stop
        release.set()
        flusher.join(10)
    finally:
        spend._write_sync = real_write  # type: ignore[assignment]
    assert answer.additional_kwargs["harness"]["budget"].get("stopped") is None
    flush_pending(backend)
    assert _rows(backend, "race") == [{"state": "settled", "cost_nanos": COST}] * 2
    assert _totals(backend, "race") == {"reserved_nanos": 0, "spent_nanos": 2 * COST, "calls": 2}


# --- a window is never refused on settlements this process holds ----------------------------
# Tasks of one type share a window. A call settled here waits for its *own* task's next
# statement; until it is written the window books its worst case, and every other task of the
# type read it that way: single-call tasks were refused ("used 0.3 of 0.3") while the window
# had $0.013 really spent. The settlers are kept waiting (`delay`), so the race is certain.

SMALL = {"input_tokens": 10, "output_tokens": 10}  # $0.000125; reserved ~$0.01 (1000 out)
SMALL_COST = Pricing().cost_nanos("gpt-4o", 10, 10)
WINDOW_CAP = 0.045  # four worst cases fit, five do not


def _window_llm(backend: Any, usage: dict[str, int] = SMALL) -> Any:
    from harness_nodes import WindowCap

    envelope = Envelope(
        max_output_tokens=1000,
        min_output_tokens=1000,  # a fixed worst case: the window refuses, never trims it
        type_cap=WindowCap(max_usd=WINDOW_CAP, seconds=3600),
    )
    model = ScriptedChatModel(script=[ai("ok", usage=usage)], loop=True, model_name="gpt-4o")
    return budgeted(model, envelope=envelope, backend=backend, task_type="short")


def _window(backend: Backend) -> dict[str, Any]:
    (row,) = backend.execute(
        "SELECT reserved_nanos, spent_nanos FROM harness_spend_windows WHERE task_type = %s",
        ("short",),
    )
    return row


def _budget(answer: AIMessage) -> dict[str, Any]:
    budget: dict[str, Any] = answer.additional_kwargs["harness"]["budget"]
    return budget


def test_tasks_of_a_type_are_not_refused_for_calls_this_process_settled_unwritten(
    backend: Backend,
) -> None:
    _sync_pending(backend).delay = 3600.0
    llm = _window_llm(backend)
    for i in range(30):  # 30 worst cases are $0.30; what they cost, $0.004
        budget = _budget(llm.invoke("hi", {"configurable": {"thread_id": f"task{i}"}}))
        assert budget.get("stopped") is None, (i, budget.get("stopped"))
        assert 4 * budget["reserved_usd"] <= WINDOW_CAP < 5 * budget["reserved_usd"]
    flush_pending(backend)
    assert _window(backend) == {"reserved_nanos": 0, "spent_nanos": 30 * SMALL_COST}


@pytest.mark.anyio
async def test_async_tasks_of_a_type_are_not_refused_for_calls_settled_unwritten(
    abackend: AsyncBackend,
) -> None:
    _async_pending(abackend).delay = 3600.0
    llm = _window_llm(abackend)
    for i in range(30):
        answer = await llm.ainvoke("hi", {"configurable": {"thread_id": f"task{i}"}})
        assert _budget(answer).get("stopped") is None, (i, _budget(answer).get("stopped"))
    await aflush_pending(abackend)
    rows = await abackend.execute(
        "SELECT reserved_nanos, spent_nanos FROM harness_spend_windows WHERE task_type = %s",
        ("short",),
    )
    assert rows == [{"reserved_nanos": 0, "spent_nanos": 30 * SMALL_COST}]


def _four_tasks_held(backend: Backend | AsyncBackend) -> None:
    store = _sync_pending(backend) if isinstance(backend, Backend) else _async_pending(backend)
    assert len(store.pending.peek_batches()) == 4  # four worst cases booked: the next won't fit


def test_the_guard_does_not_stop_a_task_on_settlements_held(
    backend: Backend,
) -> None:
    from harness_nodes import BudgetGuard

    _sync_pending(backend).delay = 3600.0
    llm = _window_llm(backend)
    for i in range(4):
        llm.invoke("hi", {"configurable": {"thread_id": f"task{i}"}})
    _four_tasks_held(backend)
    config: Any = {"configurable": {"thread_id": "next"}}
    assert BudgetGuard(llm).route({"messages": [HumanMessage("hi")]}, config) == "ok"
    assert not _sync_pending(backend).pending  # written before the stop could be decided
    assert _window(backend) == {"reserved_nanos": 0, "spent_nanos": 4 * SMALL_COST}


@pytest.mark.anyio
async def test_the_async_guard_does_not_stop_a_task_on_settlements_held(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import BudgetGuard

    _async_pending(abackend).delay = 3600.0
    llm = _window_llm(abackend)
    for i in range(4):
        await llm.ainvoke("hi", {"configurable": {"thread_id": f"task{i}"}})
    _four_tasks_held(abackend)
    config: Any = {"configurable": {"thread_id": "next"}}
    assert await BudgetGuard(llm).aroute({"messages": [HumanMessage("hi")]}, config) == "ok"
    assert not _async_pending(abackend).pending


def test_a_stale_full_view_read_again_is_not_a_stop_on_settlements_held(
    backend: Backend,
) -> None:
    from checkpointers._spend import Totals

    _sync_pending(backend).delay = 3600.0
    llm = _window_llm(backend)
    for i in range(4):
        llm.invoke("hi", {"configurable": {"thread_id": f"task{i}"}})
    # This process last saw the window full (the wrapper reads the ledger before stopping).
    llm._views().note_view("next", Totals(window_nanos=int(WINDOW_CAP * 1e9)))
    answer = llm.invoke("hi", {"configurable": {"thread_id": "next"}})
    assert _budget(answer).get("stopped") is None


def test_a_window_really_spent_is_still_refused_with_what_it_spent(backend: Backend) -> None:
    _sync_pending(backend).delay = 3600.0
    big = {"input_tokens": 10, "output_tokens": 900}  # near its worst case: $0.009025
    llm = _window_llm(backend, usage=big)
    for i in range(4):
        budget = _budget(llm.invoke("hi", {"configurable": {"thread_id": f"task{i}"}}))
        assert budget.get("stopped") is None
    spent = 4 * Pricing().cost_nanos("gpt-4o", 10, 900)  # $0.0361: no room for $0.01 more
    stop = _budget(llm.invoke("hi", {"configurable": {"thread_id": "task4"}}))["stopped"]
    assert (stop["limit"], stop["used"]) == ("window_usd", pytest.approx(spent / 1e9))
    assert _window(backend) == {"reserved_nanos": 0, "spent_nanos": spent}


def test_a_ledger_window_refusal_writes_what_this_process_holds_first(backend: Backend) -> None:
    from checkpointers._spend import Limits, SpendLedger

    _sync_pending(backend).delay = 3600.0
    ledger = SpendLedger(backend)
    cap = Limits(window_seconds=3600, window_max_nanos=1000)
    for i in range(20):  # worst case 300, cost 10: three fit at their worst, twenty at cost
        r = ledger.reserve(f"t{i}", "research", "m", 1, 1, 300, cap)
        assert r.id is not None, (i, r)
        ledger.defer_settle(f"t{i}", r.id, 1, 1, 10)
    refused = ledger.reserve("t20", "research", "m", 1, 1, 850, cap)  # 200 spent + 850 > 1000
    assert (refused.refused, refused.totals.window_nanos) == ("window_usd", 200)
    assert not _sync_pending(backend).pending
    # Nothing held: a refusal costs no write (and other types' windows are their own).
    assert ledger.reserve("t21", "research", "m", 1, 1, 850, cap).refused == "window_usd"
    assert ledger.reserve("t21", "support", "m", 1, 1, 850, cap).refused is None


@pytest.mark.anyio
async def test_an_async_ledger_window_refusal_writes_what_is_held_first(
    abackend: AsyncBackend,
) -> None:
    from checkpointers._spend import AsyncSpendLedger, Limits

    _async_pending(abackend).delay = 3600.0
    ledger = AsyncSpendLedger(abackend)
    cap = Limits(window_seconds=3600, window_max_nanos=1000)
    for i in range(20):
        r = await ledger.reserve(f"t{i}", "research", "m", 1, 1, 300, cap)
        assert r.id is not None, (i, r)
        ledger.defer_settle(f"t{i}", r.id, 1, 1, 10)
    refused = await ledger.reserve("t20", "research", "m", 1, 1, 850, cap)
    assert (refused.refused, refused.totals.window_nanos) == ("window_usd", 200)
    assert not _async_pending(abackend).pending


@pytest.mark.parametrize("backend_ref", ["kept", "dropped"])
def test_a_process_that_exits_with_its_sqlite_async_backend_open_ends_and_writes_them(
    tmp_path: Path, backend_ref: str
) -> None:
    # aiosqlite's worker threads were not daemons: with an AsyncBackend still open, the
    # interpreter waited for them forever and never reached the exit hook that writes the
    # held settlements.
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    url = f"sqlite:///{tmp_path / 'exits.db'}"
    with open_backend(url):
        pass  # the harness tables, as a deployment has them
    done = subprocess.run(
        [sys.executable, "-c", _EXITS_UNCLOSED.format(usage=USAGE), url, backend_ref],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    with open_backend(url) as backend:
        assert _rows(backend, "exited") == [{"state": "settled", "cost_nanos": COST}]
