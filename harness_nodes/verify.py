"""Verification at tool-call boundaries: no bad tool output flows on silently.

A tool can "succeed" and still return garbage: an empty list that fits the schema,
``{"status": "error"}`` inside a 200, an HTML error page, a value out of range. Exceptions
are caught by ``ToolNode(handle_tool_errors=...)`` and ``RetryPolicy``; outputs are not.
A `ToolContract` says what a good output of one tool looks like, and `VerifyToolOutputs`
holds every tool's output to its contract:

- as a node after the ``ToolNode`` (``tools → verify → route_after_verify``): the clearest
  way to drop verification into an existing app — one node and one edge;
- as the tool node's own hook, ``ToolNode(tools, wrap_tool_call=verify.wrap_tool_call,
  awrap_tool_call=verify.awrap_tool_call)``: the same rules inside the tool node, with no
  extra superstep (and tool exceptions become verdicts too).

A refused output is replaced (same message id, same ``tool_call_id``) by an error
``ToolMessage`` that tells the model what was wrong and what is needed; the verdict (and an
`Escalation` when a person must decide) rides on ``additional_kwargs["harness"]`` and, when
the state has a ``verdicts`` key, in ``verdicts`` too. `route_after_verify` then sends the
graph back to the model (``retry``), to human review (``escalate``), to a `VerificationStop`
(``fail``), or on (``ok``).

Retry counts are per tool per task, counted in model turns: a tool's output is attempt n when
n - 1 earlier turns of the task had an output of that tool fail verification. Parallel calls
of one AI message are one turn (they share an attempt, and the model corrects them together
in its next turn). A task ends on an AI message without tool calls (the answer, or a stop
note); a human message right after it starts a new task with a full budget (text-only AI
messages inside a task, a planner's or a sub-agent's, do not), and failed
verdicts carry the id of the message that opened their task (`Verdict.task_start`). The
count is read from the verdicts already on the task's messages and, where the state keeps
them, from its ``verdicts`` records (the larger count wins), so it is checkpointed,
survives a crash or an interrupt, and survives a trimmed message history
(``RemoveMessage``) in any state with a ``verdicts`` key — `HarnessState`, the middleware's
`HarnessAgentState` — and in the node form everywhere.

Example:
    ```python
    import json

    from langchain_core.messages import AIMessage, ToolMessage
    from pydantic import BaseModel

    from harness_nodes import ToolContract, VerifyToolOutputs, route_after_verify


    class Weather(BaseModel):
        city: str
        temp_c: float


    verify = VerifyToolOutputs(
        {"weather": ToolContract(schema=Weather, required=("city",), ranges={"temp_c": (-90, 60)})}
    )
    call = {"name": "weather", "args": {"city": "Paris"}, "id": "c1", "type": "tool_call"}
    state = {
        "messages": [
            AIMessage("", tool_calls=[call], id="a1"),
            ToolMessage(json.dumps({"city": "Paris", "temp_c": 999}), tool_call_id="c1", id="t1"),
        ]
    }
    update = verify(state)
    assert update["verdicts"][0]["reasons"] == ["field 'temp_c' = 999 is out of range [-90, 60]"]
    assert update["messages"][0].status == "error" and update["messages"][0].id == "t1"
    checked = {"messages": [state["messages"][0], *update["messages"]]}
    assert route_after_verify(checked) == "retry"
    ```
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Any,
    Literal,
    Protocol,
    Union,
    cast,
    get_args,
    get_origin,
    runtime_checkable,
)

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command
from pydantic import BaseModel

from harness_nodes import _verify
from harness_nodes._events import aemit, emit
from harness_nodes.effects import effect_kind
from harness_nodes.errors import HarnessError, UserError, VerificationFailed
from harness_nodes.state import (
    Escalation,
    MessagesAndOutcome,
    MessagesAndVerdicts,
    Outcome,
    Verdict,
    replace_outcome,
)

__all__ = [
    "Check",
    "ErrorSignals",
    "ToolContract",
    "VerificationStop",
    "VerifyRoute",
    "VerifyToolOutputs",
    "route_after_verify",
]

VerifyRoute = Literal["ok", "retry", "escalate", "fail"]
"""Where `route_after_verify` sends the graph."""

_POLICIES = ("retry", "escalate", "fail")
_SOURCES = ("auto", "content", "artifact")


@runtime_checkable
class Check(Protocol):
    """A check on a tool's output: returns why the output is wrong, or ``None``.

    It receives the output as the contract sees it: the schema's model instance when the
    contract has a schema, else the decoded JSON (or the artifact, or the text). A plain
    predicate works too: ``True`` means the output is good, ``False`` that it is not.

    Example:
        ```python
        from harness_nodes import Check


        def has_results(output: dict) -> str | None:
            return None if output.get("results") else "no results; broaden the query"


        assert isinstance(has_results, Check)
        assert has_results({"results": []}) == "no results; broaden the query"
        ```
    """

    def __call__(self, output: Any, /) -> str | bool | None:
        """Return a reason the output is wrong, or ``None`` (or ``True``) when it is fine."""
        ...


_DEFAULT_TEXT_PATTERNS = (
    # Each says the call failed, not what a text is about: "Rate limit exceeded", never "our
    # API has a rate limit of 100 requests per minute" (documentation, a search snippet).
    r"\brate[ _-]?limit(?=(?:s|ed|ing)?[ _-]?(?:exceeded|reached|hit|error|exception)\b)",
    r"\b(?:been|being|got|getting) rate[ _-]?limited\b",
    r"\A\W*rate[ _-]?limited\b",
    r"\bexceeded\s+(?:(?:the|your|our|its|an?)\s+)?(?:\w+\s+)?rate[ _-]?limits?\b",
    r"\btoo many requests\b",
    r"\bquota (?:exceeded|exhausted)\b",
    r"\btimed[ _-]?out\b",
    # An exception class as a traceback's last line prints it ("TimeoutError: ...",
    # "asyncio.exceptions.TimeoutError"): opening an unindented line or after a label, then
    # ":" or "(", or the whole output. "TimeoutError is raised when ..." and a docstring's
    # indented "Raises:" entry are documentation.
    r"(?m)(?:\A\s*|^|(?<=[:\]] ))(?:\w+\.)*\w*timeout(?:error|exception)(?=[ \t]*[:(])",
    r"\A\s*(?:\w+\.)*\w*timeout(?:error|exception)\s*\Z",
    r"\btimeout (?:error|exceeded|expired)\b",
    r"\A\s*(?:[\w-]+\s+)?timeout\s*[.!]?\s*\Z",  # the whole output: "upstream timeout"
    # A leading timeout: "Timeout: the server did not respond", "Timeout after 30s waiting
    # ..." (not a setting: "timeout: 30"), and axios's "timeout of 5000ms exceeded".
    r"\A\s*timeout\s*(?:!|:(?=[ \t]*[a-z]+[ \t]+[a-z]))",
    r"\A\s*timeout\s+(?:after|while|waiting)\b",
    r"\btimeout of \d+(?:\.\d+)?\s*(?:ms|s|secs?|seconds?|milliseconds?|minutes?)?"
    r"\s+(?:exceeded|expired|elapsed|reached)\b",
    r"\b(?:service unavailable|bad gateway|gateway timeout|internal server error)\b",
    r"\A\s*(?:error|exception)\b\s*[:!-]",
    # an HTTP status line served as the output: "404 Not Found", "ERROR 403 Forbidden"
    r"\A\s*(?:error\W+)?(?:HTTP/[\d.]+\s+)?[45]\d\d\W+(?:bad request|unauthori[sz]ed"
    r"|forbidden|not found|method not allowed|conflict|gone|payload too large"
    r"|unprocessable|too many requests|internal server error|bad gateway"
    r"|service unavailable|gateway timeout)\b",
    r"\A\s*(?:access|permission) denied\b",
    r"\btraceback \(most recent call last\)",
)


@dataclass(frozen=True)
class ErrorSignals:
    """Detectors for errors hidden in outputs that look like success. On by default.

    Structured outputs (JSON objects, artifacts) are checked on their top-level keys and, as
    far as `envelope_depth` goes, for an error key or a false success flag inside the
    envelopes APIs wrap their answer in (`envelope_keys`): ``{"data": null, "response":
    {"error": "quota exceeded"}}`` fails with the reason ``response.error='quota exceeded'``.
    A wrapped record's status and codes are data (``{"data": {"status": "failed"}}`` is an
    order that failed; ``{"response": {"status_code": 404}}`` the page an HTTP tool fetched),
    as are a list (jobs, some of which have ``"status": "failed"``) and any other key. An
    object that is only an error message (`message_keys`) fails when the message reads like
    an error: ``{"message": "Forbidden"}``.

    Plain text is checked where an error message puts its words: its first line, and the
    start of any other line or right after an error's label opening it (``Error: Rate limit
    exceeded``), within the first ``scan_chars`` characters. The default patterns are phrased
    as errors ("Rate limit exceeded", "429 Too Many Requests", "Request timed out", "timeout
    of 5000ms exceeded", "Timeout: ...", a traceback's ``TimeoutError: ...``), so a text that
    merely mentions a rate limit, a timeout or an exception class — documentation, a search
    snippet — is data, not an error.

    Example:
        ```python
        from harness_nodes import ErrorSignals, ToolContract

        # An order-status tool: "failed" is data here, not an error signal.
        contract = ToolContract(signals=ErrorSignals(failed_statuses=frozenset()))
        assert contract.signals is not None and not contract.signals.failed_statuses

        # An API that wraps its answer in "Payload": look inside it too.
        signals = ErrorSignals(envelope_keys=ErrorSignals().envelope_keys | {"Payload"})
        assert "Payload" in signals.envelope_keys
        ```
    """

    error_keys: frozenset[str] = frozenset(
        {"error", "errors", "error_message", "errorMessage", "exception", "fault"}
    )
    """A key among these (at the top level or in an envelope) with a non-empty value means
    the call failed."""
    status_keys: frozenset[str] = frozenset({"status", "state", "outcome", "result"})
    """Top-level keys whose text value is compared with `failed_statuses`."""
    failed_statuses: frozenset[str] = frozenset(
        {
            "error",
            "failed",
            "failure",
            "fail",
            "errored",
            "timeout",
            "timed_out",
            "rate_limited",
            # gRPC's canonical codes as Google's JSON APIs spell them, where they cannot be
            # a record's state ("unavailable", "cancelled" and "not_found" can).
            "deadline_exceeded",
            "resource_exhausted",
            "permission_denied",
            "unauthenticated",
        }
    )
    """Status values (lower-cased) that mean the call failed."""
    success_flags: frozenset[str] = frozenset({"success", "ok", "succeeded"})
    """Keys whose ``false`` value (or the text ``"false"``, ``"no"``, ``"0"``) means it failed
    (at the top level or in an envelope)."""
    code_keys: frozenset[str] = frozenset(
        {"status_code", "statusCode", "http_status", "code", "status"}
    )
    """Top-level keys whose value is an HTTP error status (400-599, as a number or a string
    such as ``"500"``) mean the call failed: ``{"code": 20404, "message": "...", "status":
    404}`` (Twilio), ``{"title": "Not Found", "status": 404}`` (RFC 9457 problem details)."""
    message_keys: frozenset[str] = frozenset({"message", "Message", "msg", "detail"})
    """Keys of the message in an object that is only an error message, with no data beside
    it (only these keys, `code_keys` but a status, and an error's references such as
    ``documentation_url``, ``request_id``): it fails when the message reads like an
    error (`text_patterns`, or an HTTP reason phrase such as ``"Forbidden"`` or ``"Not
    Found"``), or when a ``documentation_url`` names the error (GitHub's ``{"message": "Bad
    credentials", "documentation_url": ...}``). API Gateway's ``{"message": "Forbidden"}``
    fails; ``{"message": "Email sent"}`` and a log record's ``{"level": "error", "message":
    "Request timed out"}`` (data beside it) are answers."""
    envelope_keys: frozenset[str] = frozenset({"data", "result", "response", "body", "payload"})
    """Keys whose object value wraps the answer: its `error_keys` and `success_flags` are
    checked (not its status or codes, which are the wrapped record's data; a list under such
    a key is data and is not looked into). A JSON object sent as text is read as the object:
    a Lambda proxy's ``{"statusCode": 200, "body": "{\\"error\\": \\"...\\"}"}``."""
    payload_error_keys: frozenset[str] = frozenset({"userErrors", "user_errors"})
    """Keys of a GraphQL mutation payload's errors, read in each object under a GraphQL
    response's ``data`` (an object of only ``data``, ``errors``, ``extensions``): Shopify's
    ``{"data": {"productCreate": {"product": null, "userErrors": [...]}}}`` fails with the
    reason ``data.productCreate.userErrors=...``. Add ``"errors"`` for APIs that name them so
    in the payload (Saleor)."""
    envelope_depth: int = 2
    """How many envelopes deep the checks go: 2 reads ``response.body.error``; 0 reads the
    top-level keys only."""
    text_patterns: tuple[str, ...] = _DEFAULT_TEXT_PATTERNS
    """Regular expressions (case-insensitive) that mark plain text as an error message. A
    match counts in the text's first line, at the start of a line, or right after an error's
    label (``Error:``, ``[ERROR]``) opening a line (see `scan_chars`)."""
    html: bool = True
    """Refuse text that is an HTML page (an error page served instead of data)."""
    scan_chars: int = 512
    """How much of a plain-text output the text detectors read: its first line and the
    starts of its lines within this many characters (errors announce themselves up front;
    an article that mentions a "timeout" later, or in the middle of a line, is data)."""

    compiled_patterns: tuple[re.Pattern[str], ...] = field(
        init=False, repr=False, compare=False, default=()
    )
    html_pattern: re.Pattern[str] = field(
        init=False,
        repr=False,
        compare=False,
        default=re.compile(r"\A\s*(?:<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>])", re.I),
    )

    def __post_init__(self) -> None:
        if isinstance(self.text_patterns, str):
            raise UserError("ErrorSignals.text_patterns must be a tuple of regexes, not a str")
        compiled = []
        for pattern in self.text_patterns:
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as e:
                raise UserError(f"ErrorSignals: invalid text pattern {pattern!r}: {e}") from e
        if self.scan_chars < 1:
            raise UserError(f"ErrorSignals.scan_chars must be >= 1, got {self.scan_chars}")
        if (
            isinstance(self.envelope_depth, bool)
            or not isinstance(self.envelope_depth, int)
            or self.envelope_depth < 0
        ):
            raise UserError(
                f"ErrorSignals.envelope_depth must be >= 0, got {self.envelope_depth!r}"
            )
        for name in (
            "error_keys",
            "status_keys",
            "failed_statuses",
            "success_flags",
            "code_keys",
            "message_keys",
            "payload_error_keys",
            "envelope_keys",
        ):
            value = getattr(self, name)
            if isinstance(value, str):
                raise UserError(f"ErrorSignals.{name} must be a set of strings, not a str")
            object.__setattr__(self, name, frozenset(value))
        object.__setattr__(
            self, "failed_statuses", frozenset(s.lower() for s in self.failed_statuses)
        )
        object.__setattr__(self, "compiled_patterns", tuple(compiled))


def _numeric_annotation(annotation: Any) -> bool:
    """Whether a schema field's annotation admits a number (int/float, optionally Optional)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return all(
            isinstance(a, int | float) and not isinstance(a, bool) for a in get_args(annotation)
        )
    if origin in (Union, types.UnionType):
        return any(_numeric_annotation(a) for a in get_args(annotation) if a is not type(None))
    if origin is Annotated:
        return _numeric_annotation(get_args(annotation)[0])
    return (
        isinstance(annotation, type)
        and issubclass(annotation, int | float)
        and annotation is not bool
    )


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _schema_field(schema: type[BaseModel], path: str) -> Any:
    """The annotation at a dotted path in a schema; raises UserError when there is none."""
    model: Any = schema
    annotation: Any = None
    for part in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise UserError(
                f"ToolContract: field {path!r} goes through {part!r}, which is not a model "
                f"field of {schema.__name__}"
            )
        fields = model.model_fields
        if part not in fields:
            raise UserError(
                f"ToolContract: field {path!r} is not in schema {schema.__name__} "
                f"(fields of {model.__name__}: {', '.join(fields) or 'none'})"
            )
        annotation = fields[part].annotation
        model = annotation
    return annotation


@dataclass(frozen=True)
class ToolContract:
    """What a good output of one tool looks like, and what to do when an output is not good.

    Checks run in this order, stopping at the first group that finds something wrong: the
    tool's own error status, error signals (`ErrorSignals`), emptiness, the pydantic
    ``schema``, then ``required`` fields, ``ranges`` and ``checks`` (all reported together).

    Example:
        ```python
        from pydantic import BaseModel

        from harness_nodes import ToolContract


        class Quote(BaseModel):
            symbol: str
            price: float


        contract = ToolContract(
            schema=Quote,
            required=("symbol",),
            ranges={"price": (0, None)},
            checks=(lambda q: None if q.symbol.isupper() else "symbol must be upper case",),
            max_retries=1,
        )
        assert contract.on_fail == "retry" and contract.on_exhausted == "fail"
        ```
    """

    schema: type[BaseModel] | None = None
    """Pydantic model the output must validate against (JSON text, a dict or the artifact)."""
    required: tuple[str, ...] = ()
    """Fields (dotted paths) that must be present and non-empty."""
    ranges: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    """Field → inclusive ``(low, high)`` bounds; ``None`` leaves a side open."""
    checks: tuple[Check, ...] = ()
    """Checks on the output; each returns a reason (text) or ``None``, or is a predicate
    returning ``True`` for a good output and ``False`` for a bad one."""
    signals: ErrorSignals | None = field(default_factory=ErrorSignals)
    """Error-signal detectors; ``None`` turns them off."""
    allow_empty: bool = False
    """Accept an empty result (``[]``, ``{}``, ``null``, blank text) as a valid answer."""
    source: Literal["auto", "content", "artifact"] = "auto"
    """What to check: the ``ToolMessage`` artifact when there is one (``auto``), or always
    the content (JSON text or text), or always the artifact."""
    on_fail: Literal["retry", "escalate", "fail"] = "retry"
    """Back to the model with the reasons, to a person, or end the task."""
    max_retries: int = 2
    """How many times per task the model is sent back to correct this tool's failed output.

    Counted in model turns: parallel calls of the tool in one AI message are one attempt
    (their feedback all says "retry 1 of 2"), and the model's next turn is the next attempt.
    Attempt ``max_retries + 1`` that fails takes `on_exhausted`."""
    on_exhausted: Literal["escalate", "fail"] = "fail"
    """What happens to the failure after ``max_retries`` retries."""
    side_effects: bool = False
    """The tool changes the world: a failure escalates to a person instead of a retry.

    Tools marked with `irreversible` / `effect`, and outputs that ran through the
    `EffectLedger`, are treated as having side effects whatever this says."""
    instructions: str = ""
    """Extra words for the model about what a good call looks like (sent with the reasons)."""

    _requirements: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        if self.schema is not None and not (
            isinstance(self.schema, type) and issubclass(self.schema, BaseModel)
        ):
            raise UserError(
                f"ToolContract.schema must be a pydantic BaseModel subclass, got {self.schema!r}"
            )
        if isinstance(self.required, str):
            raise UserError(
                f"ToolContract.required must be a tuple of field names, not the str "
                f"{self.required!r} (write required=({self.required!r},))"
            )
        object.__setattr__(self, "required", tuple(self.required))
        if callable(self.checks) or isinstance(self.checks, str):
            raise UserError(
                f"ToolContract.checks must be a tuple of callables, got {self.checks!r} "
                "(write checks=(check,))"
            )
        object.__setattr__(self, "checks", tuple(self.checks))
        if not isinstance(self.ranges, Mapping):
            raise UserError("ToolContract.ranges must map field names to (low, high) bounds")
        for path, bounds in self.ranges.items():
            if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
                raise UserError(
                    f"ToolContract.ranges[{path!r}] must be (low, high), got {bounds!r}"
                )
            low, high = bounds
            for b in (low, high):
                if b is not None and (
                    isinstance(b, bool) or not isinstance(b, int | float) or math.isnan(b)
                ):
                    raise UserError(f"ToolContract.ranges[{path!r}]: bound {b!r} is not a number")
            if low is not None and high is not None and low > high:
                raise UserError(f"ToolContract.ranges[{path!r}]: low {low} > high {high}")
        for check in self.checks:
            if not callable(check):
                raise UserError(f"ToolContract.checks: {check!r} is not callable")
        if self.on_fail not in _POLICIES:
            raise UserError(
                f"ToolContract.on_fail must be one of {_POLICIES}, got {self.on_fail!r}"
            )
        if self.on_exhausted not in ("escalate", "fail"):
            raise UserError(
                f"ToolContract.on_exhausted must be 'escalate' or 'fail', got {self.on_exhausted!r}"
            )
        if self.source not in _SOURCES:
            raise UserError(f"ToolContract.source must be one of {_SOURCES}, got {self.source!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise UserError(f"ToolContract.max_retries must be an int, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise UserError(f"ToolContract.max_retries must be >= 0, got {self.max_retries}")
        if self.signals is not None and not isinstance(self.signals, ErrorSignals):
            raise UserError("ToolContract.signals must be an ErrorSignals or None")
        if self.schema is not None:
            for path in self.required:
                _schema_field(self.schema, path)
            for path in self.ranges:
                annotation = _schema_field(self.schema, path)
                if not _numeric_annotation(annotation):
                    raise UserError(
                        f"ToolContract.ranges[{path!r}]: field type "
                        f"{_annotation_name(annotation)} of {self.schema.__name__} is not a "
                        "number, so a range cannot apply"
                    )
        object.__setattr__(self, "_requirements", self._describe())

    def _describe(self) -> str:
        parts: list[str] = []
        if self.schema is not None:
            fields = ", ".join(
                f"{name}: {_annotation_name(f.annotation)}"
                for name, f in self.schema.model_fields.items()
            )
            parts.append(f"a JSON object matching {self.schema.__name__} {{{fields}}}")
        if self.required:
            parts.append("non-empty " + ", ".join(self.required))
        for path, (low, high) in self.ranges.items():
            parts.append(f"{path} in {_verify._bounds(low, high)}")
        if not self.allow_empty:
            parts.append("a non-empty result")
        text = "; ".join(parts)
        if self.instructions:
            text = f"{text}. {self.instructions}" if text else self.instructions
        return text

    def requirements(self) -> str:
        """What a good output needs, in words for the model.

        Example:
            ```python
            from harness_nodes import ToolContract

            text = ToolContract(required=("id",), ranges={"n": (1, 5)}).requirements()
            assert text == "non-empty id; n in [1, 5]; a non-empty result"
            ```
        """
        return self._requirements


def _default_contract() -> ToolContract:
    return ToolContract()


@dataclass(frozen=True)
class VerifyToolOutputs:
    """Hold every tool output since the last AI message to its tool's `ToolContract`.

    Use it as a node after the ``ToolNode`` (then route with `route_after_verify`), or as
    the tool node's hook: ``ToolNode(tools, wrap_tool_call=verify.wrap_tool_call,
    awrap_tool_call=verify.awrap_tool_call)`` — the same rules, no extra superstep.

    The node reads only ``messages`` and ``verdicts`` (`MessagesAndVerdicts`), so it drops
    into any app (``MessagesState``, dataclass or pydantic state); it returns the checked
    messages (a refused one replaced by an error message with the same id) and ``verdicts``
    — in the state's output only where the state has that key; elsewhere LangGraph keeps
    them in a channel of their own, so retry counts outlive a trimmed history either way.
    Messages that already carry a verdict, and a reviewer's answers, are not checked. A state
    that keeps its messages under another key (``ToolNode(messages_key=...)``) takes the hook
    form, which follows the tool node's key; the node form refuses it (`UserError` at its
    first run).

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool
        from langgraph.graph import END, START, MessagesState, StateGraph
        from langgraph.prebuilt import ToolNode, tools_condition

        from harness_nodes import ToolContract, VerifyToolOutputs, route_after_verify
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @tool
        def search(query: str) -> str:
            \"\"\"Search the web.\"\"\"
            return "[]" if query == "x" else '["result"]'


        model = ScriptedChatModel(
            script=[
                ai(tool_calls=[tool_call("search", {"query": "x"})]),
                ai(tool_calls=[tool_call("search", {"query": "better"})]),
                ai("found it"),
            ]
        )
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
        builder.add_node("tools", ToolNode([search]))
        builder.add_node("verify", VerifyToolOutputs({"search": ToolContract()}))
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", tools_condition)
        builder.add_edge("tools", "verify")
        routes = {"ok": "agent", "retry": "agent", "escalate": END, "fail": END}
        builder.add_conditional_edges("verify", route_after_verify, routes)
        out = builder.compile().invoke({"messages": [HumanMessage("find x")]})
        assert out["messages"][2].status == "error"  # the empty result went back as an error
        assert out["messages"][-1].content == "found it"
        ```
    """

    contracts: Mapping[str, ToolContract] = field(default_factory=dict)
    """Tool name → its contract."""
    default: ToolContract | None = field(default_factory=_default_contract)
    """The contract for tools not in ``contracts`` (error signals and emptiness, retry);
    ``None`` leaves such tools unchecked."""

    def __post_init__(self) -> None:
        if not isinstance(self.contracts, Mapping):
            raise UserError(
                "VerifyToolOutputs.contracts must map tool names to ToolContract, "
                f"got {type(self.contracts).__name__}"
            )
        for name, contract in self.contracts.items():
            if not isinstance(name, str) or not name:
                raise UserError(f"VerifyToolOutputs.contracts: key {name!r} is not a tool name")
            if not isinstance(contract, ToolContract):
                raise UserError(
                    f"VerifyToolOutputs.contracts[{name!r}] must be a ToolContract, "
                    f"got {type(contract).__name__}"
                )
        if self.default is not None and not isinstance(self.default, ToolContract):
            raise UserError("VerifyToolOutputs.default must be a ToolContract or None")

    def contract_for(self, tool: str) -> ToolContract | None:
        """The contract that applies to ``tool`` (its own, else the default, else None).

        Example:
            ```python
            from harness_nodes import ToolContract, VerifyToolOutputs

            verify = VerifyToolOutputs({"pay": ToolContract(side_effects=True)}, default=None)
            assert verify.contract_for("pay").side_effects and verify.contract_for("x") is None
            ```
        """
        return self.contracts.get(tool, self.default)

    # --- node form -------------------------------------------------------------------------

    def __call__(self, state: MessagesAndVerdicts) -> dict[str, Any]:
        """Check the tool messages since the last AI message; return the updates.

        Raises:
            UserError: the state holds no ``messages`` (at the node's first run, as LangGraph
                gives a node only the keys of its input schema): the app keeps them under
                another key, where this node would let every output through unchecked. Or the
                tool node added an AI message without calls after the tool outputs, which
                hides them (the node checks the tool messages after the last AI message).
        """
        if not isinstance(state, list) and not _verify.messages_of(state):
            raise UserError(
                "VerifyToolOutputs found no messages under 'messages': a state that keeps them "
                "under another key needs the hook form, ToolNode(..., messages_key=KEY, "
                "wrap_tool_call=verify.wrap_tool_call), routed by "
                "route_after_verify(state, messages_key=KEY)"
            )
        hidden = self._hidden_outputs(_verify.messages_of(state))
        if hidden:
            raise UserError(
                f"VerifyToolOutputs: the outputs of {', '.join(hidden)} are followed by an AI "
                "message that makes no tool calls, so they cannot be checked (the node checks "
                "the tool messages after the last AI message): the tool node must end on its "
                "tool messages; move the step that adds the AI message out of it"
            )
        messages, verdicts = self._check_messages(state)
        for verdict in verdicts:
            emit("verdict", dict(verdict))
        return {"messages": messages, "verdicts": verdicts} if verdicts else {}

    def _hidden_outputs(self, messages: Sequence[BaseMessage]) -> list[str]:
        """Tools whose unchecked outputs end just before an AI message that makes no calls.

        The node runs after the tool node, where the last AI message is the one that made the
        calls; one without calls there was added by the tool node itself (a sub-agent summing
        up) and hides the outputs before it.
        """
        start = _verify.last_ai_index(messages)
        if start < 0:
            return []
        last = cast(AIMessage, messages[start])
        if last.tool_calls or last.invalid_tool_calls:
            # Made by the model: a reply with only malformed calls comes here straight from
            # it (`add_harness`), and the tool messages before it are history.
            return []
        hidden: list[str] = []
        for message in reversed(messages[:start]):
            if not isinstance(message, ToolMessage):
                break
            meta = _verify.harness_meta(message)
            tool = message.name or ""
            if "verdict" in meta or "review" in meta or self.contract_for(tool) is None:
                continue
            hidden.insert(0, tool or f"call {message.tool_call_id}")
        return list(dict.fromkeys(hidden))

    def _check_messages(self, state: Any) -> tuple[list[ToolMessage], list[Verdict]]:
        messages = _verify.messages_of(state)
        start = _verify.last_ai_index(messages)
        if start < 0:
            return [], []
        ai = messages[start]
        assert isinstance(ai, AIMessage)
        calls = {c["id"]: c for c in ai.tool_calls if c.get("id")}
        earlier = messages[:start]
        task = _verify.current_task(messages, _verify.verdicts_of(state))
        out_messages: list[ToolMessage] = []
        verdicts: list[Verdict] = []
        for message in messages[start + 1 :]:
            if not isinstance(message, ToolMessage):
                continue
            meta = _verify.harness_meta(message)
            # A reviewer's answer (a rejection, a response in the tool's place) is no tool
            # output: the hook form never sees it, and its note must reach the model as is.
            if "verdict" in meta or "review" in meta:
                continue
            call = calls.get(message.tool_call_id)
            tool = (call["name"] if call else None) or message.name or ""
            contract = self.contract_for(tool)
            if contract is None:
                continue
            attempt = _verify.attempt_of(state, earlier, tool, task)
            reasons = _check(contract, message, raised=message.status == "error")
            args = call["args"] if call else None
            checked, verdict = _verify.apply_verdict(
                contract, message, tool, args, attempt, reasons, task_start=task.start
            )
            out_messages.append(checked)
            verdicts.append(verdict)
        return out_messages, verdicts

    # --- tool-node hook form ---------------------------------------------------------------

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        execute: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """``ToolNode(wrap_tool_call=...)`` hook: run the tool, then check its output.

        A tool that raises becomes a failed verdict on the same policy path (interrupts and
        harness errors propagate). The checked message is returned as a ``Command`` that
        also appends the verdict to ``verdicts`` (dropped where the state has no such key).

        Example:
            ```python
            from langchain_core.messages import AIMessage
            from langchain_core.tools import tool
            from langgraph.graph import START, MessagesState, StateGraph
            from langgraph.prebuilt import ToolNode

            from harness_nodes import ToolContract, VerifyToolOutputs


            @tool
            def lookup(key: str) -> dict:
                \"\"\"Look a key up.\"\"\"
                return {"error": "upstream 503"}


            verify = VerifyToolOutputs({"lookup": ToolContract(max_retries=1)})
            builder = StateGraph(MessagesState)
            builder.add_node("tools", ToolNode([lookup], wrap_tool_call=verify.wrap_tool_call))
            builder.add_edge(START, "tools")
            call = {"name": "lookup", "args": {"key": "k"}, "id": "c1", "type": "tool_call"}
            out = builder.compile().invoke({"messages": [AIMessage("", tool_calls=[call])]})
            msg = out["messages"][-1]
            assert msg.status == "error"
            assert msg.additional_kwargs["harness"]["verdict"]["action"] == "retry"
            ```
        """
        tool, contract, attempt, task_start = self._prepare(request)
        if contract is None:
            return execute(request)
        try:
            result = execute(request)
        except (GraphBubbleUp, HarnessError):
            raise
        except Exception as e:
            if _is_invalid_resume(e):
                raise
            result = _verify.exception_message(tool, request.tool_call["id"] or "", e)
        out, verdict = self._finish(request, result, tool, contract, attempt, task_start)
        if verdict is not None:
            emit("verdict", dict(verdict), _config_of(request))
        return out

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        execute: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async `wrap_tool_call` (``ToolNode(awrap_tool_call=...)``).

        Example:
            ```python
            import asyncio

            from langchain_core.messages import AIMessage
            from langchain_core.tools import tool
            from langgraph.graph import START, MessagesState, StateGraph
            from langgraph.prebuilt import ToolNode

            from harness_nodes import VerifyToolOutputs


            @tool
            async def fetch(url: str) -> str:
                \"\"\"Fetch a page.\"\"\"
                return "<!DOCTYPE html><html><title>502 Bad Gateway</title></html>"


            verify = VerifyToolOutputs()
            node = ToolNode([fetch], awrap_tool_call=verify.awrap_tool_call)
            builder = StateGraph(MessagesState)
            builder.add_node("tools", node)
            builder.add_edge(START, "tools")
            call = {"name": "fetch", "args": {"url": "u"}, "id": "c1", "type": "tool_call"}
            out = asyncio.run(
                builder.compile().ainvoke({"messages": [AIMessage("", tool_calls=[call])]})
            )
            verdict = out["messages"][-1].additional_kwargs["harness"]["verdict"]
            assert "HTML page" in verdict["reasons"][0]
            ```
        """
        tool, contract, attempt, task_start = self._prepare(request)
        if contract is None:
            return await execute(request)
        try:
            result = await execute(request)
        except (GraphBubbleUp, HarnessError):
            raise
        except Exception as e:
            if _is_invalid_resume(e):
                raise
            result = _verify.exception_message(tool, request.tool_call["id"] or "", e)
        out, verdict = self._finish(request, result, tool, contract, attempt, task_start)
        if verdict is not None:
            await aemit("verdict", dict(verdict), _config_of(request))
        return out

    def _prepare(
        self, request: ToolCallRequest
    ) -> tuple[str, ToolContract | None, int, str | None]:
        tool = request.tool_call["name"]
        contract = self.contract_for(tool)
        if contract is None:
            return tool, None, 0, None
        messages = _verify.messages_of(request.state, _messages_key(request))
        task = _verify.current_task(messages, _verify.verdicts_of(request.state))
        return tool, contract, _verify.attempt_of(request.state, messages, tool, task), task.start

    def _finish(
        self,
        request: ToolCallRequest,
        result: ToolMessage | Command[Any],
        tool: str,
        contract: ToolContract,
        attempt: int,
        task_start: str | None,
    ) -> tuple[ToolMessage | Command[Any], Verdict | None]:
        call_id = request.tool_call["id"]
        args = request.tool_call["args"]
        # Tools marked irreversible/effect are never re-run blindly, whatever the contract.
        side_effects = effect_kind(request.tool) is not None
        if isinstance(result, ToolMessage):
            if "verdict" in _verify.harness_meta(result):
                return result, None
            reasons = _check(contract, result, raised=result.status == "error")
            checked, verdict = _verify.apply_verdict(
                contract, result, tool, args, attempt, reasons, side_effects, task_start
            )
            if isinstance(request.state, list):  # a ToolNode fed a bare message list
                return checked, verdict
            key = _messages_key(request)
            return Command(update={key: [checked], "verdicts": [verdict]}), verdict
        # A tool returned a Command: check the ToolMessage it carries for this call.
        update = result.update
        if not isinstance(update, dict):
            return result, None
        key = _messages_key(request)
        messages = list(update.get(key) or [])
        for i, m in enumerate(messages):
            if isinstance(m, ToolMessage) and m.tool_call_id == call_id:
                if "verdict" in _verify.harness_meta(m):
                    return result, None
                reasons = _check(contract, m, raised=m.status == "error")
                messages[i], verdict = _verify.apply_verdict(
                    contract, m, tool, args, attempt, reasons, side_effects, task_start
                )
                verdicts = [*(update.get("verdicts") or []), verdict]
                new_update = {**update, key: messages, "verdicts": verdicts}
                # A refused output goes where its verdict sends it, not where the tool said
                # to go next: its goto would run the model past a `fail` (or a review).
                refused = verdict["action"] != "ok" and result.graph is None
                return Command(
                    graph=result.graph,
                    update=new_update,
                    resume=result.resume,
                    goto=() if refused else result.goto,
                ), verdict
        return result, None


def _messages_key(request: ToolCallRequest) -> str:
    """The state key the ``ToolNode`` keeps its messages under.

    ``messages``, else the key holding the AI message that made this call: a
    ``ToolNode(messages_key="chat")`` writes its messages to ``chat``; the hook's checked
    message must go there too, as a state with no ``messages`` key drops what is written to
    it (the tool's answer was lost, and the call left unanswered).
    """
    state = request.state
    values = state if isinstance(state, Mapping) else getattr(state, "__dict__", None)
    if not isinstance(values, Mapping) or "messages" in values:
        return "messages"
    call_id = request.tool_call["id"]
    for key, value in values.items():
        if isinstance(key, str) and isinstance(value, list):
            for m in reversed(value):
                if isinstance(m, AIMessage) and any(c.get("id") == call_id for c in m.tool_calls):
                    return key
    return "messages"


def _check(contract: ToolContract, message: ToolMessage, *, raised: bool) -> list[str]:
    if raised:
        text = _verify.content_text(message.content)
        return [f"the tool raised an error: {_verify.excerpt(text[:300])}"]
    return _verify.check_output(contract, message.content, message.artifact, message.status)


def _config_of(request: ToolCallRequest) -> RunnableConfig | None:
    runtime = request.runtime
    config = getattr(runtime, "config", None)
    return cast(RunnableConfig, config) if isinstance(config, dict) else None


def _is_invalid_resume(error: BaseException) -> bool:
    try:
        from langgraph.errors import is_invalid_resume
    except ImportError:  # older langgraph: resume values are never validated
        return False
    return bool(is_invalid_resume(error))


# --- malformed tool calls ----------------------------------------------------------------


def _answer_invalid_calls(
    verify: VerifyToolOutputs | None, state: Any, reply: AIMessage
) -> tuple[list[ToolMessage], list[Verdict]]:
    """Error messages answering *reply*'s malformed tool calls, and their failed verdicts.

    A provider's tool call whose arguments are not valid JSON lands in
    ``reply.invalid_tool_calls``, not ``tool_calls``: routed by its ``tool_calls`` alone, the
    reply reads as a final answer. A reply cut off at its output cap (finish reason
    ``length``, ``max_tokens``, ``MAX_TOKENS``) is malformed as a whole: every call in it is
    (`_verify.malformed_calls`), for streamed its cut arguments were repaired into valid,
    truncated ones. Each such call is answered instead by an error ``ToolMessage`` (its id,
    so the history stays valid for providers that want every call answered) telling the
    model what was wrong; its verdict counts against the tool's ``max_retries`` like a
    refused output, and once they are spent the verdict is ``fail``. The tool never ran, so
    a retry is always safe: the contract's ``on_fail`` and side effects do not apply. On
    ``fail`` the reply's well-formed calls are answered "not run" too, as the task stops
    before any tool runs. *state* holds the messages before *reply*.
    """
    malformed = _verify.malformed_calls(reply)
    if not malformed:
        return [], []
    cut = _verify.cut_at_cap(reply)
    earlier = _verify.messages_of(state)
    task = _verify.current_task([*earlier, reply], _verify.verdicts_of(state))
    answers: list[ToolMessage] = []
    verdicts: list[Verdict] = []
    for call in malformed:
        tool = call.get("name") or ""
        contract = (verify.contract_for(tool) if verify is not None else None) or ToolContract()
        attempt = _verify.attempt_of(state, earlier, tool, task)
        if cut is not None:
            reason = f"the reply was cut off at the token limit ({cut})"
        else:
            reason = "the arguments are not valid JSON"
            if call.get("error"):
                reason += f" ({_verify.excerpt(str(call['error'])[:200])})"
        reason += f": {_verify.excerpt(call.get('args'))}"
        verdict = Verdict(
            tool=tool,
            tool_call_id=call.get("id") or "",
            ok=False,
            reasons=[reason],
            attempt=attempt,
            action="retry" if attempt <= contract.max_retries else "fail",
        )
        if task.start is not None:
            verdict["task_start"] = task.start
        lines = [f"Tool call {tool!r} was not run: {reason}."]
        if verdict["action"] == "retry" and cut is not None:
            lines.append(
                "Your reply ran out of output tokens, so its arguments may be incomplete. "
                "Call the tool again with shorter arguments that fit, or fewer calls at once "
                f"(retry {attempt} of {contract.max_retries} for this tool)."
            )
        elif verdict["action"] == "retry":
            lines.append(
                "Call the tool again with its arguments as one valid JSON object that matches "
                f"its schema (retry {attempt} of {contract.max_retries} for this tool)."
            )
        else:
            lines.append("The task stops here (verification failed).")
        answers.append(
            ToolMessage(
                content="\n".join(lines),
                tool_call_id=verdict["tool_call_id"],
                name=tool or None,
                status="error",
                additional_kwargs={
                    _verify.HARNESS_KEY: {
                        "verdict": verdict,
                        "rejected_arguments": call.get("args"),
                    }
                },
            )
        )
        verdicts.append(verdict)
    if any(v["action"] == "fail" for v in verdicts):
        answered = {a.tool_call_id for a in answers}
        answers += [
            ToolMessage(
                content="Not run: another call in the same answer was malformed and the task "
                "stopped.",
                tool_call_id=str(c["id"]),
                name=c["name"],
                status="error",
            )
            for c in reply.tool_calls
            if c.get("id") and c["id"] not in answered
        ]
    return answers, verdicts


# --- routing and the finish node -----------------------------------------------------------

_ROUTE_ORDER: dict[str, int] = {"ok": 0, "retry": 1, "fail": 2, "escalate": 3}


def route_after_verify(state: Any, messages_key: str = "messages") -> VerifyRoute:
    """Route after verification, from the verdicts on the tool messages since the last AI message.

    ``escalate`` when any of them carries an `Escalation` (from verification or another
    harness layer) that no person has answered yet, else ``fail`` when a verdict says fail,
    else ``retry`` when one says retry, else ``ok``. Escalations go first so a person sees
    them; once they are answered, `HumanReview` ends the task on a sibling's ``fail`` verdict
    as `VerificationStop` does. Map the routes like langgraph's ``tools_condition``:
    ``add_conditional_edges("verify", route_after_verify, {"ok": "agent", "retry": "agent",
    "escalate": "review", "fail": "stop"})``.

    Example:
        ```python
        from langchain_core.messages import AIMessage, ToolMessage

        from harness_nodes import route_after_verify

        verdict = {"tool": "t", "tool_call_id": "c1", "ok": False, "reasons": ["empty result"],
                   "attempt": 3, "action": "fail"}
        messages = [
            AIMessage("", tool_calls=[{"name": "t", "args": {}, "id": "c1", "type": "tool_call"}]),
            ToolMessage(
                "...", tool_call_id="c1", additional_kwargs={"harness": {"verdict": verdict}}
            ),
        ]
        assert route_after_verify({"messages": messages}) == "fail"
        assert route_after_verify({"messages": messages[:1]}) == "ok"
        ```
    """
    messages = _verify.messages_of(state, messages_key)
    start = _verify.last_ai_index(messages)
    route: VerifyRoute = "ok"
    for message in messages[start + 1 :]:
        if not isinstance(message, ToolMessage):
            continue
        meta = _verify.harness_meta(message)
        candidate: VerifyRoute = "ok"
        if "escalation" in meta:
            candidate = "escalate"
        elif isinstance(meta.get("verdict"), dict):
            action = meta["verdict"].get("action", "ok")
            if action == "escalate" and "review" in meta:
                action = "ok"  # a person has answered it
            if action in _ROUTE_ORDER:
                candidate = action
        if _ROUTE_ORDER[candidate] > _ROUTE_ORDER[route]:
            route = candidate
    return route


def _stop_reason(failed: list[Verdict], escalations: list[Escalation]) -> str:
    if failed:
        return "; ".join(f"{v['tool']}: {'; '.join(v['reasons'])}" for v in failed)
    if escalations:  # escalated by another layer (the effect ledger), not by a verdict
        return "; ".join(e["reason"] for e in escalations)
    return "a tool output failed verification"


@dataclass(frozen=True)
class VerificationStop:
    """The ``fail`` target of `route_after_verify`: end the task as ``verification_failed``.

    Also the ``escalate`` target where no person reviews (`add_harness` without a review
    policy, `VerifyToolOutputsMiddleware` without `ReviewQueueMiddleware`): the escalated
    verdicts' reasons are reported the same way, and the closing message says so.

    It writes ``outcome = {"status": "verification_failed", "reason": ...}`` (kept where the
    state has an ``outcome`` key) and a closing AI message that states the reasons and
    carries the outcome in ``additional_kwargs["harness"]["outcome"]`` — so a plain
    ``MessagesState`` app sees why it stopped. With ``exit_behavior="error"`` it raises
    `VerificationFailed` instead.

    Example:
        ```python
        from langchain_core.messages import AIMessage, ToolMessage

        from harness_nodes import VerificationStop

        verdict = {"tool": "t", "tool_call_id": "c1", "ok": False, "reasons": ["empty result"],
                   "attempt": 3, "action": "fail"}
        messages = [
            AIMessage("", tool_calls=[{"name": "t", "args": {}, "id": "c1", "type": "tool_call"}]),
            ToolMessage(
                "...", tool_call_id="c1", additional_kwargs={"harness": {"verdict": verdict}}
            ),
        ]
        update = VerificationStop()({"messages": messages})
        assert update["outcome"] == {"status": "verification_failed", "reason": "t: empty result"}
        ```
    """

    exit_behavior: Literal["end", "error"] = "end"
    """``end``: record the outcome and end; ``error``: raise `VerificationFailed`."""

    def __post_init__(self) -> None:
        if self.exit_behavior not in ("end", "error"):
            raise UserError(
                "VerificationStop.exit_behavior must be 'end' or 'error', "
                f"got {self.exit_behavior!r}"
            )

    def __call__(self, state: MessagesAndOutcome) -> dict[str, Any]:
        """Record the failure (or raise it)."""
        messages = _verify.messages_of(state)
        failed = _verify.failed_verdicts(messages, escalated=True)
        escalations = _verify.unreviewed_escalations(messages)
        reason = _stop_reason(failed, escalations)
        if self.exit_behavior == "error":
            first = failed[0] if failed else None
            raise VerificationFailed(
                first["tool"] if first else "",
                first["tool_call_id"] if first else "",
                [r for v in failed for r in v["reasons"]] or [reason],
            )
        outcome = Outcome(status="verification_failed", reason=reason)
        emit("outcome", dict(outcome))
        why = "a tool output failed verification"
        if escalations or any(v["action"] == "escalate" for v in failed):
            why += " and needs a person, but no human review is set up"
        closing = AIMessage(
            content=f"I stopped: {why}. {reason}",
            additional_kwargs={_verify.HARNESS_KEY: {"outcome": outcome}},
        )
        return {"outcome": replace_outcome(state, outcome), "messages": [closing]}
