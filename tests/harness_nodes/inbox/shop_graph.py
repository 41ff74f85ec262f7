"""The test agent: a scripted model proposes an irreversible `refund`; HumanReview pauses it.

Importable by a child process (``--graph tests.harness_nodes.inbox.shop_graph:builder``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from harness_nodes.review import HumanReview, ReviewPolicy
from harness_nodes.testing import ScriptedChatModel, ai, tool_call


def builder(
    on_refund: Callable[[dict[str, Any]], None] | None = None,
    delay: Callable[[], float] = lambda: 0.0,
) -> StateGraph[Any]:
    """The uncompiled agent: user message (JSON refund args) → refund (reviewed) → reply."""

    @tool
    def refund(order: str, amount: float, note: str = "") -> str:
        """Refund an order (irreversible: money leaves)."""
        time.sleep(delay())
        if on_refund is not None:
            on_refund({"order": order, "amount": amount, "note": note})
        return f"refunded {amount} on {order}"

    model = ScriptedChatModel(
        # Turn 0 proposes the refund the user's message asks for; turn 1 ends the task.
        script=[
            lambda prompt: ai(tool_calls=[tool_call("refund", json.loads(str(prompt[0].content)))]),
            ai("Refund handled."),
        ],
        model_name="gpt-4o-mini",
    )
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_node("review", review)
    graph.add_node("tools", ToolNode([refund]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", review.route)
    graph.add_edge("tools", "agent")
    return graph
