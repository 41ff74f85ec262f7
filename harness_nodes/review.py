"""Human review: which calls need a person (`ReviewPolicy`), and the node that asks them.

`HumanReview` sits between the model and the tools. When the policy flags calls of the last
AI message (an irreversible tool, an argument rule such as "refund over $100", low
confidence, an always-list) — or a harness node escalated a tool result (verification
exhausted, the outcome of an irreversible call unknown) — it pauses the graph with one
`interrupt()` carrying a list of `ReviewRequest`s, one per call, in Agent Inbox's format
plus the reason, the risk and a trace excerpt. The run resumes with
``Command(resume=decisions)``: ``approve`` runs the call, ``edit`` runs the edited
arguments (the AI message is updated in place), ``reject``/``respond`` give the model the
reviewer's words as the tool result. A malformed or disallowed decision raises
`InvalidDecision` and the run stays paused with nothing lost.

The node is pure before ``interrupt()`` (LangGraph re-runs it from its top on resume) and it
never executes tools itself, so no tool runs twice; sibling calls that need no review run
with the approved ones, after the decision. When an escalated output had a sibling whose
verification verdict says ``fail``, the task still ends once the escalation is answered
(outcome ``verification_failed``, as `VerificationStop` writes it) instead of going back to
the model.

Example:
    ```python
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode
    from langgraph.types import Command

    from harness_nodes import HumanReview, ReviewPolicy
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call


    @tool
    def refund(order: str, amount: float) -> str:
        \"\"\"Refund an order.\"\"\"
        return f"refunded {amount} on {order}"


    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]), ai("Done.")]
    )
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=InMemorySaver())

    config = {"configurable": {"thread_id": "t1"}}
    paused = graph.invoke({"messages": [HumanMessage("refund A1")]}, config)
    request = paused["__interrupt__"][0].value[0]
    assert request["action_request"] == {"action": "refund", "args": {"order": "A1", "amount": 250}}
    done = graph.invoke(Command(resume={"type": "approve"}), config)
    assert done["messages"][-1].content == "Done."
    ```
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeGuard, cast

from langchain_core.messages import AIMessage, AnyMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.config import get_config
from langgraph.constants import END
from langgraph.errors import GraphInterrupt
from langgraph.types import Command, Send, interrupt
from pydantic import (
    BaseModel,
    ConfigDict,
    GetJsonSchemaHandler,
    RootModel,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import ErrorDetails
from typing_extensions import TypedDict

from harness_nodes import _verify
from harness_nodes._events import emit
from harness_nodes._trace_langfuse import Masker, marked_fields
from harness_nodes.errors import InvalidDecision, UserError
from harness_nodes.state import Escalation, MessagesOnly, ReviewRecord
from harness_nodes.verify import VerificationStop

__all__ = [
    "ActionRequest",
    "ConfidenceScorer",
    "DecisionType",
    "HumanReview",
    "ReviewConfig",
    "ReviewDecision",
    "ReviewPolicy",
    "ReviewRequest",
    "Risk",
    "TraceExcerpt",
    "check_decisions",
]

Risk = Literal["low", "medium", "high"]
"""How much harm the action can do if it is wrong."""

DecisionType = Literal["approve", "edit", "reject", "respond"]
"""LangChain's decision words (Agent Inbox's ``accept/edit/response/ignore`` map onto them)."""

_RISK_ORDER: dict[str, int] = {"low": 0, "medium": 1, "high": 2}


# --- the payloads --------------------------------------------------------------------------


class ActionRequest(TypedDict):
    """What the agent wants to do (Agent Inbox's ``action_request``).

    Example:
        ```python
        from harness_nodes import ActionRequest, HumanReview, ReviewPolicy
        from harness_nodes.testing import ai, tool_call

        msg = ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})])
        [request] = HumanReview(ReviewPolicy(irreversible=["refund"])).requests([msg])
        action: ActionRequest = request["action_request"]
        assert action == {"action": "refund", "args": {"order": "A1", "amount": 250}}
        ```
    """

    action: str
    """The tool's name."""
    args: dict[str, Any]
    """The call's arguments."""


class ReviewConfig(TypedDict):
    """Which decisions the reviewer may take (Agent Inbox's ``config``).

    Example:
        ```python
        from harness_nodes import HumanReview, ReviewConfig, ReviewPolicy
        from harness_nodes.testing import ai, tool_call

        policy = ReviewPolicy(irreversible=["refund"], allow_edit=False)
        msg = ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})])
        [request] = HumanReview(policy).requests([msg])
        config: ReviewConfig = request["config"]
        assert config["allow_accept"] and not config["allow_edit"]
        ```
    """

    allow_accept: bool
    """``approve`` (Agent Inbox: accept)."""
    allow_edit: bool
    """``edit`` the arguments."""
    allow_respond: bool
    """``respond``: answer in the tool's place."""
    allow_ignore: bool
    """``reject`` (Agent Inbox: ignore)."""


class TraceExcerpt(TypedDict):
    """What led to the review, read from the messages (decisions so far and spend).

    Example:
        ```python
        from langchain_core.messages import HumanMessage

        from harness_nodes import HumanReview, ReviewPolicy, TraceExcerpt
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call

        model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("refund", {"amount": 250})])])
        messages = [HumanMessage("refund A1")]
        messages.append(model.invoke(messages))
        [request] = HumanReview(ReviewPolicy(irreversible=["refund"])).requests(messages)
        trace: TraceExcerpt = request["trace"]
        assert trace["tokens"] > 0  # read from the AI messages' usage
        assert any("refund" in step for step in trace["steps"])
        ```
    """

    steps: list[str]
    """The decisions that led here, oldest first (tool calls, verdicts, earlier reviews)."""
    tokens: int
    """Tokens spent so far in this conversation (from the AI messages' usage)."""
    usd: float | None
    """Dollars spent so far, when a budgeted model reported it."""


class ReviewRequest(TypedDict):
    """One item a reviewer decides on: Agent Inbox's ``HumanInterrupt`` plus the harness's why.

    `HumanReview` interrupts with a list of these (one per call needing review in one AI
    message), which is exactly the shape Agent Inbox renders.

    Example:
        ```python
        from harness_nodes import HumanReview, ReviewPolicy, ReviewRequest
        from harness_nodes.testing import ai, tool_call

        rule = {"refund": lambda args: args["amount"] > 100 and "over $100"}
        review = HumanReview(ReviewPolicy(rules=rule))
        msg = ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250}, id="call_1")])
        requests: list[ReviewRequest] = review.requests([msg])  # what the interrupt carries
        [request] = requests
        assert (request["kind"], request["trigger"]) == ("tool_call", "argument_rule")
        assert request["tool_call_id"] == "call_1" and request["risk"] == "high"
        assert "over $100" in request["reason"]
        ```
    """

    action_request: ActionRequest
    """The action and its arguments."""
    config: ReviewConfig
    """The decisions allowed."""
    description: str
    """A line for the reviewer: what, and why it is asked."""
    kind: Literal["tool_call", "escalation"]
    """``tool_call``: the call has not run yet. ``escalation``: it ran and a node escalated."""
    trigger: str
    """Why, as a category: ``irreversible``, ``argument_rule``, ``low_confidence``, ``always``,
    or the escalation's kind (``verification``, ``effect_unknown``, ``budget``...)."""
    reason: str
    """Why, in words."""
    risk: Risk
    """How much harm the action can do."""
    tool_call_id: str
    """The call concerned."""
    trace: TraceExcerpt
    """The decisions that led here and the spend so far."""


class ReviewDecision(BaseModel):
    """A reviewer's decision on one `ReviewRequest` — untrusted input, so validated.

    Agent Inbox's responses are accepted as well and normalised:
    ``{"type": "accept"}`` → approve, ``{"type": "ignore"}`` → reject,
    ``{"type": "response", "args": "text"}`` → respond,
    ``{"type": "edit", "args": {"action": ..., "args": {...}}}`` → edit; and so is LangChain's
    ``HumanInTheLoopMiddleware`` edit, ``{"type": "edit", "edited_action": {"name": ...,
    "args": {...}}}``. An edit that names a tool (``action``) must name the reviewed one.

    Example:
        ```python
        from harness_nodes import ReviewDecision

        d = ReviewDecision.model_validate({"type": "response", "args": "Use order A2."})
        assert (d.type, d.message) == ("respond", "Use order A2.")
        ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: DecisionType
    """What the reviewer decided."""
    args: dict[str, Any] | None = None
    """``edit``: the arguments to run instead."""
    action: str | None = None
    """``edit``: the tool the edited call names, when the client sends one (it must be the
    reviewed tool: an edit changes arguments, never which tool runs)."""
    message: str | None = None
    """``reject``: why (optional); ``respond``: the answer the model gets (required)."""
    tool_call_id: str | None = None
    """Which call of a batch this decision is for (else decisions go in request order)."""
    reviewer: str | None = None
    """Who decided (set by `ReviewQueue.decide`)."""
    review_id: str | None = None
    """The queue item decided (set by `ReviewQueue.decide`)."""

    @model_validator(mode="before")
    @classmethod
    def _from_agent_inbox(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        kind = data.get("type")
        if kind == "accept":
            data["type"] = "approve"
            if data.get("args") is None:
                data.pop("args", None)
        elif kind == "ignore":
            data["type"] = "reject"
            if data.get("args") is None:
                data.pop("args", None)
        elif kind == "response":
            data["type"] = "respond"
            if isinstance(data.get("args"), str):
                data["message"] = data.pop("args")
        elif kind == "edit":
            inner = data.get("args")
            if isinstance(inner, Mapping) and set(inner) == {"action", "args"}:
                data["args"], data["action"] = inner["args"], inner["action"]
            edited = data.pop("edited_action", None)
            if isinstance(edited, Mapping) and "args" not in data:
                data["args"], data["action"] = edited.get("args"), edited.get("name")
            elif edited is not None:
                data["edited_action"] = edited  # malformed, or beside 'args': refused below
        return data

    @model_validator(mode="after")
    def _complete(self) -> ReviewDecision:
        if self.type == "edit" and self.args is None:
            raise ValueError("an edit decision needs the new arguments in 'args'")
        if self.type != "edit" and self.args is not None:
            raise ValueError(f"'args' is only for edit decisions, not {self.type}")
        if self.type != "edit" and self.action is not None:
            raise ValueError(f"'action' is only for edit decisions, not {self.type}")
        if self.type == "respond" and not (self.message or "").strip():
            raise ValueError("a respond decision needs a non-empty 'message'")
        return self


class _Decisions(RootModel[ReviewDecision | list[ReviewDecision]]):
    """The resume value: one decision (applied to every request) or one per request.

    Only its JSON Schema is used (what a UI renders); `check_decisions` validates.
    """


# --- validation shared by the node and the queue -------------------------------------------


def _is_model(schema: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def _tool_schema(tool: BaseTool | None) -> type[BaseModel] | None:
    schema = getattr(tool, "args_schema", None) if tool is not None else None
    return schema if _is_model(schema) else None


def _injected_fields(tool: BaseTool, schema: type[BaseModel]) -> set[str]:
    """The arguments LangGraph injects when *tool* runs: not the call's (or a reviewer's) to set.

    ``InjectedToolCallId``, ``ToolRuntime``, ``InjectedState``, ``InjectedStore``: they are in
    the tool's ``args_schema`` but not in ``tool_call_schema``, what the model is shown.
    """
    call_schema = tool.tool_call_schema
    if not _is_model(call_schema):
        return set()
    return set(schema.model_fields) - set(call_schema.model_fields)


def _argument_names(schema: type[BaseModel], only: Collection[str] | None = None) -> set[str]:
    """The names the fields of *schema* (or *only* these) accept: their own and their aliases."""
    names: set[str] = set()
    for name, info in schema.model_fields.items():
        if only is None or name in only:
            names.add(name)
            names.update(a for a in (info.alias, info.validation_alias) if isinstance(a, str))
    return names


def check_decisions(
    requests: Sequence[ReviewRequest],
    raw: Any,
    tools: Mapping[str, BaseTool] | Sequence[BaseTool] = (),
    *,
    review_id: str = "",
) -> list[ReviewDecision]:
    """Validate a resume value against the requests it answers; one decision per request.

    A single decision applies to every request (an ``edit`` only when there is one request).
    A list gives one decision per request, in order, or matched by ``tool_call_id``.

    Raises:
        InvalidDecision: wrong type or shape, an unknown decision word, a decision the
            request does not allow (editing a call that is not editable), edited arguments
            that fail the tool's argument schema, name none of its arguments or set one
            LangGraph injects when the tool runs (``ToolRuntime``, ``InjectedToolCallId``,
            ``InjectedState``: an edit gives what the call sets, as the model does), or a
            count that does not match.

    Example:
        ```python
        import pytest

        from harness_nodes import HumanReview, InvalidDecision, ReviewPolicy, check_decisions
        from harness_nodes.testing import ai, tool_call

        review = HumanReview(ReviewPolicy(irreversible=["refund"]))
        requests = review.requests([ai(tool_calls=[tool_call("refund", {"amount": 250})])])
        assert check_decisions(requests, {"type": "approve"})[0].type == "approve"
        with pytest.raises(InvalidDecision, match="Input should be 'approve'"):
            check_decisions(requests, {"type": "maybe"})
        ```
    """
    by_name = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
    parsed: ReviewDecision | list[ReviewDecision]
    try:
        if isinstance(raw, ReviewDecision):
            parsed = raw
        elif isinstance(raw, Mapping):
            parsed = ReviewDecision.model_validate(raw)
        elif isinstance(raw, list | tuple):
            parsed = [ReviewDecision.model_validate(d) for d in raw]
        else:
            raise InvalidDecision(
                review_id,
                f"expected a decision object or a list of them, got {type(raw).__name__}",
            )
    except ValidationError as e:
        raise InvalidDecision(review_id, _one_line(e)) from None
    decisions = _align(requests, parsed, review_id)
    allowed_key: dict[str, str] = {
        "approve": "allow_accept",
        "edit": "allow_edit",
        "respond": "allow_respond",
        "reject": "allow_ignore",
    }
    for req, dec in zip(requests, decisions, strict=True):
        call = req["tool_call_id"]
        if not req["config"].get(allowed_key[dec.type], False):
            raise InvalidDecision(
                review_id,
                f"{dec.type!r} is not allowed for {req['action_request']['action']} "
                f"(call {call}); allowed: {', '.join(_allowed(req))}",
            )
        if dec.type == "edit":
            if dec.action is not None and dec.action != req["action_request"]["action"]:
                raise InvalidDecision(
                    review_id,
                    f"an edit of call {call} names tool {dec.action!r}, but the call is "
                    f"{req['action_request']['action']!r}: an edit changes arguments, not the tool",
                )
            tool = by_name.get(req["action_request"]["action"])
            schema = _tool_schema(tool)
            if tool is not None and schema is not None:
                _check_edited_args(tool, schema, dec.args or {}, req, review_id)
    return decisions


def _check_edited_args(
    tool: BaseTool,
    schema: type[BaseModel],
    args: Mapping[str, Any],
    req: ReviewRequest,
    review_id: str,
) -> None:
    """Refuse edited *args* the tool would not run with as the reviewer wrote them.

    They are checked against the arguments a call sets, as the model's own are: the tool's
    ``args_schema`` (its types, constraints, validators and aliases) without the arguments
    LangGraph injects when the tool runs, which an edit neither gives nor may set.
    """
    where = f"edited args for {req['action_request']['action']} (call {req['tool_call_id']})"
    injected = _argument_names(schema, _injected_fields(tool, schema))
    forced = sorted(set(args) & injected)
    if forced:
        # The tool node overwrites them: the audit would show values the tool never got.
        raise InvalidDecision(
            review_id,
            f"{where} set arguments the tool gets injected when it runs: {', '.join(forced)}",
        )
    unknown = sorted(set(args) - _argument_names(schema))
    if unknown and schema.model_config.get("extra") != "allow":
        # The schema would drop them silently: the audit would show arguments (a misspelt
        # amount) that never reached the tool.
        raise InvalidDecision(
            review_id, f"{where} name no argument of the tool: {', '.join(unknown)}"
        )
    try:
        schema.model_validate(args)
    except ValidationError as e:
        # An injected argument is missing from every edit (and from the model's calls).
        errors = [
            err
            for err in e.errors()
            if not (err["type"] == "missing" and err["loc"][:1] and err["loc"][0] in injected)
        ]
        if errors:
            missing = any(err["type"] == "missing" for err in errors)
            raise InvalidDecision(
                review_id,
                f"{where} fail its schema: {_error_lines(errors)}"
                + (" (an edit replaces all of the call's arguments)" if missing else ""),
            ) from None


def _request_event(requests: Sequence[ReviewRequest]) -> dict[str, Any]:
    """What a ``review.request`` event carries: the calls, why, and the highest risk."""
    order = {"low": 0, "medium": 1, "high": 2}
    return {
        "tool_calls": [
            {
                "id": r["tool_call_id"],
                "name": r["action_request"]["action"],
                "args": r["action_request"]["args"],
            }
            for r in requests
        ],
        "reason": "; ".join(dict.fromkeys(str(r["reason"]) for r in requests)),
        "risk": max((str(r["risk"]) for r in requests), key=lambda k: order.get(k, 1)),
    }


def _allowed(req: ReviewRequest) -> list[str]:
    cfg = req["config"]
    pairs = [
        ("approve", "allow_accept"),
        ("edit", "allow_edit"),
        ("respond", "allow_respond"),
        ("reject", "allow_ignore"),
    ]
    return [word for word, key in pairs if cfg.get(key, False)]


def _align(
    requests: Sequence[ReviewRequest],
    parsed: ReviewDecision | list[ReviewDecision],
    review_id: str,
) -> list[ReviewDecision]:
    if isinstance(parsed, ReviewDecision):
        if parsed.tool_call_id is None or len(requests) == 1:
            if parsed.type == "edit" and len(requests) != 1:
                raise InvalidDecision(
                    review_id,
                    f"one edit cannot apply to {len(requests)} calls; give one decision per "
                    "call (a list, in order, or each with its tool_call_id)",
                )
            return [parsed] * len(requests)
        parsed = [parsed]
    ids = [r["tool_call_id"] for r in requests]
    if parsed and all(d.tool_call_id is not None for d in parsed):
        by_id = {d.tool_call_id: d for d in parsed}
        unknown = sorted(set(by_id) - set(ids), key=str)
        missing = [i for i in ids if i not in by_id]
        if unknown or missing or len(by_id) != len(parsed):
            raise InvalidDecision(
                review_id,
                f"decisions must cover calls {ids} exactly once "
                f"(unknown: {unknown}, missing: {missing})",
            )
        return [by_id[i] for i in ids]
    if len(parsed) != len(requests):
        raise InvalidDecision(
            review_id, f"{len(parsed)} decision(s) for {len(requests)} call(s) under review"
        )
    for req, dec in zip(requests, parsed, strict=True):
        if dec.tool_call_id is not None and dec.tool_call_id != req["tool_call_id"]:
            raise InvalidDecision(
                review_id, f"decision for call {dec.tool_call_id} given for {req['tool_call_id']}"
            )
    return list(parsed)


def _one_line(e: ValidationError) -> str:
    return _error_lines(e.errors()) or str(e)


def _error_lines(errors: Sequence[ErrorDetails]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


# --- the policy ----------------------------------------------------------------------------


class ConfidenceScorer(Protocol):
    """Scores how confident the agent is in one tool call (0..1), or None when it cannot tell.

    Example:
        ```python
        from langchain_core.messages import AIMessage, ToolCall

        from harness_nodes import ConfidenceScorer, ReviewPolicy
        from harness_nodes.testing import ai, tool_call


        def amount_scorer(call: ToolCall, message: AIMessage) -> float | None:
            return 0.9 if call["args"].get("amount", 0) < 50 else 0.4


        scorer: ConfidenceScorer = amount_scorer
        policy = ReviewPolicy(min_confidence=0.7, scorer=scorer)
        big, small = tool_call("refund", {"amount": 80}), tool_call("refund", {"amount": 10})
        msg = ai(tool_calls=[big, small])
        assert policy.check(big, msg) is not None  # 0.4 < 0.7: a person looks first
        assert policy.check(small, msg) is None
        ```
    """

    def __call__(self, call: ToolCall, message: AIMessage) -> float | None:
        """Return the confidence for *call* made in *message*."""
        ...


ArgRule = Callable[[dict[str, Any]], bool | str]
"""An argument predicate: truthy means "needs review"; a string is the reason to show."""


@dataclass(frozen=True)
class Flag:
    """Why one call needs review (the policy's verdict)."""

    trigger: str
    """Category: ``irreversible``, ``argument_rule``, ``low_confidence``, ``always``."""
    reason: str
    """In words, for the reviewer."""
    risk: Risk
    """How much harm the call can do."""


@dataclass(frozen=True)
class ReviewPolicy:
    """Which tool calls need a person before they run.

    Checked in this order: ``never`` (skip), ``always``, ``irreversible``, argument
    ``rules``, confidence. Escalations written by harness nodes always go to review.

    Example:
        ```python
        from harness_nodes import ReviewPolicy
        from harness_nodes.testing import ai, tool_call

        policy = ReviewPolicy(
            irreversible=["send_email"],
            rules={"refund": lambda args: args["amount"] > 100 and "refund over $100"},
            min_confidence=0.7,
        )
        big = tool_call("refund", {"amount": 250})
        small = tool_call("refund", {"amount": 20})
        msg = ai(tool_calls=[big, small])
        assert policy.check(big, msg).reason == "refund over $100"
        assert policy.check(small, msg) is None
        ```
    """

    irreversible: Collection[str] = ()
    """Tools whose effects cannot be undone: every call is reviewed (risk high)."""
    rules: Mapping[str, ArgRule] = field(default_factory=dict)
    """Tool name → argument predicate (e.g. refund amount > 100)."""
    min_confidence: float | None = None
    """Review calls whose confidence is below this (0..1)."""
    scorer: ConfidenceScorer | None = None
    """Computes a call's confidence. Without one, the model-supplied confidence is read from
    ``AIMessage.additional_kwargs["harness"]["confidence"]`` (a number, or a dict by call id)."""
    always: Collection[str] = ()
    """Tools always reviewed (risk medium)."""
    never: Collection[str] = ()
    """Tools never reviewed (read-only lookups); overrides every other rule."""
    allow_edit: bool = True
    """Whether reviewers may edit a call's arguments (escalations are never editable)."""
    allow_respond: bool = True
    """Whether reviewers may answer in the tool's place."""
    rule_risk: Risk = "high"
    """Risk of a call flagged by an argument rule."""

    def __post_init__(self) -> None:
        for name in ("irreversible", "always", "never"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise UserError(
                    f"ReviewPolicy.{name} must be a collection of tool names, not {value!r}"
                )
            object.__setattr__(self, name, frozenset(value))
        both = set(self.never) & (set(self.always) | set(self.irreversible))
        if both:
            raise UserError(
                f"ReviewPolicy: tools {sorted(both)} are both in 'never' and in "
                "'always'/'irreversible'"
            )
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise UserError(
                f"ReviewPolicy.min_confidence must be in [0, 1], got {self.min_confidence}"
            )
        if self.scorer is not None and self.min_confidence is None:
            raise UserError("ReviewPolicy.scorer needs min_confidence (the threshold)")

    def check(self, call: ToolCall, message: AIMessage) -> Flag | None:
        """Return why *call* (in *message*) needs review, or None when it may run."""
        name = call["name"]
        if name in self.never:
            return None
        if name in self.always:
            return Flag("always", f"{name} is always reviewed", "medium")
        if name in self.irreversible:
            return Flag("irreversible", f"{name} is irreversible", "high")
        rule = self.rules.get(name)
        if rule is not None:
            hit = rule(dict(call["args"]))
            if hit:
                reason = hit if isinstance(hit, str) else f"argument rule for {name} matched"
                return Flag("argument_rule", reason, self.rule_risk)
        if self.min_confidence is not None:
            conf = self._confidence(call, message)
            if conf is not None and conf < self.min_confidence:
                return Flag(
                    "low_confidence",
                    f"confidence {conf:.2f} is below {self.min_confidence:.2f}",
                    "medium",
                )
        return None

    def _confidence(self, call: ToolCall, message: AIMessage) -> float | None:
        if self.scorer is not None:
            return self.scorer(call, message)
        value = _harness_meta(message).get("confidence")
        if isinstance(value, Mapping):
            value = value.get(call["id"] or "")
        return float(value) if isinstance(value, int | float) else None


# --- reading the conversation --------------------------------------------------------------


def _harness_meta(msg: AnyMessage) -> dict[str, Any]:
    meta = msg.additional_kwargs.get("harness")
    return meta if isinstance(meta, dict) else {}


def _last_ai_index(messages: Sequence[AnyMessage]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], AIMessage):
            return i
    return None


def _fmt_args(args: Mapping[str, Any], mask: Masker) -> str:
    # Masked before it is cut short: a cut key would no longer look like one.
    text = mask.text(", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in args.items()))
    return text if len(text) <= 120 else text[:117] + "..."


def _shown_masker() -> Masker:
    """How text shown to people is masked: as in a trace, with the fields the run marked.

    `langfuse_callbacks(sensitive_fields=...)` records their names in the run's metadata;
    outside a run, the default masking (API keys, secret values, sensitive key names).
    """
    try:
        config = get_config()
    except RuntimeError:
        return Masker()
    return Masker(marked_fields([config.get("metadata")]))


def trace_excerpt(messages: Sequence[AnyMessage], limit: int = 20) -> TraceExcerpt:
    """The decisions that led to this point, read from the messages' harness metadata."""
    mask = _shown_masker()  # shown to people (a review UI, the queue): masked, as in a trace
    steps: list[str] = []
    tokens = 0
    usd: float | None = None
    for m in messages:
        meta = _harness_meta(m)
        if isinstance(m, AIMessage):
            if m.usage_metadata:
                tokens += int(m.usage_metadata.get("total_tokens", 0))
            budget = meta.get("budget")
            if isinstance(budget, Mapping):
                if budget.get("spent_usd") is not None:
                    usd = float(budget["spent_usd"])
                if budget.get("degraded_from"):
                    steps.append(
                        f"budget: degraded {budget['degraded_from']} → {budget.get('model')}"
                    )
            for call in m.tool_calls:
                steps.append(f"model called {call['name']}({_fmt_args(call['args'], mask)})")
            for call_id, rec in (meta.get("reviews") or {}).items():
                steps.append(
                    f"review {rec.get('review_id', '')}: {rec.get('decision')} {call_id} "
                    f"by {rec.get('reviewer')}"
                )
        elif isinstance(m, ToolMessage):
            verdict = meta.get("verdict")
            if isinstance(verdict, Mapping):
                reasons = "; ".join(verdict.get("reasons", []))
                ok = "ok" if verdict.get("ok") else f"failed: {reasons}"
                tool = verdict.get("tool", m.name)
                steps.append(f"verified {tool}: {ok} → {verdict.get('action')}")
            effect = meta.get("effect")
            if isinstance(effect, Mapping) and effect.get("replayed"):
                steps.append(f"effect replayed for {m.name} (key {effect.get('idempotency_key')})")
            esc = meta.get("escalation")
            if isinstance(esc, Mapping):
                steps.append(f"escalated ({esc.get('kind')}): {esc.get('reason')}")
            rec = meta.get("review")
            if isinstance(rec, Mapping):
                steps.append(
                    f"review {rec.get('review_id', '')}: {rec.get('decision')} "
                    f"by {rec.get('reviewer')}"
                )
    return TraceExcerpt(steps=[mask.text(s) for s in steps[-limit:]], tokens=tokens, usd=usd)


# --- the node ------------------------------------------------------------------------------


_ESCALATION_RISK: dict[str, Risk] = {
    "effect_unknown": "high",
    "verification": "medium",
    "budget": "medium",
    "low_confidence": "medium",
}


@dataclass(frozen=True)
class _Pending:
    """What the node found to review: pre-tool calls, or escalated tool results."""

    ai_index: int
    calls: list[tuple[ToolCall, Flag]]
    escalations: list[tuple[ToolMessage, Escalation]]


@dataclass(frozen=True)
class HumanReview:
    """Pause for a person before flagged tool calls run, or when a node escalated.

    Add it as a node between the model and the tools and route to it with `route`
    (``add_conditional_edges(model_node, review.route)``). It reads the state's ``messages``
    and writes nothing else the state must have, so it drops into a plain ``MessagesState``
    app (or a dataclass or pydantic state), and it leaves with a ``Command``: to the tools
    node (the approved and edited calls) or back to the model node (when nothing is left to
    run). Review records ride on the messages' ``additional_kwargs["harness"]``.

    With a plain tools node every call of the AI message runs, so when some calls were
    rejected or answered the rest are sent to the tools node with one ``Send`` of the graph's
    state, its ``messages`` replaced by the conversation up to a copy of the AI message that
    holds only those calls (the input `ToolNode` takes; the state keeps every call; tools
    reading the state, such as ``InjectedState("customer_id")``, find the rest of it). They
    run as one task, as a turn nobody reviewed does, so the edge after the tools routes on all
    their results together. When nothing is left to run and a tool result of the turn failed
    verification for good (``fail``), it ends the task (to ``END``, with
    `VerificationStop`'s outcome and closing message).

    See the module docstring for a complete example.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool
        from langgraph.checkpoint.memory import InMemorySaver
        from langgraph.graph import START, MessagesState, StateGraph
        from langgraph.prebuilt import ToolNode
        from langgraph.types import Command

        from harness_nodes import HumanReview, ReviewPolicy
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @tool
        def refund(order: str, amount: float) -> str:
            "Refund an order."
            return f"refunded {amount:g} on {order}"


        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]), ai("OK")]
        )
        review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_node("review", review)
        builder.add_node("tools", ToolNode([refund]))
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", review.route)
        builder.add_edge("tools", "agent")
        graph = builder.compile(checkpointer=InMemorySaver())

        config = {"configurable": {"thread_id": "ticket-1"}}
        paused = graph.invoke({"messages": [HumanMessage("refund A1")]}, config)
        assert paused["__interrupt__"][0].value[0]["action_request"]["action"] == "refund"
        edit = {"type": "edit", "args": {"order": "A1", "amount": 90}}
        done = graph.invoke(Command(resume=edit), config)
        assert "refunded 90 on A1" in [m.content for m in done["messages"]]
        ```
    """

    policy: ReviewPolicy = field(default_factory=ReviewPolicy)
    """Which calls need review."""
    tools: Sequence[BaseTool] = ()
    """The graph's tools: edited arguments are validated against their schemas."""
    tools_node: str = "tools"
    """The node that runs tool calls."""
    model_node: str = "agent"
    """The node that calls the model (gets rejected/answered calls and escalation results)."""
    node: str = "review"
    """This node's name in the graph (what `route` returns)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise UserError(f"HumanReview: duplicate tool names in {names}")

    @property
    def _tools_by_name(self) -> dict[str, BaseTool]:
        return {t.name: t for t in self.tools}

    # -- routing (pure) --

    def route(self, state: MessagesOnly | Mapping[str, Any] | Any) -> str:
        """Router for the edges leaving the model (or the tools): review, tools, model or END.

        Example:
            ```python
            from harness_nodes import HumanReview, ReviewPolicy
            from harness_nodes.testing import ai, tool_call

            review = HumanReview(ReviewPolicy(irreversible=["refund"]))
            msg = ai(tool_calls=[tool_call("refund", {"amount": 5})])
            assert review.route({"messages": [msg]}) == "review"
            assert review.route({"messages": [ai("hi")]}) == "__end__"
            ```
        """
        messages = _messages_of(state)
        if not messages:
            return END
        pending = self._pending(messages)
        if pending.calls or pending.escalations:
            return self.node
        last = messages[-1]
        if isinstance(last, AIMessage):
            return self.tools_node if last.tool_calls else END
        return self.model_node

    def _pending(self, messages: Sequence[AnyMessage]) -> _Pending:
        idx = _last_ai_index(messages)
        if idx is None:
            return _Pending(-1, [], [])
        ai_msg = cast(AIMessage, messages[idx])
        after = messages[idx + 1 :]
        answered = {m.tool_call_id for m in after if isinstance(m, ToolMessage)}
        reviewed = set((_harness_meta(ai_msg).get("reviews") or {}).keys())
        calls: list[tuple[ToolCall, Flag]] = []
        for call in ai_msg.tool_calls:
            if call["id"] in answered or call["id"] in reviewed:
                continue
            flag = self.policy.check(call, ai_msg)
            if flag is not None:
                calls.append((call, flag))
        escalations: list[tuple[ToolMessage, Escalation]] = []
        for m in after:
            if isinstance(m, ToolMessage):
                meta = _harness_meta(m)
                esc = meta.get("escalation")
                if isinstance(esc, Mapping) and "review" not in meta:
                    escalations.append((m, cast(Escalation, esc)))
        return _Pending(idx, calls, escalations)

    def requests(self, messages: Sequence[AnyMessage]) -> list[ReviewRequest]:
        """The review requests the node would raise for *messages* (empty: nothing to review)."""
        pending = self._pending(messages)
        if not pending.calls and not pending.escalations:
            return []
        excerpt = trace_excerpt(messages)
        # The description is read by people (any Agent Inbox UI): secrets masked, as in a
        # trace. The action's args stay as the model gave them: an edit starts from them.
        mask = _shown_masker()
        out: list[ReviewRequest] = []
        for call, flag in pending.calls:
            out.append(
                ReviewRequest(
                    action_request=ActionRequest(action=call["name"], args=dict(call["args"])),
                    config=ReviewConfig(
                        allow_accept=True,
                        allow_edit=self.policy.allow_edit,
                        allow_respond=self.policy.allow_respond,
                        allow_ignore=True,
                    ),
                    description=mask.text(
                        f"{call['name']}({_fmt_args(call['args'], mask)}): {flag.reason}"
                    ),
                    kind="tool_call",
                    trigger=flag.trigger,
                    reason=flag.reason,
                    risk=flag.risk,
                    tool_call_id=call["id"] or "",
                    trace=excerpt,
                )
            )
        for msg, esc in pending.escalations:
            tool = esc.get("tool", msg.name or "")
            args = dict(esc.get("args", {}))
            out.append(
                ReviewRequest(
                    action_request=ActionRequest(action=tool or "", args=args),
                    config=ReviewConfig(
                        allow_accept=True, allow_edit=False, allow_respond=True, allow_ignore=True
                    ),
                    description=mask.text(_escalation_description(esc, tool, args, mask)),
                    kind="escalation",
                    trigger=esc["kind"],
                    reason=esc["reason"],
                    risk=_ESCALATION_RISK.get(esc["kind"], "medium"),
                    tool_call_id=esc.get("tool_call_id", msg.tool_call_id),
                    trace=excerpt,
                )
            )
        return out

    # -- the node --

    def __call__(self, state: Any, config: RunnableConfig) -> Command[str]:
        """Pause for review when needed; route on to the tools or back to the model.

        *state* is the graph's whole state, of any schema (a ``TypedDict``, a dataclass, a
        pydantic model): the node reads its messages, and the calls a reviewer left go to the
        tools with the rest of it.
        """
        # Typed Any, not MessagesOnly: LangGraph gives a node only the keys its first
        # parameter's type names, and tools reading the state (InjectedState) need them all.
        messages = _messages_of(state)
        requests = self.requests(messages)
        if not requests:
            return self._onward(state, messages, [])
        tools = self._tools_by_name
        # Pure up to here: LangGraph re-runs the node from its top when the run resumes.
        schema = _response_model(requests, tools)
        try:
            answer = interrupt(requests, response_schema=schema)
        except GraphInterrupt:
            # The pause itself (a resume returns the answer instead): said once per pause.
            emit("review.request", _request_event(requests), config)
            raise
        except ValidationError as e:
            raise _invalid_resume(InvalidDecision("", _one_line(e))) from None
        decisions: list[ReviewDecision] = answer.decisions
        return self._apply(state, messages, requests, decisions, config)

    def _apply(
        self,
        state: Any,
        messages: list[AnyMessage],
        requests: list[ReviewRequest],
        decisions: list[ReviewDecision],
        config: RunnableConfig,
    ) -> Command[str]:
        pending = self._pending(messages)
        ai_msg = cast(AIMessage, messages[pending.ai_index])
        ai_meta = dict(_harness_meta(ai_msg))
        reviews = dict(ai_meta.get("reviews") or {})
        new_calls = [dict(c) for c in ai_msg.tool_calls]
        updates: list[AnyMessage] = []
        records: list[ReviewRecord] = []  # for a state with `reviews` (others ignore the key)
        decided_at = datetime.now(UTC).isoformat()
        after_ai = messages[pending.ai_index + 1 :]
        by_id = {m.tool_call_id: m for m in after_ai if isinstance(m, ToolMessage)}
        for req, dec in zip(requests, decisions, strict=True):
            call_id = req["tool_call_id"]
            record = {
                "review_id": dec.review_id or "",
                "decision": dec.type,
                "reviewer": dec.reviewer or "",
                "trigger": req["trigger"],
            }
            if dec.message:
                record["message"] = dec.message
            state_record: ReviewRecord = {
                "review_id": record["review_id"],
                "tool_call_ids": [call_id],
                "decision": dec.type,
                "reviewer": record["reviewer"],
                "reason": str(req["trigger"]),
                "decided_at": decided_at,
            }
            if dec.message:
                state_record["message"] = dec.message
            records.append(state_record)
            before = req["action_request"]["args"]
            after = before
            if req["kind"] == "tool_call":
                reviews[call_id] = record
                if dec.type == "edit":
                    after = dict(dec.args or {})
                    for c in new_calls:
                        if c["id"] == call_id:
                            c["args"] = after
                elif dec.type in ("reject", "respond"):
                    updates.append(_answer(req, dec, record))
            else:
                msg = by_id.get(call_id)
                if msg is not None:
                    updates.append(_resolve_escalation(msg, req, dec, record))
            emit(
                "review.decision",
                {
                    "review_id": record["review_id"],
                    "decision": dec.type,
                    "reviewer": record["reviewer"],
                    "args_before": before,
                    "args_after": after,
                    "message": dec.message,
                },
                config,
            )
        if any(r["kind"] == "tool_call" for r in requests):
            updated_ai = ai_msg.model_copy(
                update={
                    "tool_calls": new_calls,
                    "additional_kwargs": {
                        **ai_msg.additional_kwargs,
                        "harness": {**ai_meta, "reviews": reviews},
                    },
                }
            )
            updates.insert(0, updated_ai)  # same id: add_messages replaces it in place
        merged = _merge(messages, updates)
        return self._onward(state, merged, updates, records)

    def _onward(
        self,
        state: Any,
        messages: Sequence[AnyMessage],
        updates: list[AnyMessage],
        records: Sequence[ReviewRecord] = (),
    ) -> Command[str]:
        idx = _last_ai_index(messages)
        update: dict[str, Any] | None = {"messages": updates} if updates else None
        if records:
            update = {**(update or {}), "reviews": list(records)}
        if idx is None:
            return Command(update=update, goto=self.model_node)
        ai_msg = cast(AIMessage, messages[idx])
        answered = {m.tool_call_id for m in messages[idx + 1 :] if isinstance(m, ToolMessage)}
        to_run = [c for c in ai_msg.tool_calls if c["id"] not in answered]
        if not to_run:
            if ai_msg.tool_calls and _verify.failed_verdicts(messages):
                return _verification_stop(messages, update)
            return Command(update=update, goto=self.model_node if ai_msg.tool_calls else END)
        if len(to_run) == len(ai_msg.tool_calls):
            return Command(update=update, goto=self.tools_node)
        # One Send, not one per call: the calls left run as one task of the tools node, as a
        # whole turn does, so the edge after it routes on all their results together (the
        # edge after a Send task sees that task's writes only: with a Send per call, a
        # sibling's result went back to the model while an escalated one waited for review).
        # Its input is the graph's state with the conversation as if the model had asked for
        # these calls only, which any tools node runs: ToolNode (and the quickstart's tool
        # node) run the calls of the last AI message, and tools reading the state
        # (InjectedState("customer_id"), ToolRuntime) find all of it. A tools node returns
        # only its tool messages, so the copy is not written back and the state keeps every
        # call (a tools node returning its input messages would: see decision 0006).
        remaining = ai_msg.model_copy(update={"tool_calls": to_run})
        asked = [*messages[:idx], remaining]
        task = {**_state_values(state), "messages": asked}
        return Command(update=update, goto=Send(self.tools_node, task))


def _verification_stop(
    messages: Sequence[AnyMessage], update: dict[str, Any] | None
) -> Command[str]:
    """End the task as `VerificationStop` does: a sibling's ``fail`` verdict still stands.

    `route_after_verify` sends escalations to a person before a failure; once they are
    answered, the failure ends the task instead of handing the failed output to the model.
    """
    stop = VerificationStop()({"messages": list(messages)})
    written = [*(update or {}).get("messages", []), *stop["messages"]]
    return Command(update={**(update or {}), **stop, "messages": written}, goto=END)


def _messages_of(state: Any) -> list[AnyMessage]:
    if isinstance(state, Mapping):
        return list(state.get("messages") or [])
    if isinstance(state, list):
        return state
    return list(getattr(state, "messages", None) or [])


def _state_values(state: Any) -> dict[str, Any]:
    """The keys and values of a graph state, one level down (messages stay message objects).

    The state of a ``TypedDict`` graph is a dict; of a dataclass or pydantic graph, an
    instance of it (not dumped: ``model_dump`` would turn the messages into dicts).
    """
    if isinstance(state, Mapping):
        return dict(state)
    if isinstance(state, BaseModel):
        return {name: getattr(state, name) for name in type(state).model_fields}
    if is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in fields(state)}
    return {}


def _merge(messages: Sequence[AnyMessage], updates: Iterable[AnyMessage]) -> list[AnyMessage]:
    by_id = {m.id: m for m in updates if m.id}
    merged = [by_id.pop(m.id, m) if m.id else m for m in messages]
    merged.extend(m for m in updates if not m.id or m.id in by_id)
    return merged


def _answer(req: ReviewRequest, dec: ReviewDecision, record: dict[str, Any]) -> ToolMessage:
    name = req["action_request"]["action"]
    if dec.type == "respond":
        content, status = dec.message or "", "success"
    else:
        why = f": {dec.message}" if dec.message else "."
        content = (
            f"A human reviewer rejected this call to {name}; it was not executed{why} "
            "Do not retry it unless the user asks."
        )
        status = "error"
    return ToolMessage(
        content=content,
        name=name,
        tool_call_id=req["tool_call_id"],
        status=status,
        additional_kwargs={"harness": {"review": record}},
    )


def _escalation_description(
    esc: Escalation, tool: str, args: Mapping[str, Any], mask: Masker
) -> str:
    call = f"{tool}({_fmt_args(args, mask)})" if tool else "the task"
    if esc["kind"] == "effect_unknown":
        return (
            f"Did {call} take effect? It started but no result was recorded. "
            "approve = it happened; reject = it did not; respond = tell the agent."
        )
    if esc["kind"] == "verification":
        return (
            f"The output of {call} failed verification: {esc['reason']}. "
            "approve = accept it; reject = discard it; respond = give the agent the right result."
        )
    return f"{esc['kind']} escalation on {call}: {esc['reason']}"


def _resolve_escalation(
    msg: ToolMessage, req: ReviewRequest, dec: ReviewDecision, record: dict[str, Any]
) -> ToolMessage:
    meta = {k: v for k, v in _harness_meta(msg).items() if k != "escalation"}
    meta["review"] = {**record, "escalation": req["trigger"]}
    content: Any = msg.content
    status = msg.status
    artifact = msg.artifact
    note = f" Reviewer's note: {dec.message}" if dec.message else ""
    if dec.type == "approve":
        if req["trigger"] == "effect_unknown":
            content = f"A human reviewer confirmed the call took effect.{note}"
            status = "success"
        elif "rejected_output" in meta:
            # Accepted as it is: the model gets the output verification had replaced with
            # feedback (and the reviewer's note, if any).
            content, status = meta["rejected_output"], "success"
            if note and isinstance(content, str):
                content += f"\n\nA human reviewer accepted this output.{note}"
            if "rejected_artifact" in meta:
                artifact = meta.pop("rejected_artifact")
    elif dec.type == "respond":
        content, status = dec.message or "", "success"
    else:  # reject
        if req["trigger"] == "effect_unknown":
            content = f"A human reviewer confirmed the call did NOT take effect.{note}"
        else:
            content = f"A human reviewer rejected this result.{note}"
        status = "error"
    return msg.model_copy(
        update={
            "content": content,
            "status": status,
            "artifact": artifact,
            "additional_kwargs": {**msg.additional_kwargs, "harness": meta},
        }
    )


class _ResponseBase(BaseModel):
    decisions: list[ReviewDecision]


def _response_model(
    requests: list[ReviewRequest], tools: Mapping[str, BaseTool]
) -> type[_ResponseBase]:
    """A pydantic ``response_schema`` bound to these requests (LangGraph validates the resume).

    An invalid resume raises inside ``interrupt()`` before LangGraph saves it, so the
    interrupt can be answered again: the task stays paused and nothing is lost.
    """

    class ReviewResponse(_ResponseBase):
        @classmethod
        def __get_pydantic_json_schema__(
            cls, core_schema: Any, handler: GetJsonSchemaHandler
        ) -> JsonSchemaValue:
            # What a UI must send: one decision or a list, not this wrapper.
            return handler(_Decisions.__pydantic_core_schema__)

        @model_validator(mode="before")
        @classmethod
        def _check(cls, data: Any) -> Any:
            if isinstance(data, _ResponseBase):
                return data
            try:
                return {"decisions": check_decisions(requests, data, tools)}
            except InvalidDecision as e:
                raise ValueError(e.reason) from None

    return ReviewResponse


def _invalid_resume(err: InvalidDecision) -> InvalidDecision:
    # LangGraph marks resume values that fail `response_schema` so the run does not save
    # them; keep the mark on the typed error we raise instead of pydantic's.
    try:
        from langgraph.errors import _mark_invalid_resume

        _mark_invalid_resume(err)
    except ImportError:  # pragma: no cover - older langgraph: the error still propagates
        pass
    return err
