"""Small user apps the drop-in tests harness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from harness_nodes import add_harness


def harnessed_messages_app(model: Any, tools: Sequence[Any], **harness: Any) -> Any:
    """A user's ``MessagesState`` app (model node, ``ToolNode``, ``tools_condition``), harnessed
    with ``add_harness(..., **harness)`` and compiled."""

    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", call_model)
    builder.add_node("tools", ToolNode(list(tools)))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return add_harness(builder, model_node="agent", tools_node="tools", **harness).compile()
