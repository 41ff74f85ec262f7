"""A database outage: the run carries on once Postgres is back, its task never ``failed``.

During an outage the lease heartbeat cannot renew, so a run waiting on the database (a
failover takes 30-60 s) finds its lease expired when the database returns. Nobody else took
the task over: the run must go on, not stop with `LeaseLost` and leave the task ``running``
with no process carrying it (seen with a real restart: every task of an in-process runner
stuck for good, ``result()`` waiting forever). The outage is simulated on the shared
Postgres: the step expires its own lease, as the outage would have, and the server drops the
runner's connections (``pg_terminate_backend``).

An outage that outlasts every attempt a runner makes is not the task's failure either: the
attempts it cuts short (`BackendUnavailable`) are not counted; the run waits for the database
(``outage_seconds``) and goes on from its last checkpoint, each effect carried out once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from checkpointers import AsyncBackend, Backend, aopen_backend, open_backend
from harness_nodes import EffectLedger, TaskRunner, irreversible
from harness_nodes.aio import AsyncEffectLedger, AsyncTaskRunner
from harness_nodes.testing import ScriptedChatModel, ai, tool_call
from tests.conftest import database_away

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _outage_graph(url: str, ran: list[str]) -> StateGraph[MessagesState]:
    def slow_step(state: MessagesState) -> dict[str, list[AIMessage]]:
        ran.append("slow_step")
        if len(ran) > 1:
            return {"messages": [AIMessage("looked it up")]}
        with psycopg.connect(url, autocommit=True) as conn:
            # What an outage longer than the lease leaves: the lease ran out unrenewed...
            conn.execute("UPDATE harness_runs SET lease_expires_at = 0")
            # ...and the runner's connections were dropped by the restart.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        return {"messages": [AIMessage("looked it up")]}

    def answer(state: MessagesState) -> dict[str, list[AIMessage]]:
        ran.append("answer")
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node("slow_step", slow_step)
    builder.add_node("answer", answer)
    builder.add_edge(START, "slow_step")
    builder.add_edge("slow_step", "answer")
    builder.add_edge("answer", END)
    return builder


def _status(url: str, task_key: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT status, lease_owner FROM harness_runs WHERE task_key = %s", (task_key,)
        ).fetchone()
    return row


def test_a_run_whose_lease_ran_out_during_an_outage_finishes_when_the_database_is_back(
    postgres_url: str,
) -> None:
    ran: list[str] = []
    with (
        open_backend(postgres_url) as backend,
        TaskRunner(backend, _outage_graph(postgres_url, ran)) as runner,
    ):
        runner.submit("ticket-1", {"messages": [HumanMessage("hi")]})
        outcome = runner.result("ticket-1", timeout=20)
    assert outcome["status"] == "completed"
    # The run went on: the step after the outage ran once. (The outage's own step may run
    # again: a statement the restart cut short fails that attempt, which is retried.)
    assert ran.count("answer") == 1 and ran[-1] == "answer"
    assert _status(postgres_url, "ticket-1") == ("completed", None)


async def test_an_async_run_whose_lease_ran_out_during_an_outage_finishes(
    postgres_url: str,
) -> None:
    ran: list[str] = []
    backend = await aopen_backend(postgres_url)
    try:
        runner = AsyncTaskRunner(backend, _outage_graph(postgres_url, ran))
        await runner.asubmit("ticket-1", {"messages": [HumanMessage("hi")]})
        outcome = await runner.aresult("ticket-1", timeout=20)
        await runner.aclose()
    finally:
        await backend.close()
    assert outcome["status"] == "completed"
    assert ran.count("answer") == 1 and ran[-1] == "answer"
    assert _status(postgres_url, "ticket-1") == ("completed", None)


class _Failover:
    """The database goes away when the run asks it to, and comes back *seconds* later."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.seconds = url, seconds
        self.backend: Backend | AsyncBackend | None = None
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        if self.backend is None or self._timer is not None:
            return
        away = contextlib.ExitStack()
        away.enter_context(database_away(self.backend, self.url))
        self._timer = threading.Timer(self.seconds, away.close)
        self._timer.start()

    def join(self) -> None:
        assert self._timer is not None, "the run never reached the outage"
        self._timer.join()


def _refund_graph(
    failover: _Failover, refunds: list[str], *, aio: bool = False
) -> Callable[[Any], StateGraph[MessagesState]]:
    """agent → tools (an irreversible refund, through the effect ledger) → agent.

    The database goes away when the agent has the refund's result (checkpointed): every
    attempt after that finds it away.
    """

    @irreversible
    def refund(order: str) -> str:
        """Refund an order."""
        refunds.append(order)
        return f"refunded {order}"

    def factory(backend: Any) -> StateGraph[MessagesState]:
        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("refund", {"order": "A1"}, id="call_1")]), "done"]
        )

        def agent(state: MessagesState) -> dict[str, Any]:
            if len(state["messages"]) > 2:
                failover.start()
            return {"messages": [model.invoke(state["messages"])]}

        def route(state: MessagesState) -> str:
            return "tools" if getattr(state["messages"][-1], "tool_calls", None) else END

        if aio:
            tools = ToolNode([refund], awrap_tool_call=AsyncEffectLedger(backend).awrap_tool_call)
        else:
            tools = ToolNode([refund], wrap_tool_call=EffectLedger(backend).wrap_tool_call)
        builder = StateGraph(MessagesState)
        builder.add_node("agent", agent)
        builder.add_node("tools", tools)
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", route)
        builder.add_edge("tools", "agent")
        return builder

    return factory


def _run_and_effects(url: str, task_key: str) -> tuple[Any, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        run = conn.execute(
            "SELECT status, attempts, error, lease_owner FROM harness_runs WHERE task_key = %s",
            (task_key,),
        ).fetchone()
        effects = conn.execute("SELECT status, attempts FROM harness_effects").fetchall()
    return run, effects


def test_an_outage_outlasting_every_attempt_does_not_fail_the_task(postgres_url: str) -> None:
    failover, refunds = _Failover(postgres_url, seconds=1.5), []
    with open_backend(postgres_url) as backend:
        failover.backend = backend
        graph = _refund_graph(failover, refunds)
        with TaskRunner(backend, graph, max_attempts=2, outage_seconds=30) as runner:
            runner.submit("ticket-2", {"messages": [HumanMessage("refund A1")]})
            outcome = runner.result("ticket-2", timeout=30)
        failover.join()
    assert outcome == {"status": "completed", "partial_result": "done"}
    # One claim, no failure recorded; the refund ran once, recorded once.
    run, effects = _run_and_effects(postgres_url, "ticket-2")
    assert run == ("completed", 1, None, None)
    assert effects == [("done", 1)] and refunds == ["A1"]


async def test_an_outage_outlasting_every_async_attempt_does_not_fail_the_task(
    postgres_url: str,
) -> None:
    failover, refunds = _Failover(postgres_url, seconds=1.5), []
    backend = await aopen_backend(postgres_url)
    try:
        failover.backend = backend
        graph = _refund_graph(failover, refunds, aio=True)
        runner = AsyncTaskRunner(backend, graph, max_attempts=2, outage_seconds=30)
        await runner.asubmit("ticket-2", {"messages": [HumanMessage("refund A1")]})
        outcome = await runner.aresult("ticket-2", timeout=30)
        await runner.aclose()
        failover.join()
    finally:
        await backend.close()
    assert outcome == {"status": "completed", "partial_result": "done"}
    run, effects = _run_and_effects(postgres_url, "ticket-2")
    assert run == ("completed", 1, None, None)
    assert effects == [("done", 1)] and refunds == ["A1"]
