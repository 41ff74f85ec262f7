"""A retried resume never hands an old answer to a new pause.

A run started by an answer (`TaskRunner.resume`, `AsyncTaskRunner.aresume`, a queue decision)
is retried from its last checkpoint when an attempt fails (a crash-like error) or is cut short
by the database (`BackendUnavailable`). LangGraph writes a resume value sent without an
interrupt id as a thread-wide answer that the next ``interrupt()`` to run consumes, whichever
pause that is. So a retry that sent the answer again after the earlier attempt had got past
its pause answered the *next* pause with it: approving refund A1 approved refund B2, which
nobody had seen. The answer is sent again only to the pause it was given for, while that
pause is still pending; otherwise the retry carries on from the last checkpoint.

The graph: agent → review (pause A: refund A1) → tools → agent → review (pause B: refund B2)
→ tools → agent. The refunds go through the effect ledger. The review step's fraud check on B2
fails once, or takes the database away, in the step that pauses on B, so the retry starts at
the checkpoint whose next step is that pause.
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
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from checkpointers import AsyncBackend, Backend, aopen_backend, open_backend
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
from tests.conftest import database_away

pytestmark = pytest.mark.anyio

REFUNDS = {"messages": [HumanMessage("refund A1 and B2")]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Hiccup:
    """A fraud check the review step runs on refund B2 before it pauses: the first check
    fails, or the database goes away for *outage* seconds (the runner's backend, Postgres)."""

    def __init__(self, url: str, outage: float | None = None) -> None:
        self.url, self.outage = url, outage
        self.backend: Backend | AsyncBackend | None = None
        self.fired = threading.Event()
        self._back: threading.Timer | None = None

    def __call__(self, state: MessagesState) -> None:
        [call] = getattr(state["messages"][-1], "tool_calls", None) or [{"args": {}}]
        if call["args"].get("order") == "B2" and not self.fired.is_set():
            self.fired.set()
            if self.outage is None:
                raise RuntimeError("the fraud service timed out")
            assert self.backend is not None
            away = database_away(self.backend, self.url)
            away.__enter__()
            self._back = threading.Timer(self.outage, away.__exit__, (None, None, None))
            self._back.start()

    def join(self) -> None:
        if self._back is not None:
            self._back.join()


def _graph(hiccup: _Hiccup, refunds: list[str], *, aio: bool = False) -> Callable[[Any], Any]:
    @irreversible
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        refunds.append(order)
        return f"refunded {amount:g} on {order}"

    def factory(backend: Any) -> StateGraph[MessagesState]:
        model = ScriptedChatModel(
            script=[
                ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250}, id="c_a")]),
                ai(tool_calls=[tool_call("refund", {"order": "B2", "amount": 900}, id="c_b")]),
                "ok",
            ]
        )
        review = HumanReview(
            ReviewPolicy(rules={"refund": lambda a: f"refund of ${a['amount']:g}"}), tools=[refund]
        )
        if aio:
            tools = ToolNode([refund], awrap_tool_call=AsyncEffectLedger(backend).awrap_tool_call)
        else:
            tools = ToolNode([refund], wrap_tool_call=EffectLedger(backend).wrap_tool_call)

        def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [model.invoke(state["messages"])]}

        def checked_review(state: MessagesState, config: RunnableConfig) -> Any:
            hiccup(state)  # in the step that pauses: a retry starts right before the pause
            return review(state, config)

        builder = StateGraph(MessagesState)
        builder.add_node("agent", agent)
        builder.add_node("review", checked_review, destinations=("tools", "agent"))
        builder.add_node("tools", tools)
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", review.route)
        builder.add_edge("tools", "agent")
        return builder

    return factory


def _orders(items: list[Any]) -> list[str]:
    return [i.requests[0]["action_request"]["args"]["order"] for i in items]


def _wait_paused(runner: TaskRunner, task_key: str) -> None:
    deadline = time.monotonic() + 30
    while runner.status(task_key).status != "interrupted":
        assert time.monotonic() < deadline, runner.status(task_key)
        time.sleep(0.02)


async def _await_paused(runner: AsyncTaskRunner, task_key: str) -> None:
    deadline = time.monotonic() + 30
    while (await runner.astatus(task_key)).status != "interrupted":
        assert time.monotonic() < deadline, await runner.astatus(task_key)
        await asyncio.sleep(0.02)


def _effects(backend: Backend) -> list[tuple[str, str]]:
    rows = backend.execute("SELECT tool_call_id, status FROM harness_effects ORDER BY 1")
    return [(r["tool_call_id"], r["status"]) for r in rows]


def _assert_paused_on_b(backend: Backend, queue: ReviewQueue, refunds: list[str]) -> None:
    """Refund A1 ran once; B2 did not: the run stands at pause B, listed for a reviewer."""
    assert refunds == ["A1"]
    assert _effects(backend) == [("c_a", "done")]
    [item] = queue.pending()
    assert _orders([item]) == ["B2"]


@pytest.mark.parametrize("way", ["resume", "decide"])
def test_a_retried_answer_does_not_answer_the_next_pause(durable_url: str, way: str) -> None:
    refunds: list[str] = []
    hiccup = _Hiccup(durable_url)
    with open_backend(durable_url) as backend:
        with TaskRunner(backend, _graph(hiccup, refunds)) as runner:
            runner.submit("t-1", REFUNDS)
            _wait_paused(runner, "t-1")
            queue = ReviewQueue(backend, runner.graph, runner=runner)
            [a] = queue.pending()
            assert _orders([a]) == ["A1"]
            if way == "resume":
                run = runner.resume("t-1", {"type": "approve"})
            else:
                queue.decide(a.id, {"type": "approve"}, reviewer="alice")
                run = runner.status("t-1")
            assert hiccup.fired.is_set()  # the attempt past pause A failed, and was retried
            assert refunds == ["A1"]  # not B2: nobody has answered its pause
            assert run.status == "interrupted", run
            _assert_paused_on_b(backend, queue, refunds)
            assert queue.get(a.id).status == ("closed" if way == "resume" else "applied")
            # B2 is answered by its own reviewer, and refunded once.
            [b] = queue.pending()
            queue.decide(b.id, {"type": "approve"}, reviewer="bob")
            assert runner.status("t-1").status == "completed"
        assert refunds == ["A1", "B2"]
        assert _effects(backend) == [("c_a", "done"), ("c_b", "done")]


@pytest.mark.postgres
@pytest.mark.parametrize("way", ["resume", "decide"])
def test_an_answer_retried_after_an_outage_does_not_answer_the_next_pause(
    postgres_url: str, way: str
) -> None:
    refunds: list[str] = []
    hiccup = _Hiccup(postgres_url, outage=0.6)
    with open_backend(postgres_url) as backend:
        hiccup.backend = backend
        with TaskRunner(backend, _graph(hiccup, refunds), outage_seconds=20) as runner:
            runner.submit("t-2", REFUNDS)
            _wait_paused(runner, "t-2")
            queue = ReviewQueue(backend, runner.graph, runner=runner)
            [a] = queue.pending()
            if way == "resume":
                run = runner.resume("t-2", {"type": "approve"})
            else:
                queue.decide(a.id, {"type": "approve"}, reviewer="alice")
                run = runner.status("t-2")
            hiccup.join()
            assert hiccup.fired.is_set()
            assert refunds == ["A1"]
            assert (run.status, run.attempts) == ("interrupted", 2), run
            _assert_paused_on_b(backend, queue, refunds)


async def test_an_async_retried_answer_does_not_answer_the_next_pause(durable_url: str) -> None:
    refunds: list[str] = []
    hiccup = _Hiccup(durable_url)
    backend = await aopen_backend(durable_url)
    try:
        runner = AsyncTaskRunner(backend, _graph(hiccup, refunds, aio=True))
        await runner.asubmit("t-3", REFUNDS)
        await _await_paused(runner, "t-3")
        queue = AsyncReviewQueue(backend, runner.graph, runner=runner)
        [a] = await queue.pending()
        run = await runner.aresume("t-3", {"type": "approve"})
        assert hiccup.fired.is_set()
        assert refunds == ["A1"]
        assert run.status == "interrupted", run
        [b] = await queue.pending()
        assert _orders([b]) == ["B2"]
        await queue.decide(b.id, {"type": "approve"}, reviewer="bob")
        assert (await runner.astatus("t-3")).status == "completed"
        await runner.aclose()
    finally:
        await backend.close()
    assert refunds == ["A1", "B2"]


@pytest.mark.postgres
async def test_an_async_answer_retried_after_an_outage_does_not_answer_the_next_pause(
    postgres_url: str,
) -> None:
    refunds: list[str] = []
    hiccup = _Hiccup(postgres_url, outage=0.6)
    backend = await aopen_backend(postgres_url)
    try:
        hiccup.backend = backend
        runner = AsyncTaskRunner(backend, _graph(hiccup, refunds, aio=True), outage_seconds=20)
        await runner.asubmit("t-4", REFUNDS)
        await _await_paused(runner, "t-4")
        queue = AsyncReviewQueue(backend, runner.graph, runner=runner)
        [a] = await queue.pending()
        await queue.decide(a.id, {"type": "approve"}, reviewer="alice")
        await asyncio.to_thread(hiccup.join)
        assert hiccup.fired.is_set()
        assert (await runner.astatus("t-4")).status == "interrupted"
        assert refunds == ["A1"]
        assert _orders(await queue.pending()) == ["B2"]
        await runner.aclose()
    finally:
        await backend.close()
