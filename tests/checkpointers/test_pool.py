"""A Postgres backend survives the server dropping its connections (restart, idle reaper).

We kill only this test database's connections with ``pg_terminate_backend`` — never the
server, which other test runs share.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph

from checkpointers import aopen_backend, open_backend
from harness_nodes import HarnessState
from tests.conftest import drop_connections

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _graph() -> StateGraph[HarnessState]:
    def reply(state: HarnessState) -> dict[str, Any]:
        return {"messages": [HumanMessage(f"seen {len(state['messages'])}")]}

    builder = StateGraph(HarnessState)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder


def test_a_healthy_pooled_connection_passes_the_check_and_a_dropped_one_fails_it(
    postgres_server: str, postgres_url: str
) -> None:
    from checkpointers.backend import _check_pooled_connection, postgres_pool_kwargs

    dbname = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, **postgres_pool_kwargs()) as conn:
        _check_pooled_connection(conn)  # idle and healthy: passes (a poll, no query)
        assert conn.execute("SELECT 1 AS one").fetchall() == [{"one": 1}]
        assert drop_connections(postgres_server, dbname) >= 1
        with pytest.raises(psycopg.OperationalError):
            _check_pooled_connection(conn)  # the server closed it: the real check raises


def test_backend_recovers_after_its_connections_are_killed(
    postgres_server: str, postgres_url: str
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]
    with open_backend(postgres_url, pool_size=4) as backend:
        graph = _graph().compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": "pool-1"}}
        graph.invoke({"messages": [HumanMessage("hi")]}, config, durability="sync")
        assert backend.execute("SELECT 1 AS one") == [{"one": 1}]

        assert drop_connections(postgres_server, dbname) >= 1

        # The pool checks each connection on checkout and replaces the dead ones.
        assert backend.execute("SELECT 1 AS one") == [{"one": 1}]
        out = graph.invoke({"messages": [HumanMessage("again")]}, config, durability="sync")
        assert [m.content for m in out["messages"]] == ["hi", "seen 1", "again", "seen 3"]

        # And again, with every connection killed while idle in the pool.
        assert drop_connections(postgres_server, dbname) >= 1
        with backend.transaction() as tx:
            tx.execute(
                "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s)",
                ("pool-1", "running", 1.0, 1.0),
            )
        assert backend.execute("SELECT status FROM harness_runs") == [{"status": "running"}]


async def test_async_backend_recovers_after_its_connections_are_killed(
    postgres_server: str, postgres_url: str
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]
    async with await aopen_backend(postgres_url, pool_size=4) as backend:
        graph = _graph().compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": "pool-async"}}
        await graph.ainvoke({"messages": [HumanMessage("hi")]}, config, durability="sync")

        assert drop_connections(postgres_server, dbname) >= 1

        assert await backend.execute("SELECT 1 AS one") == [{"one": 1}]
        out = await graph.ainvoke({"messages": [HumanMessage("again")]}, config, durability="sync")
        assert len(out["messages"]) == 4
        snapshot = await graph.aget_state(config)
        assert snapshot.values["messages"][-1].content == "seen 3"
