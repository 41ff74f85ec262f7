"""A small billing agent for the review tests (also loaded by spec from child processes).

Its tools count their executions in ``EFFECTS`` (and append to ``$REVIEW_EFFECTS_FILE`` when
set, so a child process's executions can be counted by the parent).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any

from langchain_core.messages import AIMessage, AnyMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import InjectedState, ToolNode, ToolRuntime
from langgraph.types import Command

from harness_nodes import HumanReview, ReviewPolicy
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

EFFECTS: Counter[str] = Counter()
CRASHED: list[str] = []  # a refund of order CRASH-ONCE dies the first time
KILL_ENV = "REVIEW_KILL_IN_REFUND"  # set in a child process: a refund of order KILL is a kill -9


class ProcessDied(BaseException):
    """Stands for a kill -9: nothing in the graph catches it."""


class Gate:
    """Holds the first run that reaches it until released; later runs pass straight on."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._used = False

    def __call__(self) -> None:
        with self._lock:
            first, self._used = not self._used, True
        if first:
            self.entered.set()
            self.release.wait(30)


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


# Refunds with an argument LangGraph injects when the tool runs (not the model's to set).
@tool
def refund_replying(
    order: str, amount: float, tool_call_id: Annotated[str, InjectedToolCallId]
) -> str:
    """Refund an order (the call id injected, to answer with a Command)."""
    return f"refunded {amount:g} on {order} ({tool_call_id})"


@tool
def refund_with_runtime(order: str, amount: float, runtime: ToolRuntime) -> str:
    """Refund an order (the run injected: LangChain v1's usual tool)."""
    return f"refunded {amount:g} on {order} ({runtime.tool_call_id})"


@tool
def refund_reading_state(
    order: str, amount: float, messages: Annotated[list[AnyMessage], InjectedState("messages")]
) -> str:
    """Refund an order (the conversation injected)."""
    return f"refunded {amount:g} on {order} (after {len(messages)} messages)"


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
    gate: Callable[[], None] | None = None,
) -> StateGraph[Any]:
    """agent → (review) → tools → agent, in a plain MessagesState app (or *state*).

    *gate* is called when the review node has its answer, before that step is saved: a
    `Gate` holds a resumed run there (its lease held, the pause still in the checkpoint).
    """
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

    def gated_review(state: MessagesState, config: RunnableConfig) -> Command[str]:
        command = review(state, config)  # pauses on its first pass
        if gate is not None:
            gate()
        return command

    builder = StateGraph(state)
    builder.add_node("agent", agent)
    review_node: Any = review if gate is None else gated_review
    builder.add_node("review", review_node, destinations=("tools", "agent"))
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


bank_down_builder = build_builder(
    script=[ai(tool_calls=[tool_call("refund", {"order": "BANK-DOWN", "amount": 250})])]
)
"""A task whose approved refund fails (the bank is down): ``review_app:bank_down_builder``."""

CARD = "4929123456789012"

mail_twice_builder = build_builder(
    script=[
        ai(tool_calls=[tool_call("send_email", {"to": "a", "body": "x", "card": CARD})]),
        ai(tool_calls=[tool_call("send_email", {"to": "b", "body": "y", "card": CARD})]),
        ai("done"),
    ]
)
"""A task that pauses twice on a mail carrying a card number: ``review_app:mail_twice_builder``."""
