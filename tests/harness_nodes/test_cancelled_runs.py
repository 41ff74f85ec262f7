"""A run its caller stops (a cancelled coroutine, Ctrl-C) is not a crash.

Its lease is given back at once: the task is resumable by the next caller, not held until the
lease expires, and never counted toward ``max_recoveries``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt

from checkpointers import AsyncBackend, Backend
from harness_nodes import (
    AsyncEffectLedger,
    AsyncReviewQueue,
    AsyncTaskRunner,
    HumanReview,
    ReviewPolicy,
    TaskRunner,
    current_effect,
    irreversible,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

pytestmark = pytest.mark.anyio

INPUT = {"messages": [HumanMessage("go")]}
NOTE = "stopped by its caller"


async def _row(backend: AsyncBackend, key: str) -> dict[str, Any]:
    [row] = await backend.execute(
        "SELECT status, lease_owner, crashes, error FROM harness_runs WHERE task_key = %s",
        (key,),
    )
    return dict(row)


def _ask_graph(stalls: list[int]) -> StateGraph[MessagesState]:
    """One node that pauses, then (while *stalls* is non-empty) hangs once answered."""

    async def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": "approve?"})
        if stalls:
            stalls.pop()
            await asyncio.sleep(3600)  # a slow model call the caller gives up on
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder


async def test_a_timed_out_resume_leaves_the_task_paused_for_the_next_caller(
    abackend: AsyncBackend,
) -> None:
    # Default lease (30 s): before, the lease was kept until it expired (measured 29.8 s on
    # Postgres), each resume meanwhile refused as "another runner holds it".
    async with AsyncTaskRunner(abackend, _ask_graph(stalls=[1, 1])) as runner:
        await runner.asubmit("t-ask", INPUT)
        while (await runner.astatus("t-ask")).status != "interrupted":
            await asyncio.sleep(0.02)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(runner.aresume("t-ask", "yes"), 0.3)
            row = await _row(abackend, "t-ask")
            assert row["status"] == "interrupted" and row["lease_owner"] is None, row
            assert row["crashes"] == 0 and NOTE in row["error"], row
        done = await runner.aresume("t-ask", "yes")  # at once, not after the lease
        assert (done.status, done.crashes, done.error) == ("completed", 0, None)
        assert (await runner.aresult("t-ask", timeout=1))["partial_result"] == "reviewer said yes"


async def test_runs_cancelled_by_their_caller_are_not_counted_as_crashes(
    abackend: AsyncBackend,
) -> None:
    runs: list[int] = []

    async def slow(state: MessagesState) -> dict[str, Any]:
        runs.append(1)
        if len(runs) <= 4:
            await asyncio.sleep(3600)
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node("slow", slow)
    builder.add_edge(START, "slow")
    builder.add_edge("slow", END)
    async with AsyncTaskRunner(abackend, builder, max_recoveries=1) as runner:
        await runner.asubmit("t-slow", INPUT)
        for n in range(1, 4):
            while len(runs) < n:
                await asyncio.sleep(0.01)
            if n < 3:  # the event loop shutting down (or aclose cancelled) cancels the run
                for task in list(runner._tasks):
                    task.cancel()
                await asyncio.sleep(0.1)
            else:  # a caller running it with a timeout
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(runner.aexecute("t-slow"), 0.2)
            row = await _row(abackend, "t-slow")
            assert row["status"] == "pending" and row["lease_owner"] is None, row
            assert row["crashes"] == 0 and NOTE in row["error"], row
            if n == 1:
                # Released: a retried submission starts it again, at once.
                assert (await runner.asubmit("t-slow", INPUT)).status in ("pending", "running")
            elif n == 2:
                assert await runner.arecover() == ["t-slow"]  # at once, not after the lease
                while len(runs) < 3:
                    await asyncio.sleep(0.01)
                for task in list(runner._tasks):
                    task.cancel()
                await asyncio.sleep(0.1)
        # Past max_recoveries=1 four times over, yet not failed as a poison task.
        assert await runner.arun("t-slow", INPUT, timeout=10) == {
            "status": "completed",
            "partial_result": "done",
        }
        run = await runner.astatus("t-slow")
    assert (run.crashes, run.attempts, len(runs)) == (0, 5, 5)


def _refund_graph(refunds: list[str], held: asyncio.Event, *, in_review: bool = False) -> Any:
    """agent → review → refund (through the effect ledger) → agent.

    The first refund hangs; or, *in_review*, the review step once it has its answer.
    """

    @irreversible
    @tool
    async def refund(order: str) -> str:
        """Refund an order."""
        refunds.append(current_effect().idempotency_key)
        if len(refunds) == 1 and not in_review:
            held.set()
            await asyncio.sleep(3600)  # the bank's API hangs; the caller gives up
        return f"refunded {order}"

    def factory(backend: AsyncBackend) -> StateGraph[MessagesState]:
        ledger = AsyncEffectLedger(backend)
        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("refund", {"order": "A1"}, id="call-1")]), "ok"]
        )
        tools: list[BaseTool] = [refund]
        review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=tools)

        async def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [await model.ainvoke(state["messages"])]}

        async def held_review(state: MessagesState, config: RunnableConfig) -> Any:
            command = review(state, config)  # pauses on its first pass
            if in_review and not held.is_set():
                held.set()
                await asyncio.sleep(3600)  # answered, its step not saved yet
            return command

        builder = StateGraph(MessagesState)
        builder.add_node("agent", agent)
        builder.add_node("review", held_review, destinations=("tools", "agent"))
        builder.add_node("tools", ToolNode(tools, awrap_tool_call=ledger.awrap_tool_call))
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", review.route)
        builder.add_edge("tools", "agent")
        return builder

    return factory


async def test_a_decision_whose_run_is_cancelled_mid_effect_is_left_to_the_ledger(
    abackend: AsyncBackend,
) -> None:
    refunds: list[str] = []
    held = asyncio.Event()
    async with AsyncTaskRunner(abackend, _refund_graph(refunds, held)) as runner:
        await runner.asubmit("t-refund", INPUT)
        while (await runner.astatus("t-refund")).status != "interrupted":
            await asyncio.sleep(0.02)
        queue = AsyncReviewQueue(abackend, runner.graph, runner=runner)
        [item] = await queue.pending()
        decide = asyncio.create_task(queue.decide(item.id, {"type": "approve"}, reviewer="al"))
        await held.wait()  # the refund is executing
        decide.cancel()
        with pytest.raises(asyncio.CancelledError):
            await decide
        # Not paused (that would read as cleanly stopped): the refund's outcome is unknown.
        row = await _row(abackend, "t-refund")
        assert row["status"] == "pending" and row["lease_owner"] is None, row
        assert row["crashes"] == 0, row
        [effect] = await AsyncEffectLedger(abackend).alist("t-refund")
        assert effect.status != "done"
        assert await runner.arecover() == ["t-refund"]  # at once, not after the lease
        while (run := await runner.astatus("t-refund")).status in ("pending", "running"):
            await asyncio.sleep(0.02)
        state = await runner.graph.aget_state({"configurable": {"thread_id": "t-refund"}})
    assert refunds == ["t-refund:call-1"]  # never run again blindly
    [answer] = [m for m in state.values["messages"] if m.type == "tool"]
    assert answer.text.startswith("Outcome unknown for irreversible call refund")
    assert run.crashes == 0


async def test_a_decision_cancelled_before_its_pause_was_saved_is_applied_by_recover(
    abackend: AsyncBackend,
) -> None:
    refunds: list[str] = []
    held = asyncio.Event()
    graph = _refund_graph(refunds, held, in_review=True)
    async with AsyncTaskRunner(abackend, graph) as runner:
        await runner.asubmit("t-decide", INPUT)
        while (await runner.astatus("t-decide")).status != "interrupted":
            await asyncio.sleep(0.02)
        queue = AsyncReviewQueue(abackend, runner.graph, runner=runner)
        [item] = await queue.pending()
        decide = asyncio.create_task(queue.decide(item.id, {"type": "approve"}, reviewer="al"))
        await held.wait()
        decide.cancel()  # the reviewer's web request went away
        with pytest.raises(asyncio.CancelledError):
            await decide
        row = await _row(abackend, "t-decide")
        assert row["status"] == "interrupted" and row["lease_owner"] is None, row
        assert row["crashes"] == 0 and refunds == [], row
        assert (await queue.get(item.id)).status == "decided"  # the decision stands
        assert await runner.arecover() == ["t-decide"]  # and is applied now
        while (run := await runner.astatus("t-decide")).status in ("interrupted", "running"):
            await asyncio.sleep(0.02)
    assert (run.status, run.crashes, refunds) == ("completed", 0, ["t-decide:call-1"])
    assert (await queue.get(item.id)).status == "applied"


def test_ctrl_c_in_a_sync_resume_or_run_gives_the_lease_back(backend: Backend) -> None:
    stalls = [1, 1]

    def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": "approve?"})
        if stalls:
            stalls.pop()
            raise KeyboardInterrupt  # Ctrl-C while the resumed step runs
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)

    def row() -> dict[str, Any]:
        [r] = backend.execute(
            "SELECT status, lease_owner, crashes, error FROM harness_runs WHERE task_key = 'k'",
            (),
        )
        return dict(r)

    with TaskRunner(backend, builder, max_recoveries=0) as runner:
        runner.submit("k", INPUT)
        while runner.status("k").status != "interrupted":
            time.sleep(0.01)
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                runner.resume("k", "yes")
            r = row()
            assert (r["status"], r["lease_owner"], r["crashes"]) == ("interrupted", None, 0), r
        assert runner.resume("k", "yes").status == "completed"

        # A run interrupted mid-step is given back ``pending``; a retried submit starts it.
        runs: list[int] = []

        def slow(state: MessagesState) -> dict[str, Any]:
            runs.append(1)
            if len(runs) == 1:
                raise KeyboardInterrupt
            return {"messages": [AIMessage("done")]}

        fresh = StateGraph(MessagesState)
        fresh.add_node("slow", slow)
        fresh.add_edge(START, "slow")
        fresh.add_edge("slow", END)
    with TaskRunner(backend, fresh, max_recoveries=0) as runner:
        backend.execute(
            "INSERT INTO harness_runs (thread_id, task_key, task_type, status, input, attempts, "
            "created_at, updated_at) VALUES ('k2', 'k2', 'default', 'pending', %s, 0, 1, 1)",
            ('{"json": {"messages": [["human", "go"]]}}',),
        )
        with pytest.raises(KeyboardInterrupt):
            runner.execute("k2")
        [r] = backend.execute(
            "SELECT status, lease_owner, crashes FROM harness_runs WHERE task_key = 'k2'", ()
        )
        assert (r["status"], r["lease_owner"], r["crashes"]) == ("pending", None, 0)
        assert runner.run("k2", INPUT, timeout=10)["partial_result"] == "done"
