"""Review items stay with the pause they were made for: two pauses in one node, breakpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import interrupt

from checkpointers import AsyncBackend, Backend
from harness_nodes import (
    AsyncReviewQueue,
    AsyncTaskRunner,
    HumanReview,
    ReviewPolicy,
    ReviewQueue,
    TaskRunner,
)
from harness_nodes.testing import ai, tool_call
from tests.harness_nodes.review_app import EFFECTS, build_builder

pytestmark = pytest.mark.anyio

PAID: list[str] = []
ASK = {"messages": [HumanMessage("pay out A1 and B2")]}


@pytest.fixture(autouse=True)
def _reset() -> None:
    PAID.clear()
    EFFECTS.clear()


def _two_payouts() -> StateGraph[Any]:
    """A node asking a reviewer about two different payouts, one after the other, in one run.

    LangGraph re-runs the node from its top on each resume, so the second pause comes from
    the same task (the same checkpoint namespace) as the first.
    """
    review = HumanReview(ReviewPolicy(irreversible=["payout"]))

    def payouts(state: MessagesState) -> dict[str, list[AIMessage]]:
        approved = []
        for order, amount in (("A1", 10), ("B2", 5000)):
            call = tool_call("payout", {"order": order, "amount": amount}, id=f"call_{order}")
            [answer] = interrupt(review.requests([ai(tool_calls=[call])]))
            if answer["type"] == "approve":
                approved.append(order)
        PAID.extend(approved)  # once the node has run to its end
        return {"messages": [AIMessage(f"paid {approved}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("payouts", payouts)
    builder.add_edge(START, "payouts")
    return builder


def _order(queue: ReviewQueue, review_id: str) -> str:
    return str(queue.get(review_id).requests[0]["action_request"]["args"]["order"])


def _undo_applied(backend: Backend, review_id: str) -> None:
    """The process died after the run took the decision, before it marked the item applied."""
    sql = "UPDATE harness_reviews SET status = 'decided' WHERE id = %s AND status = 'applied'"
    assert backend.execute(sql + " RETURNING id", (review_id,))


def test_an_approval_of_the_first_pause_is_never_applied_to_the_second(backend: Backend) -> None:
    queue = ReviewQueue(backend, _two_payouts().compile(checkpointer=backend.checkpointer))
    queue.invoke(ASK, thread_id="t-two")
    [first] = queue.pending()
    assert _order(queue, first.id) == "A1"
    queue.decide(first.id, {"type": "approve"}, reviewer="alice")
    [second] = queue.pending()  # paused again, in the same node run: a new item
    assert second.id != first.id and second.interrupt_id != first.interrupt_id
    assert _order(queue, second.id) == "B2"
    _undo_applied(backend, first.id)
    assert [i.id for i in queue.sync("t-two", recover=True)] == [second.id]
    assert queue.get(first.id).status == "applied"  # settled, not applied to B2
    assert PAID == []  # the node is still paused on B2
    out = queue.decide(second.id, {"type": "reject", "message": "too much"}, reviewer="bob")
    assert out["messages"][-1].content == "paid ['A1']"
    assert PAID == ["A1"]


def _paused(runner: TaskRunner, task_key: str) -> None:
    deadline = time.monotonic() + 30
    while runner.status(task_key).status != "interrupted":
        assert time.monotonic() < deadline, runner.status(task_key)
        time.sleep(0.02)


def test_recover_never_applies_the_first_pauses_approval_to_the_second(backend: Backend) -> None:
    builder = _two_payouts()
    with TaskRunner(backend, builder, lease_seconds=5) as runner:
        runner.submit("t-two-r", ASK)
        _paused(runner, "t-two-r")
        graph = builder.compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph, runner=runner)
        [first] = queue.sync("t-two-r")
        queue.decide(first.id, {"type": "approve"}, reviewer="alice")
        [second] = queue.pending()
        assert second.interrupt_id != first.interrupt_id
        _undo_applied(backend, first.id)
        assert runner.recover() == ["t-two-r"]
        deadline = time.monotonic() + 30
        while queue.get(first.id).status == "decided":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _paused(runner, "t-two-r")
        assert queue.get(first.id).status == "applied"
        assert runner.recover() == []
        assert [i.id for i in queue.pending()] == [second.id]
        assert PAID == []  # the node is still paused on B2
        queue.decide(second.id, {"type": "reject", "message": "too much"}, reviewer="bob")
        assert runner.status("t-two-r").status == "completed"
    assert PAID == ["A1"]


def _at_the_breakpoint(backend: Backend | AsyncBackend) -> tuple[Any, str]:
    """The billing agent, stopping before its tools (a breakpoint of the graph)."""
    builder = build_builder()
    graph = builder.compile(checkpointer=backend.checkpointer, interrupt_before=["tools"])
    return graph, "UPDATE harness_reviews SET status = 'decided' WHERE id = %s RETURNING id"


def test_a_decided_item_left_at_a_breakpoint_is_settled_by_one_sweep(backend: Backend) -> None:
    # The approval was applied and the run stopped before the tools (interrupt_before), with
    # no pause left; the process died before marking the item applied. The sync cannot tell
    # that stop from a run that died, so it left the item decided, and every recover() sweep
    # claimed the task again (one more attempt each) to run nothing.
    graph, undo_applied = _at_the_breakpoint(backend)
    with TaskRunner(backend, graph, lease_seconds=5) as runner:
        runner.submit("t-bp", ASK)
        _paused(runner, "t-bp")
        queue = ReviewQueue(backend, graph, runner=runner)
        [item] = queue.sync("t-bp")
        queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        state = graph.get_state({"configurable": {"thread_id": "t-bp"}})
        assert state.next == ("tools",) and not state.interrupts
        assert backend.execute(undo_applied, (item.id,))
        attempts = runner.status("t-bp").attempts
        assert runner.recover() == ["t-bp"]
        runner.close()  # waits for the dispatched run
        assert queue.get(item.id).status == "applied"
        assert runner.recover() == []  # not claimed again
        run = runner.status("t-bp")
        assert (run.status, run.attempts) == ("interrupted", attempts + 1)
        assert graph.get_state({"configurable": {"thread_id": "t-bp"}}).next == ("tools",)
    assert EFFECTS == {}  # nothing ran past the breakpoint


async def test_async_decided_item_left_at_a_breakpoint_is_settled_by_one_sweep(
    abackend: AsyncBackend,
) -> None:
    graph, undo_applied = _at_the_breakpoint(abackend)
    async with AsyncTaskRunner(abackend, graph, lease_seconds=5) as runner:
        await runner.asubmit("t-abp", ASK)
        deadline = time.monotonic() + 30
        while (await runner.astatus("t-abp")).status != "interrupted":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        queue = AsyncReviewQueue(abackend, graph, runner=runner)
        [item] = await queue.sync("t-abp")
        await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert await abackend.execute(undo_applied, (item.id,))
        attempts = (await runner.astatus("t-abp")).attempts
        assert await runner.arecover() == ["t-abp"]
        await runner.aclose()  # waits for the dispatched run
        assert (await queue.get(item.id)).status == "applied"
        assert await runner.arecover() == []
        run = await runner.astatus("t-abp")
        assert (run.status, run.attempts) == ("interrupted", attempts + 1)
    assert EFFECTS == {}


@pytest.mark.parametrize("where", ["interrupt_before", "interrupt_after"])
def test_sync_recover_never_runs_past_a_breakpoint(backend: Backend, where: str) -> None:
    # No runner: the approval was applied, the run stopped at a breakpoint of the graph
    # (before the tools, or after the review node), and the process died before it marked
    # the item applied. sync(recover=True) took the stop for a run that died and ran on
    # through the breakpoint: the refund went out with nobody at the breakpoint.
    stop = {where: ["tools"] if where == "interrupt_before" else ["review"]}
    graph = build_builder().compile(checkpointer=backend.checkpointer, **stop)
    queue = ReviewQueue(backend, graph)
    thread = f"t-sbp-{where}"
    config: Any = {"configurable": {"thread_id": thread}}
    queue.invoke(ASK, thread_id=thread)
    [item] = queue.pending()
    queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    state = graph.get_state(config)
    assert state.next == ("tools",) and not state.interrupts  # stopped at the breakpoint
    backend.execute(
        "UPDATE harness_reviews SET status = 'decided' WHERE id = %s RETURNING id", (item.id,)
    )
    assert queue.sync(thread, recover=True) == []
    assert queue.get(item.id).status == "applied"  # its run went past its pause
    assert EFFECTS == {}  # nothing ran past the breakpoint
    assert graph.get_state(config).next == ("tools",)
    graph.invoke(None, config)  # the user resumes from the breakpoint, as LangGraph has it
    assert EFFECTS


async def test_async_sync_recover_never_runs_past_a_breakpoint(abackend: AsyncBackend) -> None:
    graph = build_builder().compile(checkpointer=abackend.checkpointer, interrupt_before=["tools"])
    queue = AsyncReviewQueue(abackend, graph)
    config: Any = {"configurable": {"thread_id": "t-asbp"}}
    await queue.ainvoke(ASK, thread_id="t-asbp")
    [item] = await queue.pending()
    await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    assert (await graph.aget_state(config)).next == ("tools",)
    await abackend.execute(
        "UPDATE harness_reviews SET status = 'decided' WHERE id = %s RETURNING id", (item.id,)
    )
    assert await queue.sync("t-asbp", recover=True) == []
    assert (await queue.get(item.id)).status == "applied"
    assert EFFECTS == {}
    assert (await graph.aget_state(config)).next == ("tools",)
