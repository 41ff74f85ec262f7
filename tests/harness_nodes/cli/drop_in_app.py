"""A user's ReAct loop with `add_harness` (a `MessagesState` app), for `harness run`."""

from __future__ import annotations

from typing import Any

from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from harness_nodes import ToolContract, add_harness
from harness_nodes.testing import ScriptedChatModel, ai, tool_call


@tool
def search(query: str) -> list[str]:
    """Search the notes."""
    return [] if query == "typo" else ["note-1"]


def build_graph(model: Any = None, *, backend: Any, typo: bool = False) -> Any:
    """The app, compiled on the backend's checkpointer; it answers "Found note-1.".

    With *typo* the search comes back empty and its contract allows no retry: the task
    stops ``verification_failed``.
    """
    llm = model or ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("search", {"query": "typo" if typo else "storage"})]),
            ai("Found note-1."),
        ]
    )
    builder: StateGraph[Any] = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [llm.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    contracts = {"search": ToolContract(max_retries=0)}
    add_harness(builder, model_node="agent", tools_node="tools", contracts=contracts)
    return builder.compile(checkpointer=backend.checkpointer)
