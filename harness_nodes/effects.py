"""Exactly-once side effects: the effect ledger and the tool markers that use it.

A tool that changes the world (sends the email, issues the refund) is marked `irreversible`
(or `effect(..., idempotent=True)` when the downstream API de-duplicates by key). Its
`ToolNode` gets the ledger's hook, ``wrap_tool_call=ledger.wrap_tool_call``. Each call then
runs at most once per ``(thread_id, tool_call_id)``:

1. the intent is committed (row ``started``) before the tool runs;
2. the tool runs with a stable idempotency key it reads with `current_effect()` (pass it on
   to APIs that accept one);
3. the result is committed (row ``done``).

On replay (a crash after the result was recorded, a resumed run re-executing the tool node)
the recorded result is returned without running the tool (``harness.effect.replay``). An
intent with no result — the process died inside the call — is `EffectOutcomeUnknown`: the
call is never re-run silently. The hook answers with an error `ToolMessage` carrying an
``Escalation(kind="effect_unknown")`` in ``additional_kwargs["harness"]["escalation"]``,
which `HumanReview` turns into a review item; the reviewer's answer is recorded with
`EffectLedger.resolve` (it happened: here is its result / it did not: run it again).

The ledger is an explicit object over a `Backend` — no global registry — so tests and
workers each hold their own.

Example:
    ```python
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from checkpointers import open_backend
    from harness_nodes import EffectLedger, current_effect, irreversible

    sent: list[str] = []


    @irreversible
    @tool
    def send_email(to: str) -> str:
        \"\"\"Send an email.\"\"\"
        sent.append(current_effect().idempotency_key)  # give this key to the mail API
        return f"sent to {to}"


    def agent(state: MessagesState) -> dict[str, list[AIMessage]]:
        if len(state["messages"]) == 1:
            call = {"name": "send_email", "args": {"to": "a@example.com"}, "id": "call-1"}
            return {"messages": [AIMessage("", tool_calls=[call])]}
        return {"messages": [AIMessage("done")]}


    with open_backend("memory://") as backend:
        ledger = EffectLedger(backend)
        builder = StateGraph(MessagesState)
        builder.add_node("agent", agent)
        builder.add_node("tools", ToolNode([send_email], wrap_tool_call=ledger.wrap_tool_call))
        builder.add_edge(START, "agent")
        builder.add_conditional_edges(
            "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
        )
        builder.add_edge("tools", "agent")
        graph = builder.compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": "t-1"}}
        graph.invoke({"messages": [HumanMessage("mail a")]}, config, durability="sync")
        assert sent == ["t-1:call-1"]
        assert ledger.get("t-1", "call-1").status == "done"
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.errors import GraphBubbleUp

from harness_nodes import _codec
from harness_nodes._events import aemit, emit
from harness_nodes.errors import (
    EffectError,
    EffectNotResolvable,
    EffectOutcomeUnknown,
    HarnessError,
    UnguardedEffect,
    UserError,
)
from harness_nodes.state import Escalation

logger = logging.getLogger("harness_nodes.effects")

if TYPE_CHECKING:
    from langgraph.prebuilt.tool_node import ToolCallRequest
    from langgraph.types import Command

    from checkpointers import Backend, Transaction
    from checkpointers.aio import AsyncTransaction

__all__ = [
    "EffectContext",
    "EffectKind",
    "EffectLedger",
    "EffectRecord",
    "EffectStatus",
    "current_effect",
    "effect",
    "effect_kind",
    "idempotency_key",
    "irreversible",
]

T = TypeVar("T")

EffectKind = Literal["irreversible", "idempotent"]
"""``irreversible``: never re-run when its outcome is unknown. ``idempotent``: the downstream
honours the idempotency key, so an unknown outcome is settled by running it again."""

EffectStatus = Literal["started", "done", "error", "aborted"]
"""``started``: intent committed, no result yet. ``done``: result recorded. ``error``: the tool
raised. ``aborted``: known not to have happened (paused before it ran, or a reviewer said so);
the next execution runs it."""


# --- what the tool sees ----------------------------------------------------------------------


@dataclass(frozen=True)
class EffectContext:
    """The call a guarded tool is running for. Read it with `current_effect()`.

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import EffectContext, EffectLedger

        seen: list[EffectContext] = []


        def send_email(ctx: EffectContext) -> str:
            seen.append(ctx)  # give ctx.idempotency_key to an API that de-duplicates by key
            return "sent"


        with open_backend("memory://") as backend:
            EffectLedger(backend).run(send_email, name="send_email", thread_id="t-1", call_id="c1")
        [ctx] = seen
        assert (ctx.thread_id, ctx.tool_call_id, ctx.tool) == ("t-1", "c1", "send_email")
        assert ctx.attempt == 1
        assert ctx.idempotency_key == "t-1:c1"
        ```
    """

    thread_id: str
    """The task's thread."""
    tool_call_id: str
    """The tool call (or the node task's id where there is no tool call)."""
    tool: str
    """The tool's (or effect's) name."""
    idempotency_key: str
    """Stable across crashes and resumes: give it to APIs that de-duplicate by key."""
    attempt: int
    """1 on the first execution; higher only for idempotent effects re-run after a crash."""


_CURRENT: ContextVar[EffectContext | None] = ContextVar("harness_effect", default=None)


def current_effect() -> EffectContext:
    """The effect being executed: call it inside a tool marked `irreversible` or `effect`.

    Raises:
        UnguardedEffect: called outside a ledger-guarded execution.

    Example:
        ```python
        from harness_nodes import UnguardedEffect, current_effect

        try:
            current_effect()
        except UnguardedEffect:
            pass  # outside a ToolNode wired with EffectLedger.wrap_tool_call
        ```
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise UnguardedEffect("<unknown>")
    return ctx


def idempotency_key(thread_id: str, tool_call_id: str) -> str:
    """The idempotency key of one call: the same in every process, on every resume.

    Example:
        ```python
        from harness_nodes import idempotency_key

        assert idempotency_key("t-1", "call-1") == "t-1:call-1"
        ```
    """
    return f"{thread_id}:{tool_call_id}"


# --- marking tools ---------------------------------------------------------------------------

_MARK = "effect"


def effect_kind(tool: BaseTool | None) -> EffectKind | None:
    """How a tool was marked: ``"irreversible"``, ``"idempotent"`` or ``None`` (no effects).

    Other layers use it too: `HumanReview` pauses before irreversible calls, verification
    never retries them blindly.

    Example:
        ```python
        from langchain_core.tools import tool

        from harness_nodes import effect_kind, irreversible


        @tool
        def lookup(q: str) -> str:
            \"\"\"Read-only.\"\"\"
            return q


        assert effect_kind(lookup) is None
        assert effect_kind(irreversible(lookup)) == "irreversible"
        ```
    """
    if tool is None or not tool.metadata:
        return None
    harness = tool.metadata.get("harness")
    kind = harness.get(_MARK) if isinstance(harness, Mapping) else None
    return kind if kind in ("irreversible", "idempotent") else None


def _guard(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def aguarded(*args: Any, **kwargs: Any) -> Any:
            ctx = _CURRENT.get()
            if ctx is None or ctx.tool != name:
                raise UnguardedEffect(name)
            return await fn(*args, **kwargs)

        return aguarded

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        ctx = _CURRENT.get()
        if ctx is None or ctx.tool != name:
            raise UnguardedEffect(name)
        return fn(*args, **kwargs)

    return guarded


def _mark(tool: BaseTool | Callable[..., Any], kind: EffectKind) -> BaseTool:
    if not isinstance(tool, BaseTool):
        if not callable(tool):
            raise UserError(f"effect() expects a LangChain tool or a function, got {tool!r}")
        from langchain_core.tools import tool as make_tool

        tool = make_tool(tool)
    metadata = dict(tool.metadata or {})
    metadata["harness"] = {**dict(metadata.get("harness") or {}), _MARK: kind}
    update: dict[str, Any] = {"metadata": metadata}
    if isinstance(tool, StructuredTool):
        # The tool itself refuses to run unguarded: a forgotten wrap_tool_call is a loud
        # error, never a silent duplicate.
        if tool.func is not None:
            update["func"] = _guard(tool.func, tool.name)
        if tool.coroutine is not None:
            update["coroutine"] = _guard(tool.coroutine, tool.name)
    return tool.model_copy(update=update)


@overload
def effect(tool: BaseTool | Callable[..., Any], *, idempotent: bool = False) -> BaseTool: ...
@overload
def effect(
    tool: None = None, *, idempotent: bool = False
) -> Callable[[BaseTool | Callable[..., Any]], BaseTool]: ...
def effect(
    tool: BaseTool | Callable[..., Any] | None = None, *, idempotent: bool = False
) -> BaseTool | Callable[[BaseTool | Callable[..., Any]], BaseTool]:
    """Mark a tool as having side effects, so an `EffectLedger` runs it at most once per call.

    Args:
        tool: A LangChain tool (or a function, made into one with ``@tool``).
        idempotent: The downstream de-duplicates by `EffectContext.idempotency_key`, so a call
            whose outcome is unknown may simply run again with the same key. Otherwise
            (the default, same as `irreversible`) an unknown outcome goes to a human.

    Returns:
        A copy of the tool, marked, that refuses to run outside the ledger.

    Example:
        ```python
        from langchain_core.tools import tool

        from harness_nodes import effect, effect_kind


        @effect(idempotent=True)
        @tool
        def charge(amount: int) -> str:
            \"\"\"Charge the card (the payment API de-duplicates by idempotency key).\"\"\"
            return "ok"


        assert effect_kind(charge) == "idempotent"
        ```
    """
    kind: EffectKind = "idempotent" if idempotent else "irreversible"
    if tool is None:
        return lambda t: _mark(t, kind)
    return _mark(tool, kind)


def irreversible(tool: BaseTool | Callable[..., Any]) -> BaseTool:
    """Mark a tool irreversible: at most one execution per call; unknown outcomes go to a human.

    Example:
        ```python
        from langchain_core.tools import tool

        from harness_nodes import effect_kind, irreversible


        @irreversible
        @tool
        def refund(order_id: str, amount: int) -> str:
            \"\"\"Refund an order.\"\"\"
            return f"refunded {amount} on {order_id}"


        assert effect_kind(refund) == "irreversible"
        ```
    """
    return _mark(tool, "irreversible")


# --- the ledger --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EffectRecord:
    """One row of the effect ledger.

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import EffectLedger, EffectRecord

        with open_backend("memory://") as backend:
            ledger = EffectLedger(backend)
            ledger.run(lambda ctx: "refunded", name="refund", thread_id="t-1", call_id="c1",
                       args={"order": "A1"})
            record: EffectRecord | None = ledger.get("t-1", "c1")
            assert [r.tool for r in ledger.list("t-1", status="done")] == ["refund"]
        assert record is not None
        assert (record.status, record.result, record.args, record.attempts) == (
            "done", "refunded", {"order": "A1"}, 1
        )
        ```
    """

    thread_id: str
    tool_call_id: str
    tool: str
    args: dict[str, Any]
    idempotency_key: str
    status: EffectStatus
    result: Any = None
    """The recorded result (the `ToolMessage` for tool calls), decoded."""
    error: str | None = None
    attempts: int = 1
    started_at: float = 0.0
    finished_at: float | None = None
    resolved_by: str | None = None
    """Who settled an unknown outcome, if a reviewer did."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EffectRecord:
        """Build a record from a ``harness_effects`` row."""
        return cls(
            thread_id=row["thread_id"],
            tool_call_id=row["tool_call_id"],
            tool=row["tool"],
            args=_codec.decode(row["args"]) or {},
            idempotency_key=row["idempotency_key"],
            status=row["status"],
            result=_codec.decode(row["result"]),
            error=row["error"],
            attempts=int(row["attempts"]),
            started_at=float(row["started_at"]),
            finished_at=row["finished_at"],
            resolved_by=row["resolved_by"],
        )


@dataclass(frozen=True)
class _Begin:
    """What to do with a call: run it now (with this context) or replay this record."""

    run: EffectContext | None = None
    replay: EffectRecord | None = None
    unknown: EffectOutcomeUnknown | None = None


@dataclass(frozen=True)
class _Call:
    thread_id: str
    call_id: str
    tool: str
    args: dict[str, Any] = field(default_factory=dict)
    idempotent: bool = False

    @property
    def key(self) -> str:
        return idempotency_key(self.thread_id, self.call_id)

    def context(self, attempt: int) -> EffectContext:
        return EffectContext(self.thread_id, self.call_id, self.tool, self.key, attempt)

    def unknown(self, row: Mapping[str, Any]) -> EffectOutcomeUnknown:
        return EffectOutcomeUnknown(
            self.thread_id, self.call_id, self.tool, _codec.decode(row["args"]), self.key
        )


_SELECT = "SELECT * FROM harness_effects WHERE thread_id = %s AND tool_call_id = %s"
_INSERT = (
    "INSERT INTO harness_effects (thread_id, tool_call_id, tool, args, idempotency_key, "
    "status, started_at, attempts) VALUES (%s, %s, %s, %s, %s, 'started', %s, 1) "
    # No conflict target: the row has two unique keys, (thread_id, tool_call_id) and its
    # idempotency key, and two concurrent inserts of one call may meet on either first (a
    # targeted ON CONFLICT raises UniqueViolation for the other).
    "ON CONFLICT DO NOTHING RETURNING attempts"
)
_RESTART = (
    "UPDATE harness_effects SET status = 'started', attempts = attempts + 1, started_at = %s, "
    "finished_at = NULL, error = NULL WHERE thread_id = %s AND tool_call_id = %s "
    "RETURNING attempts"
)
# Each statement that ends an execution is fenced by its attempt: a run that had lost its lease
# (a stalled worker, carried on after another one recovered the task) must not record its
# result as a later attempt's. A note an earlier attempt left (below) is kept.
_FINISH = (
    "UPDATE harness_effects SET status = %s, result = %s, error = COALESCE(%s, error), "
    "finished_at = %s WHERE thread_id = %s AND tool_call_id = %s AND status = 'started' "
    "AND attempts = %s RETURNING attempts"
)
# Such a run finished a call a reviewer had since answered "it did not happen": it did. The
# truth is recorded (a later execution of the call replays it instead of running it again).
_FINISH_LATE = (
    "UPDATE harness_effects SET status = 'done', result = %s, error = %s, finished_at = %s "
    "WHERE thread_id = %s AND tool_call_id = %s AND status = 'aborted' AND attempts = %s "
    "RETURNING resolved_by"
)
LATE_NOTE = (
    "finished after it was answered 'did not happen': a run that had lost its lease carried "
    "it out; check whether it was done twice"
)
# ...or finished it after a later attempt had started it again: it ran more than once. The
# later attempt's record stands; the row says so.
_FINISH_SUPERSEDED = (
    "UPDATE harness_effects SET error = %s WHERE thread_id = %s AND tool_call_id = %s "
    "AND attempts > %s RETURNING attempts"
)
SUPERSEDED_NOTE = (
    "attempt {attempt}, by a run that had lost its lease, also carried it out after a later "
    "attempt started: it ran more than once"
)
_ABORT = (
    "UPDATE harness_effects SET status = 'aborted', finished_at = %s "
    "WHERE thread_id = %s AND tool_call_id = %s AND status = 'started' AND attempts = %s"
)
# An intent whose statement an interrupt cut short (see `_aborted_if_cut`): the row it wrote,
# if any, is known by its start time.
_ABORT_CUT = (
    "UPDATE harness_effects SET status = 'aborted', finished_at = %s "
    "WHERE thread_id = %s AND tool_call_id = %s AND status = 'started' AND started_at = %s"
)
_RESOLVE = (
    "UPDATE harness_effects SET status = %s, result = %s, finished_at = %s, resolved_by = %s "
    "WHERE thread_id = %s AND tool_call_id = %s RETURNING *"
)


def _decide(call: _Call, row: Mapping[str, Any]) -> Literal["replay", "restart", "unknown"]:
    status = row["status"]
    if status == "done":
        return "replay"
    if status == "aborted" or call.idempotent:
        return "restart"
    return "unknown"  # started (crash mid-call) or error (the tool raised: did it happen?)


def _existing(call: _Call, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:  # the insert met another call's row on the idempotency key
        raise EffectError(
            f"idempotency key {call.key!r} of {call.tool} (thread {call.thread_id!r}, call "
            f"{call.call_id!r}) is already taken by another call; thread and call ids joined "
            "by ':' must be unique"
        )
    return rows[0]


def _begin_sync(tx: Transaction, dialect: str, call: _Call, now: float) -> _Begin:
    params = (call.thread_id, call.call_id, call.tool, _codec.encode(call.args), call.key, now)
    inserted = tx.execute(_INSERT, params)
    if inserted:
        return _Begin(run=call.context(int(inserted[0]["attempts"])))
    lock = " FOR UPDATE" if dialect == "postgres" else ""
    row = _existing(call, tx.execute(_SELECT + lock, (call.thread_id, call.call_id)))
    action = _decide(call, row)
    if action == "replay":
        return _Begin(replay=EffectRecord.from_row(row))
    if action == "unknown":
        return _Begin(unknown=call.unknown(row))
    attempts = tx.execute(_RESTART, (now, call.thread_id, call.call_id))[0]["attempts"]
    return _Begin(run=call.context(int(attempts)))


async def _abegin(tx: AsyncTransaction, dialect: str, call: _Call, now: float) -> _Begin:
    params = (call.thread_id, call.call_id, call.tool, _codec.encode(call.args), call.key, now)
    inserted = await tx.execute(_INSERT, params)
    if inserted:
        return _Begin(run=call.context(int(inserted[0]["attempts"])))
    lock = " FOR UPDATE" if dialect == "postgres" else ""
    row = _existing(call, await tx.execute(_SELECT + lock, (call.thread_id, call.call_id)))
    action = _decide(call, row)
    if action == "replay":
        return _Begin(replay=EffectRecord.from_row(row))
    if action == "unknown":
        return _Begin(unknown=call.unknown(row))
    attempts = (await tx.execute(_RESTART, (now, call.thread_id, call.call_id)))[0]["attempts"]
    return _Begin(run=call.context(int(attempts)))


@contextmanager
def _active(ctx: EffectContext) -> Iterator[None]:
    token = _CURRENT.set(ctx)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class _Running:
    """The executions of ledger calls in this process, until each has recorded its outcome.

    An intent with no result is an unknown outcome (a crash mid-call), unless the call is
    still running here: under ``ainvoke`` a ``ToolNode`` gathers its calls, and one that
    raises ends the node while its siblings still run (a sync ``ToolNode`` waits for them).
    A retry of the step then meets a sibling's intent before its result. Such a begin waits
    for that execution, then begins again (and replays the result it recorded).

    An execution is listed from before its begin (so no retry can slip between its intent
    and its listing) until its outcome is recorded, or, when it was not the one to run, until
    its begin decided; a begin waits only for another listed execution, never its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_call: dict[tuple[int, str, str], list[threading.Event]] = {}
        self._running: dict[tuple[int, str, str, int], threading.Event] = {}

    def enter(self, backend: Any, call: _Call) -> threading.Event:
        """List an execution of *call* about to begin."""
        mine = threading.Event()
        with self._lock:
            self._by_call.setdefault((id(backend), call.thread_id, call.call_id), []).append(mine)
        return mine

    def decided(
        self, backend: Any, call: _Call, mine: threading.Event, begin: _Begin | None
    ) -> threading.Event | None:
        """*mine* began (*begin*; None: its statement failed): keep it listed while it runs.

        Returns another execution of the call to wait for, when the outcome was unknown.
        """
        key = (id(backend), call.thread_id, call.call_id)
        with self._lock:
            if begin is not None and begin.run is not None:
                self._running[(*key, begin.run.attempt)] = mine
                return None
            self._drop(key, mine)
            others = self._by_call.get(key, ()) if begin is not None and begin.unknown else ()
            return next(iter(others), None)

    def waited(self, wait: Callable[[float], bool], call: _Call) -> bool:
        """Wait for the other execution (``Event.wait``); False once `_RUNNING_WAIT` passed.

        A call that hangs must not hang its retry with it: past the wait, the intent is what
        it would be after a crash, an unknown outcome for a person to answer.
        """
        if wait(_RUNNING_WAIT):
            return True
        logger.warning(
            "effect ledger: %s call %s of thread %s is still running in this process after "
            "%.0f s; its outcome is unknown to this execution",
            call.tool,
            call.call_id,
            call.thread_id,
            _RUNNING_WAIT,
        )
        return False

    def leave(self, backend: Any, call: _Call, attempt: int) -> None:
        """The execution *attempt* of *call* recorded its outcome: whoever waits begins again."""
        key = (id(backend), call.thread_id, call.call_id)
        with self._lock:
            mine = self._running.pop((*key, attempt), None)
            if mine is not None:
                self._drop(key, mine)

    def _drop(self, key: tuple[int, str, str], mine: threading.Event) -> None:
        left = [e for e in self._by_call.get(key, ()) if e is not mine]
        if left:
            self._by_call[key] = left
        else:
            self._by_call.pop(key, None)
        mine.set()


_RUNNING = _Running()
# How long a begin waits for an execution of the same call still running in this process.
_RUNNING_WAIT = 300.0


def _event(ctx_or_call: EffectContext | _Call | EffectRecord) -> dict[str, Any]:
    if isinstance(ctx_or_call, _Call):
        thread_id, call_id, tool, key = (
            ctx_or_call.thread_id,
            ctx_or_call.call_id,
            ctx_or_call.tool,
            ctx_or_call.key,
        )
    else:
        thread_id, call_id, tool, key = (
            ctx_or_call.thread_id,
            ctx_or_call.tool_call_id,
            ctx_or_call.tool,
            ctx_or_call.idempotency_key,
        )
    return {"thread_id": thread_id, "tool_call_id": call_id, "tool": tool, "idempotency_key": key}


def _call_of(request: ToolCallRequest, idempotent: bool) -> _Call:
    config = request.runtime.config if request.runtime is not None else {}
    configurable = config.get("configurable") or {}
    thread_id = configurable.get("thread_id")
    if not thread_id:
        raise UserError(
            f"Tool {request.tool_call['name']!r} has side effects but the graph runs without a "
            "thread_id: compile it with a checkpointer and pass "
            "config={'configurable': {'thread_id': ...}}"
        )
    call_id = request.tool_call.get("id") or _task_call_id(config, request.tool_call["name"])
    return _Call(
        str(thread_id),
        str(call_id),
        request.tool_call["name"],
        dict(request.tool_call["args"]),
        idempotent,
    )


def _task_call_id(config: RunnableConfig, name: str) -> str:
    # No tool-call id (some providers omit it): the node's task id is stable across crash and
    # resume under durability="sync", so it identifies the call as well.
    task_id = (config.get("configurable") or {}).get("checkpoint_ns") or "task"
    return f"{task_id}/{name}"


def _with_effect_meta(msg: ToolMessage, key: str, replayed: bool) -> ToolMessage:
    kwargs = dict(msg.additional_kwargs)
    harness = dict(kwargs.get("harness") or {})
    harness["effect"] = {"idempotency_key": key, "replayed": replayed}
    kwargs["harness"] = harness
    return msg.model_copy(update={"additional_kwargs": kwargs})


def _unknown_message(error: EffectOutcomeUnknown) -> ToolMessage:
    """The error `ToolMessage` that hands an unknown outcome to human review.

    It carries an ``Escalation(kind="effect_unknown")`` under
    ``additional_kwargs["harness"]["escalation"]`` with the call's arguments and key.
    """
    escalation = Escalation(
        kind="effect_unknown",
        reason=(
            f"{error.tool} started but its result was never recorded: check whether it "
            "happened (idempotency key "
            f"{error.idempotency_key}) before anything runs it again"
        ),
        tool=error.tool,
        tool_call_id=error.tool_call_id,
        args=error.call_args,
        details={"thread_id": error.thread_id, "idempotency_key": error.idempotency_key},
    )
    return ToolMessage(
        content=str(error),
        name=error.tool,
        tool_call_id=error.tool_call_id,
        status="error",
        additional_kwargs={
            "harness": {
                "escalation": escalation,
                "effect": {"idempotency_key": error.idempotency_key, "replayed": False},
            }
        },
    )


def _replayed(record: EffectRecord) -> Any:
    result = record.result
    if isinstance(result, ToolMessage):
        return _with_effect_meta(result, record.idempotency_key, replayed=True)
    return result


class EffectLedger:
    """Runs side effects at most once per ``(thread_id, tool_call_id)``, over a `Backend`.

    Use its `wrap_tool_call` / `awrap_tool_call` as the `ToolNode` hooks: tools marked with
    `irreversible` / `effect` go through the ledger, other tools run as usual. `run` guards
    an effect made anywhere else (a plain node).

    Args:
        backend: Where the ledger lives (the same database as the checkpoints).
        on_unknown: ``"escalate"`` (default) answers an unknown outcome with an error
            `ToolMessage` carrying an ``effect_unknown`` escalation, for `HumanReview`;
            ``"raise"`` raises `EffectOutcomeUnknown` out of the tool node instead. An
            intent whose call is still running in this process (a sibling's error ended an
            async ``ToolNode`` while it ran) is not unknown: it is waited for, up to 300 s,
            and its result replayed.

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import EffectLedger

        with open_backend("memory://") as backend:
            ledger = EffectLedger(backend)
            first = ledger.run(lambda ctx: f"sent {ctx.idempotency_key}",
                               name="email", thread_id="t", call_id="c1")
            again = ledger.run(lambda ctx: "sent twice!", name="email", thread_id="t",
                               call_id="c1")
            assert first == again == "sent t:c1"
        ```
    """

    def __init__(
        self, backend: Backend, *, on_unknown: Literal["escalate", "raise"] = "escalate"
    ) -> None:
        from checkpointers import Backend

        if not isinstance(backend, Backend):
            raise UserError(
                f"EffectLedger needs a checkpointers.Backend, got {type(backend).__name__}; "
                "for an AsyncBackend use harness_nodes.aio.AsyncEffectLedger"
            )
        if on_unknown not in ("escalate", "raise"):
            raise UserError(f"on_unknown must be 'escalate' or 'raise', not {on_unknown!r}")
        self.backend = backend
        self.on_unknown = on_unknown

    def __repr__(self) -> str:
        return f"EffectLedger({self.backend!r}, on_unknown={self.on_unknown!r})"

    # -- reading ----------------------------------------------------------------------------

    def get(self, thread_id: str, tool_call_id: str) -> EffectRecord | None:
        """The ledger row for one call, or ``None``."""
        rows = self.backend.execute(_SELECT, (thread_id, tool_call_id))
        return EffectRecord.from_row(rows[0]) if rows else None

    def list(
        self, thread_id: str | None = None, *, status: EffectStatus | None = None
    ) -> list[EffectRecord]:
        """Ledger rows, oldest first, optionally for one thread and/or one status."""
        sql, params = _list_query(thread_id, status)
        return [EffectRecord.from_row(r) for r in self.backend.execute(sql, params)]

    # -- settling unknown outcomes ------------------------------------------------------------

    def resolve(
        self,
        thread_id: str,
        tool_call_id: str,
        *,
        happened: bool,
        result: Any = None,
        reviewer: str,
    ) -> EffectRecord:
        """Record a person's answer to an unknown outcome ("did the refund go out?").

        Args:
            thread_id: The call's thread.
            tool_call_id: The call.
            happened: ``True``: it happened; *result* becomes the recorded result and every
                later execution replays it. ``False``: it did not; the next execution of this
                call runs it (once).
            result: The result to record when it happened: a `ToolMessage` (or its text).
            reviewer: Who answered, kept in ``resolved_by``.

        Raises:
            EffectNotResolvable: no such call in the ledger, or its result is already recorded
                (another reviewer answered first).
        """
        lock = " FOR UPDATE" if self.backend.dialect == "postgres" else ""
        with self.backend.transaction() as tx:
            rows = tx.execute(_SELECT + lock, (thread_id, tool_call_id))
            status, encoded = _resolution(thread_id, tool_call_id, happened, result, rows)
            rows = tx.execute(
                _RESOLVE, (status, encoded, time.time(), reviewer, thread_id, tool_call_id)
            )
        return EffectRecord.from_row(rows[0])

    # -- running ------------------------------------------------------------------------------

    def run(
        self,
        fn: Callable[[EffectContext], T],
        *,
        name: str,
        thread_id: str,
        call_id: str,
        args: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> T:
        """Run ``fn(context)`` at most once for ``(thread_id, call_id)``; replay its result.

        Use it for an effect made outside a tool node (in a plain node, pass the node's
        task-stable id as *call_id*). The result must be serializable by LangGraph's
        serializer (JSON values, messages, pydantic models...).

        Raises:
            EffectOutcomeUnknown: an earlier execution started and never recorded a result
                (unless *idempotent*, which runs it again with the same key).
        """
        call = _Call(thread_id, call_id, name, dict(args or {}), idempotent)
        begin = self._begin(call)
        if begin.unknown is not None:
            emit("effect.unknown", _event(call))
            raise begin.unknown
        if begin.replay is not None:
            emit("effect.replay", _event(begin.replay))
            return _replayed(begin.replay)  # type: ignore[no-any-return]
        assert begin.run is not None
        self._reported(call, begin.run, None)
        with _active(begin.run):
            try:
                value = fn(begin.run)
            except GraphBubbleUp:
                self._abort(call, begin.run.attempt)
                raise
            except BaseException as e:
                self._finish(call, begin.run.attempt, "error", None, _error_text(e))
                raise
        self._finish(call, begin.run.attempt, "done", value, None)
        return value

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        execute: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """`ToolNode` hook (``wrap_tool_call=``): marked tools run through the ledger."""
        kind = effect_kind(request.tool)
        if kind is None:
            return execute(request)
        call = _call_of(request, idempotent=kind == "idempotent")
        config = request.runtime.config
        begin = self._begin(call)
        if begin.unknown is not None:
            emit("effect.unknown", _event(call), config)
            if self.on_unknown == "raise":
                raise begin.unknown
            return _unknown_message(begin.unknown)
        if begin.replay is not None:
            emit("effect.replay", _event(begin.replay), config)
            return _replay_result(begin.replay, call)
        assert begin.run is not None
        self._reported(call, begin.run, config)
        with _active(begin.run):
            try:
                out = execute(request)
            except GraphBubbleUp:
                self._abort(call, begin.run.attempt)
                raise
            except BaseException as e:
                self._finish(call, begin.run.attempt, "error", None, _error_text(e))
                raise
        if isinstance(out, ToolMessage):
            out = _with_effect_meta(out, call.key, replayed=False)
        self._finish(call, begin.run.attempt, "done", out, None)
        return out

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        execute: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """`ToolNode` hook (``awrap_tool_call=``) for graphs run with ``ainvoke``.

        The ledger's statements run in a worker thread; with an `AsyncBackend` use
        `harness_nodes.aio.AsyncEffectLedger`.
        """
        kind = effect_kind(request.tool)
        if kind is None:
            return await execute(request)
        call = _call_of(request, idempotent=kind == "idempotent")
        config = request.runtime.config
        begin = await self._begin_in_thread(call)
        if begin.unknown is not None:
            await aemit("effect.unknown", _event(call), config)
            if self.on_unknown == "raise":
                raise begin.unknown
            return _unknown_message(begin.unknown)
        if begin.replay is not None:
            await aemit("effect.replay", _event(begin.replay), config)
            return _replay_result(begin.replay, call)
        assert begin.run is not None
        try:
            await aemit("effect.run", _event(begin.run), config)
        except BaseException:  # cut short before the call ran: see AsyncEffectLedger._reported
            await asyncio.to_thread(self._abort, call, begin.run.attempt)
            raise
        with _active(begin.run):
            try:
                out = await execute(request)
            except GraphBubbleUp:
                await asyncio.to_thread(self._abort, call, begin.run.attempt)
                raise
            except BaseException as e:
                await asyncio.to_thread(
                    self._finish, call, begin.run.attempt, "error", None, _error_text(e)
                )
                raise
        if isinstance(out, ToolMessage):
            out = _with_effect_meta(out, call.key, replayed=False)
        await asyncio.to_thread(self._finish, call, begin.run.attempt, "done", out, None)
        return out

    # -- internals ----------------------------------------------------------------------------

    async def _begin_in_thread(self, call: _Call) -> _Begin:
        """`_begin` in a worker thread, for a task that may be cancelled meanwhile.

        A cancelled task lets go of the thread, which records the intent anyway: the call
        never ran, and was left ``started`` — an "outcome unknown" for a person on the next
        execution. So the thread is waited for, and what it began is aborted.
        """
        begun = asyncio.ensure_future(asyncio.to_thread(self._begin, call))
        try:
            return await asyncio.shield(begun)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the cancellation is what is reported
                begin = await begun
                if begin.run is not None:
                    await asyncio.to_thread(self._abort, call, begin.run.attempt)
            raise

    def _reported(self, call: _Call, run: EffectContext, config: RunnableConfig | None) -> None:
        """Report the execution about to start; cut short, it is recorded as never made.

        As `AsyncEffectLedger._reported`: the call has not run, so it is aborted (and no
        longer listed as running here, see `_Running`).
        """
        try:
            emit("effect.run", _event(run), config)
        except BaseException:
            self._abort(call, run.attempt)
            raise

    def _begin(self, call: _Call) -> _Begin:
        while True:  # see `_Running`: a call still running here is waited for, not unknown
            mine = _RUNNING.enter(self.backend, call)
            began = None
            try:
                began = self._begin_once(call)
            finally:
                running = _RUNNING.decided(self.backend, call, mine, began)
            if running is None or not _RUNNING.waited(running.wait, call):
                assert began is not None
                return began

    def _begin_once(self, call: _Call) -> _Begin:
        now = time.time()

        def begin() -> _Begin:
            with self.backend.transaction() as tx:
                return _begin_sync(tx, self.backend.dialect, call, now)

        try:
            return _ledger_statement(self.backend, begin)
        except BaseException as e:
            if _aborted_if_cut(self.backend.dialect, e):
                params = (time.time(), call.thread_id, call.call_id, now)
                _ledger_statement(self.backend, lambda: self.backend.execute(_ABORT_CUT, params))
            raise

    def _finish(
        self, call: _Call, attempt: int, status: str, value: Any, error: str | None
    ) -> None:
        encoded = None if value is None else _codec.encode(value)
        now = time.time()
        params = (status, encoded, error, now, call.thread_id, call.call_id, attempt)

        def finish() -> tuple[str, list[dict[str, Any]]]:
            if self.backend.execute(_FINISH, params) or status != "done":
                return "", []
            key = (call.thread_id, call.call_id, attempt)
            late = self.backend.execute(_FINISH_LATE, (encoded, LATE_NOTE, now, *key))
            if late:
                return "late", late
            note = SUPERSEDED_NOTE.format(attempt=attempt)
            return "twice", self.backend.execute(_FINISH_SUPERSEDED, (note, *key))

        try:
            _log_late(call, attempt, *_ledger_statement(self.backend, finish))
        finally:
            _RUNNING.leave(self.backend, call, attempt)

    def _abort(self, call: _Call, attempt: int) -> None:
        params = (time.time(), call.thread_id, call.call_id, attempt)
        try:
            _ledger_statement(self.backend, lambda: self.backend.execute(_ABORT, params))
        finally:
            _RUNNING.leave(self.backend, call, attempt)


def _aborted_if_cut(dialect: str, error: BaseException) -> bool:
    """An interrupt cut the intent's statement short: abort the row it may have written.

    A ``KeyboardInterrupt``, a thread's async exception or a cancelled task (not an
    ``Exception``: those the statement's retries handle) can arrive as the COMMIT returns,
    leaving an intent ``started`` for a call that never ran, which the next execution took
    for a crash mid-call ("outcome unknown") and handed to a person. On SQLite the
    transaction is over by then — committed, or rolled back before anyone else's statement —
    so the row, if there, is aborted (known by its start time) and the call runs next time.
    On Postgres a cut-short COMMIT may still land after this check, from another
    connection: the row stays ``started``, and a person answers (the safe side).
    """
    return dialect == "sqlite" and not isinstance(error, Exception)


def _log_late(call: _Call, attempt: int, kind: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Say loudly that a run that had lost its lease carried out a call after all."""
    if not rows:
        return
    where = f"{call.tool} (thread {call.thread_id}, call {call.call_id})"
    if kind == "late":
        logger.error("%s %s (answered by %s)", where, LATE_NOTE, rows[0].get("resolved_by"))
    else:
        logger.error(
            "%s %s (attempt %s is the one recorded)",
            where,
            SUPERSEDED_NOTE.format(attempt=attempt),
            rows[0].get("attempts"),
        )


def _ledger_statement(backend: Any, run: Callable[[], T]) -> T:
    """Run one of the ledger's own statements (each safe to repeat), retrying passing faults.

    A database fault is the ledger's, not the tool's: after the retries it is a
    `BackendUnavailable` (a harness error, which verification lets through) — never a tool
    failure. If the tool ran and its result could not be recorded, the row stays ``started``
    and the resumed run asks a person whether the call took effect.
    """
    for attempt in range(1, 4):
        try:
            return run()
        except HarnessError:
            raise
        except Exception as e:
            time.sleep(_ledger_retry(backend, e, attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def _ledger_retry(backend: Any, error: Exception, attempt: int) -> float:
    """Seconds to wait before retrying a ledger statement that raised *error*; or raise."""
    from checkpointers.errors import is_transient, unavailable

    if is_transient(error) and attempt < 3:
        return float(0.1 * 2**attempt)
    raise unavailable(backend, "effect ledger", error) from error


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _replay_result(record: EffectRecord, call: _Call) -> ToolMessage | Command[Any]:
    result = record.result
    if isinstance(result, ToolMessage):
        return _with_effect_meta(result, record.idempotency_key, replayed=True)
    if result is None or isinstance(result, str):
        # Settled by a reviewer with plain text (or nothing): answer as the tool would have.
        return _with_effect_meta(
            ToolMessage(content=result or "", name=call.tool, tool_call_id=call.call_id),
            record.idempotency_key,
            replayed=True,
        )
    return result  # type: ignore[no-any-return]


def _list_query(thread_id: str | None, status: str | None) -> tuple[str, tuple[Any, ...]]:
    clauses, params = [], []
    if thread_id is not None:
        clauses.append("thread_id = %s")
        params.append(thread_id)
    if status is not None:
        clauses.append("status = %s")
        params.append(status)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    return f"SELECT * FROM harness_effects{where} ORDER BY started_at", tuple(params)


def _resolution(
    thread_id: str,
    tool_call_id: str,
    happened: bool,
    result: Any,
    rows: list[dict[str, Any]],
) -> tuple[str, str | None]:
    if not rows:
        raise EffectNotResolvable(thread_id, tool_call_id, "no such call in the effect ledger")
    row = rows[0]
    if row["status"] == "done":
        raise EffectNotResolvable(thread_id, tool_call_id, "its result is already recorded")
    if not happened:
        return "aborted", None
    if isinstance(result, str) or result is None:
        result = ToolMessage(content=result or "", name=row["tool"], tool_call_id=tool_call_id)
    return "done", _codec.encode(result)
