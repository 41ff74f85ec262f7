"""A database outage longer than a run's lease: the run carries on once Postgres is back.

During an outage the lease heartbeat cannot renew, so a run waiting on the database (a
failover takes 30-60 s) finds its lease expired when the database returns. Nobody else took
the task over: the run must go on, not stop with `LeaseLost` and leave the task ``running``
with no process carrying it (seen with a real restart: every task of an in-process runner
stuck for good, ``result()`` waiting forever). The outage is simulated on the shared
Postgres: the step expires its own lease, as the outage would have, and the server drops the
runner's connections (``pg_terminate_backend``).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from checkpointers import aopen_backend, open_backend
from harness_nodes import TaskRunner
from harness_nodes.aio import AsyncTaskRunner

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
