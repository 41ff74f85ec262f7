"""A user's router that raises once never lets the `TaskRunner` record the task completed.

LangGraph runs a conditional edge's router inside the task of the node it leaves, after that
node's writes; a router that raises leaves the writes recorded and no branch, and carrying the
run on from there ends it at once: the model's tool call never runs. The runner replays that
step with ``update_state(as_node=...)`` so the router routes again (`_lease.lost_branch`), and
fails the task (never ``completed``) when it keeps raising or the step cannot be replayed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command

from checkpointers import AsyncBackend, Backend, aopen_backend, open_backend
from harness_nodes import AsyncTaskRunner, RunFailed, TaskRunner, build_trace
from harness_nodes._lease import run_config
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

ASK = {"messages": [HumanMessage("Where is A1?")]}
LOOKED_UP: list[str] = []


@tool
def lookup_order(order_id: str) -> str:
    """Look an order up."""
    LOOKED_UP.append(order_id)
    return "shipped"


class FlakyRouter:
    """``tools_condition`` that raises on its first *failures* calls (a transient error)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, state: MessagesState) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("routing service timed out")
        return tools_condition(state)


def agent_graph(route: Callable[[MessagesState], str]) -> StateGraph[Any]:
    """A plain user agent: model → (router) → tools → model, nothing of the harness's."""
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("lookup_order", {"order_id": "A1"}, id="call_1")]),
            ai("Shipped."),
        ]
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([lookup_order]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder


def answered_once(messages: list[Any]) -> None:
    """The tool call was made once, run once and answered once: nothing doubled, nothing lost."""
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    answers = [m for m in messages if isinstance(m, ToolMessage)]
    assert [c.tool_calls[0]["id"] for c in calls] == ["call_1"]
    assert [(a.tool_call_id, a.content) for a in answers] == [("call_1", "shipped")]
    assert messages[-1].content == "Shipped."
    assert LOOKED_UP == ["A1"]


@pytest.fixture
def durable(durable_url: str) -> Iterator[Backend]:
    LOOKED_UP.clear()
    with open_backend(durable_url) as backend:
        yield backend


@pytest.fixture
async def adurable(durable_url: str) -> AsyncIterator[AsyncBackend]:
    LOOKED_UP.clear()
    backend = await aopen_backend(durable_url)
    try:
        yield backend
    finally:
        await backend.close()


def test_router_raising_once_is_routed_again_not_completed(durable: Backend) -> None:
    router = FlakyRouter(failures=1)
    with TaskRunner(durable, agent_graph(router), max_attempts=3) as runner:
        outcome = runner.run("t-once", ASK, timeout=30)
        state = runner.graph.get_state({"configurable": {"thread_id": "t-once"}})
    assert outcome == {"status": "completed", "partial_result": "Shipped."}
    assert (state.next, state.tasks) == ((), ())
    answered_once(state.values["messages"])
    assert router.calls == 3  # raised; routed again to the tools; after the final answer
    # The replayed step reads as the history it is: the call, its tool result, the answer.
    trace = build_trace(durable, "t-once")
    assert trace.status == "completed"
    text = trace.to_json()
    assert '"call_1"' in text and "Shipped." in text and "shipped" in text
    assert json.loads(text) == trace.to_dict()


def test_router_that_keeps_raising_fails_the_task_with_its_error(durable: Backend) -> None:
    router = FlakyRouter(failures=100)
    with TaskRunner(durable, agent_graph(router), max_attempts=3) as runner:
        with pytest.raises(RunFailed, match="RuntimeError: routing service timed out"):
            runner.run("t-always", ASK, timeout=30)
        run = runner.status("t-always")
        state = runner.graph.get_state({"configurable": {"thread_id": "t-always"}})
    assert (run.status, run.error) == ("failed", "RuntimeError: routing service timed out")
    assert router.calls == 3  # one per attempt
    # Still at the failed step (LangGraph reads it as finished: ``next`` omits it), so a
    # resume or a recovery once the router works routes it.
    assert [(t.name, t.error is not None) for t in state.tasks] == [("agent", True)]
    assert LOOKED_UP == []


def test_recovery_routes_again_a_dead_run_left_at_a_raising_router(durable: Backend) -> None:
    router = FlakyRouter(failures=1)
    with TaskRunner(durable, agent_graph(router), lease_seconds=5) as runner:
        # The run's process died right after the router raised: its checkpoint holds the
        # failed step, its row says running on a lease that expired.
        config = run_config("t-dead", "t-dead", "default", None)
        with pytest.raises(RuntimeError, match="routing service timed out"):
            runner.graph.invoke(ASK, config, durability="sync")
        durable.execute(
            "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, "
            "input, lease_owner, lease_expires_at, attempts, created_at, updated_at) "
            "VALUES (%s, %s, 'default', NULL, 'running', %s, 'gone:1:x', 1.0, 1, 1, 1)",
            ("t-dead", "t-dead", json.dumps({"json": {"messages": []}})),
        )
        assert runner.recover() == ["t-dead"]
        outcome = runner.result("t-dead", timeout=30)
        state = runner.graph.get_state({"configurable": {"thread_id": "t-dead"}})
    assert outcome == {"status": "completed", "partial_result": "Shipped."}
    answered_once(state.values["messages"])


def test_a_branch_that_cannot_be_replayed_fails_the_task_with_the_reason(
    durable: Backend,
) -> None:
    # The node's writes include its Command's goto, which is not state: replaying its update
    # would drop it. The task fails at once with why, never "completed".
    router = FlakyRouter(failures=1)
    builder = StateGraph(MessagesState)
    builder.add_node(
        "agent", lambda state: Command(update={"messages": [AIMessage("hm")]}, goto="note")
    )
    builder.add_node("note", lambda state: {"messages": [AIMessage("noted")]})
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", router, ["tools", END])
    builder.add_node("tools", ToolNode([lookup_order]))
    with TaskRunner(durable, builder, max_attempts=3) as runner:
        with pytest.raises(RunFailed, match="a router raised after node agent"):
            runner.run("t-goto", ASK, timeout=30)
        run = runner.status("t-goto")
    assert run.status == "failed"
    assert run.error == (
        "BranchLost: a router raised after node agent; its branch was lost "
        "(the writes of node agent cannot be replayed)"
    )
    assert router.calls == 1


async def _arun(runner: AsyncTaskRunner, key: str) -> dict[str, Any]:
    await runner.asubmit(key, ASK)
    return await runner.aresult(key, timeout=30)


@pytest.mark.anyio
async def test_async_router_raising_once_is_routed_again(adurable: AsyncBackend) -> None:
    router = FlakyRouter(failures=1)
    async with AsyncTaskRunner(adurable, agent_graph(router), max_attempts=3) as runner:
        outcome = await _arun(runner, "t-async")
        state = await runner.graph.aget_state({"configurable": {"thread_id": "t-async"}})
    assert outcome == {"status": "completed", "partial_result": "Shipped."}
    answered_once(state.values["messages"])


@pytest.mark.anyio
async def test_async_router_that_keeps_raising_fails_the_task(adurable: AsyncBackend) -> None:
    router = FlakyRouter(failures=100)
    async with AsyncTaskRunner(adurable, agent_graph(router), max_attempts=2) as runner:
        with pytest.raises(RunFailed, match="RuntimeError: routing service timed out"):
            await _arun(runner, "t-async-always")
    assert router.calls == 2
    assert LOOKED_UP == []


def _fan_out_graph(router: FlakyRouter, ran: list[str], *, aio: bool) -> StateGraph[Any]:
    """Two nodes in one step: ``a`` (whose router raises) and ``b``, still running then."""

    def node(name: str) -> Callable[[MessagesState], Any]:
        def update() -> dict[str, Any]:
            return {"messages": [AIMessage(f"from {name}", id=name)]}

        def run(state: MessagesState) -> dict[str, Any]:
            ran.append(name)
            if name == "b":
                time.sleep(0.3)  # still running when a's router raises
            return update()

        async def arun(state: MessagesState) -> dict[str, Any]:
            ran.append(name)
            if name == "b":
                await asyncio.sleep(0.3)
            return update()

        return arun if aio else run

    def route(state: MessagesState) -> str:
        router(state)
        return "c"

    builder = StateGraph(MessagesState)
    for name in ("a", "b", "c"):
        builder.add_node(name, node(name))
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    builder.add_conditional_edges("a", route, ["c", END])
    builder.add_edge("c", END)
    return builder


@pytest.mark.anyio
async def test_async_router_raising_beside_a_running_sibling_is_routed_again(
    adurable: AsyncBackend,
) -> None:
    # Under ainvoke LangGraph cancels the step's other tasks when one fails (a sync run lets
    # them finish): b is cut short with no result, which failed the task (BranchLost: "task
    # b of the same step has not finished") where TaskRunner carries it on.
    router, ran = FlakyRouter(failures=1), []
    async with AsyncTaskRunner(
        adurable, _fan_out_graph(router, ran, aio=True), max_attempts=3
    ) as runner:
        outcome = await _arun(runner, "t-fan")
        state = await runner.graph.aget_state({"configurable": {"thread_id": "t-fan"}})
    assert outcome == {"status": "completed", "partial_result": "from c"}
    assert sorted(m.content for m in state.values["messages"][1:]) == [
        "from a",
        "from b",
        "from c",
    ]
    assert ran.count("a") == 1 and ran.count("c") == 1  # a is replayed, not run again


def test_router_raising_beside_a_sibling_is_routed_again(durable: Backend) -> None:
    router, ran = FlakyRouter(failures=1), []
    with TaskRunner(durable, _fan_out_graph(router, ran, aio=False), max_attempts=3) as runner:
        outcome = runner.run("t-fan", ASK, timeout=30)
        state = runner.graph.get_state({"configurable": {"thread_id": "t-fan"}})
    assert outcome == {"status": "completed", "partial_result": "from c"}
    assert sorted(m.content for m in state.values["messages"][1:]) == [
        "from a",
        "from b",
        "from c",
    ]
    assert sorted(ran) == ["a", "b", "c"]  # each once: b finished, a is replayed
