"""A retried answer to a pause inside a subgraph never answers the subgraph's next pause.

The review pause (A: refund A1) is raised inside a subgraph: a node that is a compiled graph,
or one invoked from a node function. After the answer the run goes past A, refunds A1, then a
tool fails once, so the runner retries. The parent's checkpoint does not move while its step
(the subgraph) runs: it still lists pause A, and an answer sent without an interrupt id stays
saved with that step. A retry that reused it handed the approval of A1 to pause B (refund B2),
which nobody had seen. The review queue lists both pauses, one after the other.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from checkpointers import Backend, aopen_backend, open_backend
from harness_nodes import (
    AsyncReviewQueue,
    EffectLedger,
    HumanReview,
    ReviewPolicy,
    ReviewQueue,
    TaskRunner,
    irreversible,
)
from harness_nodes.aio import AsyncEffectLedger, AsyncTaskRunner
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

REFUNDS = {"messages": [HumanMessage("refund A1 and B2")]}


def _graph(shape: str, refunds: list[str], failed: threading.Event) -> Callable[[Any], Any]:
    @irreversible
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        refunds.append(order)
        return f"refunded {amount:g} on {order}"

    @tool
    def notify(order: str) -> str:
        """Tell the customer."""
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the mail server timed out")
        return f"told {order}"

    def factory(backend: Any) -> StateGraph[MessagesState]:
        model = ScriptedChatModel(
            script=[
                ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250}, id="c_a")]),
                ai(tool_calls=[tool_call("notify", {"order": "A1"}, id="c_n")]),
                ai(tool_calls=[tool_call("refund", {"order": "B2", "amount": 900}, id="c_b")]),
                "ok",
            ]
        )
        review = HumanReview(
            ReviewPolicy(rules={"refund": lambda a: f"refund of ${a['amount']:g}"}), tools=[refund]
        )
        tools = ToolNode([refund, notify], wrap_tool_call=EffectLedger(backend).wrap_tool_call)

        def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [model.invoke(state["messages"])]}

        inner = StateGraph(MessagesState)
        inner.add_node("agent", agent)
        inner.add_node("review", review, destinations=("tools", "agent"))
        inner.add_node("tools", tools)
        inner.add_edge(START, "agent")
        inner.add_conditional_edges("agent", review.route)
        inner.add_edge("tools", "agent")
        sub = inner.compile()

        def support(state: MessagesState, config: RunnableConfig) -> Any:
            return sub.invoke(state, config)

        outer = StateGraph(MessagesState)
        outer.add_node("support", sub if shape == "node" else support)
        outer.add_edge(START, "support")
        outer.add_edge("support", END)
        return outer

    return factory


def _orders(queue: ReviewQueue) -> list[str]:
    return [i.requests[0]["action_request"]["args"]["order"] for i in queue.pending()]


def _effects(backend: Backend) -> list[tuple[str, str]]:
    rows = backend.execute("SELECT tool_call_id, status FROM harness_effects ORDER BY 1")
    return [(r["tool_call_id"], r["status"]) for r in rows]


@pytest.mark.parametrize("way", ["resume", "decide"])
@pytest.mark.parametrize("shape", ["node", "call"], ids=["subgraph-node", "subgraph-in-node"])
def test_a_retried_answer_does_not_answer_the_subgraphs_next_pause(
    durable_url: str, shape: str, way: str
) -> None:
    refunds: list[str] = []
    failed = threading.Event()
    with open_backend(durable_url) as backend:
        with TaskRunner(backend, _graph(shape, refunds, failed)) as runner:
            runner.submit("t-1", REFUNDS)
            deadline = time.monotonic() + 30
            while runner.status("t-1").status != "interrupted":
                assert time.monotonic() < deadline, runner.status("t-1")
                time.sleep(0.02)
            queue = ReviewQueue(backend, runner.graph, runner=runner)
            assert _orders(queue) == ["A1"]  # the subgraph's pause is listed
            [a] = queue.pending()
            if way == "resume":
                run = runner.resume("t-1", {"type": "approve"})
            else:
                queue.decide(a.id, {"type": "approve"}, reviewer="alice")
                run = runner.status("t-1")
            assert failed.is_set()  # the attempt past pause A failed, and was retried
            assert (run.status, run.attempts) == ("interrupted", 2), run
            assert refunds == ["A1"]  # once, and not B2: nobody has answered its pause
            assert _effects(backend) == [("c_a", "done")]
            assert _orders(queue) == ["B2"]  # the subgraph's next pause, listed
            assert queue.get(a.id).status == ("closed" if way == "resume" else "applied")
            [b] = queue.pending()
            queue.decide(b.id, {"type": "approve"}, reviewer="bob")
            assert runner.status("t-1").status == "completed"
        assert refunds == ["A1", "B2"]
        assert _effects(backend) == [("c_a", "done"), ("c_b", "done")]


def _agraph(shape: str, refunds: list[str], failed: threading.Event) -> Callable[[Any], Any]:
    """`_graph` for `AsyncTaskRunner`: the async ledger, and ``ainvoke`` of the subgraph."""

    @irreversible
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        refunds.append(order)
        return f"refunded {amount:g} on {order}"

    @tool
    def notify(order: str) -> str:
        """Tell the customer."""
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the mail server timed out")
        return f"told {order}"

    def factory(backend: Any) -> StateGraph[MessagesState]:
        model = ScriptedChatModel(
            script=[
                ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250}, id="c_a")]),
                ai(tool_calls=[tool_call("notify", {"order": "A1"}, id="c_n")]),
                ai(tool_calls=[tool_call("refund", {"order": "B2", "amount": 900}, id="c_b")]),
                "ok",
            ]
        )
        review = HumanReview(
            ReviewPolicy(rules={"refund": lambda a: f"refund of ${a['amount']:g}"}), tools=[refund]
        )
        ledger = AsyncEffectLedger(backend)
        tools = ToolNode([refund, notify], awrap_tool_call=ledger.awrap_tool_call)

        async def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [await model.ainvoke(state["messages"])]}

        inner = StateGraph(MessagesState)
        inner.add_node("agent", agent)
        inner.add_node("review", review, destinations=("tools", "agent"))
        inner.add_node("tools", tools)
        inner.add_edge(START, "agent")
        inner.add_conditional_edges("agent", review.route)
        inner.add_edge("tools", "agent")
        sub = inner.compile()

        async def support(state: MessagesState, config: RunnableConfig) -> Any:
            return await sub.ainvoke(state, config)

        outer = StateGraph(MessagesState)
        outer.add_node("support", sub if shape == "node" else support)
        outer.add_edge(START, "support")
        outer.add_edge("support", END)
        return outer

    return factory


async def _aorders(queue: AsyncReviewQueue) -> list[str]:
    return [i.requests[0]["action_request"]["args"]["order"] for i in await queue.pending()]


@pytest.mark.anyio
@pytest.mark.parametrize("way", ["resume", "decide"])
@pytest.mark.parametrize("shape", ["node", "call"], ids=["subgraph-node", "subgraph-in-node"])
async def test_an_async_retried_answer_does_not_answer_the_subgraphs_next_pause(
    durable_url: str, shape: str, way: str
) -> None:
    refunds: list[str] = []
    failed = threading.Event()
    backend = await aopen_backend(durable_url)
    try:
        async with AsyncTaskRunner(backend, _agraph(shape, refunds, failed)) as runner:
            await runner.asubmit("t-1", REFUNDS)
            deadline = time.monotonic() + 30
            while (await runner.astatus("t-1")).status != "interrupted":
                assert time.monotonic() < deadline, await runner.astatus("t-1")
                await asyncio.sleep(0.02)
            queue = AsyncReviewQueue(backend, runner.graph, runner=runner)
            assert await _aorders(queue) == ["A1"]
            [a] = await queue.pending()
            if way == "resume":
                run = await runner.aresume("t-1", {"type": "approve"})
            else:
                await queue.decide(a.id, {"type": "approve"}, reviewer="alice")
                run = await runner.astatus("t-1")
            assert failed.is_set()
            assert (run.status, run.attempts) == ("interrupted", 2), run
            assert refunds == ["A1"]
            assert await _aorders(queue) == ["B2"]
            assert (await queue.get(a.id)).status == ("closed" if way == "resume" else "applied")
            [b] = await queue.pending()
            await queue.decide(b.id, {"type": "approve"}, reviewer="bob")
            assert (await runner.astatus("t-1")).status == "completed"
        rows = await backend.execute("SELECT tool_call_id, status FROM harness_effects ORDER BY 1")
        assert [(r["tool_call_id"], r["status"]) for r in rows] == [
            ("c_a", "done"),
            ("c_b", "done"),
        ]
    finally:
        await backend.close()
    assert refunds == ["A1", "B2"]
