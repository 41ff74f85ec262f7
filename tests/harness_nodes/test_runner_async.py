"""AsyncTaskRunner: the same guarantees as TaskRunner, on an AsyncBackend."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt

from checkpointers import AsyncBackend
from harness_nodes import (
    AsyncEffectLedger,
    AsyncTaskRunner,
    InvalidDecision,
    RunFailed,
    TaskNotFinished,
    TaskNotPaused,
    UnknownTask,
    UserError,
    current_effect,
    irreversible,
)

pytestmark = pytest.mark.anyio

INPUT = {"messages": [HumanMessage("refund my order")]}


def refund_graph(world: list[str], agent_runs: list[int]) -> Any:
    """agent → refund → agent → done, with the refund guarded by an AsyncEffectLedger."""

    @irreversible
    @tool
    async def refund(amount: int) -> str:
        """Refund."""
        world.append(current_effect().idempotency_key)
        await asyncio.sleep(0.01)
        return f"refunded {amount}"

    def factory(backend: AsyncBackend) -> StateGraph[MessagesState]:
        ledger = AsyncEffectLedger(backend)

        async def agent(state: MessagesState) -> dict[str, Any]:
            agent_runs.append(len(state["messages"]))
            if len(state["messages"]) == 1:
                call = {"name": "refund", "args": {"amount": 10}, "id": "call-refund"}
                return {"messages": [AIMessage("", tool_calls=[call])]}
            return {"messages": [AIMessage("refund done")]}

        tools: list[BaseTool] = [refund]
        builder = StateGraph(MessagesState)
        builder.add_node("agent", agent)
        builder.add_node("tools", ToolNode(tools, awrap_tool_call=ledger.awrap_tool_call))
        builder.add_edge(START, "agent")
        builder.add_conditional_edges(
            "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
        )
        builder.add_edge("tools", "agent")
        return builder

    return factory


async def test_concurrent_and_repeated_submissions_make_one_run(abackend: AsyncBackend) -> None:
    world: list[str] = []
    agent_runs: list[int] = []
    async with AsyncTaskRunner(abackend, refund_graph(world, agent_runs)) as runner:

        async def client() -> dict[str, Any]:
            await runner.asubmit("order-9", INPUT, task_type="support")
            return await runner.aresult("order-9", timeout=60)

        outcomes = await asyncio.gather(*(client() for _ in range(20)))
        for _ in range(5):
            again = await runner.asubmit("order-9", INPUT)
            assert again.status == "completed"
            outcomes.append(await runner.aresult("order-9", timeout=5))
    assert outcomes == [{"status": "completed", "partial_result": "refund done"}] * 25
    assert world == ["order-9:call-refund"]
    assert agent_runs == [1, 3]
    run = await runner.astatus("order-9")
    assert (run.attempts, run.task_type) == (1, "support")


async def test_arun_submits_and_waits_and_a_retried_submission_joins(
    abackend: AsyncBackend,
) -> None:
    world: list[str] = []
    agent_runs: list[int] = []
    async with AsyncTaskRunner(abackend, refund_graph(world, agent_runs)) as runner:
        first, second = await asyncio.gather(
            runner.arun("order-7", INPUT, task_type="support", timeout=60),
            runner.arun("order-7", INPUT, task_type="support", timeout=60),  # a client retry
        )
        third = await runner.arun("order-7", {"messages": []}, timeout=5)  # joins, reruns nothing
    assert first == second == third == {"status": "completed", "partial_result": "refund done"}
    assert world == ["order-7:call-refund"] and agent_runs == [1, 3]
    assert (await runner.astatus("order-7")).task_type == "support"


async def test_recover_resumes_a_dead_run_and_leaves_a_live_one(abackend: AsyncBackend) -> None:
    world: list[str] = []
    runner = AsyncTaskRunner(abackend, refund_graph(world, []), lease_seconds=0.5)
    for key, expires in (("t-dead", 1.0), ("t-alive", time.time() + 60)):
        await abackend.execute(
            "INSERT INTO harness_runs (thread_id, task_key, task_type, status, input, "
            "lease_owner, lease_expires_at, attempts, created_at, updated_at) "
            "VALUES (%s, %s, 'default', 'running', %s, 'gone:1:x', %s, 1, 1, 1)",
            (key, key, json.dumps({"json": {"messages": [["human", "go"]]}}), expires),
        )
    async with runner:
        assert await runner.arecover() == ["t-dead"]
        assert (await runner.aresult("t-dead", timeout=30))["status"] == "completed"
    assert (await runner.astatus("t-alive")).status == "running"
    assert world == ["t-dead:call-refund"]


async def test_paused_task_is_resumed_by_its_answer(abackend: AsyncBackend) -> None:
    async def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": "approve?"})
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    async with AsyncTaskRunner(abackend, builder, lease_seconds=0.2) as runner:
        await runner.asubmit("t-review", INPUT)
        with pytest.raises(TaskNotFinished, match="interrupted"):
            await runner.aresult("t-review", timeout=0.5)
        await asyncio.sleep(0.3)
        assert await runner.arecover() == []
        assert (await runner.aresume("t-review", "yes")).status == "completed"
        outcome = await runner.aresult("t-review", timeout=1)
    assert outcome["partial_result"] == "reviewer said yes"


async def test_a_task_resumed_by_a_runner_without_its_marks_keeps_them_at_its_next_pause(
    abackend: AsyncBackend,
) -> None:
    # As TaskRunner: a runner rebuilt without the config that marked the task's fields
    # sensitive still writes the marks into the checkpoints of its resume.
    from harness_nodes._trace_langfuse import SENSITIVE_FIELDS_KEY, marked_fields

    async def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": f"approve step {len(state['messages'])}?"})
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("first", ask)
    builder.add_node("second", ask)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    marks: Any = {"metadata": {SENSITIVE_FIELDS_KEY: "card"}}
    config: Any = {"configurable": {"thread_id": "t-marks"}}
    async with AsyncTaskRunner(abackend, builder, config=marks) as runner:
        await runner.asubmit("t-marks", INPUT)
        with pytest.raises(TaskNotFinished, match="interrupted"):
            await runner.aresult("t-marks", timeout=5)
    async with AsyncTaskRunner(abackend, builder) as unmarked:
        assert (await unmarked.aresume("t-marks", "yes")).status == "interrupted"
        snapshot = await unmarked.graph.aget_state(config)
        assert marked_fields([snapshot.metadata]) == ["card"]


async def test_resuming_a_task_that_is_not_paused_is_refused_not_reported_as_resumed(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes._lease import claim

    async def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": "approve?"})
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    async with AsyncTaskRunner(abackend, builder) as runner:
        for key in ("t-held", "t-done"):
            await runner.asubmit(key, INPUT)
            with pytest.raises(TaskNotFinished, match="interrupted"):
                await runner.aresult(key, timeout=2)
        # Another runner is answering t-held's pause: it holds the lease.
        assert await abackend.execute(*claim("t-held", "elsewhere:1:x", 30, resuming=True))
        with pytest.raises(TaskNotPaused, match=re.escape("another runner holds it")) as e:
            await runner.aresume("t-held", "yes")
        assert (e.value.task_key, e.value.status) == ("t-held", "running")
        state = await runner.graph.aget_state({"configurable": {"thread_id": "t-held"}})
        assert [i.value for i in state.interrupts] == [{"question": "approve?"}]

        assert (await runner.aresume("t-done", "yes")).status == "completed"
        with pytest.raises(TaskNotPaused, match=re.escape("(completed: it has finished)")):
            await runner.aresume("t-done", "no")  # a second answer: the first one stands
        outcome = await runner.aresult("t-done", timeout=1)
        assert outcome["partial_result"] == "reviewer said yes"
        with pytest.raises(UnknownTask, match="t-nope"):
            await runner.aresume("t-nope", "yes")


async def test_failures_cancellation_and_bad_input(abackend: AsyncBackend) -> None:
    async def broken(state: MessagesState) -> dict[str, Any]:
        raise ConnectionError("still down")

    builder = StateGraph(MessagesState)
    builder.add_node("broken", broken)
    builder.add_edge(START, "broken")
    builder.add_edge("broken", END)
    async with AsyncTaskRunner(abackend, builder, max_attempts=2) as runner:
        await runner.asubmit("t-broken", INPUT)
        with pytest.raises(RunFailed, match="still down"):
            await runner.aresult("t-broken", timeout=30)
        with pytest.raises(UnknownTask):
            await runner.astatus("nope")
        with pytest.raises(UserError, match="task_key"):
            await runner.asubmit("", INPUT)
        # A finished task cannot be cancelled; cancelling reports it as it is.
        assert (await runner.acancel("t-broken")).status == "failed"
    with pytest.raises(UserError, match="needs a checkpointers.AsyncBackend"):
        AsyncTaskRunner(object(), builder)  # type: ignore[arg-type]


async def test_an_attempt_that_failed_on_its_input_is_retried_with_it(
    abackend: AsyncBackend,
) -> None:
    from tests.harness_nodes.test_runner import _router_failing_once

    async with AsyncTaskRunner(
        abackend, _router_failing_once(failures=2), max_attempts=3
    ) as runner:
        await runner.asubmit("t-start", INPUT)
        result = await runner.aresult("t-start", timeout=30)
        assert result["partial_result"] == "answered 1 message(s)"
        state = await runner.graph.aget_state({"configurable": {"thread_id": "t-start"}})
        assert [m.type for m in state.values["messages"]] == ["human", "ai"]


async def test_a_malformed_review_decision_leaves_the_task_paused_for_a_corrected_one(
    abackend: AsyncBackend,
) -> None:
    from tests.harness_nodes.review_app import EFFECTS, build_builder

    EFFECTS.clear()
    async with AsyncTaskRunner(abackend, build_builder()) as runner:
        await runner.asubmit("t-typo", {"messages": [HumanMessage("refund A1")]})
        with pytest.raises(TaskNotFinished, match="interrupted"):
            await runner.aresult("t-typo", timeout=2)
        with pytest.raises(InvalidDecision, match="Input should be .approve."):
            await runner.aresume("t-typo", {"type": "approved"})  # a typo: nothing runs
        assert (await runner.astatus("t-typo")).status == "interrupted"
        assert "refund" not in EFFECTS
        done = await runner.aresume("t-typo", {"type": "approve"})
        assert done.status == "completed", done.error
        assert EFFECTS["refund"] == 1
        assert "refunded 250 on A1" in (await runner.aresult("t-typo", timeout=1))["partial_result"]


async def test_a_run_that_died_after_its_review_decision_is_carried_on_by_recover(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes.testing import ai, tool_call
    from tests.harness_nodes.review_app import CRASHED, EFFECTS, ProcessDied, build_builder

    CRASHED.clear()
    EFFECTS.clear()
    script = [ai(tool_calls=[tool_call("refund", {"order": "CRASH-ONCE", "amount": 250})]), "ok"]
    builder = build_builder(script=script)
    async with AsyncTaskRunner(abackend, builder, lease_seconds=0.3) as runner:
        await runner.asubmit("t-died", INPUT)
        deadline = time.monotonic() + 30
        while (await runner.astatus("t-died")).status != "interrupted":  # paused for review
            assert time.monotonic() < deadline, await runner.astatus("t-died")
            await asyncio.sleep(0.02)
        with pytest.raises(ProcessDied):  # inside the approved refund
            await runner.aresume("t-died", {"type": "approve"})
        state = await runner.graph.aget_state({"configurable": {"thread_id": "t-died"}})
        assert (state.next, state.interrupts) == (("tools",), ())
        assert (await runner.astatus("t-died")).status == "running"  # on a dead lease
        deadline = time.monotonic() + 30
        while not (recovered := await runner.arecover()):  # once the lease has expired
            assert time.monotonic() < deadline, await runner.astatus("t-died")
            await asyncio.sleep(0.05)
        assert recovered == ["t-died"]
        assert (await runner.aresult("t-died", timeout=30))["partial_result"] == "ok"
    assert EFFECTS["refund"] == 1


async def test_a_cancellation_while_the_lease_heartbeat_stops_is_kept() -> None:
    # The step had ended and its lease heartbeat was stopping (a renewal still finishing)
    # when the task was cancelled: the heartbeat's exit swallowed that cancellation, and the
    # task went on as if nobody had cancelled it.
    from harness_nodes.aio import _AsyncHeartbeat

    class SlowToStop(_AsyncHeartbeat):
        async def _run(self) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)  # the renewal in flight ends first
                raise

    exiting = asyncio.Event()
    went_on: list[str] = []

    async def step() -> None:
        async with SlowToStop(Any, "t-hb", "owner", 30.0):  # type: ignore[arg-type]
            await asyncio.sleep(0.01)  # the step runs; its heartbeat waits for its turn
            exiting.set()
        went_on.append("after the step")

    task = asyncio.create_task(step())
    await exiting.wait()
    await asyncio.sleep(0.05)  # in the heartbeat's exit, waiting for it to stop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []
