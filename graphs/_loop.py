"""The plain agent → tools → agent loop the reference graphs are built on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, SystemMessage
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from harness_nodes import HarnessState, Outcome

__all__ = ["react_builder"]


def react_builder(
    model: BaseChatModel, tools: Sequence[BaseTool], *, system_prompt: str
) -> StateGraph[HarnessState]:
    """Build agent → tools → agent until the model stops calling tools; ``finish`` ends it."""
    llm = model.bind_tools(list(tools))

    def agent(state: HarnessState) -> dict[str, Any]:
        return {"messages": [llm.invoke([SystemMessage(system_prompt), *state["messages"]])]}

    def finish(state: HarnessState) -> dict[str, Any]:
        last = state["messages"][-1]
        result = last.text if isinstance(last, AIMessage) else None
        outcome: Outcome = {"status": "completed", "partial_result": result}
        return {"outcome": outcome}

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(list(tools)))
    builder.add_node("finish", finish)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "finish"})
    builder.add_edge("tools", "agent")
    builder.add_edge("finish", END)
    return builder
