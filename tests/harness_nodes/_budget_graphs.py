"""Graphs shared by the budget tests and their child processes (importable by name)."""

from __future__ import annotations

import os
import signal
from typing import Any, Literal

from langchain_core.messages import BaseMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import interrupt

from harness_nodes import BudgetedChatModel, BudgetGuard, Envelope, HarnessState, budgeted
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

RESULT = "lorem ipsum " * 1500  # ~18 KB per tool result: the prompt grows fast
MAX_USD = 0.50


@tool
def search(query: str) -> str:
    """Search the web."""
    crash_at = os.environ.get("BUDGET_CRASH_AT_TOOL_CALL")
    if crash_at is not None:
        counter = os.environ["BUDGET_CRASH_COUNTER"]
        with open(counter, "a") as f:
            f.write("x")
        with open(counter) as f:
            if len(f.read()) >= int(crash_at):
                os.kill(os.getpid(), signal.SIGKILL)
    return RESULT


@tool
def search_after_approval(query: str) -> str:
    """Search the web once a person approves."""
    approved = interrupt({"query": query})
    return RESULT if approved else "not approved"


def runaway_model(name: str = "gpt-4o") -> ScriptedChatModel:
    """A model that never stops calling the search tool."""
    return ScriptedChatModel(
        script=[
            ai("Searching once more.", tool_calls=[tool_call("search", {"query": "x"}, id="c")])
        ],
        loop=True,
        model_name=name,
    )


def runaway_llm(backend: Any, *, exit_behavior: Literal["end", "error"] = "end") -> Any:
    """The runaway model, budgeted (``BUDGET_LEASE`` / ``BUDGET_MAX_USD`` in the environment
    set ``lease`` and the envelope)."""
    max_usd = float(os.environ.get("BUDGET_MAX_USD", MAX_USD))
    return budgeted(
        runaway_model(),
        envelope=Envelope(max_usd=max_usd, exit_behavior=exit_behavior),
        backend=backend,
        lease=int(os.environ.get("BUDGET_LEASE", "1")),
    ).bind_tools([search])


def guarded_loop(
    llm: BudgetedChatModel,
    *,
    form: Literal["route", "node"] = "route",
    state: type[Any] = HarnessState,
    tools: list[Any] | None = None,
    asynchronous: bool = False,
) -> StateGraph[Any]:
    """agent → tools → agent, guarded by `BudgetGuard` as a routing function or as a node.

    *asynchronous*: the model node is an ``async def`` (run it with ``ainvoke``), as in
    LangGraph's async templates; the guard's node form is the same object either way.
    """
    tools = tools or [search]
    guard = BudgetGuard(llm, next="agent", on_stop=END)

    def agent(s: Any) -> dict[str, list[BaseMessage]]:
        messages = s["messages"] if isinstance(s, dict) else s.messages
        return {"messages": [llm.invoke(messages)]}

    async def aagent(s: Any) -> dict[str, list[BaseMessage]]:
        messages = s["messages"] if isinstance(s, dict) else s.messages
        return {"messages": [await llm.ainvoke(messages)]}

    builder: StateGraph[Any] = StateGraph(state)
    builder.add_node("agent", aagent if asynchronous else agent)
    builder.add_node("tools", ToolNode(tools))
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    if form == "route":
        routes = {"ok": "agent", "degrade": "agent", "stop": "budget_exhausted"}
        builder.add_node("budget_exhausted", guard.finish)
        builder.add_conditional_edges(START, guard.route, routes)
        builder.add_conditional_edges("tools", guard.route, routes)
        builder.add_edge("budget_exhausted", END)
    else:
        builder.add_node("guard", guard)
        builder.add_edge(START, "guard")
        builder.add_edge("tools", "guard")
    return builder


def unguarded_loop(llm: BudgetedChatModel) -> StateGraph[Any]:
    """A plain MessagesState agent loop where only the model is wrapped."""

    def agent(s: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [llm.invoke(s["messages"])]}

    builder: StateGraph[Any] = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_edge("tools", "agent")
    return builder
