from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph

from checkpointers import Backend, aopen_backend, mask_url, open_backend
from checkpointers._schema import MIGRATIONS
from harness_nodes import BackendUnavailable, BackendURLError, HarnessState

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("", "the URL is empty", id="empty"),
        pytest.param("harness.db", "no scheme", id="no-scheme"),
        pytest.param("mysql://root@localhost/db", "unknown scheme 'mysql'", id="unknown-scheme"),
        pytest.param("sqlite://", "a sqlite URL needs a path", id="sqlite-no-path"),
        pytest.param("sqlite:////no/such/dir/x.db", "does not exist", id="sqlite-missing-dir"),
        pytest.param("postgresql://u:p@host:notaport/db", "Port could not be cast", id="bad-port"),
        pytest.param("postgresql:///db", "no host", id="pg-no-host"),
    ],
)
def test_bad_url_is_one_typed_error(url: str, reason: str) -> None:
    with pytest.raises(BackendURLError, match=re.escape(reason)) as exc:
        open_backend(url)
    assert "Expected memory://" in str(exc.value)


def test_bad_url_masks_password() -> None:
    with pytest.raises(BackendURLError) as exc:
        open_backend("mysql://admin:hunter2@db.example/prod")
    assert "hunter2" not in str(exc.value)
    assert exc.value.url == "mysql://admin:***@db.example/prod"


def test_unreachable_postgres_names_url_with_password_masked() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    url = "postgresql://postgres:s3cret@127.0.0.1:1/postgres"
    with pytest.raises(BackendUnavailable) as exc:
        open_backend(url, connect_timeout=2)
    assert exc.value.url == "postgresql://postgres:***@127.0.0.1:1/postgres"
    assert "s3cret" not in str(exc.value)
    assert "Cannot open backend" in str(exc.value)


@pytest.mark.parametrize(
    "url",
    [
        # libpq echoes a malformed percent-encoded password in its message
        "postgresql://app:p%zzMYSECRET@127.0.0.1:1/postgres",
        # a password given as a query parameter, not in the user part
        "postgresql://app@127.0.0.1:1/postgres?password=MYSECRET",
    ],
)
def test_passwords_reach_no_backend_error(url: str) -> None:
    with pytest.raises(BackendUnavailable) as exc:
        open_backend(url, connect_timeout=2)
    assert "MYSECRET" not in str(exc.value) and "MYSECRET" not in exc.value.url
    assert "***" in exc.value.url


@pytest.mark.postgres
def test_missing_postgres_database_is_backend_unavailable(postgres_server: str) -> None:
    url = postgres_server.rsplit("/", 1)[0] + f"/no_such_db_{uuid.uuid4().hex[:6]}"
    with pytest.raises(BackendUnavailable, match="does not exist"):
        open_backend(url)


@pytest.mark.parametrize("url", [123, b"memory://"])
def test_a_url_that_is_not_a_string_says_so(url: Any) -> None:
    with pytest.raises(BackendURLError, match="expected a URL string, got"):
        open_backend(url)


async def test_async_bad_url_is_typed() -> None:
    with pytest.raises(BackendURLError):
        await aopen_backend("redis://localhost")


def test_mask_url_leaves_passwordless_urls_alone() -> None:
    assert mask_url("postgresql://postgres@h:5432/db") == "postgresql://postgres@h:5432/db"
    assert mask_url("postgresql://h/db?sslmode=require") == "postgresql://h/db?sslmode=require"
    assert (
        mask_url("postgresql://u:pw@h/db?sslmode=require&password=x")
        == "postgresql://u:***@h/db?sslmode=require&password=***"
    )


def test_harness_schema_is_created_and_versioned(backend: Backend) -> None:
    names = [r["name"] for r in backend.execute("SELECT name FROM harness_migrations")]
    assert sorted(names) == sorted(m.name for m in MIGRATIONS) and "0001_base" in names
    for table in ("harness_runs", "harness_spend", "harness_effects", "harness_reviews"):
        assert backend.execute(f"SELECT count(*) AS n FROM {table}") == [{"n": 0}]


def test_reopening_is_idempotent(durable_url: str) -> None:
    with open_backend(durable_url) as a:
        a.execute(
            "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s)",
            ("t1", "running", 1.0, 1.0),
        )
    with open_backend(durable_url) as b:
        assert b.execute("SELECT thread_id FROM harness_runs") == [{"thread_id": "t1"}]
        assert len(b.execute("SELECT name FROM harness_migrations")) == len(MIGRATIONS)


def test_transaction_rolls_back_on_error(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with backend.transaction() as tx:
            tx.execute(
                "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s)",
                ("t-rollback", "running", 1.0, 1.0),
            )
            raise RuntimeError("boom")
    assert backend.execute("SELECT * FROM harness_runs WHERE thread_id = %s", ("t-rollback",)) == []


def _counter_graph() -> StateGraph[HarnessState]:
    def step(state: HarnessState) -> dict[str, Any]:
        return {"messages": [HumanMessage(f"step {len(state['messages'])}")]}

    builder = StateGraph(HarnessState)
    builder.add_node("a", step)
    builder.add_node("b", step)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    return builder


def test_checkpointer_persists_graph_state(backend: Backend) -> None:
    graph = _counter_graph().compile(checkpointer=backend.checkpointer)
    config = {"configurable": {"thread_id": "persist-1"}}
    graph.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    snapshot = graph.get_state(config)
    assert [m.content for m in snapshot.values["messages"]] == ["go", "step 1", "step 2"]
    history = list(graph.get_state_history(config))
    assert len(history) >= 3


async def test_async_backend_persists_graph_state(backend_url: str) -> None:
    async with await aopen_backend(backend_url) as backend:
        graph = _counter_graph().compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": "persist-async"}}
        await graph.ainvoke({"messages": [HumanMessage("go")]}, config, durability="sync")
        snapshot = await graph.aget_state(config)
        assert len(snapshot.values["messages"]) == 3
        rows = await backend.execute("SELECT name FROM harness_migrations")
        assert sorted(r["name"] for r in rows) == sorted(m.name for m in MIGRATIONS)
        async with backend.transaction() as tx:
            await tx.execute(
                "INSERT INTO harness_runs (thread_id, status, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s)",
                ("a1", "running", 1.0, 1.0),
            )
        assert await backend.execute("SELECT status FROM harness_runs") == [{"status": "running"}]
