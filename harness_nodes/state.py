"""The state a harnessed graph carries, and the typed records inside it.

`HarnessState` is a `TypedDict` users extend with their own keys. Every harness node also
works on a plain ``MessagesState`` app: nodes declare the smallest state they read, and keep
what they need in message metadata or the backend. Extending `HarnessState` adds the richer
records (verdicts, reviews, spend mirror, outcome).

Example:
    ```python
    from langgraph.graph import END, START, StateGraph

    from harness_nodes import HarnessState


    class MyState(HarnessState):
        customer_id: str


    builder = StateGraph(MyState)
    builder.add_node("noop", lambda state: {})
    builder.add_edge(START, "noop")
    builder.add_edge("noop", END)
    out = builder.compile().invoke({"messages": [], "customer_id": "c1"})
    assert out["customer_id"] == "c1"
    ```
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal, NotRequired

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

__all__ = [
    "Escalation",
    "EscalationKind",
    "HarnessState",
    "MessagesOnly",
    "ModelSpend",
    "Outcome",
    "OutcomeStatus",
    "ReviewRecord",
    "Spend",
    "TaskInfo",
    "Verdict",
    "keep_first_outcome",
    "merge_spend",
]

OutcomeStatus = Literal[
    "completed",
    "budget_exhausted",
    "verification_failed",
    "rejected",
    "failed",
    "cancelled",
]
"""How a task ended."""


class TaskInfo(TypedDict, total=False):
    """Which task a thread is running. Budgets and ledgers key on `task_id`, never on a run."""

    task_id: str
    """Stable id of the task (defaults to the thread id)."""
    task_type: str
    """The task's type: selects the envelope, tags the trace, groups the report."""


class Verdict(TypedDict):
    """The verification result for one tool call."""

    tool: str
    """The tool's name."""
    tool_call_id: str
    """The call that was checked."""
    ok: bool
    """Whether the output met its contract."""
    reasons: list[str]
    """Why it did not (empty when ok)."""
    attempt: int
    """1 for the first call of this tool in the task, 2 for the first retry, ..."""
    action: Literal["ok", "retry", "escalate", "fail"]
    """What the harness decided to do about it."""


class ReviewRecord(TypedDict):
    """A human decision on one paused action."""

    review_id: str
    """The review item's id in the queue."""
    tool_call_ids: list[str]
    """The calls the decision covered."""
    decision: Literal["approve", "edit", "reject", "respond"]
    """LangChain's decision words."""
    reviewer: str
    """Who decided."""
    message: NotRequired[str]
    """The reviewer's message (reject / respond)."""
    reason: NotRequired[str]
    """Why the action was sent to review."""
    decided_at: NotRequired[str]
    """ISO 8601 time of the decision."""


EscalationKind = Literal["verification", "effect_unknown", "budget", "low_confidence"]
"""Why a case goes to a person without being a plain pre-tool review."""


class Escalation(TypedDict):
    """A case a harness node hands to human review.

    Nodes that escalate write it on the tool message concerned, as
    ``ToolMessage.additional_kwargs["harness"]["escalation"]`` — so it works in a plain
    ``MessagesState`` app — and `HumanReview` picks up every escalation among the tool
    messages after the last AI message.
    """

    kind: EscalationKind
    """Who escalated and why (verification exhausted, outcome of an effect unknown, ...)."""
    reason: str
    """One line for the reviewer."""
    tool: NotRequired[str]
    """The tool concerned."""
    tool_call_id: NotRequired[str]
    """The call concerned."""
    args: NotRequired[dict[str, Any]]
    """The call's arguments."""
    details: NotRequired[dict[str, Any]]
    """Anything else the reviewer needs (verifier reasons, idempotency key, spend...)."""


class ModelSpend(TypedDict):
    """Spend on one model."""

    input_tokens: int
    output_tokens: int
    usd: float
    calls: int


class Spend(TypedDict, total=False):
    """Checkpointed mirror of a task's spend (the ledger in the backend is authoritative)."""

    total_tokens: int
    """Input + output tokens over all models."""
    usd: float
    """Dollars over all models."""
    calls: int
    """LLM calls made."""
    by_model: dict[str, ModelSpend]
    """Per-model breakdown."""
    model: str
    """The model currently in use (changes when the budget degrades down the ladder)."""


class Outcome(TypedDict):
    """How the task ended. Set once, at the end."""

    status: OutcomeStatus
    reason: NotRequired[str]
    """Why it ended this way (the verifier's reasons, the exhausted limit...)."""
    partial_result: NotRequired[Any]
    """What was achieved before the end (last answer, tool results so far)."""


def keep_first_outcome(current: Outcome | None, new: Outcome | None) -> Outcome | None:
    """Reducer for `HarnessState.outcome`: the first outcome written wins.

    Example:
        ```python
        from harness_nodes.state import keep_first_outcome

        first = {"status": "budget_exhausted"}
        assert keep_first_outcome(first, {"status": "completed"}) == first
        assert keep_first_outcome(None, first) == first
        ```
    """
    return current if current is not None else new


def merge_spend(current: Spend | None, new: Spend | None) -> Spend:
    """Reducer for `HarnessState.spend`: a newer mirror replaces older keys.

    The mirror is written from the ledger (authoritative), so the newest snapshot wins
    key by key; keys absent from the update are kept.

    Example:
        ```python
        from harness_nodes.state import merge_spend

        assert merge_spend({"usd": 0.1, "calls": 1}, {"usd": 0.2})["calls"] == 1
        ```
    """
    merged: Spend = {**(current or {})}
    merged.update(new or {})
    return merged


class MessagesOnly(TypedDict):
    """The smallest state a harness node reads: just the messages."""

    messages: Annotated[list[AnyMessage], add_messages]


class HarnessState(TypedDict):
    """State of a harnessed agent. Extend it with your own keys.

    Only ``messages`` is required; the harness fills the rest.
    """

    messages: Annotated[list[AnyMessage], add_messages]
    """The conversation (LangGraph's `add_messages` reducer)."""
    task: NotRequired[TaskInfo]
    """The task id and type."""
    verdicts: NotRequired[Annotated[list[Verdict], operator.add]]
    """Verification records, appended."""
    reviews: NotRequired[Annotated[list[ReviewRecord], operator.add]]
    """Review records, appended."""
    spend: NotRequired[Annotated[Spend, merge_spend]]
    """Checkpointed mirror of the task's spend."""
    outcome: NotRequired[Annotated[Outcome | None, keep_first_outcome]]
    """How the task ended; set once."""
