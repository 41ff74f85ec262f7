"""Cost envelopes: hard token, call and dollar limits per task, enforced before a call is made.

- `Envelope` / `Envelopes`: the limits of a task (per task type, with a default), a model
  ladder to degrade down, ``exit_behavior="end" | "error"`` (LangChain's words) and an
  optional aggregate cap per task type over a time window (`WindowCap`).
- `budgeted(model_or_ladder, envelope=..., backend=...)`: wraps any chat model. Before each
  call it counts the prompt's tokens offline, **reserves the worst case** (input + output cap at
  the model's highest price) in the spend ledger atomically, caps ``max_tokens`` to what
  remains, steps down the ladder when the next call would not fit and refuses when even the
  cheapest cannot. After the call it settles the reservation to the reported usage; a call
  the provider answered with an error releases it, and one cancelled or timed out after its
  request went out, or answered with a success status but unreadably (a malformed body), keeps
  its worst case (it may be billed in full).
- `BudgetGuard`: the graph side. Its `route` runs on the edge into the model (no extra
  superstep): ``"ok"``, ``"degrade"`` or ``"stop"``; its `finish` node ends the task with
  outcome ``budget_exhausted``, keeping the partial result. The guard itself is also a node
  (``Command`` form) for apps that prefer one.
- `BudgetCallbackHandler`: accounts, after the fact, calls made through models that are not
  wrapped (inside a tool, say).

Spend is keyed by **task** (``configurable["task_id"]``, else the thread id), persisted in the
backend's ``harness_spend*`` tables: a task paused for review, crashed and resumed, or resumed
in another process keeps its spend.

Example:
    ```python
    from langchain_core.messages import HumanMessage

    from checkpointers import open_backend
    from harness_nodes import Envelope, budgeted
    from harness_nodes.testing import ScriptedChatModel

    with open_backend("memory://") as backend:
        model = budgeted(
            [ScriptedChatModel(script=["Hi!"], model_name="gpt-4o"),
             ScriptedChatModel(script=["Hi!"], model_name="gpt-4o-mini")],
            envelope=Envelope(max_usd=0.50),
            backend=backend,
        )
        answer = model.invoke([HumanMessage("Hello")], {"configurable": {"thread_id": "t1"}})
        assert answer.additional_kwargs["harness"]["budget"]["model"] == "gpt-4o"
        assert model.spend({"configurable": {"thread_id": "t1"}})["calls"] == 1
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import math
import numbers
import threading
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import astuple, dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal, cast

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import BaseLanguageModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    SystemMessage,
    ToolMessage,
    message_chunk_to_message,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.runnables.config import merge_configs
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END
from langgraph.types import Command
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SkipValidation, ValidationError

from checkpointers._spend import (
    AsyncSpendLedger,
    Limits,
    PendingSettles,
    Reservation,
    SpendLedger,
    Totals,
    _async_pending,
)
from harness_nodes import _verify
from harness_nodes._events import aemit, emit
from harness_nodes.errors import BudgetExceeded, UnpricedModelError, UserError
from harness_nodes.pricing import NANOS_PER_USD, Pricing, Rates
from harness_nodes.state import (
    MessagesAndOutcome,
    MessagesOnly,
    ModelSpend,
    Outcome,
    Spend,
    replace_outcome,
)

__all__ = [
    "BudgetCallbackHandler",
    "BudgetCheck",
    "BudgetGuard",
    "BudgetedChatModel",
    "Envelope",
    "Envelopes",
    "WindowCap",
    "budgeted",
]

log = logging.getLogger(__name__)

ExitBehavior = Literal["end", "error"]
Decision = Literal["ok", "degrade", "stop"]
TokenCounter = Callable[[Sequence[BaseMessage]], int]


_INT64_MAX = 2**63 - 1
"""The ledger keeps nano-dollars, tokens and calls in signed 64-bit integers (BIGINT)."""
_MAX_USD = Decimal(_INT64_MAX) / NANOS_PER_USD

_IN_FLIGHT_SHARE = 2**20
"""One call's worst case takes at most this fraction of what the ledger can still hold.

An output cap can be absurd (a model's ``max_tokens=10**30``, an envelope with no dollar or
token limit): its worst case would overflow the ledger's 64-bit counts. So beside the
envelope's limits, a reservation must fit in what the ledger has left — shared, so that a
million calls reserved at once (parallel branches, a budget lease booking several) still add
up to a number the ledger holds. No real call comes near: the share starts at 8.8 trillion
tokens and $8,796."""


def _ledger_room(used: int) -> int:
    """What one reservation may take of a 64-bit count already at *used* (see above)."""
    return max(0, _INT64_MAX - used) // _IN_FLIGHT_SHARE


def _usd_to_nanos(usd: float | int | str | Decimal, what: str) -> int:
    try:
        d = Decimal(str(usd))
    except ArithmeticError:
        raise UserError(f"{what} must be a number of USD, got {usd!r}") from None
    if not d.is_finite() or d < 0:
        raise UserError(f"{what} must be a finite, non-negative number of USD, got {usd!r}")
    nanos = int(d * NANOS_PER_USD)  # floor: a limit is never rounded up
    if nanos > _INT64_MAX:
        raise UserError(
            f"{what} must be at most ${_MAX_USD:,} (the ledger counts nano-dollars in 64-bit "
            f"integers), got {usd!r}"
        )
    return nanos


def _check_count(value: object, what: str) -> None:
    """A token or call count the ledger can hold: an int (not a bool) in 0..2**63-1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{what} must be a non-negative int, got {value!r}")
    if value > _INT64_MAX:
        raise UserError(
            f"{what} must be at most {_INT64_MAX} (the ledger counts in 64-bit integers), "
            f"got {value!r}"
        )


def _usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


def _number(value: object, what: str) -> float:
    """*value* as a float; a bool (``True`` is 1) or a string is a wiring mistake."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise UserError(f"{what} must be a number, got {value!r}")
    return float(value)


_MIN_WINDOW_SECONDS = 1.0
"""The shortest `WindowCap` window. The ledger keys a window by ``floor(now / seconds) *
seconds``: an infinite length makes that NaN, a tiny one overflows."""


@dataclass(frozen=True)
class WindowCap:
    """An aggregate cap on all tasks of one type over a tumbling time window.

    Windows are aligned to the epoch: ``seconds=86400`` means UTC calendar days.

    Example:
        ```python
        from harness_nodes import Envelope, WindowCap

        research = Envelope(max_usd=2.0, type_cap=WindowCap(max_usd=50.0, seconds=86400))
        assert research.type_cap is not None and research.type_cap.max_usd == 50.0
        ```
    """

    max_usd: float
    """Dollars all tasks of the type may spend together in one window."""
    seconds: float = 86400.0
    """The window's length in seconds: finite, at least 1."""

    def __post_init__(self) -> None:
        _usd_to_nanos(self.max_usd, "WindowCap.max_usd")
        seconds = _number(self.seconds, "WindowCap.seconds")
        if not _MIN_WINDOW_SECONDS <= seconds < math.inf:  # False for NaN too
            raise UserError(
                f"WindowCap.seconds must be a finite number of seconds, at least "
                f"{_MIN_WINDOW_SECONDS:g}, got {self.seconds!r}"
            )


@dataclass(frozen=True)
class Envelope:
    """The limits of one task. Every limit is optional; set at least the ones you mean.

    Example:
        ```python
        from harness_nodes import Envelope

        envelope = Envelope(max_usd=0.50, max_calls=40, warn_at=0.8, exit_behavior="end")
        assert envelope.limits().max_nanos == 500_000_000
        ```
    """

    max_usd: float | None = None
    """Dollars the task may spend, reservations in flight included (at most $9,223,372,036.85:
    the ledger counts nano-dollars in 64-bit integers)."""
    max_tokens: int | None = None
    """Input + output tokens the task may use."""
    max_calls: int | None = None
    """LLM calls the task may make."""
    warn_at: float = 0.8
    """Fraction of ``max_usd`` at which a ``harness.budget.warn`` event is emitted (once)."""
    ladder: tuple[str, ...] = ()
    """Model names to use for this task type, most capable first (default: the wrapper's)."""
    exit_behavior: ExitBehavior = "end"
    """``"end"``: stop the task with outcome ``budget_exhausted``; ``"error"``: raise
    `BudgetExceeded`."""
    max_output_tokens: int = 4096
    """Output cap per call when the model declares none (the worst case that is reserved).
    Whichever cap applies is lowered to what the envelope has left — and never above what the
    ledger's 64-bit counts can hold, so an absurd cap is capped, not an overflow."""
    min_output_tokens: int = 256
    """A model "fits" only if at least this many output tokens remain affordable after the
    prompt; below that the wrapper steps down the ladder (or stops)."""
    type_cap: WindowCap | None = None
    """Aggregate cap shared by every task of the same type (e.g. $50/day for "research")."""

    def __post_init__(self) -> None:
        if self.max_usd is not None:
            _usd_to_nanos(self.max_usd, "Envelope.max_usd")
        for name in ("max_tokens", "max_calls", "max_output_tokens", "min_output_tokens"):
            value = getattr(self, name)
            if value is not None:
                _check_count(value, f"Envelope.{name}")
        if not 0 < _number(self.warn_at, "Envelope.warn_at") <= 1:
            raise UserError(f"Envelope.warn_at must be in (0, 1], got {self.warn_at!r}")
        if self.exit_behavior not in ("end", "error"):
            raise UserError(
                f"Envelope.exit_behavior must be 'end' or 'error', got {self.exit_behavior!r}"
            )
        if self.min_output_tokens > self.max_output_tokens:
            raise UserError("Envelope.min_output_tokens must not exceed max_output_tokens")
        if self.type_cap is not None and not isinstance(self.type_cap, WindowCap):
            raise UserError(
                f"Envelope.type_cap must be a WindowCap(max_usd=..., seconds=...), "
                f"got {self.type_cap!r}"
            )
        if isinstance(self.ladder, str) or not all(
            isinstance(m, str) and m for m in self.ladder
        ):  # a bare string would become a ladder of its letters
            raise UserError(
                f"Envelope.ladder must be a sequence of model names, got {self.ladder!r}"
            )
        object.__setattr__(self, "ladder", tuple(self.ladder))

    def limits(self) -> Limits:
        """The envelope as the ledger's limits (integer nano-dollars)."""
        cap = self.type_cap
        return Limits(
            max_nanos=None if self.max_usd is None else _usd_to_nanos(self.max_usd, "max_usd"),
            max_tokens=self.max_tokens,
            max_calls=self.max_calls,
            window_seconds=None if cap is None else float(cap.seconds),
            window_max_nanos=None if cap is None else _usd_to_nanos(cap.max_usd, "max_usd"),
        )


@dataclass(frozen=True)
class Envelopes:
    """Envelopes by task type, with a default for every other type.

    Example:
        ```python
        from harness_nodes import Envelope, Envelopes

        envelopes = Envelopes(
            default=Envelope(max_usd=0.10),
            by_type={"research": Envelope(max_usd=2.0, ladder=("gpt-4o", "gpt-4o-mini"))},
        )
        assert envelopes.for_type("research").max_usd == 2.0
        assert envelopes.for_type("support").max_usd == 0.10
        ```
    """

    default: Envelope
    """The envelope of any task type not listed."""
    by_type: Mapping[str, Envelope] = field(default_factory=dict)
    """Task type → envelope."""

    def __post_init__(self) -> None:
        for name, env in {"default": self.default, **self.by_type}.items():
            if not isinstance(env, Envelope):
                raise UserError(f"Envelopes[{name!r}] must be an Envelope, got {env!r}")

    def for_type(self, task_type: str) -> Envelope:
        """The envelope for *task_type*."""
        return self.by_type.get(task_type, self.default)

    def all(self) -> list[Envelope]:
        """Every envelope (the default first)."""
        return [self.default, *self.by_type.values()]


@dataclass(frozen=True)
class BudgetCheck:
    """What the budget allows for the next call of a task (see `BudgetedChatModel.check`).

    Example:
        ```python
        from langchain_core.messages import HumanMessage

        from harness_nodes import BudgetCheck, Envelope, budgeted
        from harness_nodes.testing import ScriptedChatModel, ai

        model = budgeted(
            ScriptedChatModel(script=[ai("hi")], loop=True, model_name="gpt-4o-mini"),
            envelope=Envelope(max_calls=1),
        )
        config = {"configurable": {"thread_id": "t-1"}}
        before: BudgetCheck = model.check([HumanMessage("hi")], config)
        model.invoke([HumanMessage("hi")], config)
        after: BudgetCheck = model.check([HumanMessage("hi")], config)
        assert (before.decision, before.model) == ("ok", "gpt-4o-mini")
        assert (after.decision, after.limit, after.used, after.maximum) == ("stop", "calls", 1, 1)
        assert after.spent_usd > 0
        ```
    """

    decision: Decision
    """``"ok"``: the first model of the ladder fits; ``"degrade"``: only a cheaper one does;
    ``"stop"``: none does."""
    task_id: str
    """The task."""
    model: str | None
    """The model the next call would use (None on stop)."""
    limit: str | None
    """On stop: which limit (``"usd"``, ``"tokens"``, ``"calls"``, ``"window_usd"``)."""
    used: float
    """How much of that limit is used (dollars for usd limits)."""
    maximum: float
    """The limit's value."""
    spent_usd: float
    """Dollars the task has spent (settled)."""


# --- token counting ------------------------------------------------------------------------

_MESSAGE_OVERHEAD_BYTES = 16  # role markers and separators a provider adds per message


def _message_bytes(m: BaseMessage) -> int:
    content = m.content if isinstance(m.content, str) else json.dumps(m.content, default=str)
    size = len(content.encode("utf-8")) + _MESSAGE_OVERHEAD_BYTES
    if isinstance(m, AIMessage) and m.tool_calls:
        size += len(json.dumps([dict(c) for c in m.tool_calls], default=str).encode("utf-8"))
    if isinstance(m, ToolMessage):
        size += len(m.tool_call_id.encode("utf-8"))
    if m.name:
        size += len(m.name.encode("utf-8"))
    return size


def _tools_schemas(tools: Sequence[Any]) -> list[str]:
    schemas = []
    for t in tools:
        try:
            schema: Any = convert_to_openai_tool(t)
        except Exception:  # an exotic tool: count its repr
            schema = repr(t)
        schemas.append(json.dumps(schema, default=str))
    return schemas


def _tools_bytes(tools: Sequence[Any]) -> int:
    return sum(len(s.encode("utf-8")) for s in _tools_schemas(tools))


def bytes_bound(messages: Sequence[BaseMessage], tools: Sequence[Any] = ()) -> int:
    """A conservative token count: UTF-8 bytes of the prompt (every BPE token is >= 1 byte)."""
    return sum(_message_bytes(m) for m in messages) + _tools_bytes(tools)


def _message_key(m: BaseMessage) -> tuple[Any, ...]:
    """What `_message_bytes` counts of a message, as a hashable value."""
    content = m.content if isinstance(m.content, str) else json.dumps(m.content, default=str)
    calls = repr(m.tool_calls) if isinstance(m, AIMessage) and m.tool_calls else None
    call_id = m.tool_call_id if isinstance(m, ToolMessage) else None
    return (m.type, content, m.name, calls, call_id)


def _fingerprint(keys: Iterable[tuple[Any, ...]], tools: int) -> int:
    """A fingerprint of a prompt: its messages' `_message_key` and the bound tools' *tools*.

    Python's hash: cached on each string, so checking a long history again costs about a
    microsecond per message. It differs from process to process; there a check just fails
    (the byte bound is used: the safe side).
    """
    return hash((tools, *keys))


_BASE_COUNTER = BaseLanguageModel.get_num_tokens_from_messages


def _own_counter(model: BaseChatModel) -> bool:
    return type(model).get_num_tokens_from_messages is not _BASE_COUNTER


# --- model names ---------------------------------------------------------------------------


def _model_name(model: Any) -> str | None:
    for attr in ("model_name", "model", "model_id", "deployment_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    bound = getattr(model, "bound", None)
    return _model_name(bound) if bound is not None and bound is not model else None


def _response_model(msg: AIMessage) -> str | None:
    meta = msg.response_metadata or {}
    for key in ("model_name", "model"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _priced_name(pricing: Pricing, called: str | None, reported: str | None) -> str:
    """The name a call is priced under (``""``: none, the fallback's price).

    The model called, when it has a price of its own: it is what the reservation was priced
    at, and what the provider bills (OpenAI answers ``gpt-4o`` as ``gpt-4o-2024-08-06``, which
    your override for ``gpt-4o`` does not name). Else the model the answer names, when that
    has one (a deployment or router name priced by the fallback).
    """
    if called and pricing.is_priced(called):
        return called
    if reported and pricing.is_priced(reported):
        return reported
    return called or reported or ""


# --- reported usage ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Usage:
    """The token counts an answer reports, checked (LangChain's ``usage_metadata``)."""

    input: int
    """Every prompt token, cached ones included."""
    output: int
    """Output tokens (reasoning included)."""
    cache_read: int
    """Prompt tokens read from the provider's cache."""
    cache_write: int
    """Prompt tokens written to the provider's cache (Anthropic's ``cache_creation``)."""
    cache_write_1h: int
    """Of those, tokens written to the 1-hour cache (billed higher than the 5-minute one)."""
    service_tier: str | None = None
    """The tier the provider answered at when it bills it apart (OpenAI's ``"priority"``,
    ``"flex"``); None: the standard one."""


_SERVICE_TIERS = ("priority", "flex")
"""The tiers langchain-openai reports apart: it names the cached and reasoning tokens of a
call answered at one ``{tier}_cache_read`` and ``{tier}_reasoning`` (no ``cache_read``), and
its other tokens ``{tier}``."""


def _asks_priority(model: Any, kwargs: Mapping[str, Any] | None) -> bool:
    """Whether a call asks OpenAI's priority tier: reserved at its prices (about 1.7x).

    ``ChatOpenAI(service_tier="priority")``, its ``model_kwargs``, or the call's own kwargs.
    A project whose default tier is priority is not seen here: its calls are settled at the
    tier's prices but reserved at standard ones (see the README).
    """
    asked = (kwargs or {}).get("service_tier") or getattr(model, "service_tier", None)
    if asked is None:
        extra = getattr(model, "model_kwargs", None)
        asked = extra.get("service_tier") if isinstance(extra, Mapping) else None
    return asked == "priority"


_MOST_TOKENS = 2**40
"""More tokens than any call is billed for (a trillion): a count above it is malformed, and
priced as given it would overflow the ledger's 64-bit counts."""


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MOST_TOKENS


def _reported_usage(usage: object) -> _Usage | str:
    """The usage an answer reports, or why it cannot be priced.

    A count that is not a whole number from 0 to 2**40 (negative, NaN, a fraction, text,
    missing, absurdly large) makes the whole usage malformed: priced as given it could be a
    credit, nothing, or more than the ledger can hold.
    """
    if usage is None:
        return "reported no usage"
    if not isinstance(usage, Mapping):
        return f"reported malformed usage {usage!r}"
    details = usage.get("input_token_details") or {}
    if not isinstance(details, Mapping):
        return f"reported malformed usage (input_token_details={details!r})"
    tier = next((t for t in _SERVICE_TIERS if t in details or f"{t}_cache_read" in details), None)
    read_key = f"{tier}_cache_read" if tier else "cache_read"
    counts = {
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        read_key: details.get(read_key) or details.get("cache_read") or 0,
        "cache_creation": details.get("cache_creation") or 0,
        "ephemeral_5m_input_tokens": details.get("ephemeral_5m_input_tokens") or 0,
        "ephemeral_1h_input_tokens": details.get("ephemeral_1h_input_tokens") or 0,
    }
    bad = ", ".join(f"{k}={v!r}" for k, v in counts.items() if not _is_count(v))
    if bad:
        return (
            f"reported malformed usage ({bad}: token counts are whole numbers from 0 to "
            f"{_MOST_TOKENS})"
        )
    inp, out, read, creation, five_min, one_hour = (cast(int, v) for v in counts.values())
    # langchain-anthropic gives the writes as cache_creation, or split by cache lifetime
    # (cache_creation then 0 in recent versions, the total of the split in older ones).
    written = max(creation, five_min + one_hour)
    if read + written > inp:
        return (
            f"reported malformed usage (cache_read={read} + cache writes={written} > "
            f"input_tokens={inp})"
        )
    return _Usage(inp, out, read, written, one_hour, tier)


def _usage_cost(pricing: Pricing, model: str, usage: _Usage) -> int:
    """What *usage* costs on *model*, in nano-dollars (cache reads and writes included)."""
    return pricing.cost_nanos(
        model,
        usage.input,
        usage.output,
        usage.cache_read,
        cache_write_tokens=usage.cache_write,
        cache_write_1h_tokens=usage.cache_write_1h,
        service_tier=usage.service_tier,
    )


def _added(usages: list[_Usage]) -> _Usage:
    """The usages of a call's answers, added up count by count (at the dearest tier)."""
    inp, out, read, written, one_hour = (
        sum(counts) for counts in zip(*(astuple(u)[:-1] for u in usages), strict=True)
    )
    tiers = {u.service_tier for u in usages}
    # Answers at different tiers (none known): price them all at the dearer one.
    tier = "priority" if "priority" in tiers else (tiers.pop() if len(tiers) == 1 else None)
    return _Usage(inp, out, read, written, one_hour, tier)


# --- planning (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    index: int
    name: str
    cap: int
    input_tokens: int
    nanos: int
    lowered_by: str | None = None
    """The limit that lowered *cap* below the call's own (``None``: the call's own cap)."""
    uncapped: int = 0
    """The call's own output cap, before the envelope lowered it."""


@dataclass(frozen=True)
class _Refusal:
    limit: str
    used: float
    maximum: float


@dataclass(frozen=True)
class _Context:
    task_id: str
    task_type: str
    envelope: Envelope
    limits: Limits
    ladder: list[tuple[str, BaseChatModel]]
    positions: list[int]
    """Index in the wrapper's models of each ladder entry."""


def _plan(
    ctx: _Context,
    rates: list[Rates],
    output_caps: list[int],
    inputs: list[int],
    totals: Totals,
) -> _Plan | _Refusal:
    lim, env = ctx.limits, ctx.envelope
    if lim.max_calls is not None and totals.calls + 1 > lim.max_calls:
        return _Refusal("calls", totals.calls, lim.max_calls)
    # What the envelope has left, and never more than the ledger can hold: an output cap of
    # 10**30 is capped like any other (or refused at the end of the ledger's range).
    budgets: list[tuple[str, int]] = []
    nanos_left = _ledger_room(totals.committed_nanos)
    if lim.max_nanos is not None:
        nanos_left = min(nanos_left, lim.max_nanos - totals.committed_nanos)
    budgets.append(("usd", nanos_left))
    if lim.window_seconds is not None:  # the type's window is a running total too
        window_left = _ledger_room(totals.window_nanos)
        if lim.window_max_nanos is not None:
            window_left = min(window_left, lim.window_max_nanos - totals.window_nanos)
        budgets.append(("window_usd", window_left))
    tokens_left = _ledger_room(totals.committed_tokens)
    if lim.max_tokens is not None:
        tokens_left = min(tokens_left, lim.max_tokens - totals.committed_tokens)
    blocked = "usd"
    for i, (name, _) in enumerate(ctx.ladder):
        r, call_max, input_tokens = rates[i], output_caps[i], inputs[i]
        cap = min(call_max, tokens_left - input_tokens)
        if cap < min(env.min_output_tokens, call_max):
            blocked = "tokens"
            continue
        lowered_by = "tokens" if cap < call_max else None
        why = None
        for limit, nanos_left in budgets:
            affordable = r.affordable_output_tokens(input_tokens, max(0, nanos_left))
            if affordable < cap:
                cap, lowered_by = affordable, limit
            if cap < min(env.min_output_tokens, call_max):
                why = limit
                break
        if why is not None:
            blocked = why
            continue
        nanos = r.worst_case_nanos(input_tokens, cap)
        return _Plan(i, name, cap, input_tokens, nanos, lowered_by, call_max)
    # With no limit of its own, the maximum is the ledger's (a task at the end of its range).
    if blocked == "tokens":
        return _Refusal("tokens", totals.committed_tokens, _or_int64(lim.max_tokens))
    if blocked == "window_usd":
        window_max = _or_int64(lim.window_max_nanos)
        return _Refusal("window_usd", _usd(totals.window_nanos), _usd(window_max))
    return _Refusal("usd", _usd(totals.committed_nanos), _usd(_or_int64(lim.max_nanos)))


def _or_int64(limit: int | None) -> int:
    return _INT64_MAX if limit is None else limit


def _budget_meta(m: BaseMessage) -> dict[str, Any]:
    harness = (m.additional_kwargs or {}).get("harness") or {}
    budget = harness.get("budget") if isinstance(harness, dict) else None
    return budget if isinstance(budget, dict) else {}


def _cut_at_cap(msg: AIMessage) -> bool:
    """Whether the provider says *msg* stopped because it reached its output cap."""
    return _verify.cut_at_cap(msg) is not None


def _limit_figures(lim: Limits, limit: str, totals: Totals) -> tuple[float, float]:
    """``(used, maximum)`` of *limit* in *totals*, in the units a `_Refusal` reports."""
    if limit == "tokens":
        return totals.committed_tokens, _or_int64(lim.max_tokens)
    if limit == "window_usd":
        return _usd(totals.window_nanos), _usd(_or_int64(lim.window_max_nanos))
    return _usd(totals.committed_nanos), _usd(_or_int64(lim.max_nanos))


def _settled(ctx: _Context, reserved: Totals, plan: _Plan, cost: int, tokens: int) -> Totals:
    """The totals after settling *plan*'s reservation at *cost*, from the reservation's view."""
    window = reserved.window_nanos
    if ctx.limits.window_seconds is not None:
        window = max(0, window - plan.nanos + cost)
    return Totals(
        reserved_nanos=max(0, reserved.reserved_nanos - plan.nanos),
        spent_nanos=reserved.spent_nanos + cost,
        reserved_tokens=max(0, reserved.reserved_tokens - plan.input_tokens - plan.cap),
        spent_tokens=reserved.spent_tokens + tokens,
        calls=reserved.calls,
        window_nanos=window,
    )


@functools.cache
def _transport_errors() -> tuple[tuple[type[BaseException], ...], ...]:
    """``(not sent, sent and awaited, timeouts)``: the error classes `_maybe_billed` tells apart.

    The first two are the HTTP clients' that provider SDKs send through: httpx,
    langchain-core's own dependency, and httpx2, its successor (genai-prices depends on it),
    which current openai SDKs (3.x) send through. A client missing from the environment is
    simply not looked for. The last is langchain-core's provider-neutral
    ``ModelTimeoutError`` (recent langchain-core; integrations raise it over the SDK's own).
    """
    not_sent: list[type[BaseException]] = []
    awaited: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            client = importlib.import_module(name)
        except ImportError:
            continue
        not_sent += [client.ConnectTimeout, client.PoolTimeout, client.ConnectError]
        # A read or write timeout, or the connection dropped while the answer was awaited or
        # read: the request went out.
        awaited += [client.TimeoutException, client.ReadError, client.RemoteProtocolError]
    import langchain_core.exceptions

    timeout = getattr(langchain_core.exceptions, "ModelTimeoutError", None)
    timeouts = (timeout,) if isinstance(timeout, type) else ()
    return tuple(not_sent), (TimeoutError, *awaited), timeouts


# Functions that turn a provider's answer into LangChain's result: the answer arrived (a success
# status: an error status raises before them), so an error raised in one of them is raised after
# the call was billed. langchain-openai's (and the integrations built on it, for any
# OpenAI-compatible endpoint) raises a bare ``TypeError`` or ``ValueError`` there on a 200 whose
# body its SDK, with its lax validation (the default), let through: ``choices`` missing or
# malformed, an HTML page.
_ANSWER_READERS = frozenset({"_create_chat_result"})


def _answered(error: BaseException) -> bool:
    """Whether *error* was raised reading an answer the provider gave with a success status.

    An SDK's own error for an unreadable answer carries the HTTP response (openai's and
    anthropic's ``APIResponseValidationError``: a body that is not JSON, or does not fit their
    schema); a body that does not decode is ``json.JSONDecodeError``, one that does not fit a
    pydantic model is pydantic's ``ValidationError``; and LangChain's integrations raise while
    building the message from it (`_ANSWER_READERS`).
    """
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return 200 <= status < 300  # an error status is the provider's refusal: not billed
    if isinstance(error, (json.JSONDecodeError, ValidationError)):
        return True
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _ANSWER_READERS:
            return True
        tb = tb.tb_next
    return False


def _maybe_billed(error: BaseException, *, answering: bool = False) -> str | None:
    """Why a call that ended in *error* may still be billed by its provider, else ``None``.

    The one place that tells a billed failure from a free one (docs/decisions/0004). A
    cancellation (asyncio's, a stream closed early, Ctrl-C) can come at any moment after the
    request went out, and a read or write timeout, or a connection dropped while the answer was
    awaited, comes after it did: the provider may still be generating, and bills what it
    generates. An answer the provider gave with a success status but that cannot be read (a
    malformed or truncated body, one the client's schema rejects: `_answered`) was generated,
    and billed, in full. A provider's error answer (an auth error, a rejected request, a rate
    limit: a 4xx or 5xx status) is not billed, nor is a failure to connect (the request never
    left). Provider SDKs wrap their client's error in their own (openai's and anthropic's
    ``APITimeoutError`` over httpx's or httpx2's, itself over httpcore's), and LangChain's
    integrations wrap that again: the error's causes are looked at, and a timeout none of them
    explains (langchain-core's ``ModelTimeoutError``, from a client the harness does not know)
    counts as one after the request went out.

    A streamed call that breaks once *answering* (its first chunk arrived: the provider accepted
    the request with a success status and was generating) is billed whatever broke it: a
    malformed chunk, an error event in the stream (openai's bare ``APIError``, with no status),
    the connection dropped, a chunk the client cannot convert (a bare ``TypeError``). The
    provider bills the prompt in full and what it generated before it noticed, which the
    stream never reported.

    Args:
        error: What the call raised.
        answering: Whether the answer had started to stream when it was raised.

    Returns:
        ``"cancelled"``, ``"timed out"``, ``"answer unreadable"`` or ``"stream broken"``
        (recorded on the call's ``budget.settle`` event and in the log), or ``None``: not
        billed, released.
    """
    if not isinstance(error, Exception):
        return "cancelled"  # CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit
    if answering:
        return "stream broken"
    not_sent, awaited, timeouts = _transport_errors()
    timed_out = False
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, not_sent):
            return None
        if isinstance(cause, awaited):
            return "timed out"
        if _answered(cause):
            return "answer unreadable"
        timed_out = timed_out or isinstance(cause, timeouts)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return "timed out" if timed_out else None


@dataclass(slots=True)
class _Call:
    """The model call `_flow` asks its driver to make."""

    index: int
    """The ladder position of the model to call."""
    cap: int
    """Its output cap."""
    answering: bool = False
    """Set by the driver when the answer's first chunk arrives (see `_maybe_billed`)."""


class _AnswerWatch(BaseCallbackHandler):
    """Marks a call answering when its model, streaming under ``invoke``, hands its first chunk.

    A chat model streams inside ``invoke`` when a streaming handler listens (a graph run with
    ``stream_mode="messages"``, ``astream_events``) or it is told to (``streaming=True``): its
    chunks then reach only the run's handlers, this one among them.
    """

    run_inline = True  # called in the model's own thread or task, before its next chunk

    def __init__(self, call: _Call) -> None:
        self.call = call

    @property
    def ignore_chat_model(self) -> bool:
        return True

    @property
    def ignore_retriever(self) -> bool:
        return True

    @property
    def ignore_chain(self) -> bool:
        return True

    @property
    def ignore_agent(self) -> bool:
        return True

    @property
    def ignore_custom_event(self) -> bool:
        return True

    def on_llm_new_token(self, *args: Any, **kwargs: Any) -> None:
        """The answer started."""
        self.call.answering = True


def _may_stream(model: Any, config: RunnableConfig, kwargs: Mapping[str, Any]) -> bool:
    """Whether *model* may stream its answer inside ``invoke`` (langchain-core's rule)."""
    if kwargs.get("stream") or getattr(model, "streaming", False) is True:
        return True
    callbacks = config.get("callbacks")
    handlers = getattr(callbacks, "handlers", callbacks)
    if not isinstance(handlers, list) or not handlers:
        return False
    if _STREAMING_HANDLER is None:  # langchain-core moved it: watch whenever handlers listen
        return True
    return any(isinstance(h, _STREAMING_HANDLER) for h in handlers)


def _streaming_handler() -> type | None:
    """langchain-core's marker class of handlers that make ``invoke`` stream (a private name)."""
    try:
        from langchain_core.tracers._streaming import _StreamingCallbackHandler
    except ImportError:  # pragma: no cover - a langchain-core without it
        return None
    return cast(type, _StreamingCallbackHandler)


_STREAMING_HANDLER = _streaming_handler()


def _watched(call: _Call, model: Any, child: RunnableConfig, kwargs: Mapping[str, Any]) -> Any:
    """*child*, with `_AnswerWatch` on *call* when *model* may stream under ``invoke``."""
    if not _may_stream(model, child, kwargs):
        return child
    return merge_configs(child, {"callbacks": [_AnswerWatch(call)]})


def _defer(ledger: SpendLedger | AsyncSpendLedger, args: tuple[Any, ...]) -> None:
    """Defer a settlement: no I/O, and no ``await`` (a cancellation cannot cut it short)."""
    task_id, spend_id, inp, out, nanos, model, lease = args
    ledger.defer_settle(task_id, spend_id, inp, out, nanos, model=model, lease=lease)


def _forgo(ledger: SpendLedger | AsyncSpendLedger, args: tuple[Any, ...]) -> None:
    """Give back a reservation whose call was never made, deferred like a settlement."""
    task_id, spend_id = args
    ledger.defer_settle(task_id, spend_id, 0, 0, 0, released=True)


def _ledger_op(ledger: SpendLedger, op: str, args: tuple[Any, ...]) -> Any:
    if op == "totals":
        return ledger.totals(*args)
    if op == "reserve":
        return ledger.reserve(*args)
    if op == "defer":
        return _defer(ledger, args)
    if op == "forgo":
        return _forgo(ledger, args)
    if op == "flush_held":
        return ledger.flush_held(*args)
    return ledger.settle(args[0], 0, 0, 0, released=True)


async def _aledger_op(ledger: AsyncSpendLedger, op: str, args: tuple[Any, ...]) -> Any:
    if op == "totals":
        return await ledger.totals(*args)
    if op == "reserve":
        return await ledger.reserve(*args)
    if op == "flush_held":
        return await ledger.flush_held(*args)
    return await ledger.settle(args[0], 0, 0, 0, released=True)


# --- the wrapper ---------------------------------------------------------------------------


def _private(model: BaseModel) -> dict[str, Any]:
    """A pydantic model's private attributes, read straight from their slot.

    ``model._x`` goes through pydantic's ``__getattr__`` (~3.5 µs); the hot path reads a dozen
    of them per call.
    """
    return cast(dict[str, Any], model.__pydantic_private__)


class BudgetedChatModel(BaseChatModel):
    """A chat model (or a ladder of them) that cannot spend past its task's envelope.

    Build it with `budgeted`. It is a LangChain chat model: ``bind_tools``, ``invoke``,
    ``ainvoke``, ``batch`` and ``stream`` work, inside LangGraph nodes or anywhere else.

    Example:
        ```python
        from langchain_core.messages import HumanMessage

        from checkpointers import open_backend
        from harness_nodes import BudgetedChatModel, Envelope, budgeted
        from harness_nodes.testing import ScriptedChatModel, ai

        strong = ScriptedChatModel(script=[ai("from 4o")], loop=True, model_name="gpt-4o")
        cheap = ScriptedChatModel(script=[ai("from mini")], loop=True, model_name="gpt-4o-mini")
        with open_backend("memory://") as backend:  # the spend ledger (shared across processes)
            model: BudgetedChatModel = budgeted(
                [strong, cheap], envelope=Envelope(max_usd=0.001, max_calls=2), backend=backend
            )
            config = {"configurable": {"thread_id": "ticket-1"}}
            answers = [model.invoke([HumanMessage("hi")], config) for _ in range(3)]
        # $0.001 cannot pay for a gpt-4o answer: the ladder degrades to gpt-4o-mini ...
        assert [a.content for a in answers[:2]] == ["from mini", "from mini"]
        assert answers[0].additional_kwargs["harness"]["budget"]["degraded_from"] == "gpt-4o"
        # ... and the third call is refused without calling any model.
        assert answers[2].additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "calls"
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    models: list[BaseChatModel]
    """The ladder, most capable (and expensive) first."""
    names: list[str]
    """The price name of each model (``""`` when unknown until priced by the fallback)."""
    envelopes: SkipValidation[Envelopes]
    """Limits per task type."""
    pricing: SkipValidation[Pricing] = Field(default_factory=Pricing)
    """Where prices come from."""
    backend: Any = None
    """A `Backend` or `AsyncBackend` holding the spend ledger."""
    task_type: str = "default"
    """Task type when the config does not give one (``configurable["task_type"]``)."""
    task_id: str | None = None
    """Task id when the config gives neither ``task_id`` nor ``thread_id``."""
    token_counter: Literal["auto", "bytes"] | Callable[..., int] = "auto"
    """``"auto"``: the model's own offline counter if it has one that works, else the UTF-8
    byte bound; ``"bytes"``: always the byte bound (a hard upper bound); or a function of the
    messages. The bound tools' schemas are added to each, as their UTF-8 bytes."""
    tools: list[Any] = Field(default_factory=list)
    """Tools bound with `bind_tools` (bound on each model of the ladder)."""
    tool_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra arguments given to `bind_tools`."""
    sync_commit: bool = True
    """Postgres: make each reservation durable (wait for its WAL flush) before the call.
    ``False`` saves that wait (~1-3 ms); a database *server* crash could then forget
    reservations of calls in flight (an application crash cannot)."""
    lease: int = 1
    """Postgres: a reservation may book room for this many calls like it at once (when that
    leaves at least as much again under every limit); the next calls that fit are granted
    from it in memory, with no round trip. The cap holds either way. The unused rest goes
    back when the lease cannot serve a call, after `LEASE_IDLE` seconds, at ``close()`` and
    at exit; a process *killed* holding a lease leaves that rest booked (the task has less
    room, never more). ``1``: every call is reserved on its own (exact after any crash)."""

    _default_task: str = PrivateAttr(default_factory=lambda: f"budgeted-{uuid.uuid4().hex}")
    _bound: dict[int, Runnable[Any, Any]] = PrivateAttr(default_factory=dict)
    _counter_failed: set[int] = PrivateAttr(default_factory=set)
    _tools_sig: list[tuple[int, int]] = PrivateAttr(default_factory=list)
    """The bound tools' schema bytes and fingerprint, computed once (schemas do not change)."""
    _deferred: dict[int, None] = PrivateAttr(default_factory=dict)
    """Spend ids whose settlement this process deferred (it will land, or the process died)."""
    _lock: Any = PrivateAttr(default_factory=threading.Lock)
    # A one-slot list so that copies (bind_tools) share the private ledger opened lazily.
    _owned_backend: list[Any] = PrivateAttr(default_factory=lambda: [None])

    @property
    def _llm_type(self) -> str:
        return "budgeted"

    # -- configuration ------------------------------------------------------------------

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> BudgetedChatModel:
        """Bind *tools* on every model of the ladder (the wrapper stays budgeted).

        The copy shares the ledger (and this process's view of each task), not the bindings.
        """
        copy = self.model_copy(update={"tools": list(tools), "tool_kwargs": dict(kwargs)})
        copy._bound = {}
        copy._tools_sig = []
        return copy

    def _runnable(self, index: int) -> Runnable[Any, Any]:
        if not self.tools:
            return self.models[index]
        own = _private(self)
        with own["_lock"]:
            bound: Runnable[Any, Any] | None = own["_bound"].get(index)
            if bound is None:
                bound = self.models[index].bind_tools(self.tools, **self.tool_kwargs)
                own["_bound"][index] = bound
        return bound

    def _ledger(self) -> SpendLedger:
        from checkpointers import Backend, open_backend

        backend = self.backend
        if backend is None:
            own = _private(self)
            with own["_lock"]:
                if own["_owned_backend"][0] is None:
                    own["_owned_backend"][0] = open_backend("memory://")
                backend = own["_owned_backend"][0]
        if not isinstance(backend, Backend):
            raise UserError(
                "invoke() needs a sync Backend (open_backend); with an AsyncBackend use ainvoke()"
            )
        return SpendLedger(backend, sync_commit=self.sync_commit, lease=self.lease)

    async def _aready(self) -> None:
        """Open the model's own in-memory ledger (no *backend* given) off the event loop.

        Opening it is SQLite work: on the loop it would block every other coroutine (an
        ASGI server — ``langgraph dev`` — refuses such a call outright).
        """
        if self.backend is None and _private(self)["_owned_backend"][0] is None:
            await asyncio.to_thread(self._ledger)

    def _aledger(self) -> AsyncSpendLedger | SpendLedger:
        from checkpointers import AsyncBackend

        if isinstance(self.backend, AsyncBackend):
            return AsyncSpendLedger(self.backend, sync_commit=self.sync_commit, lease=self.lease)
        return self._ledger()

    def _context(self, config: RunnableConfig) -> _Context:
        conf = config.get("configurable") or {}
        meta = config.get("metadata") or {}
        task_id = str(
            conf.get("task_id")
            or conf.get("thread_id")
            or self.task_id
            or _private(self)["_default_task"]
        )
        task_type = str(conf.get("task_type") or meta.get("task_type") or self.task_type)
        envelope = self.envelopes.for_type(task_type)
        positions = list(range(len(self.models)))
        if envelope.ladder:
            positions = [self.names.index(n) for n in envelope.ladder]
        pairs = [(self.names[i], self.models[i]) for i in positions]
        return _Context(task_id, task_type, envelope, envelope.limits(), pairs, positions)

    def _rates(self, ctx: _Context, kwargs: Mapping[str, Any] | None = None) -> list[Rates]:
        out = []
        for name, model in ctx.ladder:
            if not name:
                if self.pricing.fallback is None:
                    raise UnpricedModelError(f"<{type(model).__name__}: no model name>")
                out.append(self.pricing.fallback.rates())
            elif _asks_priority(model, kwargs):
                out.append(self.pricing.tier_rates(name, "priority"))
            else:
                out.append(self.pricing.rates(name))
        return out

    def _output_caps(self, ctx: _Context, requested: int | None) -> list[int]:
        caps = []
        for _, model in ctx.ladder:
            own = getattr(model, "max_tokens", None)
            cap = own if isinstance(own, int) and own > 0 else ctx.envelope.max_output_tokens
            if requested is not None:
                cap = min(cap, requested)
            caps.append(cap)
        return caps

    def count_tokens(
        self, messages: Sequence[BaseMessage], model: BaseChatModel | None = None
    ) -> int:
        """The prompt's token count used for the reservation (see `token_counter`).

        Example:
            ```python
            from langchain_core.messages import HumanMessage

            from harness_nodes import Envelope, budgeted
            from harness_nodes.testing import ScriptedChatModel

            model = budgeted(ScriptedChatModel(model_name="gpt-4o"), envelope=Envelope())
            assert model.count_tokens([HumanMessage("héllo")]) >= 6  # bytes, not characters
            ```
        """
        # The bound tools' schemas are part of the prompt the provider bills, and are bounded
        # by their bytes whatever counts the messages: ChatOpenAI's own counter ignores the
        # tools it is given (with a warning on every call), and a counter function sees the
        # messages only. Counted twice by a counter that does count them: the safe side.
        tools_bound = self._tools_signature()[0]
        counter = self.token_counter
        if callable(counter):
            return int(counter(list(messages))) + tools_bound
        model = model or self.models[0]
        if (
            counter == "auto"
            and _own_counter(model)
            and id(model) not in _private(self)["_counter_failed"]
        ):
            try:
                return int(model.get_num_tokens_from_messages(list(messages))) + tools_bound
            except Exception:  # offline tokenizers fail in many ways
                with _private(self)["_lock"]:
                    _private(self)["_counter_failed"].add(id(model))
        return bytes_bound(messages) + tools_bound

    def _tools_signature(self) -> tuple[int, int]:
        """The bound tools' schema bytes and fingerprint (computed once per bound copy)."""
        sig: list[tuple[int, int]] = _private(self)["_tools_sig"]
        if not sig:
            schemas = _tools_schemas(self.tools)
            sig.append((sum(len(s.encode("utf-8")) for s in schemas), hash(tuple(schemas))))
        return sig[0]

    # -- the call -----------------------------------------------------------------------

    def _child_config(self, config: RunnableConfig) -> RunnableConfig:
        child = cast(RunnableConfig, {k: v for k, v in config.items() if k != "run_id"})
        child["metadata"] = {**(config.get("metadata") or {}), "harness_budgeted": True}
        return child

    def _note_deferred(self, spend_id: int) -> None:
        own = _private(self)
        with own["_lock"]:
            if len(own["_deferred"]) > 4096:
                own["_deferred"].clear()
            own["_deferred"][spend_id] = None

    def _recoverable(
        self, ctx: _Context, messages: Sequence[BaseMessage]
    ) -> list[tuple[str, int, int, int, int, None, tuple[int, int, int] | None]]:
        """Settlements of the task's last answers, when this process never deferred them.

        An answer in the checkpoint whose settlement was still pending when its process died
        left its reservation booked at the worst case; the answer itself records what the call
        really cost. Settling it again is a no-op when it did land. Each reservation statement
        carries the settlements before it, so only the answers since the last one can have
        lost theirs: the last answer, or the last ``lease`` answers with a lease.
        """
        found: list[tuple[str, int, int, int, int, None, tuple[int, int, int] | None]] = []
        for k in range(len(messages) - 1, -1, -1):
            if len(found) >= self.lease:
                break
            budget = _budget_meta(messages[k])
            if not budget:
                continue
            spend_id = budget.get("spend_id")
            inp, out = budget.get("input_tokens"), budget.get("output_tokens")
            usd = budget.get("spent_usd")
            if (
                not isinstance(spend_id, int)
                or budget.get("task_id") != ctx.task_id
                or not isinstance(inp, int)
                or not isinstance(out, int)
                or not isinstance(usd, int | float)
            ):
                break
            with _private(self)["_lock"]:
                if spend_id in _private(self)["_deferred"]:
                    break
            lease = None
            lease_id, reserved = budget.get("lease_id"), budget.get("reserved_usd")
            reserved_tokens = budget.get("reserved_tokens")
            if isinstance(lease_id, int):  # granted from a lease: no row until settled
                if not isinstance(reserved, int | float) or not isinstance(reserved_tokens, int):
                    break
                lease = (lease_id, round(reserved * NANOS_PER_USD), reserved_tokens)
            self._note_deferred(spend_id)
            found.append((ctx.task_id, spend_id, inp, out, round(usd * NANOS_PER_USD), None, lease))
        return found

    def _views(self) -> PendingSettles:
        """Where this process keeps its latest view of each task's totals (per backend)."""
        from checkpointers import AsyncBackend

        if isinstance(self.backend, AsyncBackend):
            return _async_pending(self.backend).pending
        return self._ledger()._store.pending

    def _remember(self, task_id: str, totals: Totals) -> None:
        self._views().note_view(task_id, totals)

    def _stop(
        self, ctx: _Context, refusal: _Refusal, totals: Totals
    ) -> tuple[AIMessage, dict[str, Any]]:
        data = {
            "task_id": ctx.task_id,
            "limit": refusal.limit,
            "used": refusal.used,
            "maximum": refusal.maximum,
        }
        if ctx.envelope.exit_behavior == "error":
            raise BudgetExceeded(ctx.task_id, refusal.limit, refusal.used, refusal.maximum)
        msg = AIMessage(
            content=(
                f"Budget exhausted for this task ({refusal.limit}: used {refusal.used:g} of "
                f"{refusal.maximum:g}); no further model call was made."
            ),
            additional_kwargs={
                "harness": {
                    "budget": {
                        "model": None,
                        "degraded_from": None,
                        "reserved_usd": 0.0,
                        "spent_usd": 0.0,
                        "task_id": ctx.task_id,
                        "task_spent_usd": _usd(totals.spent_nanos),
                        "stopped": data,
                    }
                }
            },
        )
        return msg, data

    def _settle_figures(self, name: str, msg: AIMessage, plan: _Plan) -> tuple[str, int, int, int]:
        usage = _reported_usage(msg.usage_metadata)
        if isinstance(usage, str):
            # Nothing to price, or nothing to trust: keep the worst case we reserved (never
            # silently free, never a credit).
            log.warning(
                "%s %s; the call is recorded at its reserved worst case (%d input and %d "
                "output tokens, $%.6f)",
                name or "a model",
                usage,
                plan.input_tokens,
                plan.cap,
                _usd(plan.nanos),
            )
            return name, plan.input_tokens, plan.cap, plan.nanos
        inp, out = usage.input, usage.output
        priced = _priced_name(self.pricing, name, _response_model(msg))
        if not priced:  # an unnamed model priced by the declared fallback
            fallback = self.pricing.fallback
            assert fallback is not None  # _rates() refused the call otherwise
            return name, inp, out, fallback.rates().worst_case_nanos(inp, out)
        # Recorded under the name the ladder calls it (the spend mirror's by_model).
        return name or priced, inp, out, _usage_cost(self.pricing, priced, usage)

    def _annotate(
        self,
        msg: AIMessage,
        ctx: _Context,
        plan: _Plan,
        cost: int,
        totals: Totals,
        inp: int,
        out: int,
        reservation: Reservation,
        prompt: list[tuple[Any, ...]],
    ) -> AIMessage:
        harness = dict((msg.additional_kwargs or {}).get("harness") or {})
        budget: dict[str, Any] = {
            "spend_id": reservation.id,
            "model": plan.name,
            "degraded_from": ctx.ladder[0][0] if plan.index > 0 else None,
            "reserved_usd": _usd(plan.nanos),
            "spent_usd": _usd(cost),
            "task_id": ctx.task_id,
            "task_spent_usd": _usd(totals.spent_nanos),
            "input_tokens": inp,
            "output_tokens": out,
            # Which prompt *inp* counted: the next call's estimate anchors on it only if the
            # messages before this answer are still exactly that prompt.
            "prompt_messages": len(prompt),
            "prompt_fingerprint": _fingerprint(prompt, self._tools_signature()[1]),
        }
        if plan.lowered_by is not None and _cut_at_cap(msg):
            # The answer ran into the cap the envelope lowered: its work (a tool call, the
            # rest of the text) was cut for want of budget, so it ends the task as a budget
            # stop, not as a completion (`BudgetGuard.finish`, `CostEnvelopeMiddleware`).
            used, maximum = _limit_figures(ctx.limits, plan.lowered_by, totals)
            budget["truncated"] = {
                "task_id": ctx.task_id,
                "limit": plan.lowered_by,
                "used": used,
                "maximum": maximum,
                "output_cap": plan.cap,
                "uncapped": plan.uncapped,
            }
        if reservation.lease_id is not None:  # enough to settle it again after a crash
            budget["lease_id"] = reservation.lease_id
            budget["reserved_tokens"] = plan.input_tokens + plan.cap
        harness["budget"] = budget
        return msg.model_copy(
            update={"additional_kwargs": {**msg.additional_kwargs, "harness": harness}}
        )

    def _events_after(
        self,
        ctx: _Context,
        plan: _Plan,
        before: Totals,
        after: Totals,
        cost: int,
        inp: int,
        out: int,
    ) -> list[tuple[Any, dict[str, Any]]]:
        lim = ctx.limits
        events: list[tuple[Any, dict[str, Any]]] = [
            (
                "budget.settle",
                {
                    "task_id": ctx.task_id,
                    "model": plan.name,
                    "input_tokens": inp,
                    "output_tokens": out,
                    "usd": _usd(cost),
                    "spent_usd": _usd(after.spent_nanos),
                    "limit_usd": None if lim.max_nanos is None else _usd(lim.max_nanos),
                },
            )
        ]
        if lim.max_nanos:
            mark = lim.max_nanos * ctx.envelope.warn_at
            if before.spent_nanos < mark <= after.spent_nanos:
                events.append(
                    (
                        "budget.warn",
                        {
                            "task_id": ctx.task_id,
                            "limit": "usd",
                            "used": _usd(after.spent_nanos),
                            "maximum": _usd(lim.max_nanos),
                        },
                    )
                )
        return events

    def _reserve_events(
        self, ctx: _Context, plan: _Plan, totals: Totals
    ) -> list[tuple[Any, dict[str, Any]]]:
        lim = ctx.limits
        events: list[tuple[Any, dict[str, Any]]] = []
        if plan.index > 0:
            events.append(
                (
                    "budget.degrade",
                    {
                        "task_id": ctx.task_id,
                        "from_model": ctx.ladder[0][0],
                        "to_model": plan.name,
                        "reason": f"{ctx.ladder[0][0]} would not fit the remaining budget",
                    },
                )
            )
        events.append(
            (
                "budget.reserve",
                {
                    "task_id": ctx.task_id,
                    "model": plan.name,
                    "input_tokens": plan.input_tokens,
                    "output_tokens": plan.cap,
                    "usd": _usd(plan.nanos),
                    "spent_usd": _usd(totals.spent_nanos),
                    "limit_usd": None if lim.max_nanos is None else _usd(lim.max_nanos),
                },
            )
        )
        return events

    def _anchor(
        self, messages: Sequence[BaseMessage], keys: list[tuple[Any, ...]] | None = None
    ) -> tuple[int, str, int] | None:
        """``(index, model, input tokens)`` of the last annotated answer, if it can anchor.

        It can when the messages before it (and the bound tools) are exactly the prompt its
        reported input tokens counted; a system prompt or context changed or added since, or
        a history trimmed, would not be counted otherwise. *keys*: the messages'
        `_message_key`, when the caller has them.
        """
        for k in range(len(messages) - 1, -1, -1):
            budget = _budget_meta(messages[k])
            if not (budget.get("model") and isinstance(budget.get("input_tokens"), int)):
                continue
            prefix = keys[:k] if keys is not None else map(_message_key, messages[:k])
            if budget.get("prompt_messages") != k or budget.get(
                "prompt_fingerprint"
            ) != _fingerprint(prefix, self._tools_signature()[1]):
                return None
            return k, str(budget["model"]), int(budget["input_tokens"])
        return None

    def _inputs(
        self,
        ctx: _Context,
        messages: Sequence[BaseMessage],
        keys: list[tuple[Any, ...]] | None = None,
    ) -> list[int]:
        """Prompt tokens to reserve for, per model of the ladder.

        With ``token_counter="auto"`` the last answer this wrapper annotated anchors the count
        when the prompt before it is unchanged (`_anchor`): the provider reported exactly how
        many tokens that prompt had, so only what came after it (that answer, tool results)
        is bounded by bytes — for the same model; another model may tokenize differently and
        gets the plain bound, as does a prompt changed before the answer.
        """
        counter = self.token_counter
        if callable(counter) or counter == "bytes":
            n = self.count_tokens(messages, ctx.ladder[0][1])
            return [n] * len(ctx.ladder)
        anchor = self._anchor(messages, keys)
        plain: int | None = None
        out: list[int] = []
        for name, model in ctx.ladder:
            if anchor is not None and anchor[1] == name:
                out.append(anchor[2] + bytes_bound(messages[anchor[0] :]))
                continue
            if plain is None:
                plain = self.count_tokens(messages, model)
            out.append(plain)
        return out

    def _flow(
        self, ctx: _Context, messages: list[BaseMessage], kwargs: dict[str, Any]
    ) -> Generator[tuple[str, Any], Any, AIMessage]:
        """The whole call as a sequence of effects, driven by `invoke` or `ainvoke`.

        Yields ``("totals" | "reserve" | "defer" | "forgo" | "flush_held" | "release", args)``
        for the ledger, ``("emit", (kind, data))`` for events and ``("call", _Call)`` for
        the model. A failed model call is thrown back in and settled before it propagates:
        released when the provider cannot have billed it (an error answer), else kept at its
        worst case (cancelled, or timed out, after the request went out, answered unreadably, or
        broken once its streamed answer started: see `_maybe_billed`), with a ``budget.settle``
        event giving the reason.
        A failed event is thrown back in too: one that cuts the call short between its
        reservation and the model call (a cancellation while a tracer takes the reservation's
        event) gives the reservation back, deferred, before it propagates.
        """
        rates = self._rates(ctx, kwargs)
        caps = self._output_caps(ctx, kwargs.pop("max_tokens", None))
        keys = [_message_key(m) for m in messages]  # for the anchor and the annotation
        inputs = self._inputs(ctx, messages, keys)
        for recovered in self._recoverable(ctx, messages):  # folded into the reservation below
            yield ("defer", recovered)
        cached = self._views().view(ctx.task_id)
        totals, fresh = (cached, False) if cached is not None else (Totals(), False)
        reservation: Reservation | None = None
        plan: _Plan | _Refusal = _Refusal("usd", 0, 0)
        held_written = False
        for _ in range(32):
            plan = _plan(ctx, rates, caps, inputs, totals)
            if not fresh and (isinstance(plan, _Refusal) or plan.index > 0):
                # Never degrade or stop on a stale snapshot: read the ledger first.
                totals, fresh = (yield ("totals", (ctx.task_id, ctx.task_type, ctx.limits))), True
                continue
            if isinstance(plan, _Refusal):
                if plan.limit == "window_usd" and not held_written:
                    # Nor on other tasks' calls this process settled but has not written yet
                    # (the window still books their worst case): write them, read again.
                    held_written = True
                    if (yield ("flush_held", (ctx.task_type,))):
                        totals = yield ("totals", (ctx.task_id, ctx.task_type, ctx.limits))
                        continue
                break
            reservation = yield (
                "reserve",
                (
                    ctx.task_id,
                    ctx.task_type,
                    plan.name,
                    plan.input_tokens,
                    plan.cap,
                    plan.nanos,
                    ctx.limits,
                ),
            )
            assert reservation is not None
            totals, fresh = reservation.totals, True
            if reservation.id is not None:
                break
            # Someone else took the budget meanwhile: plan again on the fresh totals.
        self._remember(ctx.task_id, totals)
        if reservation is None or reservation.id is None or isinstance(plan, _Refusal):
            refusal = (
                plan
                if isinstance(plan, _Refusal)
                else _Refusal("usd", _usd(totals.committed_nanos), _usd(ctx.limits.max_nanos or 0))
            )
            data = {
                "task_id": ctx.task_id,
                "limit": refusal.limit,
                "used": refusal.used,
                "maximum": refusal.maximum,
            }
            yield ("emit", ("budget.stop", data))
            return self._stop(ctx, refusal, totals)[0]
        try:
            for event in self._reserve_events(ctx, plan, totals):
                yield ("emit", event)
        except GeneratorExit:
            raise
        except BaseException:
            # Cut short before the model was called (the task cancelled while a tracer took the
            # event, a client gone): nothing was sent, so nothing can be billed. The reservation
            # goes back, deferred like a settlement (nothing awaited while the task is being
            # cancelled); kept, it booked the worst case for good.
            yield ("forgo", (ctx.task_id, reservation.id))
            self._views().forget_view(ctx.task_id)
            raise
        try:
            call = _Call(ctx.positions[plan.index], plan.cap)
            raw = yield ("call", call)
        except BaseException as error:
            reason = _maybe_billed(error, answering=call.answering)
            if reason is None:
                self._remember(ctx.task_id, (yield ("release", (reservation.id,))))
                raise
            # The request went out: the provider may bill the call in full, and nothing says
            # how much. It keeps its reserved worst case (never silently free). Deferred, so
            # nothing awaits while the task is being cancelled; until it lands, the ledger
            # holds the reservation, the same worst case.
            settle = (ctx.task_id, reservation.id, plan.input_tokens, plan.cap, plan.nanos)
            yield ("defer", (*settle, plan.name, None))
            self._note_deferred(reservation.id)
            worst = plan.input_tokens + plan.cap
            after = _settled(ctx, reservation.totals, plan, plan.nanos, worst)
            self._remember(ctx.task_id, after)
            level = logging.WARNING if isinstance(error, Exception) else logging.INFO
            log.log(
                level,
                "%s call %s (%s); it is recorded at its reserved worst case (%d input and %d "
                "output tokens, $%.6f)",
                plan.name or "a model",
                reason,
                type(error).__name__,
                plan.input_tokens,
                plan.cap,
                _usd(plan.nanos),
            )
            if isinstance(error, Exception):  # a cancelled task reports nothing more
                events = self._events_after(
                    ctx, plan, totals, after, plan.nanos, plan.input_tokens, plan.cap
                )
                events[0][1]["reason"] = f"{reason} ({type(error).__name__}): worst case kept"
                try:
                    for event in events:
                        yield ("emit", event)
                except Exception:
                    log.debug("the worst-case settlement's event was not reported", exc_info=True)
            raise
        msg = raw if isinstance(raw, AIMessage) else AIMessage(content=getattr(raw, "content", ""))
        name, i_tok, o_tok, cost = self._settle_figures(plan.name, msg, plan)
        # The settlement rides on the task's next ledger statement (or a flush shortly after):
        # no round trip here. Until it lands the ledger holds the worst case, the safe side.
        yield ("defer", (ctx.task_id, reservation.id, i_tok, o_tok, cost, name, None))
        self._note_deferred(reservation.id)
        after = _settled(ctx, reservation.totals, plan, cost, i_tok + o_tok)
        self._remember(ctx.task_id, after)
        for event in self._events_after(ctx, plan, totals, after, cost, i_tok, o_tok):
            yield ("emit", event)
        return self._annotate(msg, ctx, plan, cost, after, i_tok, o_tok, reservation, keys)

    def _started(
        self, input: LanguageModelInput, config: RunnableConfig, kwargs: dict[str, Any]
    ) -> tuple[
        list[BaseMessage],
        _Context,
        Generator[tuple[str, Any], Any, AIMessage],
        RunnableConfig,
    ]:
        """A call's messages, context, effects (`_flow`, not started) and its model's config."""
        messages = self._convert_input(input).to_messages()
        ctx = self._context(config)
        return messages, ctx, self._flow(ctx, messages, kwargs), self._child_config(config)

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """Reserve, call the model that fits, settle. Returns the answer (or a stop message).

        Raises:
            BudgetExceeded: nothing fits and the envelope says ``exit_behavior="error"``.
            UnpricedModelError: a model of the ladder has no price.
        """
        config = ensure_config(config)
        messages, ctx, flow, child = self._started(input, config, kwargs)
        ledger = self._ledger()
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op, args = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as done:
                result: AIMessage = done.value
                return result
            value, error = None, None
            if op == "call":
                model = self._runnable(args.index)
                try:
                    value = model.invoke(
                        messages,
                        _watched(args, model, child, kwargs),
                        stop=stop,
                        max_tokens=args.cap,
                        **kwargs,
                    )
                except BaseException as e:
                    error = e
            else:
                value, error = _sync_step(ledger, config, op, args)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """Async `invoke` (an `AsyncBackend` is used natively; a sync one from a thread)."""
        config = ensure_config(config)
        messages, ctx, flow, child = self._started(input, config, kwargs)
        await self._aready()
        ledger = self._aledger()
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op, args = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as done:
                result: AIMessage = done.value
                return result
            value, error = None, None
            if op == "call":
                model = self._runnable(args.index)
                try:
                    value = await model.ainvoke(
                        messages,
                        _watched(args, model, child, kwargs),
                        stop=stop,
                        max_tokens=args.cap,
                        **kwargs,
                    )
                except BaseException as e:
                    error = e
            else:
                value, error = await _async_step(ledger, config, op, args)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """`invoke`, streamed: the model's chunks as it sends them, then one with the budget.

        Added up, the chunks are `invoke`'s answer (the last carries its ``harness.budget``
        annotation; a refused call is that one chunk, the stop message). A stream the caller
        stops reading is a call cut short after its request went out: recorded at its
        reserved worst case, as a cancelled ``invoke`` is; so is one that breaks after its first
        chunk (``"stream broken"``: the provider was generating, and bills it).

        Example:
            ```python
            from harness_nodes import Envelope, budgeted
            from harness_nodes.testing import ScriptedChatModel

            model = ScriptedChatModel(
                model_name="gpt-4o", script=["Hello there."], disable_streaming=False
            )
            llm = budgeted(model, envelope=Envelope())
            chunks = list(llm.stream("hi", {"configurable": {"thread_id": "s"}}))
            answer = sum(chunks[1:], chunks[0])
            assert answer.content == "Hello there." and len(chunks) > 2
            assert answer.additional_kwargs["harness"]["budget"]["model"] == "gpt-4o"
            ```
        """
        config = ensure_config(config)
        messages, ctx, flow, child = self._started(input, config, kwargs)
        ledger = self._ledger()
        value: Any = None
        error: BaseException | None = None
        streamed: AIMessageChunk | None = None
        while True:
            try:
                op, args = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as done:
                yield _last_chunk(done.value, streamed)
                return
            value, error = None, None
            if op == "call":
                chunks = cast(
                    Generator[Any, None, None],
                    self._runnable(args.index).stream(
                        messages, child, stop=stop, max_tokens=args.cap, **kwargs
                    ),
                )
                try:
                    with contextlib.closing(chunks):
                        for chunk in chunks:
                            args.answering = True
                            streamed = _added_chunk(streamed, chunk)
                            yield cast(AIMessageChunk, chunk)
                except BaseException as e:  # GeneratorExit too: the caller stopped reading
                    error = e
                else:
                    value = _streamed_answer(streamed)
            else:
                value, error = _sync_step(ledger, config, op, args)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """Async `stream`."""
        config = ensure_config(config)
        messages, ctx, flow, child = self._started(input, config, kwargs)
        await self._aready()
        ledger = self._aledger()
        value: Any = None
        error: BaseException | None = None
        streamed: AIMessageChunk | None = None
        while True:
            try:
                op, args = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as done:
                yield _last_chunk(done.value, streamed)
                return
            value, error = None, None
            if op == "call":
                achunks = cast(
                    AsyncGenerator[Any, None],
                    self._runnable(args.index).astream(
                        messages, child, stop=stop, max_tokens=args.cap, **kwargs
                    ),
                )
                try:
                    async with contextlib.aclosing(achunks):
                        async for chunk in achunks:
                            args.answering = True
                            streamed = _added_chunk(streamed, chunk)
                            yield cast(AIMessageChunk, chunk)
                except BaseException as e:  # GeneratorExit, CancelledError: cut short
                    error = e
                else:
                    value = _streamed_answer(streamed)
            else:
                value, error = await _async_step(ledger, config, op, args)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=self.invoke(messages, stop=stop, **kwargs))]
        )

    # -- inspection ---------------------------------------------------------------------

    def _check_from(
        self, ctx: _Context, totals: Totals, messages: Sequence[BaseMessage]
    ) -> BudgetCheck:
        plan = _plan(
            ctx, self._rates(ctx), self._output_caps(ctx, None), self._inputs(ctx, messages), totals
        )
        spent = _usd(totals.spent_nanos)
        if isinstance(plan, _Refusal):
            return BudgetCheck(
                "stop", ctx.task_id, None, plan.limit, plan.used, plan.maximum, spent
            )
        decision: Decision = "ok" if plan.index == 0 else "degrade"
        return BudgetCheck(decision, ctx.task_id, plan.name, None, 0.0, 0.0, spent)

    def _ok_from_view(
        self, messages: Sequence[BaseMessage], config: RunnableConfig
    ) -> BudgetCheck | None:
        """``ok`` from this process's latest view of the task, with no read; else None.

        The view comes from this process's own reservations and reads (and drops when a
        `BudgetCallbackHandler` records a call), so it is current unless another process
        spends on the same task meanwhile — then the reservation, checked under the ledger's
        lock, refuses and the wrapper answers with a flagged stop message. Degrading or
        stopping is never decided on a view; with a per-type window cap (totals shared by
        every task of the type) the view is never used.
        """
        ctx = self._context(ensure_config(config))
        if ctx.limits.window_seconds is not None:
            return None
        view = self._views().view(ctx.task_id)
        if view is None:
            return None
        check = self._check_from(ctx, view, messages)
        return check if check.decision == "ok" else None

    def check(
        self, messages: Sequence[BaseMessage], config: RunnableConfig | None = None
    ) -> BudgetCheck:
        """Whether the next call with *messages* fits, read fresh from the ledger (no reservation).

        Example:
            ```python
            from langchain_core.messages import HumanMessage

            from harness_nodes import Envelope, budgeted
            from harness_nodes.testing import ScriptedChatModel

            model = budgeted(ScriptedChatModel(model_name="gpt-4o"), envelope=Envelope(max_usd=0))
            assert model.check([HumanMessage("hi")]).decision == "stop"
            ```
        """
        config = ensure_config(config)
        ctx = self._context(config)
        ledger = self._ledger()
        for recovered in self._recoverable(ctx, messages):  # folded into the read below
            _ledger_op(ledger, "defer", recovered)
        totals = ledger.totals(ctx.task_id, ctx.task_type, ctx.limits)
        check = self._check_from(ctx, totals, messages)
        if check.limit == "window_usd" and ledger.flush_held(ctx.task_type):
            # The window booked other tasks' calls this process had settled but not yet
            # written at their worst case: now written, the stop is decided on a new read.
            totals = ledger.totals(ctx.task_id, ctx.task_type, ctx.limits)
            check = self._check_from(ctx, totals, messages)
        self._remember(ctx.task_id, totals)
        return check

    async def acheck(
        self, messages: Sequence[BaseMessage], config: RunnableConfig | None = None
    ) -> BudgetCheck:
        """Async `check`."""
        config = ensure_config(config)
        ctx = self._context(config)
        await self._aready()
        ledger = self._aledger()
        for recovered in self._recoverable(ctx, messages):  # folded into the read (no I/O)
            task_id, spend_id, inp, out, nanos, model, lease = recovered
            ledger.defer_settle(task_id, spend_id, inp, out, nanos, model=model, lease=lease)
        args = (ctx.task_id, ctx.task_type, ctx.limits)
        totals = await self._aledger_call(ledger, "totals", args)
        check = self._check_from(ctx, totals, messages)
        if check.limit == "window_usd" and await self._aledger_call(
            ledger, "flush_held", (ctx.task_type,)
        ):  # as in `check`: other tasks' settlements written, read again
            totals = await self._aledger_call(ledger, "totals", args)
            check = self._check_from(ctx, totals, messages)
        self._remember(ctx.task_id, totals)
        return check

    @staticmethod
    async def _aledger_call(
        ledger: SpendLedger | AsyncSpendLedger, op: str, args: tuple[Any, ...]
    ) -> Any:
        """A ledger statement from the event loop: native on an `AsyncSpendLedger`."""
        if isinstance(ledger, AsyncSpendLedger):
            return await _aledger_op(ledger, op, args)
        return await asyncio.to_thread(_ledger_op, ledger, op, args)

    @staticmethod
    def _mirror(totals: Totals, rows: list[dict[str, Any]], model: str | None) -> Spend:
        by_model: dict[str, ModelSpend] = {
            str(r["model"]): ModelSpend(
                input_tokens=int(r["input_tokens"]),
                output_tokens=int(r["output_tokens"]),
                usd=_usd(int(r["nanos"])),
                calls=int(r["calls"]),
            )
            for r in rows
        }
        spend = Spend(
            total_tokens=totals.spent_tokens,
            usd=_usd(totals.spent_nanos),
            calls=sum(m["calls"] for m in by_model.values()),
            by_model=by_model,
        )
        if model:
            spend["model"] = model
        return spend

    def spend(self, config: RunnableConfig | None = None, *, model: str | None = None) -> Spend:
        """The task's spend from the ledger, shaped as `HarnessState.spend`.

        Example:
            ```python
            from harness_nodes import Envelope, budgeted
            from harness_nodes.testing import ScriptedChatModel

            model = budgeted(ScriptedChatModel(model_name="gpt-4o"), envelope=Envelope())
            assert model.spend({"configurable": {"thread_id": "new"}})["usd"] == 0.0
            ```
        """
        config = ensure_config(config)
        ctx = self._context(config)
        ledger = self._ledger()
        totals = ledger.totals(ctx.task_id, ctx.task_type, ctx.limits)
        return self._mirror(totals, ledger.by_model(ctx.task_id), model)

    async def aspend(
        self, config: RunnableConfig | None = None, *, model: str | None = None
    ) -> Spend:
        """Async `spend`."""
        config = ensure_config(config)
        ctx = self._context(config)
        await self._aready()
        ledger = self._aledger()
        if isinstance(ledger, AsyncSpendLedger):
            totals = await ledger.totals(ctx.task_id, ctx.task_type, ctx.limits)
            rows = await ledger.by_model(ctx.task_id)
        else:
            totals = await asyncio.to_thread(ledger.totals, ctx.task_id, ctx.task_type, ctx.limits)
            rows = await asyncio.to_thread(ledger.by_model, ctx.task_id)
        return self._mirror(totals, rows, model)


def _sync_step(
    ledger: SpendLedger, config: RunnableConfig, op: str, args: tuple[Any, ...]
) -> tuple[Any, BaseException | None]:
    """One of the flow's ledger or event effects (not a call), done.

    Returns its value, or the error to throw back into the flow (an event cut short: the flow
    settles first).
    """
    if op != "emit":
        return _ledger_op(ledger, op, args), None
    if config.get("callbacks"):  # nobody listens otherwise; skip the dispatch cost
        try:
            emit(args[0], args[1], config)
        except BaseException as e:
            return None, e
    return None, None


async def _async_step(
    ledger: SpendLedger | AsyncSpendLedger,
    config: RunnableConfig,
    op: str,
    args: tuple[Any, ...],
) -> tuple[Any, BaseException | None]:
    """Async `_sync_step`."""
    if op == "emit":
        if config.get("callbacks"):
            try:
                await aemit(args[0], args[1], config)
            except BaseException as e:  # a cancellation: thrown into the flow
                return None, e
        return None, None
    if op in ("defer", "forgo"):  # no I/O: no thread, no await
        (_defer if op == "defer" else _forgo)(ledger, args)
        return None, None
    if isinstance(ledger, AsyncSpendLedger):
        return await _aledger_op(ledger, op, args), None
    return await asyncio.to_thread(_ledger_op, ledger, op, args), None


def _added_chunk(streamed: AIMessageChunk | None, chunk: Any) -> AIMessageChunk:
    if not isinstance(chunk, AIMessageChunk):
        raise TypeError(f"a chat model streamed {type(chunk).__name__}, not AIMessageChunk")
    return chunk if streamed is None else streamed + chunk


def _streamed_answer(streamed: AIMessageChunk | None) -> AIMessage:
    """The answer the chunks add up to (what ``invoke`` would have returned)."""
    if streamed is None:
        return AIMessage(content="")
    return cast(AIMessage, message_chunk_to_message(streamed))


def _last_chunk(result: AIMessage, streamed: AIMessageChunk | None) -> AIMessageChunk:
    """What the stream still owes after the model's chunks: the budget's annotation.

    Nothing streamed (a refused call): the whole answer, the stop message, as one chunk.
    """
    if streamed is not None:
        harness = (result.additional_kwargs or {}).get("harness")
        return AIMessageChunk(
            content="", id=streamed.id, additional_kwargs={"harness": harness} if harness else {}
        )
    return AIMessageChunk(
        content=result.content,
        id=result.id,
        additional_kwargs=dict(result.additional_kwargs),
        response_metadata=dict(result.response_metadata),
        tool_call_chunks=[
            tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
            for i, c in enumerate(result.tool_calls)
        ],
        usage_metadata=result.usage_metadata,
    )


def _check_lease(lease: object) -> None:
    if isinstance(lease, bool) or not isinstance(lease, int) or lease < 1:
        raise UserError(f"lease must be a whole number of calls >= 1, got {lease!r}")


def budgeted(
    model_or_ladder: BaseChatModel | Sequence[BaseChatModel],
    *,
    envelope: Envelope | Envelopes,
    backend: Any = None,
    pricing: Pricing | None = None,
    task_type: str = "default",
    task_id: str | None = None,
    token_counter: Literal["auto", "bytes"] | Callable[..., int] = "auto",
    sync_commit: bool = True,
    lease: int = 1,
) -> BudgetedChatModel:
    """Wrap a chat model (or a ladder, most capable first) so it cannot overspend its envelope.

    Args:
        model_or_ladder: Any LangChain chat model, or several to degrade through.
        envelope: One `Envelope` for every task, or `Envelopes` by task type.
        backend: The `Backend` (or `AsyncBackend` for ``ainvoke``) whose ledger records spend;
            default: a private in-memory ledger (not shared across processes).
        pricing: Where prices come from; default genai-prices with no fallback.
        task_type: Task type when the run's config gives none.
        task_id: Task id when the run's config has no ``task_id``/``thread_id``.
        token_counter: How prompts are counted before a call (see `BudgetedChatModel`).
        sync_commit: Postgres: wait for each reservation to reach disk before the call
            (default). ``False`` is faster; see `BudgetedChatModel.sync_commit`.
        lease: Postgres: book room for up to this many calls per reservation and grant the
            next ones from memory (no round trip per call); see `BudgetedChatModel.lease`.

    Raises:
        UnpricedModelError: a model's name is known and it has no price (and no fallback).
        UserError: an envelope's ladder names a model the wrapper does not have, or
            *lease* is not a whole number >= 1.

    Example:
        ```python
        from harness_nodes import Envelope, UnpricedModelError, budgeted
        from harness_nodes.testing import ScriptedChatModel

        try:
            budgeted(ScriptedChatModel(model_name="acme-7b"), envelope=Envelope(max_usd=1))
        except UnpricedModelError as e:
            assert e.model == "acme-7b"
        ```
    """
    models = (
        [model_or_ladder] if isinstance(model_or_ladder, BaseChatModel) else list(model_or_ladder)
    )
    if not models:
        raise UserError("budgeted() needs at least one chat model")
    for m in models:
        if not isinstance(m, BaseChatModel):
            raise UserError(f"budgeted() takes chat models, got {type(m).__name__}")
    _check_lease(lease)
    pricing = pricing or Pricing()
    names = [_model_name(m) or "" for m in models]
    for name in names:
        if name:
            pricing.rates(name)  # fail fast: UnpricedModelError names the model and the fix
    envelopes = envelope if isinstance(envelope, Envelopes) else Envelopes(default=envelope)
    if not isinstance(envelopes, Envelopes):
        raise UserError(f"envelope must be an Envelope or Envelopes, got {envelope!r}")
    for env in envelopes.all():
        missing = [n for n in env.ladder if n not in names]
        if missing:
            raise UserError(f"Envelope ladder names {missing} but the wrapped models are {names}")
    return BudgetedChatModel(
        models=models,
        names=names,
        envelopes=envelopes,
        pricing=pricing,
        backend=backend,
        task_type=task_type,
        task_id=task_id,
        token_counter=token_counter,
        sync_commit=sync_commit,
        lease=lease,
    )


# --- the graph side ------------------------------------------------------------------------


def _messages_of(state: Any) -> list[BaseMessage]:
    # Routing functions get the graph's own state: a dict, a dataclass or a pydantic model.
    if isinstance(state, Mapping):
        return list(state.get("messages") or [])
    return list(getattr(state, "messages", None) or [])


def _is_stop_message(m: BaseMessage) -> bool:
    budget = ((m.additional_kwargs or {}).get("harness") or {}).get("budget") or {}
    return isinstance(m, AIMessage) and bool(budget.get("stopped"))


def _truncation(m: BaseMessage) -> dict[str, Any] | None:
    """The record of an answer cut at the output cap the envelope lowered (else ``None``)."""
    cut = _budget_meta(m).get("truncated") if isinstance(m, AIMessage) else None
    return cut if isinstance(cut, dict) else None


def _ends_on_budget(m: BaseMessage) -> bool:
    """*m* ends its task on the budget: a refusal's stop message, or an answer cut short."""
    return _is_stop_message(m) or _truncation(m) is not None


def _stopped_by_model(messages: Sequence[BaseMessage]) -> BudgetCheck | None:
    """The wrapper refused the last call, or cut its answer short: stop too.

    A refusal is a race the guard's estimate missed; an answer cut short ran into the output
    cap the envelope lowered (its record carries ``truncated``).
    """
    if not messages or not _ends_on_budget(messages[-1]):
        return None
    budget = _budget_meta(messages[-1])
    data = _truncation(messages[-1]) or budget["stopped"]
    return BudgetCheck(
        "stop",
        str(data["task_id"]),
        None,
        str(data["limit"]),
        float(data["used"]),
        float(data["maximum"]),
        float(budget.get("task_spent_usd", 0.0)),
    )


def _partial_result(messages: Sequence[BaseMessage]) -> dict[str, Any]:
    last_answer = None
    for m in reversed(messages):
        if isinstance(m, AIMessage) and not _is_stop_message(m) and m.text.strip():
            last_answer = m.text
            break
    tool_results = [
        {"tool": m.name, "tool_call_id": m.tool_call_id, "content": m.text}
        for m in messages
        if isinstance(m, ToolMessage)
    ]
    return {"last_answer": last_answer, "tool_results": tool_results}


def _last_model(messages: Sequence[BaseMessage]) -> str | None:
    for m in reversed(messages):
        model = (((m.additional_kwargs or {}).get("harness") or {}).get("budget") or {}).get(
            "model"
        )
        if model:
            return str(model)
    return None


@dataclass(frozen=True)
class BudgetGuard(Runnable[MessagesAndOutcome, Command[str]]):
    """The budget's graph side: a routing function, a ``finish`` node, and a node form.

    Routing form (no extra superstep on the common path): put `route` on every edge into the
    model node, mapping ``"ok"``/``"degrade"`` to it and ``"stop"`` to the `finish` node.
    ``ok`` costs no read when this process's latest view of the task already says the next
    call fits; ``degrade`` and ``stop`` are decided on a fresh read. If another process spends
    on the same task meanwhile, the wrapper's reservation refuses under the ledger's lock and
    answers with a flagged stop message: route it to `finish` too (the reference wiring,
    `build_harnessed_agent`, does) to end with outcome ``budget_exhausted``.
    Node form: add the guard itself as a node before the model; it routes with ``Command``.
    It is a `Runnable` with both paths, so the same node runs under ``invoke`` (a `Backend`)
    and under ``ainvoke`` (an `AsyncBackend` natively, a `Backend` from a thread).

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langgraph.graph import END, START, MessagesState, StateGraph

        from checkpointers import open_backend
        from harness_nodes import BudgetGuard, Envelope, budgeted
        from harness_nodes.testing import ScriptedChatModel

        with open_backend("memory://") as backend:
            llm = budgeted(ScriptedChatModel(script=["Done."], model_name="gpt-4o-mini"),
                           envelope=Envelope(max_usd=0.01), backend=backend)
            guard = BudgetGuard(llm)
            builder = StateGraph(MessagesState)
            builder.add_node("agent", lambda state: {"messages": [llm.invoke(state["messages"])]})
            builder.add_node("budget_exhausted", guard.finish)
            builder.add_conditional_edges(
                START, guard.route, {"ok": "agent", "degrade": "agent", "stop": "budget_exhausted"}
            )
            builder.add_edge("agent", END)
            builder.add_edge("budget_exhausted", END)
            graph = builder.compile(checkpointer=backend.checkpointer)
            out = graph.invoke({"messages": [HumanMessage("hi")]},
                               {"configurable": {"thread_id": "t1"}})
            assert out["messages"][-1].content == "Done."
        ```
    """

    model: BudgetedChatModel
    """The budgeted model the guarded node calls (bound to its tools, ideally)."""
    next: str = "agent"
    """Node form: where ``ok``/``degrade`` go."""
    on_stop: str = END
    """Node form: where ``stop`` goes after writing the outcome."""
    system_prompt: str | None = None
    """The system prompt the guarded node prepends to the state's messages (as `ModelNode`
    does): the guard checks the prompt the node will send. Without it, the last answer's
    reported input tokens cannot anchor the estimate (its prompt had the system message), and
    the whole history is bounded by its bytes: a tight envelope stops early."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, BudgetedChatModel):
            raise UserError(
                f"BudgetGuard needs the budgeted() model, got {type(self.model).__name__}"
            )

    def _stop_data(self, check: BudgetCheck) -> dict[str, Any]:
        return {
            "task_id": check.task_id,
            "limit": check.limit,
            "used": check.used,
            "maximum": check.maximum,
        }

    def _raise_if_error(self, check: BudgetCheck, config: RunnableConfig) -> None:
        if self.model._context(ensure_config(config)).envelope.exit_behavior == "error":
            raise BudgetExceeded(check.task_id, check.limit or "usd", check.used, check.maximum)

    def _decide(self, check: BudgetCheck, config: RunnableConfig) -> Decision:
        if check.decision == "stop":
            emit("budget.stop", self._stop_data(check), config)
            self._raise_if_error(check, config)
        return check.decision

    async def _adecide(self, check: BudgetCheck, config: RunnableConfig) -> Decision:
        if check.decision == "stop":
            await aemit("budget.stop", self._stop_data(check), config)
            self._raise_if_error(check, config)
        return check.decision

    def _prompt(self, state: Any) -> list[BaseMessage]:
        """The prompt the guarded node sends: the state's messages after `system_prompt`."""
        messages = _messages_of(state)
        if self.system_prompt:
            return [SystemMessage(self.system_prompt), *messages]
        return messages

    def route(self, state: MessagesOnly, config: RunnableConfig) -> Decision:
        """``"ok"``, ``"degrade"`` or ``"stop"`` for the next model call (an edge function).

        Raises:
            BudgetExceeded: on stop, when the envelope says ``exit_behavior="error"``.
        """
        messages = self._prompt(state)
        check = _stopped_by_model(messages) or self.model._ok_from_view(messages, config)
        if check is None:
            check = self.model.check(messages, config)
        return self._decide(check, config)

    async def aroute(self, state: MessagesOnly, config: RunnableConfig) -> Decision:
        """Async `route` (use it with an `AsyncBackend`)."""
        messages = self._prompt(state)
        await self.model._aready()
        check = _stopped_by_model(messages) or self.model._ok_from_view(messages, config)
        if check is None:
            check = await self.model.acheck(messages, config)
        return await self._adecide(check, config)

    def _finish_update(
        self, messages: Sequence[BaseMessage], check: BudgetCheck, spend: Spend
    ) -> dict[str, Any]:
        limit = check.limit or "usd"
        reason = f"{limit} limit reached: used {check.used:g} of {check.maximum:g}"
        cut = _truncation(messages[-1]) if messages else None
        if cut is not None:
            reason += (
                f"; the last answer was cut short at the {cut['output_cap']} output tokens "
                f"the budget left it (of {cut['uncapped']})"
            )
        outcome = Outcome(
            status="budget_exhausted", reason=reason, partial_result=_partial_result(messages)
        )
        # A cut answer's tool calls (whole or, cut mid-way, invalid) never run: each is
        # answered, or the next model call on the thread is refused by providers that want a
        # result for every call (OpenAI, Anthropic).
        unanswered = []
        if cut is not None and isinstance(messages[-1], AIMessage):
            last = messages[-1]
            calls = [*last.tool_calls, *last.invalid_tool_calls]
            unanswered = [
                ToolMessage(
                    content="Not run: the answer was cut short at the output cap the budget "
                    "left it.",
                    tool_call_id=str(c["id"]),
                    name=c.get("name") or None,
                    status="error",
                )
                for c in calls
                if c.get("id")
            ]
        note = AIMessage(
            content=f"Stopped: budget exhausted ({reason}).",
            additional_kwargs={
                "harness": {
                    "outcome": dict(outcome),
                    "budget": {
                        "model": None,
                        "degraded_from": None,
                        "reserved_usd": 0.0,
                        "spent_usd": 0.0,
                        "task_id": check.task_id,
                        "task_spent_usd": spend.get("usd", 0.0),
                        "stopped": {
                            "task_id": check.task_id,
                            "limit": limit,
                            "used": check.used,
                            "maximum": check.maximum,
                        },
                    },
                }
            },
        )
        return {"messages": [*unanswered, note], "outcome": outcome, "spend": spend}

    def finish(self, state: MessagesAndOutcome, config: RunnableConfig) -> dict[str, Any]:
        """The node ``stop`` leads to: writes outcome ``budget_exhausted`` and the spend mirror.

        The partial result keeps the last useful answer and every tool result so far. In a
        plain ``MessagesState`` app the outcome rides on the final message's
        ``additional_kwargs["harness"]["outcome"]``. When the messages end on the wrapper's
        stop message, the limit it reports is the reason (the ladder that refused may not be
        this guard's: a model another middleware swapped in). When they end on an answer cut
        short at the output cap the budget lowered, that answer stays, the stop is reported
        (a ``budget.stop`` event) and, with ``exit_behavior="error"``, `BudgetExceeded` is
        raised here.

        Raises:
            BudgetExceeded: the messages end on an answer the budget cut short and the
                envelope says ``exit_behavior="error"``.
        """
        messages = _messages_of(state)
        check = _stopped_by_model(messages) or self.model.check(self._prompt(state), config)
        if messages and _truncation(messages[-1]) is not None:
            self._decide(check, config)  # nothing reported this stop yet
        spend = self.model.spend(config, model=_last_model(messages))
        emit("outcome", {"status": "budget_exhausted", "reason": check.limit}, config)
        update = self._finish_update(messages, check, spend)
        update["outcome"] = replace_outcome(state, update["outcome"])
        return update

    async def afinish(self, state: MessagesAndOutcome, config: RunnableConfig) -> dict[str, Any]:
        """Async `finish`."""
        messages = _messages_of(state)
        check = _stopped_by_model(messages) or await self.model.acheck(self._prompt(state), config)
        if messages and _truncation(messages[-1]) is not None:
            await self._adecide(check, config)  # nothing reported this stop yet
        spend = await self.model.aspend(config, model=_last_model(messages))
        await aemit("outcome", {"status": "budget_exhausted", "reason": check.limit}, config)
        update = self._finish_update(messages, check, spend)
        update["outcome"] = replace_outcome(state, update["outcome"])
        return update

    def __call__(self, state: MessagesAndOutcome, config: RunnableConfig) -> Command[str]:
        """Node form: go to `next` (writing the spend mirror) or finish and go to `on_stop`.

        LangGraph infers the node's input (``messages``, ``outcome``) from this signature.
        """
        check = self.model.check(self._prompt(state), config)
        decision = self._decide(check, config)
        if decision == "stop":
            return Command(goto=self.on_stop, update=self.finish(state, config))
        spend = self.model.spend(config, model=check.model)
        return Command(goto=self.next, update={"spend": spend})

    def invoke(
        self, input: MessagesAndOutcome, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Command[str]:
        """Node form under ``invoke``: `__call__` (needs a sync `Backend`)."""
        return self(input, ensure_config(config))

    async def ainvoke(
        self, input: MessagesAndOutcome, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Command[str]:
        """Node form under ``ainvoke``: `__call__` with the async reads.

        A plain callable node only has a sync path, which LangGraph runs in a thread under
        ``ainvoke``; an `AsyncBackend` cannot serve it there. Being a `Runnable`, the guard
        gets this path instead.
        """
        config = ensure_config(config)
        check = await self.model.acheck(self._prompt(input), config)
        decision = await self._adecide(check, config)
        if decision == "stop":
            return Command(goto=self.on_stop, update=await self.afinish(input, config))
        spend = await self.model.aspend(config, model=check.model)
        return Command(goto=self.next, update={"spend": spend})


# --- unwrapped models ----------------------------------------------------------------------

_OUTPUT_CAP_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True)
class _Run:
    """A call `BudgetCallbackHandler` saw start: whose it is, and what it was asked."""

    task_id: str
    task_type: str
    model: str | None
    """The model called (from the invocation params, else LangSmith's ``ls_model_name``)."""
    messages: list[list[BaseMessage]] | None
    """The chat prompts (None for a text model)."""
    prompts: list[str]
    """The text prompts (a text model)."""
    params: dict[str, Any]
    """The invocation params (for the output cap and the tools)."""
    started: float = field(default_factory=time.monotonic)
    """When the call started (a call that never reports back is forgotten after a while)."""
    reserved: tuple[int, str, int, int, int] | None = None
    """The worst case booked when the call started: ``(spend id, model, input tokens,
    output tokens, nano-dollars)``; nano-dollars 0 for an unpriced model (its tokens only)."""

    def prompt_bound(self) -> int:
        """An upper bound on the prompt's tokens: its UTF-8 bytes (see `bytes_bound`)."""
        tools = self.params.get("tools")
        size = _tools_bytes(tools) if isinstance(tools, list) else 0
        if self.messages is not None:
            return size + sum(bytes_bound(m) for m in self.messages)
        return size + sum(len(p.encode("utf-8")) + _MESSAGE_OVERHEAD_BYTES for p in self.prompts)

    def output_cap(self) -> int | None:
        """The output cap the call was made with, if it had one."""
        for key in _OUTPUT_CAP_PARAMS:
            cap = self.params.get(key)
            if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
                return cap
        return None


def _generation_bytes(gen: Any) -> int:
    msg = getattr(gen, "message", None)
    if isinstance(msg, BaseMessage):
        return _message_bytes(msg)
    return len(str(getattr(gen, "text", "")).encode("utf-8")) + _MESSAGE_OVERHEAD_BYTES


class BudgetCallbackHandler(BaseCallbackHandler):
    """Accounts calls made through models that are not `budgeted` (inside tools, say).

    Add it to the run's callbacks; each chat-model call is recorded in the ledger against its
    task (``task_id`` or ``thread_id`` from the run's metadata): its worst case is booked when
    it starts (the prompt's bound and its output cap, else the envelope's
    ``max_output_tokens``), then settled to its priced usage when it ends, or given back on an
    error answer; a call that never reports back (an ``ainvoke`` cancelled in flight) stays
    booked at its worst case. It cannot stop a call, so the next budgeted call sees the spend.
    An unpriced model is booked its tokens only (with a warning), and raises
    `UnpricedModelError` when it ends (its tokens settled, at no price). Calls
    made by a `budgeted` model are skipped (they are already accounted). A call that reports
    no usage, or usage that cannot be trusted (a negative count, say), is recorded at its worst
    case, with a warning, as the wrapper keeps its reservation: the prompt's bytes in, and out
    the call's output cap (or, with none, its answer's bytes and at least the envelope's
    ``max_output_tokens``) — never more than a reservation may take of the ledger's 64-bit
    counts, however absurd the cap.

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import BudgetCallbackHandler
        from harness_nodes.testing import ScriptedChatModel

        with open_backend("memory://") as backend:
            handler = BudgetCallbackHandler(backend)
            raw = ScriptedChatModel(script=["ok"], model_name="gpt-4o-mini")
            raw.invoke("hi", {"callbacks": [handler], "metadata": {"thread_id": "t1"}})
            row = backend.execute("SELECT task_id, model FROM harness_spend")[0]
            assert row == {"task_id": "t1", "model": "gpt-4o-mini"}
        ```
    """

    raise_error = True  # an unpriced model must not pass silently as free
    forget_after: float = 3600.0
    """Seconds after which a call that never reported back (an ``ainvoke`` cancelled in flight:
    LangChain calls no handler then) is forgotten; its worst case stays booked in the ledger."""

    def __init__(
        self,
        backend: Any,
        pricing: Pricing | None = None,
        *,
        envelopes: Envelope | Envelopes | None = None,
        task_type: str = "default",
        default_task_id: str = "unassigned",
    ) -> None:
        from checkpointers import Backend

        if not isinstance(backend, Backend):
            raise UserError("BudgetCallbackHandler needs a sync Backend (open_backend)")
        self.ledger = SpendLedger(backend)
        self.pricing = pricing or Pricing()
        self.envelopes = (
            Envelopes(default=envelopes) if isinstance(envelopes, Envelope) else envelopes
        )
        self.task_type = task_type
        self.default_task_id = default_task_id
        self._runs: dict[uuid.UUID, _Run] = {}
        self._answering: set[uuid.UUID] = set()
        """Calls whose streamed answer started (their first chunk arrived)."""
        self._lock = threading.Lock()

    def _start(
        self,
        run_id: uuid.UUID,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
        messages: list[list[BaseMessage]] | None,
        prompts: list[str],
    ) -> None:
        meta = metadata or {}
        if meta.get("harness_budgeted"):
            return
        task_id = str(meta.get("task_id") or meta.get("thread_id") or self.default_task_id)
        task_type = str(meta.get("task_type") or self.task_type)
        params = kwargs.get("invocation_params") or {}
        model = params.get("model_name") or params.get("model") or meta.get("ls_model_name")
        run = _Run(task_id, task_type, str(model) if model else None, messages, prompts, params)
        run = self._reserve(run, run.model or "")
        now = time.monotonic()
        with self._lock:
            # A call cancelled in flight never reports back (an awaited gather that was cut
            # short calls no handler): its worst case stays booked, and it is forgotten here.
            for stale in [k for k, r in self._runs.items() if now - r.started >= self.forget_after]:
                del self._runs[stale]
                self._answering.discard(stale)
            self._runs[run_id] = run

    def _limits(self, task_type: str) -> Limits:
        if self.envelopes is not None:
            cap = self.envelopes.for_type(task_type).type_cap
            if cap is not None:
                return Limits(window_seconds=float(cap.seconds))
        return Limits()

    def _reserve(self, run: _Run, model: str) -> _Run:
        """Book the call's worst case before it runs: the prompt's bound and its output cap.

        An unpriced model (its answer may still name a priced one) has its tokens and the call
        booked at no price: cancelled in flight, it would otherwise go unrecorded.
        """
        cap = run.output_cap()
        if cap is None:
            envelope = (self.envelopes or Envelopes(default=Envelope())).for_type(run.task_type)
            cap = envelope.max_output_tokens
        inp, out = run.prompt_bound(), min(cap, _ledger_room(0))
        if self.pricing.is_priced(model):
            nanos = min(self.pricing.rates(model).worst_case_nanos(inp, out), _ledger_room(0))
        else:
            nanos = 0
            log.warning(
                "%s (called outside a budgeted model) has no price: the call is booked with "
                "its tokens only (%d input, %d output), and raises UnpricedModelError when it "
                "ends unless its answer names a priced model",
                model or "an unnamed model",
                inp,
                out,
            )
        r = self.ledger.reserve(
            run.task_id, run.task_type, model, inp, out, nanos, self._limits(run.task_type)
        )
        self.ledger._store.pending.forget_view(run.task_id)  # budgeted calls read afresh
        if r.id is None:  # the ledger's range is spent: recorded when the call ends, as before
            return run
        return replace(run, reserved=(r.id, model, inp, out, nanos))

    def _settle(self, run: _Run, model: str | None, inp: int, out: int, nanos: int) -> None:
        """Settle the call's reservation, carried by the task's next ledger statement."""
        assert run.reserved is not None
        released = model is None
        self.ledger.defer_settle(
            run.task_id, run.reserved[0], inp, out, nanos, model=model, released=released
        )
        self.ledger._store.pending.forget_view(run.task_id)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: uuid.UUID,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember which task the call belongs to."""
        self._start(run_id, metadata, kwargs, messages, [])

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: uuid.UUID,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember which task the call belongs to."""
        self._start(run_id, metadata, kwargs, None, prompts)

    def on_llm_new_token(self, *args: Any, run_id: uuid.UUID, **kwargs: Any) -> None:
        """A streamed answer started (see `on_llm_error`)."""
        if run_id not in self._answering:
            with self._lock:
                if run_id in self._runs:
                    self._answering.add(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        """A failed call costs nothing, unless the provider may still bill it.

        An error answer is not billed. A call cut short after its request went out (a
        cancellation, a read timeout, a dropped connection), answered with a success status
        but unreadably (a malformed body), or whose streamed answer broke after it started,
        may be: it is recorded at its worst case, as the budgeted wrapper keeps its
        reservation's (`_maybe_billed`).
        """
        with self._lock:
            run = self._runs.pop(run_id, None)
            answering = run_id in self._answering
            self._answering.discard(run_id)
        if run is None:
            return
        reason = _maybe_billed(error, answering=answering)
        if run.reserved is not None:
            _, reserved_model, inp, out, nanos = run.reserved
            if reason is None:
                self._settle(run, None, 0, 0, 0)
                return
            if not self.pricing.is_priced(reserved_model):
                self._settle(run, reserved_model, inp, out, 0)  # its tokens, no price
                raise UnpricedModelError(reserved_model or "<unnamed model>")
            log.warning(
                "%s (called outside a budgeted model) may be billed: %s (%s) after its request "
                "went out; the call is recorded at its worst case (%d input tokens, %d output "
                "tokens, $%.6f)",
                reserved_model,
                reason,
                type(error).__name__,
                inp,
                out,
                _usd(nanos),
            )
            self._settle(run, reserved_model, inp, out, nanos)
            return
        if reason is None:
            return
        model = _priced_name(self.pricing, run.model, None)
        if not model:
            raise UnpricedModelError("<unnamed model>")
        cap = run.output_cap()
        if cap is None:
            cap = (
                (self.envelopes or Envelopes(default=Envelope()))
                .for_type(run.task_type)
                .max_output_tokens
            )
        inp, out = run.prompt_bound(), min(cap, _ledger_room(0))
        nanos = min(self.pricing.rates(model).worst_case_nanos(inp, out), _ledger_room(0))
        log.warning(
            "%s (called outside a budgeted model) may be billed: %s (%s) after its request "
            "went out; the call is recorded at its worst case (%d input tokens, %d output "
            "tokens, $%.6f)",
            model,
            reason,
            type(error).__name__,
            inp,
            out,
            _usd(nanos),
        )
        self._record(run, model, inp, out, nanos)

    def _worst_output(self, run: _Run, response: LLMResult) -> int:
        """Output tokens to record for a call whose usage is unknown.

        The call's own output cap bounds each answer; without one, the answer's bytes bound
        what can be seen of it, and the envelope's ``max_output_tokens`` (what the wrapper
        would have capped it at) stands in for what cannot (hidden reasoning).
        """
        cap = run.output_cap()
        envelope = (self.envelopes or Envelopes(default=Envelope())).for_type(run.task_type)
        sizes = [_generation_bytes(g) for gens in response.generations for g in gens] or [0]
        if cap is not None:
            worst = cap * len(sizes)
        else:
            worst = sum(max(envelope.max_output_tokens, size) for size in sizes)
        return min(worst, _ledger_room(0))  # an absurd cap (10**30) must fit the ledger

    def _priced(self, run: _Run, response: LLMResult) -> tuple[str, int, int, int]:
        """``(model, input tokens, output tokens, nano-dollars)`` to record for a finished call.

        Usage missing or malformed on any answer: the call's worst case, as the budgeted
        wrapper keeps its reservation's (never silently free, never a credit).
        """
        answers = [
            m
            for gens in response.generations
            for g in gens
            if isinstance(m := getattr(g, "message", None), AIMessage)
        ]
        reported = next((n for n in map(_response_model, answers) if n), None)
        model = _priced_name(self.pricing, run.model, reported)
        if not model:
            model = str((response.llm_output or {}).get("model_name") or "")
        if not model:
            raise UnpricedModelError("<unnamed model>")
        usages = [_reported_usage(m.usage_metadata) for m in answers] or ["reported no usage"]
        problem = next((u for u in usages if isinstance(u, str)), None)
        if problem is None:
            total = _added(cast(list[_Usage], usages))
            return model, total.input, total.output, _usage_cost(self.pricing, model, total)
        inp, out = run.prompt_bound(), self._worst_output(run, response)
        nanos = min(self.pricing.rates(model).worst_case_nanos(inp, out), _ledger_room(0))
        log.warning(
            "%s (called outside a budgeted model) %s; the call is recorded at its worst case "
            "(%d input tokens, the prompt's bytes, and %d output tokens, $%.6f)",
            model,
            problem,
            inp,
            out,
            _usd(nanos),
        )
        return model, inp, out, nanos

    def on_llm_end(self, response: LLMResult, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        """Price the call's usage and record it against its task."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            self._answering.discard(run_id)
        if run is None:
            return
        try:
            priced = self._priced(run, response)
        except UnpricedModelError:
            if run.reserved is not None:  # its tokens were booked: settle them, no price
                self._settle(run, run.reserved[1], *self._tokens(run, response), 0)
            raise
        if run.reserved is not None:
            self._settle(run, *priced)
            return
        self._record(run, *priced)

    def _tokens(self, run: _Run, response: LLMResult) -> tuple[int, int]:
        """``(input, output)`` tokens of a finished call: as reported, else its worst case."""
        answers = [
            m
            for gens in response.generations
            for g in gens
            if isinstance(m := getattr(g, "message", None), AIMessage)
        ]
        usages = [_reported_usage(m.usage_metadata) for m in answers]
        if usages and not any(isinstance(u, str) for u in usages):
            total = _added(cast(list[_Usage], usages))
            return total.input, total.output
        return run.prompt_bound(), self._worst_output(run, response)

    def _record(self, run: _Run, model: str, inp: int, out: int, nanos: int) -> None:
        """Record a finished call against its task (one reservation, settled at once)."""
        task_id, task_type = run.task_id, run.task_type
        r = self.ledger.reserve(task_id, task_type, model, inp, out, 0, self._limits(task_type))
        if r.id is not None:
            self.ledger.settle(r.id, inp, out, nanos, model=model)
        self.ledger._store.pending.forget_view(task_id)  # budgeted calls read afresh
