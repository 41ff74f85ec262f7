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
from langgraph.types import Overwrite
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
    """Which task a thread is running. Budgets and ledgers key on `task_id`, never on a run.

    Example:
        ```python
        from harness_nodes import HarnessState, TaskInfo

        task: TaskInfo = {"task_id": "ticket-42", "task_type": "refund"}
        state: HarnessState = {"messages": [], "task": task}
        assert state["task"]["task_type"] == "refund"
        ```
    """

    task_id: str
    """Stable id of the task (defaults to the thread id)."""
    task_type: str
    """The task's type: selects the envelope, tags the trace, groups the report."""


class Verdict(TypedDict):
    """The verification result for one tool call.

    Example:
        ```python
        import operator

        from harness_nodes import Verdict

        ok: Verdict = {"tool": "lookup_order", "tool_call_id": "call_1", "ok": True, "reasons": [],
                       "attempt": 1, "action": "ok"}
        bad: Verdict = {**ok, "tool_call_id": "call_2", "ok": False,
                        "reasons": ["missing key 'status'"], "action": "retry"}
        verdicts = operator.add([ok], [bad])  # HarnessState.verdicts appends
        assert [v["action"] for v in verdicts] == ["ok", "retry"]
        ```
    """

    tool: str
    """The tool's name."""
    tool_call_id: str
    """The call that was checked."""
    ok: bool
    """Whether the output met its contract."""
    reasons: list[str]
    """Why it did not (empty when ok)."""
    attempt: int
    """1 for the tool's first turn in the task, 2 for the first retry, ... (parallel calls of
    one AI message share their turn's attempt)."""
    action: Literal["ok", "retry", "escalate", "fail"]
    """What the harness decided to do about it."""
    task_start: NotRequired[str]
    """On a failed verdict: id of the message that opened its task (the input after the
    previous task's answer). Retries are counted per task, so a thread's next question
    starts with the tool's full `ToolContract.max_retries`."""


class ReviewRecord(TypedDict):
    """A human decision on one paused action.

    Example:
        ```python
        from harness_nodes import ReviewRecord

        record: ReviewRecord = {
            "review_id": "r-1",
            "tool_call_ids": ["call_1"],
            "decision": "approve",
            "reviewer": "alice",
            "reason": "refund over $100",
        }
        assert record["decision"] in ("approve", "edit", "reject", "respond")
        ```
    """

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

    Example:
        ```python
        from langchain_core.messages import ToolMessage

        from harness_nodes import Escalation

        escalation: Escalation = {
            "kind": "verification",
            "reason": "lookup_order failed its contract twice",
            "tool": "lookup_order",
            "tool_call_id": "call_1",
        }
        # Where nodes put it, so it works in a plain MessagesState app too:
        msg = ToolMessage("{}", tool_call_id="call_1",
                          additional_kwargs={"harness": {"escalation": escalation}})
        assert msg.additional_kwargs["harness"]["escalation"]["kind"] == "verification"
        ```
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
    """Spend on one model.

    Example:
        ```python
        from harness_nodes import ModelSpend, Spend

        mini: ModelSpend = {"input_tokens": 1200, "output_tokens": 300, "usd": 0.0004, "calls": 2}
        spend: Spend = {"by_model": {"gpt-4o-mini": mini}, "calls": mini["calls"]}
        assert spend["by_model"]["gpt-4o-mini"]["calls"] == 2
        ```
    """

    input_tokens: int
    output_tokens: int
    usd: float
    calls: int


class Spend(TypedDict, total=False):
    """Checkpointed mirror of a task's spend (the ledger in the backend is authoritative).

    Example:
        ```python
        from harness_nodes import Spend
        from harness_nodes.state import merge_spend

        before: Spend = {"usd": 0.01, "calls": 1, "model": "gpt-4o"}
        after = merge_spend(before, {"usd": 0.03, "calls": 2, "model": "gpt-4o-mini"})
        # key by key, the newest snapshot wins (here: degraded down the ladder)
        assert after == {"usd": 0.03, "calls": 2, "model": "gpt-4o-mini"}
        ```
    """

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
    """How the task ended. Set once, at the end.

    Example:
        ```python
        from harness_nodes import Outcome
        from harness_nodes.state import keep_first_outcome

        stopped: Outcome = {"status": "budget_exhausted", "reason": "usd used 0.51, limit 0.5"}
        later: Outcome = {"status": "completed"}
        assert keep_first_outcome(stopped, later) == stopped  # set once, at the end
        ```
    """

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


def replace_outcome(state: Any, outcome: Outcome | None) -> Any:
    """The ``outcome`` write of a node that ends the run (or starts a new task's first turn).

    `keep_first_outcome` keeps the first outcome of a task. A thread given new input after
    its task finished (a second question in the same conversation) starts a new task: the
    previous one's outcome is replaced — LangGraph's ``Overwrite`` — instead of kept.

    Example:
        ```python
        from langgraph.types import Overwrite

        from harness_nodes.state import replace_outcome

        done = {"status": "completed"}
        assert replace_outcome({"messages": []}, done) == done
        assert replace_outcome({"outcome": done}, None) == Overwrite(None)
        ```
    """
    previous = state.get("outcome") if hasattr(state, "get") else None
    return Overwrite(outcome) if previous is not None else outcome


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
    """The smallest state a harness node reads: just the messages.

    Example:
        ```python
        from langchain_core.messages import AIMessage, HumanMessage
        from langgraph.graph import END, START, StateGraph

        from harness_nodes import MessagesOnly

        builder = StateGraph(MessagesOnly)
        builder.add_node("echo", lambda s: {"messages": [AIMessage(s["messages"][-1].content)]})
        builder.add_edge(START, "echo")
        builder.add_edge("echo", END)
        out = builder.compile().invoke({"messages": [HumanMessage("hi")]})
        assert [m.content for m in out["messages"]] == ["hi", "hi"]
        ```
    """

    messages: Annotated[list[AnyMessage], add_messages]


class MessagesAndOutcome(MessagesOnly, total=False):
    """What a node that may end the run reads: the messages and the outcome, if any.

    Where the state has an outcome, a finished thread's new task replaces it
    (`replace_outcome`); where it has none, the outcome stays out of the state's output.
    """

    outcome: Outcome | None


class MessagesAndVerdicts(MessagesOnly, total=False):
    """What the verification node reads: the messages and the verdicts recorded so far.

    The verdicts keep the retry counts when a trimmed message history has lost the refused
    outputs. Where the state has no ``verdicts`` key, LangGraph keeps the node's records in a
    channel of their own, out of the state's output.
    """

    verdicts: Annotated[list[Verdict], operator.add]


class HarnessState(TypedDict):
    """State of a harnessed agent. Extend it with your own keys.

    Only ``messages`` is required; the harness fills the rest.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool

        from checkpointers import open_backend
        from harness_nodes import HarnessState, ToolContract, build_harnessed_agent
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        class SupportState(HarnessState):  # your own keys next to the harness's
            customer_id: str


        @tool
        def lookup_order(order_id: str) -> dict:
            "Look an order up."
            return {"order_id": order_id, "status": "shipped"}


        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("lookup_order", {"order_id": "A1"})]), ai("Shipped.")]
        )
        with open_backend("memory://") as backend:
            agent = build_harnessed_agent(
                model, [lookup_order], state_schema=SupportState, backend=backend,
                contracts={"lookup_order": ToolContract(required=("status",))},
            )
            out = agent.invoke({"messages": [HumanMessage("Where is A1?")], "customer_id": "c-7"},
                               {"configurable": {"thread_id": "ticket-1"}})
        assert out["customer_id"] == "c-7"
        assert [v["ok"] for v in out["verdicts"]] == [True]
        assert out["outcome"]["status"] == "completed"
        ```
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
    """How the task ended; set once per task. New input on a finished thread (a second
    question in the conversation) starts a new task, whose outcome replaces it."""
