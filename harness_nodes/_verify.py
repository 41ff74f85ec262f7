"""The verification rules, shared by the `VerifyToolOutputs` node and its tool-node hook.

One implementation: both forms call `check_output` (what is wrong with an output),
`decide` (what to do about it) and `apply_verdict` (the message the model sees next, with
the verdict and any escalation in its metadata). Nothing here keeps state between calls:
retry counts are read back from the verdicts already recorded on the task's messages and,
where the state keeps them, in its ``verdicts`` records (which a trimmed message history
does not lose), so they are checkpointed and survive a resume in another process. Only the
current task counts (`current_task`): a thread's next question starts with a full budget.
"""

from __future__ import annotations

import ast
import json
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import is_dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import pydantic_core
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    ToolCall,
    ToolMessage,
)
from langgraph.errors import GraphBubbleUp
from pydantic import BaseModel, ValidationError

from harness_nodes.state import Escalation, Verdict

if TYPE_CHECKING:
    from harness_nodes.verify import ErrorSignals, ToolContract

Action = Literal["ok", "retry", "escalate", "fail"]

HARNESS_KEY = "harness"
_MISSING = object()
_MAX_SCHEMA_ERRORS = 5

_excerpt_repr = reprlib.Repr()
_excerpt_repr.maxstring = 160
_excerpt_repr.maxother = 160
_excerpt_repr.maxlevel = 3
_excerpt_repr.maxdict = 6
_excerpt_repr.maxlist = 6


def excerpt(value: Any) -> str:
    """A short, always-safe rendering of a value for a reason (no recursion, bounded size)."""
    try:
        return _excerpt_repr.repr(value)
    except Exception:  # a user object whose __repr__ raises
        return f"<{type(value).__name__}>"


# --- reading messages and state --------------------------------------------------------------


def messages_of(state: Any, key: str = "messages") -> list[AnyMessage]:
    """The messages of a state given as a dict, a list, a dataclass or a pydantic model."""
    if isinstance(state, list):
        return state
    if isinstance(state, Mapping):
        found = state.get(key, [])
    else:
        found = getattr(state, key, [])
    return list(found or [])


def harness_meta(message: BaseMessage) -> dict[str, Any]:
    """The harness records on a message (``additional_kwargs["harness"]``), or ``{}``."""
    meta = message.additional_kwargs.get(HARNESS_KEY)
    return meta if isinstance(meta, dict) else {}


def last_ai_index(messages: Sequence[BaseMessage]) -> int:
    """Index of the last AI message, or -1."""
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], AIMessage):
            return i
    return -1


_CUT_AT_CAP = ("length", "max_tokens")
"""Finish reasons, lowercased, of a reply cut at its output cap: OpenAI's ``finish_reason``
(and Ollama's ``done_reason``) ``"length"``, Anthropic's ``stop_reason`` and Bedrock's
``stopReason`` ``"max_tokens"``, Google's ``finish_reason`` ``"MAX_TOKENS"`` (and OpenAI's
Responses API's ``incomplete_details.reason`` ``"max_output_tokens"``). langchain-core
passes each provider's own word through in ``response_metadata``, unnormalised."""

_FINISH_KEYS = ("finish_reason", "stop_reason", "stopReason", "done_reason")


def cut_at_cap(message: AIMessage) -> str | None:
    """How the provider says *message* stopped at its output cap (``"finish_reason='length'"``).

    ``None`` when it did not. A streamed reply's metadata is its chunks' merged: langchain-core
    concatenates a string key sent in more than one chunk (``"lengthlength"``), and the last
    chunk's word — the one that ended the reply — is the end of the string.
    """
    meta = message.response_metadata or {}
    for key in _FINISH_KEYS:
        reason = meta.get(key)
        reason = getattr(reason, "name", reason)  # an enum, as Google's FinishReason
        if isinstance(reason, str) and reason.lower().endswith(_CUT_AT_CAP):
            return f"{key}={reason!r}"
    # OpenAI's Responses API: status "incomplete", incomplete_details.reason.
    details = meta.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, Mapping) else None
    if reason == "max_output_tokens":
        return f"incomplete_details.reason={reason!r}"
    return None


def malformed_calls(reply: AIMessage) -> list[dict[str, Any]]:
    """The tool calls of *reply* that must not run: each answered as malformed instead.

    Its ``invalid_tool_calls`` (arguments that are not valid JSON) and, when the reply was cut
    off at its output cap with calls in it, every call: the last one's arguments end where
    the cap fell — streamed, langchain-core's ``parse_partial_json`` repairs them into valid
    but truncated ones (``{"query": "sto`` → ``{"query": "sto"}``), so they cannot be told
    apart — and the reply as a whole is not the model's finished intent.
    """
    invalid: list[dict[str, Any]] = [dict(c) for c in reply.invalid_tool_calls]
    if (reply.tool_calls or invalid) and cut_at_cap(reply) is not None:
        return [*(dict(c) for c in reply.tool_calls), *invalid]
    return invalid


def runnable_calls(reply: AIMessage) -> list[ToolCall]:
    """The tool calls of *reply* the tools may run: none from a reply cut off at its cap."""
    return [] if cut_at_cap(reply) is not None else list(reply.tool_calls)


def prior_failures(messages: Sequence[BaseMessage], tool: str) -> int:
    """How many model turns of this task already had an output of ``tool`` fail verification.

    A turn is one AI message and its tool results: failed parallel calls of one turn count
    once, as the model answers them all in its next turn.
    """
    turns: set[int] = set()
    turn = -1
    for i, m in enumerate(messages):
        if isinstance(m, AIMessage):
            turn = i
        elif isinstance(m, ToolMessage):
            verdict = harness_meta(m).get("verdict")
            if isinstance(verdict, dict) and verdict.get("tool") == tool and not verdict.get("ok"):
                turns.add(turn)
    return len(turns)


class Task(NamedTuple):
    """Where the current task begins in the visible history, and the mark its verdicts carry."""

    first: int
    """Index of the task's first message in the messages (0 when its start is out of sight)."""
    start: str | None
    """Id of the message that opened the task (`Verdict.task_start`), ``None`` if unknown."""


TASK_END = "task_end"
"""Harness metadata key marking a message a task ends on that is not an answer without tool
calls: the response-format tool's message (``create_agent`` with ``ToolStrategy`` ends its run
there), marked by the harness middleware."""


def _ends_task(messages: Sequence[BaseMessage], i: int) -> bool:
    """Whether the agent's run ended on ``messages[i]`` (its task's last message)."""
    m = messages[i]
    if isinstance(m, AIMessage):
        return not m.tool_calls
    # The response-format tool's message may be followed by the results of the tools called
    # beside it (the run ends after them): any message of that block ends the task.
    while i >= 0 and isinstance(messages[i], ToolMessage):
        if harness_meta(messages[i]).get(TASK_END):
            return True
        i -= 1
    return False


def current_task(messages: Sequence[BaseMessage], verdicts: Sequence[Any]) -> Task:
    """The task the tool calls at the end of ``messages`` belong to.

    A task ends on an AI message without tool calls: the model's answer, or a harness stop
    note (`VerificationStop`, a budget stop), which is what ends the run in the node, hook
    and middleware forms alike; or on a structured response given through a tool (the
    response-format tool's message, marked `TASK_END`). The next task opens with the user's
    new question right after it, and its verdicts carry that message's id (a text-only AI
    message followed by more of the agent's own messages — a planner's, a sub-agent's — is
    not an end). When no end is in sight, this is the thread's first task or a history
    trimmed past the previous end: the task is then the one the latest failed ``verdicts``
    record belongs to, so trimming never gives a task a fresh budget.
    """
    for i in range(len(messages) - 2, -1, -1):
        if isinstance(messages[i + 1], HumanMessage) and _ends_task(messages, i):
            return Task(i + 1, messages[i + 1].id)
    for v in reversed(verdicts):
        if isinstance(v, Mapping) and isinstance(v.get("task_start"), str):
            return Task(0, v["task_start"])
    return Task(0, messages[0].id if messages else None)


def earlier_tasks_outcome(messages: Sequence[BaseMessage], outcome: Mapping[str, Any]) -> bool:
    """Whether *outcome* is an earlier task's, kept in the state after the thread moved on.

    A stop (`VerificationStop`, a budget stop) writes the outcome with the closing message
    that reports it; a drop-in graph has nothing that rewrites it when the user's next question
    starts a new task. It is that earlier task's when the message reporting it comes before the
    current task (`current_task`). An outcome no message reports (written by a `HarnessState`
    node) is taken as current.
    """
    status = outcome.get("status")
    for i in range(len(messages) - 1, -1, -1):
        reported = harness_meta(messages[i]).get("outcome")
        if isinstance(reported, Mapping) and reported.get("status") == status:
            return current_task(messages, ()).first > i
    return False


def verdicts_of(state: Any) -> list[Any]:
    """The state's ``verdicts`` records, or ``[]`` where it keeps none."""
    if isinstance(state, Mapping):
        found = state.get("verdicts")
    else:
        found = getattr(state, "verdicts", None)
    return list(found) if isinstance(found, list) else []


def recorded_failures(verdicts: Sequence[Any], tool: str, task_start: str | None = None) -> int:
    """How many model turns of the task had an output of ``tool`` fail, from ``verdicts``.

    The calls of one turn share their attempt number, so the distinct attempts among the
    tool's failed verdicts are its failed turns. Records of other tasks are left out; a
    record without a ``task_start`` (written before verdicts carried one) counts, as then.
    """
    return len(
        {
            v.get("attempt")
            for v in verdicts
            if isinstance(v, Mapping)
            and v.get("tool") == tool
            and not v.get("ok")
            and v.get("task_start", task_start) == task_start
        }
    )


def attempt_of(state: Any, earlier: Sequence[BaseMessage], tool: str, task: Task) -> int:
    """The attempt number of an output of ``tool`` in this turn (after the ``earlier`` ones).

    Only the current ``task`` counts. Both sources undercount at worst — a trimmed history
    has lost messages, a state without a ``verdicts`` key keeps no records — so the larger
    count is the right one.
    """
    in_task = prior_failures(earlier[task.first :], tool)
    return max(in_task, recorded_failures(verdicts_of(state), tool, task.start)) + 1


def failed_verdicts(messages: Sequence[BaseMessage], *, escalated: bool = False) -> list[Verdict]:
    """The ``fail`` verdicts on the tool messages since the last AI message.

    *escalated*: also the ``escalate`` ones nobody answered (what stops a task that has no
    reviewer wired: their reasons are the task's).
    """
    found: list[Verdict] = []
    for message in messages[last_ai_index(messages) + 1 :]:
        if isinstance(message, ToolMessage):
            meta = harness_meta(message)
            verdict = meta.get("verdict")
            if not isinstance(verdict, dict):
                continue
            action = verdict.get("action")
            if action == "fail" or (escalated and action == "escalate" and "escalation" in meta):
                found.append(cast(Verdict, verdict))
    return found


def unreviewed_escalations(messages: Sequence[BaseMessage]) -> list[Escalation]:
    """Escalations on the tool messages since the last AI message that no reviewer answered.

    The rule `HumanReview` pauses on: a review resolves an escalation by recording ``review``.
    """
    found: list[Escalation] = []
    for m in messages[last_ai_index(messages) + 1 :]:
        if isinstance(m, ToolMessage):
            meta = harness_meta(m)
            escalation = meta.get("escalation")
            if isinstance(escalation, Mapping) and "review" not in meta:
                found.append(cast(Escalation, escalation))
    return found


# --- decoding an output --------------------------------------------------------------------


def content_text(content: Any) -> str:
    """A message content as text (content blocks joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    return "" if content is None else str(content)


_JSON_START = frozenset('{["-0123456789tfn')


_MAX_LITERAL_CHARS = 100_000


def decode_json(text: str) -> tuple[bool, Any]:
    """``(True, value)`` for one JSON document or Python dict/list literal; else ``(False, None)``.

    The literal covers tool nodes that hand the model ``str(dict)`` instead of JSON.
    """
    stripped = text.strip()
    if stripped[:2] in ("b'", 'b"') and len(stripped) <= _MAX_LITERAL_CHARS:
        # a tool that returned bytes: LangChain hands the model their repr
        try:
            raw = ast.literal_eval(stripped)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False, None
        if isinstance(raw, bytes):
            return decode_json(raw.decode("utf-8", errors="replace"))
        return False, None
    if not stripped or stripped[0] not in _JSON_START:
        return False, None
    try:
        # pydantic-core's parser is about twice as fast as json.loads on typical outputs.
        return True, pydantic_core.from_json(stripped)
    except ValueError:
        pass
    try:  # e.g. lone surrogates, which pydantic-core refuses and json accepts
        return True, json.loads(stripped)
    except (ValueError, RecursionError):
        pass
    # A tool node that calls str() on a dict hands the model Python's repr
    # ({'status': 'failed'}), not JSON. literal_eval parses literals only (no code runs) and
    # its tokenizer refuses nesting past 200 levels; the size cap keeps it cheap.
    if stripped[0] in "{[" and len(stripped) <= _MAX_LITERAL_CHARS:
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False, None
        if isinstance(value, dict | list):
            return True, value
    return False, None


_REPR_START = re.compile(r"[A-Za-z_]\w*(=|\()")


def decode_repr(text: str) -> tuple[bool, Any]:
    """``(True, fields)`` for a pydantic model's ``str()`` or a model/dataclass ``repr()``.

    LangChain hands the model ``str(output)`` when a tool returns an object that is not JSON:
    ``city='Paris' temp_c=18.0`` for a pydantic model, ``Weather(city='Paris')`` for a
    dataclass. Their fields are read back (literals and nested reprs only: nothing runs), so
    the checks see the data the model sees; anything else is ``(False, None)``.
    """
    stripped = text.strip()
    match = _REPR_START.match(stripped)
    if match is None or len(stripped) > _MAX_LITERAL_CHARS:
        return False, None
    source = f"_({_comma_separated(stripped)})" if match.group(1) == "=" else stripped
    try:
        value = _repr_value(ast.parse(source, mode="eval").body)
    except (_NotARepr, ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    return (True, value) if isinstance(value, dict) else (False, None)


class _NotARepr(Exception):
    pass


def _comma_separated(text: str) -> str:
    """``a=1 b='x y'`` → ``a=1, b='x y'``: the spaces between top-level fields become commas."""
    out: list[str] = []
    depth, quote, escaped = 0, "", False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == " " and depth == 0 and _REPR_START.match(text, i + 1):
            out.append(",")
        out.append(ch)
    return "".join(out)


def _repr_value(node: ast.expr) -> Any:
    if isinstance(node, ast.Call):  # Name(field=..., ...): its fields
        if node.args or any(k.arg is None for k in node.keywords):
            raise _NotARepr
        return {k.arg: _repr_value(k.value) for k in node.keywords}
    if isinstance(node, ast.List | ast.Tuple):
        return [_repr_value(v) for v in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotARepr
        pairs = zip(node.keys, node.values, strict=True)
        return {_repr_value(k): _repr_value(v) for k, v in pairs}  # type: ignore[arg-type]
    return ast.literal_eval(node)  # constants, negative numbers, sets...


def payload_of(contract: ToolContract, content: Any, artifact: Any) -> tuple[Any, str, bool]:
    """``(payload, text, structured)``: what the checks look at.

    ``payload`` is the artifact (when the contract's source picks it), else the content's
    JSON value, else the content's text; ``text`` is the content as text (for the text
    detectors); ``structured`` says whether ``payload`` came from JSON or an artifact.
    """
    text = content_text(content)
    use_artifact = contract.source == "artifact" or (
        contract.source == "auto" and artifact is not None
    )
    if use_artifact:
        if isinstance(artifact, bytes | bytearray):
            decoded = bytes(artifact).decode("utf-8", errors="replace")
            is_json, value = decode_json(decoded)
            return (value, decoded, True) if is_json else (decoded, decoded, False)
        return artifact, text, True
    if not text.strip() and isinstance(content, list) and content:
        return content, text, True  # content blocks with no text (an image): not empty
    is_json, value = decode_json(text)
    if not is_json:
        is_json, value = decode_repr(text)
    if is_json:
        return value, text, True
    return text, text, False


# --- the checks ----------------------------------------------------------------------------

_EMPTY_TEXT = frozenset({"", "null", "none", "nil", "undefined", "[]", "{}", '""'})

# A result's counts and page marks describe its items, they are not data: beside empty
# items, a count of 0, a page number and a ``has_more: false`` leave the result empty.
_COUNT_KEYS = frozenset(
    {
        "count",
        "total",
        "total_count",
        "totalCount",
        "total_results",
        "totalResults",
        "num_results",
        "numResults",
        "result_count",
        "resultCount",
    }
)
_PAGE_KEYS = frozenset({"page", "page_size", "pageSize", "per_page", "perPage"})
# Only an absent next page counts: a cursor or ``has_more: true`` says there is more data.
_MORE_KEYS = frozenset(
    {
        "has_more",
        "hasMore",
        "next",
        "next_cursor",
        "nextCursor",
        "next_page",
        "nextPage",
        "next_page_token",
        "nextPageToken",
        "cursor",
        "previous",
        "prev",
    }
)
_RESULT_META_KEYS = _COUNT_KEYS | _PAGE_KEYS | _MORE_KEYS
# What a list response says about itself, not about its items: Slack's ``ok: true``, GitHub's
# ``incomplete_results``, and the marks naming the object a list (Stripe's and OpenAI's
# ``object: "list"``, Google's ``kind: "drive#fileList"``), beside which Stripe's ``url`` is
# the list's own address. A boolean elsewhere (``notifications: true``) is a record's data.
_TRUE_FLAG_KEYS = frozenset({"ok", "success", "succeeded"})
_COMPLETENESS_KEYS = frozenset({"incomplete_results", "incompleteResults", "truncated"})
_LIST_MARK_KEYS = frozenset({"object", "type", "kind"})
_LIST_MARK = re.compile(r"list|collection|[\w.-]*#\w*list(?:response)?", re.IGNORECASE)
_LIST_URL_KEYS = frozenset({"url"})
# How many nested objects deep an empty result is looked for ({"data": {"items": []}}).
_EMPTY_DEPTH = 3


def is_empty(value: Any) -> bool:
    """None, blank text, an empty container, or an object that carries no data.

    An object carries no data when every value is empty, or when its data fields are all
    empty beside counts of 0, page marks and what a list response says about itself
    (``{"results": [], "total": 0}``, ``{"items": [], "next": null}``, ``{"ok": true,
    "messages": []}``, ``{"object": "list", "data": [], "url": "/v1/charges"}``); a nested
    object is looked into (``{"data": {"items": [], "total": 0}}``). A count alone
    (``{"count": 0}``) is an answer, and a non-zero count, a next cursor or any non-empty
    field keeps an object from being empty.
    """
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in _EMPTY_TEXT
    if isinstance(value, list | tuple | set | frozenset):
        return len(value) == 0
    if isinstance(value, Mapping):
        return _carries_no_data(value)
    if isinstance(value, BaseModel):
        return _carries_no_data({name: getattr(value, name) for name in type(value).model_fields})
    return False


class _Held(NamedTuple):
    """What an object's values hold, for `is_empty`."""

    data: bool
    """A value that is data (nothing else matters then)."""
    empty_data: bool
    """A data field that is empty (``"items": []``)."""
    blank: bool
    """Every value is empty."""


def _carries_no_data(fields: Mapping[Any, Any]) -> bool:
    held = _held(fields, _EMPTY_DEPTH)
    return not held.data and (held.empty_data or held.blank)


def _held(fields: Mapping[Any, Any], depth: int) -> _Held:
    listed = any(
        key in _LIST_MARK_KEYS and isinstance(value, str) and _LIST_MARK.fullmatch(value.strip())
        for key, value in fields.items()
    )
    all_blank, empty_data = True, False
    for key, value in fields.items():
        if _is_blank(value):
            empty_data = empty_data or key not in _RESULT_META_KEYS
            continue
        all_blank = False
        if _is_result_meta(key, value, listed):
            continue
        if isinstance(value, Mapping) and depth > 0:
            inner = _held(value, depth - 1)
            if inner.data:
                return inner
            # an object of empty data fields is one; one of marks only ({"page": 1}) is a mark
            empty_data = empty_data or inner.empty_data
            continue
        return _Held(data=True, empty_data=False, blank=False)
    return _Held(data=False, empty_data=empty_data, blank=all_blank)


def _is_result_meta(key: Any, value: Any, listed: bool) -> bool:
    """Whether a non-empty value describes a result rather than being its data."""
    if key in _COUNT_KEYS:
        return _is_count(value, 0)
    if key in _PAGE_KEYS:
        return _is_count(value)
    if key in _MORE_KEYS:
        return value is False
    if key in _TRUE_FLAG_KEYS:
        return value is True
    if key in _COMPLETENESS_KEYS:
        return isinstance(value, bool)
    if key in _LIST_MARK_KEYS:
        return listed and isinstance(value, str) and _LIST_MARK.fullmatch(value.strip()) is not None
    return listed and key in _LIST_URL_KEYS and isinstance(value, str)


def _is_count(value: Any, equal: int | None = None) -> bool:
    """A non-negative whole number (not a bool), equal to *equal* when given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not (value >= 0 and float(value).is_integer()):
        return False
    return equal is None or value == equal


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple | set | frozenset | dict):
        return len(value) == 0
    return False


def lookup(payload: Any, path: str) -> Any:
    """The value at a dotted path in a mapping or model, or ``_MISSING``."""
    current = payload
    for part in path.split("."):
        if isinstance(current, BaseModel):
            current = getattr(current, part, _MISSING)
        elif isinstance(current, dict | Mapping):  # dict first: the ABC check is slow
            current = current.get(part, _MISSING)
        else:
            return _MISSING
        if current is _MISSING:
            return _MISSING
    return current


def signal_reasons(signals: ErrorSignals, payload: Any, text: str, structured: bool) -> list[str]:
    """Error signals inside an output that otherwise looks like a success."""
    if structured and isinstance(payload, str):  # a JSON string: its text is the output
        text, structured = payload, False
    if not structured:
        return _text_reasons(signals, text)
    fields = _fields_of(payload)
    if fields is None:
        return []
    reasons: list[str] = []
    _field_reasons(signals, fields, "", signals.envelope_depth, reasons)
    _graphql_reasons(signals, fields, reasons)
    return reasons or _message_reasons(signals, fields)


_GRAPHQL_KEYS = frozenset({"data", "errors", "extensions"})


def _graphql_reasons(signals: ErrorSignals, fields: Mapping[Any, Any], reasons: list[str]) -> None:
    """A GraphQL mutation's own errors, in its payload under ``data`` (`payload_error_keys`)."""
    data = fields.get("data")
    if not isinstance(data, Mapping) or not all(k in _GRAPHQL_KEYS for k in fields):
        return
    for name, payload in data.items():
        if not isinstance(payload, Mapping):
            continue
        for key in signals.payload_error_keys:
            errors = payload.get(key)
            if isinstance(errors, list) and errors:
                reasons.append(f"the output carries an error: data.{name}.{key}={excerpt(errors)}")


# What an error object holds beside its message: where to read about it, which request it
# was (GitHub, Twilio, AWS). Not a `type`, `title`, `timestamp` or `path`: records (an
# event, a commit, a ticket, a notification) have those beside a message that may mention an
# error; RFC 9457 problem details and Spring's error bodies carry a status or an `error`.
_ERROR_REFERENCES = frozenset(
    {"documentation_url", "more_info", "request_id", "requestId", "instance"}
)
# The whole message is an HTTP reason phrase (API Gateway's {"message": "Forbidden"}, Django
# REST framework's {"detail": "Not found."}).
_REASON_PHRASE = re.compile(
    r"\s*(?:bad request|unauthori[sz]ed|forbidden|not found|method not allowed|request timeout"
    r"|payload too large|unprocessable (?:entity|content)|too many requests"
    r"|internal server error|bad gateway|service unavailable|gateway timeout"
    r"|missing authentication token)\s*[.!]?\s*",
    re.IGNORECASE,
)


def _message_reasons(signals: ErrorSignals, fields: Mapping[Any, Any]) -> list[str]:
    """An object that is only an error message (see `ErrorSignals.message_keys`)."""
    if not any(k in fields for k in signals.message_keys):
        return []
    # A status beside the message is the call's own word (a failed one was read already):
    # {"status": "sent", "message": "Sorry, the request timed out"} echoes what was sent.
    allowed = signals.message_keys | (signals.code_keys - signals.status_keys) | _ERROR_REFERENCES
    if not all(isinstance(k, str) and k in allowed for k in fields):
        return []
    for key in fields:
        value = fields[key]
        if key not in signals.message_keys:
            continue
        if isinstance(value, str) and value.strip():
            if (
                "documentation_url" in fields
                or _REASON_PHRASE.fullmatch(value)
                or _text_reasons(signals, value)
            ):
                return [f"the output is an error message: {key}={excerpt(value)}"]
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, Mapping) and "msg" in v and "loc" in v for v in value)
        ):
            # FastAPI's validation error: {"detail": [{"loc": [...], "msg": ..., "type": ...}]}
            return [f"the output is a validation error: {key}={excerpt(value)}"]
    return []


def _text_reasons(signals: ErrorSignals, text: str) -> list[str]:
    head = text[: signals.scan_chars]
    if signals.html and signals.html_pattern.search(head):
        return [f"the tool returned an HTML page, not data: {excerpt(head[:120])}"]
    first_line_end = _first_line_end(head)
    for pattern in signals.compiled_patterns:
        for match in pattern.finditer(head):
            if _where_errors_are(head, match.start(), first_line_end):
                return [
                    f"the output reads like an error ({match.group(0)!r}): {excerpt(text[:200])}"
                ]
    return []


def _first_line_end(text: str) -> int:
    """Where the first non-blank line of *text* ends."""
    start = len(text) - len(text.lstrip())
    end = text.find("\n", start)
    return len(text) if end < 0 else end


# An error's label opening a line: "Error: ", "[ERROR] ", "**Exception:** ".
_ERROR_LABEL = re.compile(
    r"\s*(?:\[(?:error|exception|fatal)\]|[*_]*(?:error|exception|fatal)[*_]*\s*[:!-][*_]*)\s*",
    re.IGNORECASE,
)


def _where_errors_are(text: str, start: int, first_line_end: int) -> bool:
    """Whether a match at *start* is where an error message puts its words.

    That is the first line (an error leads with what went wrong, whatever label precedes it),
    the start of a line, or right after an error's label opening a line (``Error: Rate limit
    exceeded``); in the middle of a later line, it is text about errors (docs, a search
    snippet).
    """
    if start < first_line_end:
        return True
    before = text[text.rfind("\n", 0, start) + 1 : start]
    return not before.strip() or _ERROR_LABEL.fullmatch(before) is not None


def _fields_of(value: Any) -> Mapping[Any, Any] | None:
    """The fields of a mapping, a pydantic model or a dataclass instance; else ``None``."""
    if isinstance(value, dict | Mapping):  # dict first: the ABC check is slow
        return value
    if isinstance(value, BaseModel):
        return value.model_dump()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclass_fields(value)}  # slots too
    return None


def _field_reasons(
    signals: ErrorSignals, fields: Mapping[Any, Any], prefix: str, depth: int, reasons: list[str]
) -> None:
    """The signals in one object's keys, then in its envelopes' (``depth`` more levels).

    Inside an envelope (a non-empty *prefix*) only error keys and success flags are signals:
    a wrapped record's ``status`` or ``code`` (an order that failed, a product code, the
    status code of a page an HTTP tool fetched) is its data.
    """
    top = not prefix
    for key, value in fields.items():
        if not isinstance(key, str):
            continue
        path = prefix + key
        if key in signals.error_keys and not _is_blank(value) and not _is_zero(value):
            reasons.append(f"the output carries an error: {path}={excerpt(value)}")
        elif (
            top
            and key in signals.status_keys
            and isinstance(value, str)
            and value.strip().lower() in signals.failed_statuses
        ):
            reasons.append(f"the output reports a failure: {path}={value!r}")
        elif key in signals.success_flags and _is_false(value):
            flag = "false" if value is False else repr(value)
            reasons.append(f"the output reports a failure: {path}={flag}")
        elif top and key in signals.code_keys and _is_error_status(value):
            reasons.append(f"the output reports an error status: {path}={value!r}")
        elif depth > 0 and key in signals.envelope_keys:
            inner = _fields_of(value)
            if inner is None and isinstance(value, str):
                inner = _json_object(value)  # a JSON body sent as text
            if inner is not None:
                _field_reasons(signals, inner, path + ".", depth - 1, reasons)


def _json_object(text: str) -> Mapping[Any, Any] | None:
    """The object a JSON text holds, else None (any other text is data)."""
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_zero(value: Any) -> bool:
    # `error: false` / `error: 0` (an errno of 0) say there is none.
    return value is False or (type(value) in (int, float) and value == 0)


def _is_false(value: Any) -> bool:
    return value is False or (
        isinstance(value, str) and value.strip().lower() in ("false", "no", "0")
    )


def _is_error_status(value: Any) -> bool:
    """An HTTP error status (400-599), written as an int, a float or a string."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 400 <= value <= 599  # a zip code or an app's own code 94107 is data
    if isinstance(value, float) and value.is_integer():
        return 400 <= value <= 599
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) == 3:
        return 400 <= int(value) <= 599
    return False


def _validate(schema: type[BaseModel], payload: Any, structured: bool) -> BaseModel | list[str]:
    """The schema's model instance for the output, or why the output does not match."""
    name = schema.__name__
    if isinstance(payload, schema):
        return payload
    if not structured:
        return [f"expected JSON matching {name}, got text: {excerpt(payload)}"]
    candidate = payload.model_dump() if isinstance(payload, BaseModel) else payload
    try:
        return schema.model_validate(candidate)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_context=False)
        reasons = []
        for err in errors[:_MAX_SCHEMA_ERRORS]:
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            reasons.append(
                f"does not match {name}: {loc}: {err['msg']} (got {excerpt(err.get('input'))})"
            )
        if len(errors) > _MAX_SCHEMA_ERRORS:
            reasons.append(f"... and {len(errors) - _MAX_SCHEMA_ERRORS} more schema errors")
        return reasons
    except RecursionError:
        return [f"does not match {name}: the output is nested too deeply to validate"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def field_reasons(contract: ToolContract, payload: Any) -> list[str]:
    """Required non-empty fields and ranges."""
    reasons: list[str] = []
    if (contract.required or contract.ranges) and not isinstance(payload, Mapping | BaseModel):
        fields = ", ".join([*contract.required, *contract.ranges])
        return [f"expected an object with fields {fields}, got {excerpt(payload)}"]
    for path in contract.required:
        value = lookup(payload, path)
        if value is _MISSING:
            reasons.append(f"required field {path!r} is missing")
        elif _is_blank(value):
            reasons.append(f"required field {path!r} is empty (got {excerpt(value)})")
    for path, (low, high) in contract.ranges.items():
        value = lookup(payload, path)
        if value is _MISSING or value is None:
            if path not in contract.required:  # already reported
                reasons.append(f"field {path!r} is missing (it must be in {_bounds(low, high)})")
            continue
        number = _number(value)
        if number is None:
            reasons.append(f"field {path!r} is not a number (got {excerpt(value)})")
        elif (
            math.isnan(number)
            or (low is not None and number < low)
            or (high is not None and number > high)
        ):
            reasons.append(f"field {path!r} = {number:g} is out of range {_bounds(low, high)}")
    return reasons


def _bounds(low: float | None, high: float | None) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "+inf" if high is None else f"{high:g}"
    return f"[{lo}, {hi}]"


def check_output(
    contract: ToolContract, content: Any, artifact: Any = None, status: str = "success"
) -> list[str]:
    """Every reason the output breaks its contract (empty when it is fine).

    Never raises for any output: a user check that raises is itself a reason.
    """
    if status == "error":
        return [f"the tool reported an error: {excerpt(content_text(content)[:300])}"]
    payload, text, structured = payload_of(contract, content, artifact)
    if contract.signals is not None:
        reasons = signal_reasons(contract.signals, payload, text, structured)
        if reasons:
            return reasons
    if is_empty(payload):
        return [] if contract.allow_empty else [f"empty result: {excerpt(payload)}"]
    if contract.schema is not None:
        validated = _validate(contract.schema, payload, structured)
        if isinstance(validated, list):
            return validated
        payload = validated
    reasons = field_reasons(contract, payload)
    for check in contract.checks:
        try:
            reason = check(payload)
        except GraphBubbleUp:  # an interrupt inside a check is the user's to handle
            raise
        except Exception as e:
            reason = f"check {_name(check)} raised {type(e).__name__}: {excerpt(str(e))}"
        if reason is True:  # a predicate: True means the output is good
            continue
        if reason is False:
            reason = f"check {_name(check)} returned False"
        if reason:
            reasons.append(str(reason))
    return reasons


def _name(obj: Any) -> str:
    return str(getattr(obj, "__name__", None) or type(obj).__name__)


# --- deciding and telling the model --------------------------------------------------------


def decide(contract: ToolContract, ok: bool, attempt: int, side_effects: bool = False) -> Action:
    """What to do about an output: ok, retry (back to the model), escalate or fail."""
    if ok:
        return "ok"
    if contract.on_fail != "retry":
        return contract.on_fail
    if contract.side_effects or side_effects:
        # Re-running a tool with side effects could repeat the effect: a person decides.
        return "escalate"
    if attempt <= contract.max_retries:
        return "retry"
    return contract.on_exhausted


def feedback(contract: ToolContract, tool: str, verdict: Verdict) -> str:
    """The error text the model sees in place of a refused output."""
    lines = [
        f"The output of tool {tool!r} was rejected by verification "
        f"(attempt {verdict['attempt']}). What was wrong:"
    ]
    lines += [f"- {r}" for r in verdict["reasons"]]
    needed = contract.requirements()
    if needed:
        lines.append("What is needed: " + needed)
    action = verdict["action"]
    if action == "retry":
        lines.append(
            "Do not use this output. Call the tool again with corrected arguments or take "
            f"a different approach (retry {verdict['attempt']} of {contract.max_retries} "
            "for this tool)."
        )
    elif action == "escalate":
        lines.append(
            "Do not use this output and do not call the tool again: it is held for a "
            "person's review (where nobody reviews, the task stops here)."
        )
    else:
        lines.append("Do not use this output: the task stops here (verification failed).")
    return "\n".join(lines)


def apply_verdict(
    contract: ToolContract,
    message: ToolMessage,
    tool: str,
    args: Mapping[str, Any] | None,
    attempt: int,
    reasons: list[str],
    side_effects: bool = False,
    task_start: str | None = None,
) -> tuple[ToolMessage, Verdict]:
    """The message to keep (same id and call id) with the verdict, and the verdict itself.

    ``side_effects`` marks a tool known to change the world (an `effect_kind` mark) whatever
    its contract says; ``task_start`` is the `Task.start` a failed verdict counts against.
    """
    ok = not reasons
    existing = harness_meta(message)
    # A call that ran through the effect ledger is irreversible whatever its contract says,
    # and a call another layer already escalated stays with the person it went to.
    side_effects = side_effects or contract.side_effects or "effect" in existing
    action = decide(contract, ok, attempt, side_effects=side_effects)
    if not ok and "escalation" in existing:
        action = "escalate"
    verdict = Verdict(
        tool=tool,
        tool_call_id=message.tool_call_id,
        ok=ok,
        reasons=list(reasons),
        attempt=attempt,
        action=action,
    )
    if not ok and task_start is not None:  # only failures count against a task's retries
        verdict["task_start"] = task_start
    meta = {**existing, "verdict": verdict}
    update: dict[str, Any] = {}
    if not ok:
        meta["rejected_output"] = message.content
        if message.artifact is not None:  # refused with its output: it does not flow on
            meta["rejected_artifact"] = message.artifact
            update["artifact"] = None
        if verdict["action"] == "escalate" and "escalation" not in meta:
            meta["escalation"] = Escalation(
                kind="verification",
                reason=f"output of {tool} failed verification: " + "; ".join(reasons),
                tool=tool,
                tool_call_id=message.tool_call_id,
                args=dict(args or {}),
                details={
                    "reasons": list(reasons),
                    "attempt": attempt,
                    "side_effects": side_effects,
                },
            )
        update["content"] = feedback(contract, tool, verdict)
        update["status"] = "error"
    update["additional_kwargs"] = {**message.additional_kwargs, HARNESS_KEY: meta}
    if message.name is None:
        update["name"] = tool
    return message.model_copy(update=update), verdict


def exception_message(tool: str, tool_call_id: str, error: BaseException) -> ToolMessage:
    """The tool message standing for a tool that raised (checked like any error output)."""
    return ToolMessage(
        content=f"{type(error).__name__}: {error}",
        name=tool,
        tool_call_id=tool_call_id,
        status="error",
    )
