"""Budget leases (``budgeted(lease=k)``, Postgres): room for k calls booked by one statement.

The next calls that fit are granted from the process's memory, with no round trip; their rows
are written with their settlements; the unused rest goes back when the lease cannot serve,
when it idles, on `flush_pending` and at ``close()``. The cap holds whatever happens: the
room a lease grants from is booked in the ledger before any call uses it.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from checkpointers import AsyncBackend, Backend, aopen_backend, open_backend
from checkpointers._spend import (
    AsyncSpendLedger,
    Limits,
    SpendLedger,
    _sync_pending,
    aflush_pending,
    flush_pending,
)
from harness_nodes import Envelope, UserError, budgeted
from harness_nodes.pricing import Pricing
from harness_nodes.testing import ScriptedChatModel, ai
from tests.checkpointers.test_spend_settlements import _Counting
from tests.harness_nodes._budget_graphs import guarded_loop, runaway_llm

USAGE = {"input_tokens": 1_000, "output_tokens": 200}
COST = Pricing().cost_nanos("gpt-4o", 1_000, 200)


@pytest.fixture
def pg(postgres_url: str) -> Any:
    with open_backend(postgres_url) as backend:
        yield backend


def _task(backend: Backend, task_id: str) -> dict[str, Any]:
    rows = backend.execute(
        "SELECT reserved_nanos, spent_nanos, reserved_tokens, calls FROM harness_spend_tasks "
        "WHERE task_id = %s",
        (task_id,),
    )
    return rows[0]


def _by_state(backend: Backend, task_id: str) -> dict[str, dict[str, int]]:
    rows = backend.execute(
        "SELECT state, count(*) AS n, CAST(SUM(cost_nanos) AS BIGINT) AS cost, "
        "CAST(SUM(reserved_nanos) AS BIGINT) AS reserved FROM harness_spend "
        "WHERE task_id = %s GROUP BY state",
        (task_id,),
    )
    return {r["state"]: {"n": r["n"], "cost": r["cost"], "reserved": r["reserved"]} for r in rows}


def _model() -> ScriptedChatModel:
    return ScriptedChatModel(script=[ai("Paris.", usage=USAGE)], loop=True, model_name="gpt-4o")


def test_calls_from_a_lease_send_no_statement_and_the_ledger_is_exact_after_a_flush(
    pg: Backend,
) -> None:
    llm = budgeted(_model(), envelope=Envelope(max_usd=100), backend=pg, lease=8)
    config: Any = {"configurable": {"thread_id": "leased"}}
    with _Counting(pg) as counting:
        for _ in range(20):
            assert llm.invoke("hi", config).content == "Paris."
    # 20 calls, room for 8 per statement: 3 statements on the caller's path (was 20).
    assert counting.sent == math.ceil(20 / 8)
    flush_pending(pg)
    assert _task(pg, "leased")["reserved_nanos"] == 0
    assert _task(pg, "leased")["reserved_tokens"] == 0
    assert (_task(pg, "leased")["spent_nanos"], _task(pg, "leased")["calls"]) == (20 * COST, 20)
    states = _by_state(pg, "leased")
    assert states["settled"] == {
        "n": 20,
        "cost": 20 * COST,
        "reserved": states["settled"]["reserved"],
    }
    assert states["lease_closed"]["reserved"] == 0  # every lease gave back all it held
    assert "lease" not in states and "reserved" not in states
    # The state mirror reads the same as without a lease.
    assert llm.spend(config)["usd"] == pytest.approx(20 * COST / 1e9)


def test_a_lease_takes_at_most_half_the_room_left_so_the_limit_is_met_exactly(
    pg: Backend,
) -> None:
    ledger = SpendLedger(pg, lease=4)
    limits = Limits(max_nanos=1_000)
    with _Counting(pg) as counting:
        granted = []
        for _ in range(12):
            r = ledger.reserve("tight", "default", "gpt-4o", 1, 1, 100, limits)
            if r.id is None:
                assert r.refused == "usd"
                break
            granted.append(r)
    # 100 + a lease of 300 leaves 600 >= 300: booked. Then 3 calls from memory; then no lease
    # fits (500 + 2 * 300 > 1000): every call is reserved on its own, up to the limit exactly.
    assert len(granted) == 10
    assert [r.lease_id is not None for r in granted[:4]] == [False, True, True, True]
    assert all(r.lease_id is None for r in granted[4:])
    assert counting.sent == 1 + 6 + 1  # the lease, six single reservations, the refusal
    assert granted[-1].totals.committed_nanos == 1_000
    assert _task(pg, "tight")["reserved_nanos"] == 1_000  # never above the limit
    for r in granted:
        assert r.id is not None
        ledger.defer_settle("tight", r.id, 1, 1, 60)
    flush_pending(pg)
    assert (_task(pg, "tight")["reserved_nanos"], _task(pg, "tight")["spent_nanos"]) == (0, 600)


def test_parallel_callers_in_two_processes_never_push_a_task_past_its_cap(
    postgres_url: str,
) -> None:
    # Two backends on one database stand for two processes, each with its own leases.
    limits = Limits(max_nanos=10_000)
    granted: list[int] = []
    lock = threading.Lock()
    with open_backend(postgres_url) as one, open_backend(postgres_url) as two:
        ledgers = [SpendLedger(one, lease=4), SpendLedger(two, lease=4)]

        def worker(i: int) -> None:
            ledger = ledgers[i % 2]
            for _ in range(40):
                r = ledger.reserve("shared", "default", "gpt-4o", 1, 1, 170, limits)
                if r.id is None:
                    return
                with lock:
                    granted.append(170)
                ledger.defer_settle("shared", r.id, 1, 1, 170)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flush_pending(one)
        flush_pending(two)
        task = _task(one, "shared")
    assert sum(granted) <= 10_000
    assert task["spent_nanos"] == sum(granted) and task["reserved_nanos"] == 0
    # Leases only ever hold room: once both are given back, the cap is reached but for what
    # no single call fits in.
    assert 10_000 - sum(granted) < 170 * 2


def test_a_failed_call_from_a_lease_gives_its_room_and_call_back(pg: Backend) -> None:
    model = ScriptedChatModel(
        script=[ai("fine", usage=USAGE)],
        loop=True,
        model_name="gpt-4o",
        faults={1: ConnectionError("provider down")},
    )
    llm = budgeted(model, envelope=Envelope(max_usd=100), backend=pg, lease=4)
    config: Any = {"configurable": {"thread_id": "flaky"}}
    assert llm.invoke("hi", config).content == "fine"  # reserved by a statement, lease booked
    second_turn = [HumanMessage("hi"), AIMessage("fine"), HumanMessage("again")]
    with pytest.raises(ConnectionError, match="provider down"):
        llm.invoke(second_turn, config)  # granted from the lease, then failed
    assert llm.invoke(second_turn, config).content == "fine"
    flush_pending(pg)
    states = _by_state(pg, "flaky")
    assert states["released"]["n"] == 1 and states["released"]["cost"] == 0
    assert _task(pg, "flaky") == {
        "reserved_nanos": 0,
        "spent_nanos": 2 * COST,
        "reserved_tokens": 0,
        "calls": 2,
    }


def test_an_idle_lease_gives_its_rest_back_by_itself(
    pg: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import checkpointers._spend as spend

    monkeypatch.setattr(spend, "LEASE_IDLE", 0.2)
    llm = budgeted(_model(), envelope=Envelope(max_usd=100), backend=pg, lease=8)
    llm.invoke("hi", {"configurable": {"thread_id": "idle"}})
    assert _task(pg, "idle")["reserved_nanos"] > 0  # this call's worst case and the lease
    deadline = time.monotonic() + 10
    while _task(pg, "idle")["reserved_nanos"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _task(pg, "idle") == {
        "reserved_nanos": 0,
        "spent_nanos": COST,
        "reserved_tokens": 0,
        "calls": 1,
    }
    assert _by_state(pg, "idle")["lease_closed"]["reserved"] == 0


def test_a_lease_serves_one_window_only(pg: Backend) -> None:
    ledger = SpendLedger(pg, lease=4)
    limits = Limits(window_seconds=1.0, window_max_nanos=10**9)
    # Start just after a window opens, so the lease and the next call share it.
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    first = ledger.reserve("w", "research", "gpt-4o", 1, 1, 100, limits)
    second = ledger.reserve("w", "research", "gpt-4o", 1, 1, 100, limits)
    assert first.lease_id is None and second.lease_id is not None
    time.sleep(1.0 - time.time() % 1.0 + 0.01)  # the next window
    third = ledger.reserve("w", "research", "gpt-4o", 1, 1, 100, limits)
    assert third.lease_id is None  # a statement: the old window's lease cannot serve it
    for r in (first, second, third):
        assert r.id is not None
        ledger.defer_settle("w", r.id, 1, 1, 100)
    flush_pending(pg)
    windows = pg.execute(
        "SELECT reserved_nanos, spent_nanos FROM harness_spend_windows WHERE task_type = %s "
        "ORDER BY starts_at",
        ("research",),
    )
    assert windows[0]["spent_nanos"] == 200 and windows[-1]["spent_nanos"] >= 100
    assert all(w["reserved_nanos"] == 0 for w in windows)


def test_a_release_is_applied_once_however_often_it_is_carried(pg: Backend) -> None:
    ledger = SpendLedger(pg, lease=4)
    limits = Limits(max_nanos=10_000)
    r = ledger.reserve("once", "default", "gpt-4o", 1, 1, 100, limits)
    assert r.id is not None
    pending = _sync_pending(pg).pending
    pending.release_leases("once")
    (release,) = pending.peek_batches("once")[0]
    assert release.state == "lease_release"
    flush_pending(pg)
    pending.put_back([release])  # the same release again (a flush and a statement both carried it)
    flush_pending(pg)
    assert _task(pg, "once")["reserved_nanos"] == 100  # the call's own reservation, nothing less


@pytest.mark.anyio
async def test_async_ledger_grants_from_a_lease_too(postgres_url: str) -> None:
    backend: AsyncBackend = await aopen_backend(postgres_url)
    try:
        ledger = AsyncSpendLedger(backend, lease=5)
        limits = Limits(max_nanos=10_000)
        reservations = [
            await ledger.reserve("async", "default", "gpt-4o", 1, 1, 100, limits) for _ in range(7)
        ]
        assert [r.lease_id is not None for r in reservations] == [False] + [True] * 4 + [
            False,
            True,
        ]
        for r in reservations:
            assert r.id is not None
            ledger.defer_settle("async", r.id, 1, 1, 50)
        await aflush_pending(backend)
        rows = await backend.execute(
            "SELECT reserved_nanos, spent_nanos, calls FROM harness_spend_tasks WHERE task_id = %s",
            ("async",),
        )
    finally:
        await backend.close()
    assert rows == [{"reserved_nanos": 0, "spent_nanos": 350, "calls": 7}]


def test_lease_must_be_a_whole_number_of_calls() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="lease must be a whole number"):
            budgeted(_model(), envelope=Envelope(max_usd=1), lease=bad)  # type: ignore[arg-type]


def test_sqlite_ignores_lease_and_reserves_each_call(tmp_path: Path) -> None:
    with open_backend(f"sqlite:///{tmp_path / 'h.db'}") as backend:
        llm = budgeted(_model(), envelope=Envelope(max_usd=100), backend=backend, lease=8)
        config: Any = {"configurable": {"thread_id": "local"}}
        with _Counting(backend) as counting:
            for _ in range(3):
                llm.invoke("hi", config)
        assert counting.sent == 3
        flush_pending(backend)
        assert _task(backend, "local")["spent_nanos"] == 3 * COST


@pytest.mark.slow
def test_a_process_killed_holding_a_lease_never_lets_the_task_overspend(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness_nodes.test_budget import _child, _ledger_nanos

    thread = f"lease-crash-{uuid.uuid4().hex[:8]}"
    crashed = _child(
        "runaway",
        postgres_url,
        thread,
        "start",
        BUDGET_LEASE="4",
        BUDGET_MAX_USD="2",  # room for a lease of 4 calls: a worst case is ~$0.17 here
        BUDGET_CRASH_AT_TOOL_CALL="3",
        BUDGET_CRASH_COUNTER=str(tmp_path / "tool-calls"),
    )
    assert crashed.returncode == -9, crashed.stderr
    with open_backend(postgres_url) as backend:
        held = backend.execute(
            "SELECT CAST(COALESCE(SUM(reserved_nanos), 0) AS BIGINT) AS n FROM harness_spend "
            "WHERE task_id = %s AND state = 'lease'",
            (thread,),
        )[0]["n"]
    assert held > 0  # the dead process's lease: its rest stays booked, the safe side
    resumed = _child(
        "runaway", postgres_url, thread, "resume", BUDGET_LEASE="4", BUDGET_MAX_USD="2"
    )
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["status"] == "budget_exhausted"
    limit = round(2.0 * 1e9)
    monkeypatch.setenv("BUDGET_MAX_USD", "2")
    monkeypatch.setenv("BUDGET_LEASE", "4")
    with open_backend(postgres_url) as backend:
        graph = guarded_loop(runaway_llm(backend)).compile(checkpointer=backend.checkpointer)
        graph.invoke(None, {"configurable": {"thread_id": thread}}, durability="sync")
        spent, committed = _ledger_nanos(backend, thread)
        task = _task(backend, thread)
        stranded = backend.execute(
            "SELECT CAST(COALESCE(SUM(reserved_nanos), 0) AS BIGINT) AS n FROM harness_spend "
            "WHERE task_id = %s AND state = 'lease'",
            (thread,),
        )[0]["n"]
        messages = graph.get_state({"configurable": {"thread_id": thread}}).values["messages"]
    # The cap held across the kill and the resumes, and the ledger adds up: what is booked
    # beyond the spend is the dead lease's rest and nothing else.
    assert spent == task["spent_nanos"] == result["spent_nanos"]
    assert committed == spent  # no call row is left open
    assert task["reserved_nanos"] == stranded <= held
    assert spent + stranded <= limit
    # Every answer in the checkpoint is in the ledger, leased ones included (recovered at the
    # resume if their settlement died with the process).
    answered = [
        m.additional_kwargs["harness"]["budget"]
        for m in messages
        if m.type == "ai" and not m.additional_kwargs["harness"]["budget"].get("stopped")
    ]
    assert any("lease_id" in b for b in answered)
    assert round(sum(b["spent_usd"] for b in answered) * 1e9) == pytest.approx(
        spent, abs=len(answered)
    )


def test_settlements_that_died_with_a_process_are_recovered_from_its_answers(
    postgres_url: str,
) -> None:
    config: Any = {"configurable": {"thread_id": "lost"}}
    messages: list[Any] = [HumanMessage("hi")]
    with open_backend(postgres_url) as dead:
        llm = budgeted(_model(), envelope=Envelope(max_usd=100), backend=dead, lease=4)
        for _ in range(3):  # one reservation by statement (and a lease), two from the lease
            messages += [llm.invoke(messages, config), HumanMessage("more")]
        assert [
            "lease_id" in m.additional_kwargs["harness"]["budget"]
            for m in messages
            if isinstance(m, AIMessage)
        ] == [False, True, True]
        # The process dies: its pending settlements and its lease die with it.
        pending = _sync_pending(dead).pending
        pending.take("lost")
        pending._leases.clear()
        pending._held.clear()
    with open_backend(postgres_url) as fresh:
        llm = budgeted(_model(), envelope=Envelope(max_usd=100), backend=fresh, lease=4)
        llm.invoke(messages, config)  # settles the three answers first, in its statement
        flush_pending(fresh)
        task = _task(fresh, "lost")
        states = _by_state(fresh, "lost")
    assert task["spent_nanos"] == 4 * COST
    assert states["settled"]["n"] == 4 and "reserved" not in states
    # What stays booked is the dead lease's unused slot (its room and its call), only that.
    assert task["reserved_nanos"] == states["lease"]["reserved"] > 0
    assert task["calls"] == 4 + 1


@pytest.mark.anyio
async def test_an_async_idle_lease_gives_its_rest_back_and_settlements_still_flush_fast(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import checkpointers._spend as spend

    monkeypatch.setattr(spend, "LEASE_IDLE", 0.5)
    backend: AsyncBackend = await aopen_backend(postgres_url)

    async def task() -> dict[str, Any]:
        rows = await backend.execute(
            "SELECT reserved_nanos, spent_nanos FROM harness_spend_tasks WHERE task_id = %s",
            ("aidle",),
        )
        return dict(rows[0])

    try:
        ledger = AsyncSpendLedger(backend, lease=4)
        limits = Limits(max_nanos=10_000)
        first = await ledger.reserve("aidle", "default", "gpt-4o", 1, 1, 100, limits)
        second = await ledger.reserve("aidle", "default", "gpt-4o", 1, 1, 100, limits)
        assert second.lease_id is not None and first.id is not None and second.id is not None
        ledger.defer_settle("aidle", first.id, 1, 1, 40)
        await asyncio.sleep(0.25)  # the flush is due after SETTLE_DELAY, not when the lease idles
        assert await task() == {"reserved_nanos": 3 * 100, "spent_nanos": 40}  # the lease
        ledger.defer_settle("aidle", second.id, 1, 1, 40)
        await asyncio.sleep(0.15)  # before the lease's idle check, due ~0.55 s after the start
        assert (await task())["spent_nanos"] == 80
        deadline = asyncio.get_running_loop().time() + 10
        while (await task())["reserved_nanos"] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert await task() == {"reserved_nanos": 0, "spent_nanos": 80}
    finally:
        await backend.close()


def test_cost_envelope_middleware_takes_lease_too(pg: Backend) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from harness_nodes import CostEnvelopeMiddleware
    from harness_nodes.testing import tool_call

    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    with pytest.raises(UserError, match="lease must be a whole number"):
        CostEnvelopeMiddleware(Envelope(max_usd=1), backend=pg, lease=0)
    runaway = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("ping", {})], usage=USAGE)],
        loop=True,
        model_name="gpt-4o",
    )
    budget = CostEnvelopeMiddleware(Envelope(max_usd=5, max_calls=12), backend=pg, lease=4)
    agent = create_agent(runaway, [ping], middleware=[budget], checkpointer=pg.checkpointer)
    config: Any = {"configurable": {"thread_id": "mw"}, "recursion_limit": 1_000}
    with _Counting(pg) as counting:
        out = agent.invoke({"messages": [HumanMessage("hi")]}, config)
    assert out["outcome"]["status"] == "budget_exhausted"
    flush_pending(pg)
    states = _by_state(pg, "mw")
    assert states["settled"]["n"] == 12 == _task(pg, "mw")["calls"]  # max_calls, exactly
    assert _task(pg, "mw")["reserved_nanos"] == 0 and "lease_closed" in states
    reservations = counting.sent - counting.reads
    # 12 calls and the refused 13th: 13 reservation statements without a lease.
    assert reservations == 7, reservations


def test_a_window_refusal_ends_this_process_s_leases_of_the_type_first(pg: Backend) -> None:
    # Each single-call task of the type leaves a lease booked in the window (its unused rest
    # waits `LEASE_IDLE` to go back) and its settlement pending: the window filled with room
    # nobody would use, and the next task of the type was refused.
    _sync_pending(pg).delay = 3600.0
    ledger = SpendLedger(pg, lease=4)
    cap = Limits(window_seconds=3600, window_max_nanos=10_000)
    for i in range(40):
        r = ledger.reserve(f"t{i}", "research", "gpt-4o", 1, 1, 300, cap)
        assert r.id is not None, (i, r)
        ledger.defer_settle(f"t{i}", r.id, 1, 1, 10)
    flush_pending(pg)
    (window,) = pg.execute("SELECT reserved_nanos, spent_nanos FROM harness_spend_windows")
    assert window == {"reserved_nanos": 0, "spent_nanos": 40 * 10}
    assert pg.execute("SELECT count(*) AS n FROM harness_spend WHERE state = 'lease'") == [{"n": 0}]
