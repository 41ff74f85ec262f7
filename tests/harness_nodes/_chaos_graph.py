"""A multi-step agent with irreversible tools whose effects (and node runs) are counted.

Used by the runner, worker and chaos tests, in the test process and in worker processes
(imported by path: ``tests.harness_nodes._chaos_graph:build``). Everything it counts lives in
the backend's own database, so every process sees the same counts:

- ``chaos_world``: one row each time an effect really happened (the refund went out);
- ``chaos_steps``: one row each time a node started, with its LangGraph step number.

The agent: refund → email → lookup → answer. An unknown effect outcome goes to ``review``,
which pauses (``interrupt``) for a person: ``{"happened": bool, "result": str}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from langchain_core.messages import AIMessage, RemoveMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.config import get_config
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt

from checkpointers import Backend
from harness_nodes import EffectLedger, current_effect, effect, irreversible

EFFECT_SLEEP = float(os.environ.get("CHAOS_EFFECT_SLEEP", "0.03"))
STEP_SLEEP = float(os.environ.get("CHAOS_STEP_SLEEP", "0.005"))

SCRIPT: list[dict[str, Any]] = [
    {"name": "refund", "args": {"amount": 10}, "id": "call-refund"},
    {"name": "email", "args": {"to": "customer"}, "id": "call-email"},
    {"name": "lookup", "args": {"q": "status"}, "id": "call-lookup"},
]

TABLES = """
CREATE TABLE IF NOT EXISTS chaos_world (
    thread_id TEXT NOT NULL, effect TEXT NOT NULL, idempotency_key TEXT NOT NULL, at {float}
);
CREATE TABLE IF NOT EXISTS chaos_steps (
    thread_id TEXT NOT NULL, node TEXT NOT NULL, step INTEGER NOT NULL, started_at {float}
)
"""


def create_tables(backend: Backend) -> None:
    kind = "DOUBLE PRECISION" if backend.dialect == "postgres" else "REAL"
    for stmt in TABLES.format(float=kind).split(";"):
        if stmt.strip():
            backend.execute(stmt)


def _record_step(backend: Backend, node: str, config: RunnableConfig) -> None:
    thread_id = config["configurable"]["thread_id"]
    step = int(config["metadata"]["langgraph_step"])
    backend.execute(
        "INSERT INTO chaos_steps (thread_id, node, step, started_at) VALUES (%s, %s, %s, %s)",
        (thread_id, node, step, time.time()),
    )


def make_tools(backend: Backend) -> list[BaseTool]:
    def happen(what: str) -> None:
        ctx = current_effect()
        backend.execute(
            "INSERT INTO chaos_world (thread_id, effect, idempotency_key, at) "
            "VALUES (%s, %s, %s, %s)",
            (ctx.thread_id, what, ctx.idempotency_key, time.time()),
        )
        time.sleep(EFFECT_SLEEP)  # the call is still "in flight" after the money moved

    @irreversible
    @tool
    def refund(amount: int) -> str:
        """Refund the customer."""
        happen("refund")
        return f"refunded {amount}"

    @irreversible
    @tool
    def email(to: str) -> str:
        """Email the customer."""
        happen("email")
        return f"emailed {to}"

    @effect(idempotent=True)
    @tool
    def lookup(q: str) -> str:
        """Look the order up (safe to repeat)."""
        time.sleep(EFFECT_SLEEP)
        return f"{q}: ok"

    return [refund, email, lookup]


def build(
    backend: Backend, on_agent: Callable[[MessagesState], None] | None = None
) -> StateGraph[MessagesState]:
    """The graph factory TaskRunner and the workers call with their backend.

    *on_agent* runs at the end of each agent step (tests use it to inject an outage).
    """
    create_tables(backend)
    ledger = EffectLedger(backend)

    def agent(state: MessagesState) -> dict[str, Any]:
        _record_step(backend, "agent", get_config())
        time.sleep(STEP_SLEEP)
        turn = sum(isinstance(m, AIMessage) for m in state["messages"])
        if on_agent is not None:
            on_agent(state)
        if turn < len(SCRIPT):
            return {"messages": [AIMessage("", tool_calls=[SCRIPT[turn]])]}
        return {"messages": [AIMessage("all done")]}

    def counted(request: Any, execute: Any) -> Any:
        _record_step(backend, "tools", request.runtime.config)
        return ledger.wrap_tool_call(request, execute)

    def review(state: MessagesState) -> Command[Any]:
        last = state["messages"][-1]
        escalation = last.additional_kwargs["harness"]["escalation"]
        answer = interrupt(escalation)  # nothing with side effects before this line
        _record_step(backend, "review", get_config())
        thread_id = get_config()["configurable"]["thread_id"]
        if answer["happened"]:
            ledger.resolve(
                thread_id,
                escalation["tool_call_id"],
                happened=True,
                result=answer["result"],
                reviewer="test",
            )
            settled = ToolMessage(
                answer["result"], tool_call_id=escalation["tool_call_id"], id=last.id
            )
            return Command(update={"messages": [settled]}, goto="agent")
        ledger.resolve(thread_id, escalation["tool_call_id"], happened=False, reviewer="test")
        assert last.id is not None
        return Command(update={"messages": [RemoveMessage(id=last.id)]}, goto="tools")

    def after_tools(state: MessagesState) -> str:
        last = state["messages"][-1]
        if (last.additional_kwargs.get("harness") or {}).get("escalation"):
            return "review"
        return "agent"

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(make_tools(backend), wrap_tool_call=counted))
    builder.add_node("review", review, destinations=("agent", "tools"))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_conditional_edges("tools", after_tools, ["agent", "review"])
    return builder


def world(backend: Backend, thread_id: str) -> list[str]:
    rows = backend.execute(
        "SELECT effect FROM chaos_world WHERE thread_id = %s ORDER BY at", (thread_id,)
    )
    return [r["effect"] for r in rows]


def steps(backend: Backend, thread_id: str) -> list[dict[str, Any]]:
    return backend.execute(
        "SELECT node, step, started_at FROM chaos_steps WHERE thread_id = %s ORDER BY started_at",
        (thread_id,),
    )
