"""The effect ledger: irreversible tool calls run at most once per (thread_id, tool_call_id)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from checkpointers import AsyncBackend, Backend, open_backend
from checkpointers.backend import _SqliteDB
from harness_nodes import (
    AsyncEffectLedger,
    EffectError,
    EffectLedger,
    EffectNotResolvable,
    EffectOutcomeUnknown,
    UnguardedEffect,
    UserError,
    current_effect,
    effect,
    effect_kind,
    irreversible,
)
from harness_nodes.effects import _Call
from tests.conftest import subprocess_env

pytestmark = pytest.mark.anyio


@pytest.fixture
def memory_backend() -> Iterator[Backend]:
    """For behaviour that does not depend on where the ledger lives."""
    with open_backend("memory://") as backend:
        yield backend


class Counter:
    """Stands in for the outside world: how many times each effect really happened."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, what: str, guarded: bool = True) -> None:
        key = current_effect().idempotency_key if guarded else "-"
        with self.lock:
            self.calls.append((what, key))


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.seen.append((name, data))

    def names(self) -> list[str]:
        return [n for n, _ in self.seen]


def make_tools(world: Counter, *, fail: bool = False) -> list[BaseTool]:
    @irreversible
    @tool
    def refund(order_id: str, amount: int) -> str:
        """Refund an order."""
        world.add(f"refund {order_id} {amount}")
        if fail:
            raise RuntimeError("payment gateway timed out")
        return f"refunded {amount} on {order_id}"

    @effect(idempotent=True)
    @tool
    def charge(amount: int) -> str:
        """Charge the card (the API de-duplicates by key)."""
        world.add(f"charge {amount}")
        if fail:
            raise RuntimeError("gateway down")
        return f"charged {amount}"

    @tool
    def lookup(order_id: str) -> str:
        """Read-only lookup."""
        world.add(f"lookup {order_id}", guarded=False)
        return f"order {order_id}: 2 items"

    return [refund, charge, lookup]


def call(name: str, args: dict[str, Any], id: str) -> dict[str, Any]:
    return {"name": name, "args": args, "id": id, "type": "tool_call"}


def build(
    backend: Backend, tools: list[BaseTool], turns: list[list[dict[str, Any]]], *, hook: bool = True
) -> Any:
    """agent → tools → agent ..., the agent issuing `turns[n]` as its n-th tool calls."""

    def agent(state: MessagesState) -> dict[str, Any]:
        n = sum(isinstance(m, AIMessage) for m in state["messages"])
        if n < len(turns):
            return {"messages": [AIMessage("", tool_calls=turns[n])]}
        return {"messages": [AIMessage("done")]}

    ledger = EffectLedger(backend)
    node = (
        ToolNode(
            tools, wrap_tool_call=ledger.wrap_tool_call, awrap_tool_call=ledger.awrap_tool_call
        )
        if hook
        else ToolNode(tools)
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", node)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=backend.checkpointer)


def run(
    graph: Any, thread_id: str, events: Events | None = None, *, resume: bool = False
) -> list[Any]:
    """Start the task on *thread_id*, or with *resume* continue it from its last checkpoint."""
    config: dict[str, Any] = {"configurable": {"thread_id": thread_id}}
    if events is not None:
        config["callbacks"] = [events]
    inputs = None if resume else {"messages": [HumanMessage("go")]}
    out = graph.invoke(inputs, config, durability="sync")
    return list(out["messages"])


def tool_messages(messages: list[Any]) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage)]


def test_irreversible_call_runs_once_and_replays_its_recorded_result(backend: Backend) -> None:
    world = Counter()
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    # The model asks for the very same call twice (a resumed tool node does the same).
    graph = build(backend, make_tools(world), [[refund], [refund]])
    events = Events()
    first, second = tool_messages(run(graph, "t-1", events))

    assert world.calls == [("refund o1 10", "t-1:call-1")]
    assert first.content == second.content == "refunded 10 on o1"
    assert first.additional_kwargs["harness"]["effect"] == {
        "idempotency_key": "t-1:call-1",
        "replayed": False,
    }
    assert second.additional_kwargs["harness"]["effect"]["replayed"] is True
    assert events.names() == ["harness.effect.run", "harness.effect.replay"]
    assert events.seen[1][1] == {
        "thread_id": "t-1",
        "tool_call_id": "call-1",
        "tool": "refund",
        "idempotency_key": "t-1:call-1",
    }
    record = EffectLedger(backend).get("t-1", "call-1")
    assert record is not None
    assert (record.status, record.attempts, record.args) == (
        "done",
        1,
        {"order_id": "o1", "amount": 10},
    )
    assert isinstance(record.result, ToolMessage) and record.result.content == "refunded 10 on o1"


def test_same_call_id_on_another_thread_is_another_effect(memory_backend: Backend) -> None:
    backend = memory_backend
    world = Counter()
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    graph = build(backend, make_tools(world), [[refund]])
    run(graph, "t-a")
    run(graph, "t-b")
    assert [key for _, key in world.calls] == ["t-a:call-1", "t-b:call-1"]


def test_tools_without_effects_run_every_time(memory_backend: Backend) -> None:
    backend = memory_backend
    world = Counter()
    look = call("lookup", {"order_id": "o1"}, "call-1")
    graph = build(backend, make_tools(world), [[look], [look]])
    messages = tool_messages(run(graph, "t-1"))
    assert len(world.calls) == 2
    assert "harness" not in messages[0].additional_kwargs
    assert EffectLedger(backend).list("t-1") == []


def test_parallel_calls_each_run_once(backend: Backend) -> None:
    world = Counter()
    calls = [call("refund", {"order_id": f"o{i}", "amount": i}, f"call-{i}") for i in range(4)]
    graph = build(backend, make_tools(world), [calls, calls])
    run(graph, "t-1")
    assert sorted(key for _, key in world.calls) == [f"t-1:call-{i}" for i in range(4)]
    assert {r.status for r in EffectLedger(backend).list("t-1")} == {"done"}


def test_unknown_outcome_escalates_to_review_instead_of_rerunning(backend: Backend) -> None:
    world = Counter()
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    failing = build(backend, make_tools(world, fail=True), [[refund]])
    with pytest.raises(RuntimeError, match="payment gateway timed out"):
        run(failing, "t-1")
    record = EffectLedger(backend).get("t-1", "call-1")
    assert record is not None and record.status == "error"
    assert record.error == "RuntimeError: payment gateway timed out"

    # The call raised: did the refund go out? Nobody knows, so it is not run again.
    graph = build(backend, make_tools(world), [[refund]])
    events = Events()
    (message,) = tool_messages(run(graph, "t-1", events, resume=True))
    assert len(world.calls) == 1
    assert message.status == "error"
    assert message.tool_call_id == "call-1"
    escalation = message.additional_kwargs["harness"]["escalation"]
    assert escalation["kind"] == "effect_unknown"
    assert escalation["tool"] == "refund" and escalation["tool_call_id"] == "call-1"
    assert escalation["args"] == {"order_id": "o1", "amount": 10}
    assert escalation["details"]["idempotency_key"] == "t-1:call-1"
    assert "harness.effect.unknown" in events.names()


def test_reviewer_settles_an_unknown_outcome(backend: Backend) -> None:
    world = Counter()
    ledger = EffectLedger(backend)
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    with pytest.raises(RuntimeError):
        run(build(backend, make_tools(world, fail=True), [[refund]]), "t-yes")
    with pytest.raises(RuntimeError):
        run(build(backend, make_tools(world, fail=True), [[refund]]), "t-no")
    assert len(world.calls) == 2

    # "Yes, it went out": the recorded answer is replayed, the tool does not run.
    settled = ledger.resolve(
        "t-yes", "call-1", happened=True, result="refunded (checked)", reviewer="ann"
    )
    assert (settled.status, settled.resolved_by) == ("done", "ann")
    graph = build(backend, make_tools(world), [[refund]])
    (message,) = tool_messages(run(graph, "t-yes", resume=True))
    assert message.content == "refunded (checked)"
    assert message.additional_kwargs["harness"]["effect"]["replayed"] is True
    assert len(world.calls) == 2

    # "No, it did not": the next execution runs it, once.
    assert ledger.resolve("t-no", "call-1", happened=False, reviewer="bob").status == "aborted"
    run(build(backend, make_tools(world), [[refund]]), "t-no", resume=True)
    assert world.calls[2:] == [("refund o1 10", "t-no:call-1")]
    record = ledger.get("t-no", "call-1")
    assert record is not None and (record.status, record.attempts) == ("done", 2)

    # A second answer to a settled call is refused.
    with pytest.raises(EffectNotResolvable, match=re.escape("its result is already recorded")) as e:
        ledger.resolve("t-yes", "call-1", happened=False, reviewer="carl")
    assert (e.value.thread_id, e.value.tool_call_id) == ("t-yes", "call-1")
    with pytest.raises(EffectNotResolvable, match="no such call"):
        ledger.resolve("t-yes", "call-404", happened=True, reviewer="carl")


def test_idempotent_effect_reruns_with_the_same_key(backend: Backend) -> None:
    world = Counter()
    charge = call("charge", {"amount": 5}, "call-1")
    with pytest.raises(RuntimeError):
        run(build(backend, make_tools(world, fail=True), [[charge]]), "t-1")
    graph = build(backend, make_tools(world), [[charge]])
    (message,) = tool_messages(run(graph, "t-1", resume=True))
    assert message.content == "charged 5"
    assert world.calls == [("charge 5", "t-1:call-1"), ("charge 5", "t-1:call-1")]
    record = EffectLedger(backend).get("t-1", "call-1")
    assert record is not None and (record.status, record.attempts) == ("done", 2)


def test_on_unknown_raise_fails_the_run(backend: Backend) -> None:
    world = Counter()
    ledger = EffectLedger(backend, on_unknown="raise")
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    with pytest.raises(RuntimeError):
        run(build(backend, make_tools(world, fail=True), [[refund]]), "t-1")
    request_graph = StateGraph(MessagesState)
    request_graph.add_node(
        "tools", ToolNode(make_tools(world), wrap_tool_call=ledger.wrap_tool_call)
    )
    request_graph.add_edge(START, "tools")
    graph = request_graph.compile(checkpointer=backend.checkpointer)
    with pytest.raises(EffectOutcomeUnknown) as e:
        graph.invoke(
            {"messages": [AIMessage("", tool_calls=[refund])]},
            {"configurable": {"thread_id": "t-1"}},
        )
    assert (e.value.tool, e.value.call_args, e.value.idempotency_key) == (
        "refund",
        {"order_id": "o1", "amount": 10},
        "t-1:call-1",
    )


def test_effectful_tool_refuses_to_run_without_the_ledger(memory_backend: Backend) -> None:
    backend = memory_backend
    world = Counter()
    refund = make_tools(world)[0]
    with pytest.raises(UnguardedEffect, match="ran outside an EffectLedger"):
        refund.invoke({"order_id": "o1", "amount": 10})
    graph = build(
        backend,
        make_tools(world),
        [[call("refund", {"order_id": "o1", "amount": 1}, "c")]],
        hook=False,
    )
    with pytest.raises(UnguardedEffect):
        run(graph, "t-1")
    assert world.calls == []


def test_marks_are_visible_and_copies_keep_the_tool_intact() -> None:
    @tool
    def send(to: str) -> str:
        """Send."""
        return to

    marked = irreversible(send)
    assert (effect_kind(send), effect_kind(marked)) == (None, "irreversible")
    assert marked.name == "send" and marked.args == send.args
    assert effect_kind(effect(idempotent=True)(send)) == "idempotent"

    def plain(x: int) -> int:
        """A plain function becomes a tool."""
        return x

    assert effect_kind(irreversible(plain)) == "irreversible"


def test_graph_without_thread_is_refused(memory_backend: Backend) -> None:
    backend = memory_backend
    world = Counter()
    ledger = EffectLedger(backend)
    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode(make_tools(world), wrap_tool_call=ledger.wrap_tool_call))
    builder.add_edge(START, "tools")
    graph = builder.compile()
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    with pytest.raises(UserError, match="without a thread_id"):
        graph.invoke({"messages": [AIMessage("", tool_calls=[refund])]})
    assert world.calls == []


def test_concurrent_executions_of_one_call_run_it_once(backend: Backend) -> None:
    ledger = EffectLedger(backend)
    ran: list[str] = []
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def body(ctx: Any) -> str:
        ran.append(ctx.idempotency_key)
        return "ok"

    def attempt() -> None:
        barrier.wait()
        try:
            outcomes.append(ledger.run(body, name="email", thread_id="t", call_id="c"))
        except EffectOutcomeUnknown:
            outcomes.append("unknown")  # saw the intent while the winner was still running

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ran == ["t:c"]
    assert len(outcomes) == 8 and set(outcomes) <= {"ok", "unknown"}


def test_ledger_needs_a_backend() -> None:
    with pytest.raises(UserError, match="needs a checkpointers.Backend"):
        EffectLedger("sqlite:///x.db")  # type: ignore[arg-type]


async def test_async_ledger_runs_once_in_an_async_graph(abackend: AsyncBackend) -> None:
    world = Counter()
    ledger = AsyncEffectLedger(abackend)
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    turns = [[refund], [refund]]

    async def agent(state: MessagesState) -> dict[str, Any]:
        n = sum(isinstance(m, AIMessage) for m in state["messages"])
        if n < len(turns):
            return {"messages": [AIMessage("", tool_calls=turns[n])]}
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(make_tools(world), awrap_tool_call=ledger.awrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=abackend.checkpointer)
    out = await graph.ainvoke(
        {"messages": [HumanMessage("go")]},
        {"configurable": {"thread_id": "t-1"}},
        durability="sync",
    )
    first, second = tool_messages(out["messages"])
    assert world.calls == [("refund o1 10", "t-1:call-1")]
    assert second.additional_kwargs["harness"]["effect"]["replayed"] is True
    record = await ledger.aget("t-1", "call-1")
    assert record is not None and record.status == "done"
    assert [r.tool_call_id for r in await ledger.alist("t-1", status="done")] == ["call-1"]

    async def body(ctx: Any) -> str:
        return f"mailed {ctx.idempotency_key}"

    # A passing fault on the ledger's own statement is retried (async twin of the sync one).
    import sqlite3

    import harness_nodes.effects as fx

    real, left = abackend.execute, [1]

    async def flaky(sql: str, params: Any = ()) -> Any:
        if sql == fx._FINISH and left[0]:
            left[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return await real(sql, params)

    abackend.execute = flaky  # type: ignore[method-assign]
    try:
        assert await ledger.arun(body, name="mail", thread_id="t-3", call_id="c") == "mailed t-3:c"
    finally:
        abackend.execute = real  # type: ignore[method-assign]
    assert left == [0]
    record = await ledger.aget("t-3", "c")
    assert record is not None and record.status == "done"

    assert await ledger.arun(body, name="mail", thread_id="t-2", call_id="c") == "mailed t-2:c"
    assert await ledger.arun(body, name="mail", thread_id="t-2", call_id="c") == "mailed t-2:c"


async def test_sync_ledger_guards_async_graphs_too() -> None:
    # Only the in-memory saver serves both sync and async calls; durable async graphs use
    # aopen_backend and AsyncEffectLedger (tested above on every backend).
    world = Counter()
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    with open_backend("memory://") as backend:
        graph = build(backend, make_tools(world), [[refund], [refund]])
        out = await graph.ainvoke(
            {"messages": [HumanMessage("go")]},
            {"configurable": {"thread_id": "t-1"}},
            durability="sync",
        )
    assert len(tool_messages(out["messages"])) == 2
    assert world.calls == [("refund o1 10", "t-1:call-1")]


async def _cancel_while_effect_run_is_reported(graph: Any, thread_id: str) -> None:
    """Run *graph*; cancel it while a slow tracer takes its ``effect.run`` event."""
    reporting = asyncio.Event()

    class SlowTracer(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if name.endswith("effect.run"):
                reporting.set()
                await asyncio.sleep(30)  # an exporter over the network

    config: Any = {"configurable": {"thread_id": thread_id}, "callbacks": [SlowTracer()]}
    run = asyncio.ensure_future(
        graph.ainvoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    )
    await asyncio.wait_for(reporting.wait(), 10)
    run.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_a_call_cancelled_while_its_run_is_reported_runs_on_resume_not_asks_a_person(
    abackend: AsyncBackend,
) -> None:
    # The intent is recorded, then the execution is reported; a task cancelled meanwhile never
    # made the call. It was left `started`, so the resumed run answered "outcome unknown" and
    # stopped for a person to say whether a call that never ran had happened.
    world = Counter()
    ledger = AsyncEffectLedger(abackend)
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")

    async def agent(state: MessagesState) -> dict[str, Any]:
        if len(state["messages"]) == 1:
            return {"messages": [AIMessage("", tool_calls=[refund])]}
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(make_tools(world), awrap_tool_call=ledger.awrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=abackend.checkpointer)
    await _cancel_while_effect_run_is_reported(graph, "t-1")
    assert world.calls == []
    record = await ledger.aget("t-1", "call-1")
    assert record is not None and record.status == "aborted"

    out = await graph.ainvoke(None, {"configurable": {"thread_id": "t-1"}}, durability="sync")
    [result] = tool_messages(out["messages"])
    assert (result.status, result.text) == ("success", "refunded 10 on o1")
    assert world.calls == [("refund o1 10", "t-1:call-1")]

    # The sync ledger guarding an async graph, likewise.
    sync_world = Counter()
    with open_backend("memory://") as backend:
        graph = build(backend, make_tools(sync_world), [[refund]])
        await _cancel_while_effect_run_is_reported(graph, "t-2")
        assert sync_world.calls == []
        out = await graph.ainvoke(None, {"configurable": {"thread_id": "t-2"}}, durability="sync")
    [result] = tool_messages(out["messages"])
    assert (result.status, result.text) == ("success", "refunded 10 on o1")
    assert sync_world.calls == [("refund o1 10", "t-2:call-1")]


CRASHING_CHILD = """
import os, sys
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from checkpointers import open_backend
from harness_nodes import EffectLedger, irreversible

@irreversible
@tool
def refund(order_id: str, amount: int) -> str:
    \"\"\"Refund.\"\"\"
    with open(sys.argv[2], "a") as f:
        f.write("refund\\n")
    os._exit(9)  # the process dies inside the call, after the money moved

with open_backend(sys.argv[1]) as backend:
    ledger = EffectLedger(backend)
    b = StateGraph(MessagesState)
    b.add_node("tools", ToolNode([refund], wrap_tool_call=ledger.wrap_tool_call))
    b.add_edge(START, "tools")
    g = b.compile(checkpointer=backend.checkpointer)
    call = {"name": "refund", "args": {"order_id": "o1", "amount": 10}, "id": "call-1"}
    g.invoke({"messages": [AIMessage("", tool_calls=[call])]},
             {"configurable": {"thread_id": "t-1"}}, durability="sync")
"""


@pytest.mark.slow
def test_crash_inside_the_call_is_an_unknown_outcome_in_the_next_process(tmp_path: Any) -> None:
    # SQLite here; on Postgres the chaos test SIGKILLs workers inside calls (test_chaos.py).
    durable_url = f"sqlite:///{tmp_path / 'harness.db'}"
    world_file = tmp_path / "world.txt"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, durable_url, str(world_file)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 9, proc.stderr
    assert world_file.read_text() == "refund\n"

    with open_backend(durable_url) as backend:
        ledger = EffectLedger(backend)
        record = ledger.get("t-1", "call-1")
        assert record is not None and record.status == "started"
        # Resume the crashed run: the tool node runs again, the refund does not.
        builder = StateGraph(MessagesState)
        world = Counter()
        builder.add_node("tools", ToolNode(make_tools(world), wrap_tool_call=ledger.wrap_tool_call))
        builder.add_edge(START, "tools")
        graph = builder.compile(checkpointer=backend.checkpointer)
        out = graph.invoke(None, {"configurable": {"thread_id": "t-1"}}, durability="sync")
        (message,) = tool_messages(out["messages"])
        assert message.additional_kwargs["harness"]["escalation"]["kind"] == "effect_unknown"
        assert world.calls == []
        assert world_file.read_text() == "refund\n"


def _timing_out_refund(world: Counter, times: int | None) -> BaseTool:
    """An irreversible refund whose first *times* calls (all, with None) time out mid-call."""

    @irreversible
    @tool
    def refund(order_id: str, amount: int) -> str:
        """Refund an order."""
        world.add(f"refund {order_id}")
        if times is None or len(world.calls) <= times:
            raise TimeoutError("payment gateway timed out")  # did it go through?
        return "refunded"

    return refund


def _reviewed_refund(
    refund: BaseTool, ledger: EffectLedger | AsyncEffectLedger, last: Any = "ok"
) -> StateGraph[MessagesState]:
    """agent → (review) → tools through the ledger, the agent refunding o1 once, then *last*."""
    from harness_nodes import HumanReview, ReviewPolicy
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("refund", {"order_id": "o1", "amount": 5}, "c1")]), last]
    )
    review = HumanReview(ReviewPolicy(), tools=[refund])
    if isinstance(ledger, AsyncEffectLedger):
        tools = ToolNode([refund], awrap_tool_call=ledger.awrap_tool_call)
    else:
        tools = ToolNode([refund], wrap_tool_call=ledger.wrap_tool_call)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", tools)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_conditional_edges("tools", review.route)
    return builder


def test_unknown_outcome_reaches_a_person_through_human_review(memory_backend: Backend) -> None:
    from langgraph.types import Command

    world = Counter()
    refund = _timing_out_refund(world, times=1)
    ledger = EffectLedger(memory_backend)
    graph = _reviewed_refund(refund, ledger).compile(checkpointer=memory_backend.checkpointer)
    config: Any = {"configurable": {"thread_id": "t-1"}}

    with pytest.raises(TimeoutError):
        graph.invoke({"messages": [HumanMessage("refund o1")]}, config, durability="sync")
    paused = graph.invoke(None, config, durability="sync")  # the resumed run
    (request,) = paused["__interrupt__"][0].value
    assert request["trigger"] == "effect_unknown"
    assert request["action_request"] == {
        "action": "refund",
        "args": {"order_id": "o1", "amount": 5},
    }
    assert world.calls == [("refund o1", "t-1:c1")]  # not re-run while it waits

    # The reviewer checked the gateway: it went through. The app records it in the ledger.
    ledger.resolve("t-1", "c1", happened=True, result="refunded (confirmed)", reviewer="ann")
    done = graph.invoke(Command(resume={"type": "approve"}), config, durability="sync")
    assert done["messages"][-1].content == "ok"
    assert world.calls == [("refund o1", "t-1:c1")]


def test_a_reviewer_cannot_deny_an_effect_the_ledger_records_as_done(
    memory_backend: Backend,
) -> None:
    from harness_nodes import InvalidDecision, ReviewQueue

    world = Counter()
    refund = _timing_out_refund(world, times=1)
    ledger = EffectLedger(memory_backend)
    graph = _reviewed_refund(refund, ledger).compile(checkpointer=memory_backend.checkpointer)
    queue = ReviewQueue(memory_backend, graph)
    with pytest.raises(TimeoutError):
        queue.invoke({"messages": [HumanMessage("refund o1")]}, thread_id="t-1")
    queue.invoke(None, thread_id="t-1")  # the resumed run asks: did it happen?
    [item] = queue.pending()
    assert item.requests[0]["trigger"] == "effect_unknown"
    # Meanwhile it became known: the call took effect (a paused worker finished it, say).
    ledger.resolve("t-1", "c1", happened=True, result="refunded", reviewer="ops")
    with pytest.raises(InvalidDecision, match="took effect since this review was asked"):
        queue.decide(item.id, {"type": "reject", "message": "no charge found"}, reviewer="al")
    assert queue.get(item.id).status == "pending"
    queue.decide(item.id, {"type": "approve"}, reviewer="al")
    assert len(world.calls) == 1  # never a second refund


async def test_an_async_reviewer_cannot_deny_an_effect_the_ledger_records_as_done(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import AsyncReviewQueue, InvalidDecision

    world = Counter()
    refund = _timing_out_refund(world, times=1)
    ledger = AsyncEffectLedger(abackend)
    graph = _reviewed_refund(refund, ledger).compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph)
    with pytest.raises(TimeoutError):
        await queue.ainvoke({"messages": [HumanMessage("refund o1")]}, thread_id="t-1")
    await queue.ainvoke(None, thread_id="t-1")  # the resumed run asks: did it happen?
    [item] = await queue.pending()
    assert item.requests[0]["trigger"] == "effect_unknown"
    # Meanwhile it became known: the call took effect (a paused worker finished it, say).
    await ledger.aresolve("t-1", "c1", happened=True, result="refunded", reviewer="ops")
    with pytest.raises(InvalidDecision, match="took effect since this review was asked"):
        await queue.decide(item.id, {"type": "reject", "message": "no charge"}, reviewer="al")
    assert (await queue.get(item.id)).status == "pending"
    await queue.decide(item.id, {"type": "approve"}, reviewer="al")
    assert len(world.calls) == 1  # never a second refund


@pytest.mark.parametrize("known", [False, True], ids=["unknown", "done-since"])
def test_a_runner_answer_about_an_unknown_effect_is_checked_and_recorded(
    memory_backend: Backend, known: bool
) -> None:
    from harness_nodes import InvalidDecision, TaskRunner

    world = Counter()
    refund = _timing_out_refund(world, times=None)
    ledger = EffectLedger(memory_backend)
    with TaskRunner(memory_backend, _reviewed_refund(refund, ledger), max_attempts=2) as runner:
        runner.submit("k", {"messages": [HumanMessage("refund o1")]})
        deadline = time.monotonic() + 10
        while runner.status("k").status != "interrupted":  # the retry asks: did it happen?
            assert time.monotonic() < deadline, runner.status("k")
            time.sleep(0.02)
        thread = runner.status("k").thread_id
        if known:  # it became known meanwhile: the refund went out
            ledger.resolve(thread, "c1", happened=True, result="refunded", reviewer="ops")
            with pytest.raises(InvalidDecision, match="took effect since this review was asked"):
                runner.resume("k", {"type": "reject", "reviewer": "al"})
            assert runner.status("k").status == "interrupted"
            return
        done = runner.resume("k", {"type": "reject", "reviewer": "al"})  # it did not happen
    assert done.status == "completed"
    record = ledger.get(thread, "c1")
    assert record is not None and record.resolved_by == "al"  # recorded, as the queue does
    assert len(world.calls) == 1


@pytest.mark.parametrize("known", [False, True], ids=["unknown", "done-since"])
async def test_an_async_runner_answer_about_an_unknown_effect_is_checked_and_recorded(
    abackend: AsyncBackend, known: bool
) -> None:
    from harness_nodes import AsyncTaskRunner, InvalidDecision

    world = Counter()
    refund = _timing_out_refund(world, times=None)
    ledger = AsyncEffectLedger(abackend)
    graph = _reviewed_refund(refund, ledger)
    async with AsyncTaskRunner(abackend, graph, max_attempts=2) as runner:
        await runner.asubmit("k", {"messages": [HumanMessage("refund o1")]})
        deadline = time.monotonic() + 10
        while (await runner.astatus("k")).status != "interrupted":  # did it happen?
            assert time.monotonic() < deadline, await runner.astatus("k")
            await asyncio.sleep(0.02)
        thread = (await runner.astatus("k")).thread_id
        if known:  # it became known meanwhile: the refund went out
            await ledger.aresolve(thread, "c1", happened=True, result="refunded", reviewer="ops")
            with pytest.raises(InvalidDecision, match="took effect since this review was asked"):
                await runner.aresume("k", {"type": "reject", "reviewer": "al"})
            assert (await runner.astatus("k")).status == "interrupted"
            return
        done = await runner.aresume("k", {"type": "reject", "reviewer": "al"})  # it did not
    assert done.status == "completed"
    record = await ledger.aget(thread, "c1")
    assert record is not None and record.resolved_by == "al"  # recorded, as the queue does
    assert len(world.calls) == 1


def test_a_runner_answer_about_an_effect_is_not_recorded_while_another_runner_holds_the_task(
    memory_backend: Backend,
) -> None:
    from harness_nodes import TaskNotPaused, TaskRunner
    from harness_nodes._lease import claim

    world = Counter()
    refund = _timing_out_refund(world, times=None)
    ledger = EffectLedger(memory_backend)
    with TaskRunner(memory_backend, _reviewed_refund(refund, ledger), max_attempts=2) as runner:
        runner.submit("k", {"messages": [HumanMessage("refund o1")]})
        deadline = time.monotonic() + 10
        while runner.status("k").status != "interrupted":  # the retry asks: did it happen?
            assert time.monotonic() < deadline, runner.status("k")
            time.sleep(0.02)
        thread = runner.status("k").thread_id
        asked = ledger.get(thread, "c1")
        # Another runner claimed the task to answer the pause (the review queue, say).
        assert memory_backend.execute(*claim(thread, "elsewhere:1:x", 30, resuming=True))
        with pytest.raises(TaskNotPaused, match="another runner holds it"):
            runner.resume("k", {"type": "reject", "reviewer": "al"})  # "it did not happen"
    record = ledger.get(thread, "c1")
    assert asked is not None and asked.resolved_by is None
    assert record == asked  # not answered: that is for the runner holding the task
    assert len(world.calls) == 1


async def test_an_async_runner_answer_about_an_effect_is_not_recorded_while_the_task_is_held(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import AsyncTaskRunner, TaskNotPaused
    from harness_nodes._lease import claim

    world = Counter()
    refund = _timing_out_refund(world, times=None)
    ledger = AsyncEffectLedger(abackend)
    graph = _reviewed_refund(refund, ledger)
    async with AsyncTaskRunner(abackend, graph, max_attempts=2) as runner:
        await runner.asubmit("k", {"messages": [HumanMessage("refund o1")]})
        deadline = time.monotonic() + 10
        while (await runner.astatus("k")).status != "interrupted":  # did it happen?
            assert time.monotonic() < deadline, await runner.astatus("k")
            await asyncio.sleep(0.02)
        thread = (await runner.astatus("k")).thread_id
        asked = await ledger.aget(thread, "c1")
        assert await abackend.execute(*claim(thread, "elsewhere:1:x", 30, resuming=True))
        with pytest.raises(TaskNotPaused, match="another runner holds it"):
            await runner.aresume("k", {"type": "reject", "reviewer": "al"})
    record = await ledger.aget(thread, "c1")
    assert asked is not None and asked.resolved_by is None
    assert record == asked  # not answered: that is for the runner holding the task
    assert len(world.calls) == 1


def _dying_once(died: bool) -> Any:
    """The agent's last answer, "ok" — after a process death the first time, with *died*."""
    from tests.harness_nodes.review_app import ProcessDied

    crashed: list[bool] = []

    def ok_unless_dying(messages: Any) -> str:
        if died and not crashed:
            crashed.append(True)
            raise ProcessDied("the process died after the decision was applied")
        return "ok"

    return ok_unless_dying


@pytest.mark.parametrize("died", [False, True], ids=["never-resumed", "died-after-resume"])
def test_queue_recovery_settles_the_ledger_before_carrying_a_decision_on(
    backend: Backend, died: bool
) -> None:
    from langgraph.types import Command

    from harness_nodes import ReviewQueue
    from harness_nodes.review_queue import _CLAIM
    from tests.harness_nodes.review_app import ProcessDied

    world = Counter()
    ledger = EffectLedger(backend)
    builder = _reviewed_refund(_timing_out_refund(world, times=1), ledger, _dying_once(died))
    queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
    with pytest.raises(TimeoutError):
        queue.invoke({"messages": [HumanMessage("refund o1")]}, thread_id="t-1")
    queue.invoke(None, thread_id="t-1")  # the resumed run asks: did it happen?
    [item] = queue.pending()
    # "It happened": al's decision won (its claim committed), then the process died before
    # the answer reached the ledger (and, with *died*, after it reached the graph).
    decision = [{"type": "approve", "reviewer": "al", "review_id": item.id}]
    backend.execute(_CLAIM, (json.dumps(decision), "al", time.time(), item.id))
    cfg: Any = {"configurable": {"thread_id": "t-1"}}
    if died:
        with pytest.raises(ProcessDied):
            resume = Command(resume={item.interrupt_id: decision})
            queue.graph.invoke(resume, cfg, durability="sync")
    assert queue.sync("t-1") == []  # a plain sync leaves it to recovery
    assert queue.get(item.id).status == "decided"

    assert queue.sync("t-1", recover=True) == []
    record = ledger.get("t-1", "c1")
    assert record is not None and (record.status, record.resolved_by) == ("done", "al")
    assert queue.get(item.id).status == "applied"
    assert queue.graph.get_state(cfg).values["messages"][-1].content == "ok"
    assert len(world.calls) == 1


@pytest.mark.parametrize("died", [False, True], ids=["never-resumed", "died-after-resume"])
async def test_async_queue_recovery_settles_the_ledger_before_carrying_a_decision_on(
    abackend: AsyncBackend, died: bool
) -> None:
    from langgraph.types import Command

    from harness_nodes import AsyncReviewQueue
    from harness_nodes.review_queue import _CLAIM
    from tests.harness_nodes.review_app import ProcessDied

    world = Counter()
    ledger = AsyncEffectLedger(abackend)
    builder = _reviewed_refund(_timing_out_refund(world, times=1), ledger, _dying_once(died))
    queue = AsyncReviewQueue(abackend, builder.compile(checkpointer=abackend.checkpointer))
    with pytest.raises(TimeoutError):
        await queue.ainvoke({"messages": [HumanMessage("refund o1")]}, thread_id="t-1")
    await queue.ainvoke(None, thread_id="t-1")  # the resumed run asks: did it happen?
    [item] = await queue.pending()
    # "It happened": al's decision won (its claim committed), then the process died before
    # the answer reached the ledger (and, with *died*, after it reached the graph).
    decision = [{"type": "approve", "reviewer": "al", "review_id": item.id}]
    await abackend.execute(_CLAIM, (json.dumps(decision), "al", time.time(), item.id))
    cfg: Any = {"configurable": {"thread_id": "t-1"}}
    if died:
        with pytest.raises(ProcessDied):
            resume = Command(resume={item.interrupt_id: decision})
            await queue.graph.ainvoke(resume, cfg, durability="sync")
    assert await queue.sync("t-1") == []  # a plain sync leaves it to recovery
    assert (await queue.get(item.id)).status == "decided"

    assert await queue.sync("t-1", recover=True) == []
    record = await ledger.aget("t-1", "c1")
    assert record is not None and (record.status, record.resolved_by) == ("done", "al")
    assert (await queue.get(item.id)).status == "applied"
    assert (await queue.graph.aget_state(cfg)).values["messages"][-1].content == "ok"
    assert len(world.calls) == 1


def test_an_idempotency_key_taken_by_another_call_is_a_clear_error(backend: Backend) -> None:
    ledger = EffectLedger(backend)
    assert ledger.run(lambda ctx: "first", name="email", thread_id="a:b", call_id="c") == "first"
    # ("a", "b:c") joins to the same key "a:b:c": refused, never run, nothing overwritten.
    with pytest.raises(EffectError, match="already taken by another call"):
        ledger.run(lambda ctx: "second", name="email", thread_id="a", call_id="b:c")
    rows = backend.execute("SELECT thread_id, status FROM harness_effects")
    assert rows == [{"thread_id": "a:b", "status": "done"}]


def _ledger_fault(
    monkeypatch: pytest.MonkeyPatch, backend: Backend, error: Exception, times: int
) -> list[int]:
    """Make the ledger's result-recording statement fail *times* times with *error*."""
    import harness_nodes.effects as fx

    real = backend.execute
    left = [times]

    def execute(sql: str, params: Any = ()) -> Any:
        if sql == fx._FINISH and left[0] > 0:
            left[0] -= 1
            raise error
        return real(sql, params)

    monkeypatch.setattr(backend, "execute", execute)
    return left


def _harnessed(backend: Backend, world: Counter) -> Any:
    from harness_nodes import build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("refund", {"order_id": "o1", "amount": 10})]), ai("ok")]
    )
    return build_harnessed_agent(model, make_tools(world), backend=backend)


def test_a_passing_database_fault_in_the_ledger_is_retried_not_a_tool_failure(
    memory_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    world = Counter()
    left = _ledger_fault(
        monkeypatch, memory_backend, sqlite3.OperationalError("database is locked"), 1
    )
    out = _harnessed(memory_backend, world).invoke(
        {"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "f1"}}
    )
    assert left == [0] and len(world.calls) == 1
    assert out["outcome"]["status"] == "completed"
    assert all(v["ok"] for v in out["verdicts"])  # not blamed on the tool
    record = EffectLedger(memory_backend).get("f1", out["messages"][1].tool_calls[0]["id"])
    assert record is not None and record.status == "done"


def test_a_ledger_that_cannot_record_a_result_fails_the_run_and_the_resume_asks_a_person(
    memory_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from harness_nodes import BackendUnavailable

    world = Counter()
    graph = _harnessed(memory_backend, world)
    cfg = {"configurable": {"thread_id": "f2"}}
    _ledger_fault(monkeypatch, memory_backend, sqlite3.DatabaseError("disk I/O error"), 99)
    with pytest.raises(BackendUnavailable, match="effect ledger: DatabaseError: disk I/O error"):
        graph.invoke({"messages": [HumanMessage("go")]}, cfg)
    assert len(world.calls) == 1  # the refund went out; its record did not
    monkeypatch.undo()
    graph.invoke(None, cfg)
    [intr] = graph.get_state(cfg).interrupts
    assert intr.value[0]["trigger"] == "effect_unknown"  # did it happen? a person says
    assert len(world.calls) == 1


def test_a_call_finished_after_it_was_answered_did_not_happen_is_recorded_done(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # A stalled worker (its lease lost, the task recovered elsewhere and a reviewer told
    # "it did not happen") carries the call out after all: its result was dropped (the row
    # was no longer 'started') and the ledger kept saying it never happened, so a re-issued
    # call of the same id would run it a second time.
    ledger = EffectLedger(backend)

    def refund(ctx: Any) -> str:
        # ...meanwhile, in the process that recovered the task:
        EffectLedger(backend).resolve("t-late", "c1", happened=False, reviewer="alice")
        return "refunded 25"

    kw: Any = {"name": "refund", "thread_id": "t-late", "call_id": "c1"}
    assert ledger.run(refund, args={"amount": 25}, **kw) == "refunded 25"
    record = ledger.get("t-late", "c1")
    assert record is not None
    assert (record.status, record.result, record.resolved_by) == ("done", "refunded 25", "alice")
    assert record.error is not None and "lost its lease" in record.error
    assert any(
        "lost its lease" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records
    )
    # the call again: replayed, not run a second time
    assert ledger.run(lambda ctx: "refunded twice", **kw) == "refunded 25"


async def test_an_async_call_finished_after_it_was_answered_did_not_happen_is_recorded_done(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes.aio import AsyncEffectLedger

    ledger = AsyncEffectLedger(abackend)

    async def refund(ctx: Any) -> str:
        await AsyncEffectLedger(abackend).aresolve("t-late", "c1", happened=False, reviewer="al")
        return "refunded 25"

    kw: Any = {"name": "refund", "thread_id": "t-late", "call_id": "c1"}
    assert await ledger.arun(refund, **kw) == "refunded 25"
    record = await ledger.aget("t-late", "c1")
    assert record is not None and (record.status, record.result) == ("done", "refunded 25")


def test_a_call_a_stalled_run_finished_after_a_later_attempt_ran_it_is_recorded_twice_run(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # The usual order: answered "did not happen", the new worker runs the call again (attempt
    # 2), then the stalled one finishes attempt 1. Its finish matched attempt 2's row (any
    # 'started' row): no note, nothing logged, and a result recorded as the wrong attempt's.
    ran: list[int] = []
    kw: Any = {"name": "refund", "thread_id": "t-twice", "call_id": "c1"}

    def again(ctx: Any) -> str:
        ran.append(ctx.attempt)
        return "refunded by the new worker"

    def stalled(ctx: Any) -> str:
        EffectLedger(backend).resolve("t-twice", "c1", happened=False, reviewer="alice")
        assert EffectLedger(backend).run(again, **kw) == "refunded by the new worker"
        ran.append(ctx.attempt)
        return "refunded by the stalled worker"

    EffectLedger(backend).run(stalled, **kw)
    assert ran == [2, 1]  # it did run twice: the ledger must say so
    record = EffectLedger(backend).get("t-twice", "c1")
    assert record is not None
    assert (record.status, record.result, record.attempts) == (
        "done",
        "refunded by the new worker",
        2,
    )
    assert record.error is not None and "ran more than once" in record.error
    assert any("ran more than once" in r.getMessage() for r in caplog.records)


class _CommitThenInterrupt:
    """A SQLite connection whose next COMMIT is interrupted once it has run.

    As a ``KeyboardInterrupt`` (a signal handled when the statement returns) or a thread's
    async exception arrives: SQLite committed, the caller sees only the interrupt.
    """

    def __init__(self, conn: Any) -> None:
        self._conn, self.armed = conn, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        out = self._conn.execute(sql, *args)
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return out


class _CancelledAtCommit:
    """An aiosqlite connection whose task is cancelled while its next COMMIT is queued.

    aiosqlite runs a queued statement even when the task awaiting it is cancelled (a client
    gone, an ``asyncio.wait_for`` timeout): the COMMIT lands, the caller sees the cancellation.
    """

    def __init__(self, conn: Any) -> None:
        self._conn, self.armed = conn, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            return self._cancelled_commit()
        return self._conn.execute(sql, *args)

    async def _cancelled_commit(self) -> None:
        commit = asyncio.ensure_future(self._conn.execute("COMMIT"))
        await asyncio.sleep(0)  # queued on aiosqlite's thread
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await commit


def test_a_call_whose_intent_commit_was_interrupted_runs_again_not_asks_a_person(
    tmp_path: Any,
) -> None:
    # The intent's COMMIT ran, the interrupt came as it returned; the call never ran, yet the
    # row stayed `started` and the next execution answered "outcome unknown" (SQLite
    # committed or rolled back: nothing about it is unknown).
    with open_backend(f"sqlite:///{tmp_path / 'h.db'}") as backend:
        ledger = EffectLedger(backend)
        ran: list[str] = []

        def send(ctx: Any) -> str:
            ran.append(ctx.idempotency_key)
            return "sent"

        db: Any = backend._db  # pyright: ignore[reportPrivateUsage]
        db.conn = _CommitThenInterrupt(db.conn)
        with pytest.raises(KeyboardInterrupt):
            ledger.run(send, name="email", thread_id="t", call_id="c1")
        record = ledger.get("t", "c1")
        assert ran == [] and record is not None and record.status == "aborted"

        assert ledger.run(send, name="email", thread_id="t", call_id="c1") == "sent"
        assert ran == ["t:c1"]


async def test_a_call_whose_intent_commit_was_cancelled_runs_again_not_asks_a_person(
    tmp_path: Any,
) -> None:
    from checkpointers import aopen_backend

    async with await aopen_backend(f"sqlite:///{tmp_path / 'h.db'}") as backend:
        ledger = AsyncEffectLedger(backend)
        ran: list[str] = []

        async def send(ctx: Any) -> str:
            ran.append(ctx.idempotency_key)
            return "sent"

        db: Any = backend._db  # pyright: ignore[reportPrivateUsage]
        db.conn = _CancelledAtCommit(db.conn)
        run = asyncio.ensure_future(ledger.arun(send, name="email", thread_id="t", call_id="c1"))
        with pytest.raises(asyncio.CancelledError):
            await run
        record = await ledger.aget("t", "c1")
        assert ran == [] and record is not None and record.status == "aborted"

        assert await ledger.arun(send, name="email", thread_id="t", call_id="c1") == "sent"
        assert ran == ["t:c1"]


class _SlowCommit:
    """A SQLite connection whose next COMMIT waits for *release* (a slow disk, a busy lock)."""

    def __init__(self, conn: Any, entered: threading.Event, release: threading.Event) -> None:
        self._conn, self.entered, self.release, self.armed = conn, entered, release, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(10)
        return self._conn.execute(sql, *args)


async def test_a_call_cancelled_while_the_sync_ledger_records_its_intent_runs_on_resume() -> None:
    # The sync ledger records the intent in a worker thread; the task cancelled meanwhile let
    # go of the thread, which recorded it anyway: the call never ran, but its row stayed
    # `started` and the resumed run answered "outcome unknown" (on any backend).
    world = Counter()
    refund = call("refund", {"order_id": "o1", "amount": 10}, "call-1")
    entered, release = threading.Event(), threading.Event()
    with open_backend("memory://") as backend:
        db: Any = backend._db  # pyright: ignore[reportPrivateUsage]
        graph = build(backend, make_tools(world), [[refund]])
        db.conn = _SlowCommit(db.conn, entered, release)
        config: Any = {"configurable": {"thread_id": "t-3"}}
        run = asyncio.ensure_future(
            graph.ainvoke({"messages": [HumanMessage("go")]}, config, durability="sync")
        )
        assert await asyncio.to_thread(entered.wait, 10)
        run.cancel()  # the client disconnected
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await run
        ledger = EffectLedger(backend)
        for _ in range(100):  # the thread's transaction, if it was let go
            record = ledger.get("t-3", "call-1")
            if record is not None and record.status != "started":
                break
            await asyncio.sleep(0.02)
        assert world.calls == []
        assert record is not None and record.status == "aborted"

        out = await graph.ainvoke(None, config, durability="sync")
    [result] = tool_messages(out["messages"])
    assert (result.status, result.text) == ("success", "refunded 10 on o1")
    assert world.calls == [("refund o1 10", "t-3:call-1")]


def test_a_refused_commit_of_the_intent_is_retried_once_whole(tmp_path: Any) -> None:
    # A file in rollback-journal mode (the backend sets WAL; a file system without WAL
    # support keeps it so): the intent's COMMIT waits for a reader in another process and is
    # refused after the busy timeout. The ledger retries the whole transaction: the call is
    # recorded once, as its first attempt, and nothing stays locked.
    path = tmp_path / "harness.db"
    db = _SqliteDB(str(path))
    db.migrate()
    assert db.execute("PRAGMA journal_mode = DELETE", ()) == [{"journal_mode": "delete"}]
    db.execute("PRAGMA busy_timeout = 100", ())
    backend = Backend(
        url="sqlite:///harness.db", kind="sqlite", checkpointer=InMemorySaver(), db=db
    )
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM harness_effects").fetchall()
    # Done reading after the first COMMIT was refused (100 ms), before the retry (200 ms later).
    done_reading = threading.Timer(0.2, reader.execute, ("COMMIT",))
    done_reading.start()
    try:
        begin = EffectLedger(backend)._begin(_Call("t-1", "call-1", "refund", {"amount": 10}))
    finally:
        done_reading.join()
        reader.close()
    assert begin.run is not None and begin.run.attempt == 1
    with backend:
        rows = backend.execute("SELECT status, attempts FROM harness_effects")
        assert rows == [{"status": "started", "attempts": 1}]
        other = sqlite3.connect(path, timeout=1, isolation_level=None)
        other.execute("UPDATE harness_effects SET status = 'done'")
        other.close()


def _refund_and_notify(backend: Backend | AsyncBackend, refunds: list[str]) -> Any:
    """One model turn asks for a refund (slow) and a notification (fails once), together."""
    failed = threading.Event()

    @irreversible
    async def refund(order: str) -> str:
        """Refund an order."""
        refunds.append(order)
        await asyncio.sleep(0.3)  # still running when its sibling raises
        return f"refunded {order}"

    @tool
    def notify(order: str) -> str:
        """Tell the customer."""
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the mail server timed out")
        return f"told {order}"

    both = [call("refund", {"order": "A1"}, "c_r"), call("notify", {"order": "A1"}, "c_n")]

    async def agent(state: MessagesState) -> dict[str, Any]:
        done = any(isinstance(m, ToolMessage) for m in state["messages"])
        return {"messages": [AIMessage("done" if done else "", tool_calls=[] if done else both)]}

    if isinstance(backend, AsyncBackend):
        hook = AsyncEffectLedger(backend).awrap_tool_call
    else:
        hook = EffectLedger(backend).awrap_tool_call
    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([refund, notify], awrap_tool_call=hook))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=backend.checkpointer)


async def _retried_after_a_sibling_failed(graph: Any) -> list[Any]:
    config: Any = {"configurable": {"thread_id": "t-sib"}}
    with pytest.raises(RuntimeError, match="mail server"):
        await graph.ainvoke({"messages": [HumanMessage("refund A1")]}, config, durability="sync")
    out = await graph.ainvoke(None, config, durability="sync")  # a retry, as the runner's
    return tool_messages(out["messages"])


async def test_a_call_still_running_when_a_sibling_failed_is_replayed_not_unknown(
    abackend: AsyncBackend,
) -> None:
    # Under ainvoke, ToolNode gathers its calls: one that raises ends the node while the
    # refund still runs (a sync ToolNode waits for it). The retry found the refund's intent
    # with no result and told the model its outcome was unknown, then the refund finished.
    refunds: list[str] = []
    answers = await _retried_after_a_sibling_failed(_refund_and_notify(abackend, refunds))
    assert [(m.tool_call_id, m.content) for m in answers] == [
        ("c_r", "refunded A1"),
        ("c_n", "told A1"),
    ]
    assert answers[0].additional_kwargs["harness"]["effect"]["replayed"] is True
    assert refunds == ["A1"]
    record = await AsyncEffectLedger(abackend).aget("t-sib", "c_r")
    assert record is not None and (record.status, record.attempts) == ("done", 1)


async def test_the_sync_ledger_replays_a_call_still_running_when_a_sibling_failed() -> None:
    refunds: list[str] = []
    with open_backend("memory://") as backend:
        answers = await _retried_after_a_sibling_failed(_refund_and_notify(backend, refunds))
    assert [(m.tool_call_id, m.content) for m in answers][0] == ("c_r", "refunded A1")
    assert refunds == ["A1"]


async def test_a_call_running_past_the_wait_is_an_unknown_outcome_to_the_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A call that hangs must not hang its retry: past the wait, the retry treats the intent
    # as after a crash (the outcome unknown, for a person), and says why in the log.
    import harness_nodes.effects as fx

    monkeypatch.setattr(fx, "_RUNNING_WAIT", 0.05)
    refunds: list[str] = []
    with open_backend("memory://") as backend:
        answers = await _retried_after_a_sibling_failed(_refund_and_notify(backend, refunds))
        await asyncio.sleep(0.4)  # the first refund finishes meanwhile
    assert answers[0].tool_call_id == "c_r" and "unknown" in str(answers[0].content).lower()
    assert refunds == ["A1"]
    assert any("still running in this process" in r.getMessage() for r in caplog.records)
