"""A small billing agent for the review tests (also loaded by spec from child processes).

Its tools count their executions in ``EFFECTS`` (and append to ``$REVIEW_EFFECTS_FILE`` when
set, so a child process's executions can be counted by the parent).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from harness_nodes import HumanReview, ReviewPolicy
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

EFFECTS: Counter[str] = Counter()
CRASHED: list[str] = []  # a refund of order CRASH-ONCE dies the first time
KILL_ENV = "REVIEW_KILL_IN_REFUND"  # set in a child process: a refund of order KILL is a kill -9


class ProcessDied(BaseException):
    """Stands for a kill -9: nothing in the graph catches it."""


def _record(name: str) -> None:
    EFFECTS[name] += 1
    path = os.environ.get("REVIEW_EFFECTS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


@tool
def refund(order: str, amount: float) -> str:
    """Refund an order (irreversible)."""
    if order == "BANK-DOWN":
        raise RuntimeError("the bank is down")
    if order == "CRASH-ONCE" and not CRASHED:
        CRASHED.append(order)
        raise ProcessDied("the process died in the middle of the refund")
    if order == "KILL" and os.environ.get(KILL_ENV):
        os.kill(os.getpid(), signal.SIGKILL)
    _record("refund")
    return f"refunded {amount:g} on {order}"


@tool
def lookup(order: str) -> str:
    """Look an order up (read-only)."""
    _record("lookup")
    return f"order {order}: paid"


@tool
def send_email(to: str, body: str) -> str:
    """Send an email (irreversible)."""
    _record("send_email")
    return f"sent to {to}"


TOOLS = [refund, lookup, send_email]


def refund_turns(amount: float = 250) -> list[Any]:
    """Turn 0: refund + lookup in parallel; turn 1: a final answer that echoes tool results."""

    def final(messages: list[Any]) -> str:
        results = [m.content for m in messages if isinstance(m, ToolMessage)]
        return "Done: " + " | ".join(str(r) for r in results)

    return [
        ai(
            tool_calls=[
                tool_call("refund", {"order": "A1", "amount": amount}, id="call_refund"),
                tool_call("lookup", {"order": "A1"}, id="call_lookup"),
            ]
        ),
        final,
    ]


def build_builder(
    script: list[Any] | None = None,
    policy: ReviewPolicy | None = None,
    state: type[Any] = MessagesState,
) -> StateGraph[Any]:
    """agent → (review) → tools → agent, in a plain MessagesState app (or *state*)."""
    model = ScriptedChatModel(script=script if script is not None else refund_turns())
    review = HumanReview(
        policy
        or ReviewPolicy(
            irreversible=["send_email"],
            rules={"refund": lambda a: a["amount"] > 100 and f"refund of ${a['amount']:g} > $100"},
            never=["lookup"],
        ),
        tools=TOOLS,
    )

    def agent(state: MessagesState) -> dict[str, list[AIMessage]]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(state)
    builder.add_node("agent", agent)
    builder.add_node("review", review, destinations=("tools", "agent"))
    builder.add_node("tools", ToolNode(TOOLS))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    return builder


builder = build_builder()
"""Module-level builder: the CLI's ``--graph tests.harness_nodes.review_app:builder``."""


def compiled_on(model: Any = None, *, backend: Any) -> Any:
    """A factory shaped like ``graphs.support:build_graph``: model first, backend by name."""
    assert model is None, "the backend must be passed by keyword"
    return build_builder().compile(checkpointer=backend.checkpointer)
