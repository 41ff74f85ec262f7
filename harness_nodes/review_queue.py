"""`ReviewQueue`: every paused review across all threads, in one indexed table.

Open-source LangGraph keeps interrupts inside each thread's checkpoints, so finding the
pending ones means scanning every thread. The queue keeps one row per pause in
``harness_reviews`` (keyed on thread + interrupt id), lists them with filters served by an
index, shows each with its trace, and applies a decision: it validates it, records who
decided what (``harness_review_audit``), resumes the run with ``Command(resume=...)`` and
``durability="sync"`` (a `TaskRunner`'s task under the runner's lease, as `TaskRunner.resume`
does), and lets exactly one of several racing reviewers win.

Rows are written from the graph's state after a run pauses (`ReviewQueue.sync`, called by
`ReviewQueue.invoke` and after every decision), never from inside the node: the node stays
pure before ``interrupt()``, and the upsert is idempotent, so syncing twice is harmless and a
crash between the pause and the sync loses nothing (the pause is in the checkpoint; sync
again). See ``docs/decisions/0006-review-queue.md``.

Example:
    ```python
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from checkpointers import open_backend
    from harness_nodes import HumanReview, ReviewPolicy, ReviewQueue
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

    with open_backend("memory://") as backend:
        graph = builder.compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph)
        queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t1")
        [item] = queue.pending()
        assert item.reason == "irreversible"
        done = queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert done["messages"][-1].content == "Done."
    ```
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.errors import EmptyInputError
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, Interrupt, StateSnapshot

from checkpointers.errors import outage
from harness_nodes._lease import SELECT_THREAD, Answer, TaskRun, claim, new_owner
from harness_nodes._trace_langfuse import Masker, carry_marks, marked_fields
from harness_nodes._trace_local import Trace, build_trace
from harness_nodes.errors import (
    AlreadyDecided,
    EffectNotResolvable,
    HarnessError,
    InvalidDecision,
    ReviewNotFound,
    RunFailed,
    UnknownThread,
    UserError,
)
from harness_nodes.review import (
    HumanReview,
    ReviewDecision,
    ReviewRequest,
    check_decisions,
    trace_excerpt,
)

if TYPE_CHECKING:
    from langgraph.checkpoint.base import CheckpointTuple
    from langgraph.pregel import Pregel

    from checkpointers import AsyncBackend, Backend
    from checkpointers.backend import Row
    from harness_nodes.aio import AsyncTaskRunner
    from harness_nodes.runner import TaskRunner

__all__ = [
    "AsyncReviewQueue",
    "PendingOrder",
    "ReviewDetail",
    "ReviewItem",
    "ReviewQueue",
    "ReviewStatus",
]

ReviewStatus = Literal["pending", "decided", "applied", "closed"]
"""``pending`` → ``decided`` (a reviewer won; the run is resuming) → ``applied`` (resumed).
``closed``: the pause was answered outside the queue (the run moved on without it)."""

_RISK_PRIORITY = {"low": 0, "medium": 1, "high": 2}
_RISK_ORDER = _RISK_PRIORITY


@dataclass(frozen=True)
class ReviewItem:
    """One paused review in the queue.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langgraph.graph import START, MessagesState, StateGraph

        from checkpointers import open_backend
        from harness_nodes import HumanReview, ReviewItem, ReviewPolicy, ReviewQueue
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call

        model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("refund", {"amount": 250})])])
        review = HumanReview(ReviewPolicy(irreversible=["refund"]))
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_node("review", review)
        builder.add_node("tools", lambda state: {})
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", review.route)
        with open_backend("memory://") as backend:
            queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="ticket-1")
            items: list[ReviewItem] = queue.pending()
        [item] = items
        assert (item.thread_id, item.status, item.reason, item.risk) == (
            "ticket-1", "pending", "irreversible", "high"
        )
        assert item.requests[0]["action_request"]["action"] == "refund"
        ```
    """

    id: str
    """The item's id (stable: derived from thread and interrupt id)."""
    thread_id: str
    """The paused task's thread."""
    interrupt_id: str
    """LangGraph's id of the interrupt (what ``Command(resume={id: ...})`` answers)."""
    task_type: str
    """The task's type (from ``state["task"]`` or the run's metadata)."""
    reason: str
    """Why it was paused, as a category (the riskiest request's trigger)."""
    risk: str
    """The highest risk among the requests."""
    status: ReviewStatus
    """Where it is in its life."""
    priority: int
    """Higher first; defaults from the risk."""
    assignee: str | None
    """Who should decide, if assigned."""
    deadline: float | None
    """Epoch seconds after which the expiry policy applies."""
    created_at: float
    """Epoch seconds when the queue saw the pause."""
    requests: list[ReviewRequest]
    """What the reviewer decides on, one request per call."""
    decision: list[dict[str, Any]] | None = None
    """The winning decisions (one per request), once decided."""
    decided_by: str | None = None
    """Who decided."""
    decided_at: float | None = None
    """When."""

    @property
    def age(self) -> float:
        """Seconds since the queue saw the pause."""
        return max(0.0, time.time() - self.created_at)


@dataclass(frozen=True)
class ReviewDetail:
    """An item with the task's trace so far (`ReviewQueue.show`).

    It is what a reviewer is shown, so secrets in it are masked as in `build_trace`: API
    keys and secret values in the requests, trace lines and audit rows (`ReviewQueue.get`
    returns the item as stored).

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langgraph.graph import START, MessagesState, StateGraph

        from checkpointers import open_backend
        from harness_nodes import HumanReview, ReviewDetail, ReviewPolicy, ReviewQueue
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call

        model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("refund", {"amount": 250})])])
        review = HumanReview(ReviewPolicy(irreversible=["refund"]))
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_node("review", review)
        builder.add_node("tools", lambda state: {})
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", review.route)
        with open_backend("memory://") as backend:
            queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="ticket-1")
            [item] = queue.pending()
            detail: ReviewDetail = queue.show(item.id)
        assert detail.item.id == item.id
        assert detail.trace  # the steps that led to the pause, oldest first
        ```
    """

    item: ReviewItem
    """The queue row."""
    trace: list[str]
    """The task's steps so far, oldest first: checkpoints, then the decisions that led here."""
    audit: list[dict[str, Any]] = field(default_factory=list)
    """Audit rows for this item (who, when, what, before/after args)."""
    tree: Trace | None = None
    """The task's full decision tree from `build_trace` (sync queue; None if unavailable)."""


# --- SQL shared by the sync and async queues ------------------------------------------------

_COLUMNS = (
    "id, thread_id, interrupt_id, task_type, reason, risk, request, status, priority, "
    "assignee, deadline, created_at, decision, decided_by, decided_at"
)
_INSERT = (
    "INSERT INTO harness_reviews (id, thread_id, interrupt_id, task_type, reason, risk, "
    "request, status, priority, assignee, deadline, created_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s) "
    "ON CONFLICT (thread_id, interrupt_id) DO NOTHING"
)
_CLAIM = (
    "UPDATE harness_reviews SET status = 'decided', decision = %s, decided_by = %s, "
    "decided_at = %s WHERE id = %s AND status = 'pending' RETURNING id"
)
_AUDIT = (
    "INSERT INTO harness_review_audit (review_id, reviewer, decision, before, after, at) "
    "VALUES (%s, %s, %s, %s, %s, %s)"
)
_UNDECIDE = (
    "UPDATE harness_reviews SET status = 'pending', decision = NULL, "
    "decided_by = NULL, decided_at = NULL WHERE id = %s AND status = 'decided'"
)
_APPLIED = "UPDATE harness_reviews SET status = 'applied' WHERE id = %s AND status = 'decided'"
_CLOSE = "UPDATE harness_reviews SET status = 'closed' WHERE id = %s AND status = 'pending'"
_DECIDED = f"SELECT {_COLUMNS} FROM harness_reviews WHERE thread_id = %s AND status = 'decided'"


class _ThreadBusy(Exception):
    """Rolls a review's claim back: its task's lease is held elsewhere (or the task ended)."""


PendingOrder = Literal["age", "urgency"]
"""``age``: oldest first. ``urgency``: highest priority first, then earliest deadline
(items without one after those with one), then oldest."""

_ORDERS: dict[str, str] = {
    "age": "created_at, id",
    "urgency": "priority DESC, CASE WHEN deadline IS NULL THEN 1 ELSE 0 END, deadline, "
    "created_at, id",
}


_ASSIGN = "UPDATE harness_reviews SET assignee = %s WHERE id = %s"
_EXPIRED = (
    f"SELECT {_COLUMNS} FROM harness_reviews WHERE status = 'pending' "
    "AND deadline IS NOT NULL AND deadline < %s ORDER BY deadline"
)
_ESCALATE = (
    "UPDATE harness_reviews SET assignee = %s, deadline = %s, priority = priority + 1 "
    "WHERE id = %s AND status = 'pending' AND deadline < %s RETURNING id"
)
_EXPIRY_REVIEWER = "harness:expired"
_EXPIRED_REJECT = {"type": "reject", "message": "no reviewer decided before the deadline"}


def _assign_audit(item: ReviewItem, assignee: str | None, by: str) -> tuple[Any, ...]:
    return (item.id, by, "assign", json.dumps(item.assignee), json.dumps(assignee), time.time())


def _refused_audit(item: ReviewItem, error: InvalidDecision) -> tuple[Any, ...]:
    """The row that says a claimed decision was refused by the graph and never applied.

    The decision's own row stays (the audit only grows); this one follows it, so the history
    reads "bob: edit" then "bob: refused (why)".
    """
    return (
        item.id,
        item.decided_by or "",
        "refused",
        json.dumps(item.decision, default=str),
        json.dumps(error.reason),
        time.time(),
    )


def _effect_answers(
    requests: Sequence[ReviewRequest], decisions: Sequence[Mapping[str, Any]]
) -> list[tuple[str, bool, str]]:
    """``(tool_call_id, happened, result)`` per effect_unknown request approved or rejected."""
    out = []
    for req, dec in zip(requests, decisions, strict=False):
        if req["trigger"] != "effect_unknown" or dec.get("type") not in ("approve", "reject"):
            continue
        happened = dec["type"] == "approve"
        note = f" Reviewer's note: {dec['message']}" if dec.get("message") else ""
        result = f"A human reviewer confirmed the call took effect.{note}" if happened else ""
        out.append((req["tool_call_id"], happened, result))
    return out


def _denied_effects(
    requests: Sequence[ReviewRequest], decisions: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str]]:
    """``(tool_call_id, action)`` per effect_unknown request rejected ("it did not happen")."""
    return [
        (req["tool_call_id"], req["action_request"]["action"])
        for req, dec in zip(requests, decisions, strict=False)
        if req["trigger"] == "effect_unknown" and dec.get("type") == "reject"
    ]


def _contradicts_the_ledger(review_id: str, call_id: str, action: str) -> InvalidDecision:
    return InvalidDecision(
        review_id,
        f"the effect ledger records that {action} (call {call_id}) took effect since this "
        "review was asked: approve it (it happened)",
    )


def check_effect_answers(
    backend: Backend,
    thread_id: str,
    requests: Sequence[ReviewRequest],
    decisions: Sequence[Mapping[str, Any]],
    review_id: str = "",
) -> None:
    """Refuse "it did not happen" for a call the effect ledger records as done.

    The outcome was unknown when the review was asked (a process died inside the call); it
    may have become known since (the process was only paused, and finished the call). Telling
    the model the call failed would have it try again: a second payment.

    Raises:
        InvalidDecision: such a reject (nothing is applied).
    """
    from harness_nodes.effects import EffectLedger

    ledger = EffectLedger(backend)
    for call_id, action in _denied_effects(requests, decisions):
        record = ledger.get(thread_id, call_id)
        if record is not None and record.status == "done":
            raise _contradicts_the_ledger(review_id, call_id, action)


async def acheck_effect_answers(
    backend: AsyncBackend,
    thread_id: str,
    requests: Sequence[ReviewRequest],
    decisions: Sequence[Mapping[str, Any]],
    review_id: str = "",
) -> None:
    """Async `check_effect_answers`, on an `AsyncBackend`.

    Raises:
        InvalidDecision: "it did not happen" for a call the ledger records as done.
    """
    from harness_nodes.aio import AsyncEffectLedger

    ledger = AsyncEffectLedger(backend)
    for call_id, action in _denied_effects(requests, decisions):
        record = await ledger.aget(thread_id, call_id)
        if record is not None and record.status == "done":
            raise _contradicts_the_ledger(review_id, call_id, action)


def record_effect_answers(
    backend: Backend,
    thread_id: str,
    requests: Sequence[ReviewRequest],
    decisions: Sequence[Mapping[str, Any]],
    reviewer: str,
) -> None:
    """Record answers to "did it take effect?" in the effect ledger too.

    A later execution of that call then replays it (it happened) or runs it once (it did not).
    """
    answers = _effect_answers(requests, decisions)
    if not answers:
        return
    from harness_nodes.effects import EffectLedger

    ledger = EffectLedger(backend)
    for call_id, happened, result in answers:
        try:
            ledger.resolve(thread_id, call_id, happened=happened, result=result, reviewer=reviewer)
        except EffectNotResolvable:
            pass  # already settled (answered in the ledger directly), or not a ledger call


async def arecord_effect_answers(
    backend: AsyncBackend,
    thread_id: str,
    requests: Sequence[ReviewRequest],
    decisions: Sequence[Mapping[str, Any]],
    reviewer: str,
) -> None:
    """Async `record_effect_answers`, on an `AsyncBackend`."""
    answers = _effect_answers(requests, decisions)
    if not answers:
        return
    from harness_nodes.aio import AsyncEffectLedger

    ledger = AsyncEffectLedger(backend)
    for call_id, happened, result in answers:
        try:
            await ledger.aresolve(
                thread_id, call_id, happened=happened, result=result, reviewer=reviewer
            )
        except EffectNotResolvable:
            pass  # already settled (answered in the ledger directly), or not a ledger call


def _effect_answer_of(
    snapshot: StateSnapshot, value: Any
) -> tuple[list[ReviewRequest], list[dict[str, Any]], str] | None:
    """What a runner's resume *value* answers on a "did it take effect?" pause.

    Returns the pause's requests, the validated decisions and who decided; ``None`` when the
    task is not paused on one review asking it, or *value* is malformed (the graph refuses
    it the same way, and nothing is to be recorded).
    """
    pauses = [i for i in snapshot.interrupts if _is_review_interrupt(i)]
    if len(pauses) != 1:
        return None  # none, or several answered by interrupt id: the graph checks those
    requests = cast(list[ReviewRequest], pauses[0].value)
    if not any(r.get("trigger") == "effect_unknown" for r in requests):
        return None
    if isinstance(value, dict) and pauses[0].id in value:
        value = value[pauses[0].id]
    try:
        decisions = check_decisions(requests, value)
    except InvalidDecision:
        return None
    payload = [d.model_dump(exclude_none=True) for d in decisions]
    reviewer = next((d.reviewer for d in decisions if d.reviewer), None) or "task runner"
    return requests, payload, reviewer


def _died_after(snapshot: StateSnapshot) -> bool:
    """A run that is neither paused nor finished: it died mid-way (after its resume)."""
    return bool(snapshot.next) and not snapshot.interrupts


def _breakpoints(graph: Any) -> tuple[Any, Any]:
    """The compiled graph's static breakpoints: ``(interrupt_before, interrupt_after)``."""
    before = getattr(graph, "interrupt_before_nodes", None) or ()
    after = getattr(graph, "interrupt_after_nodes", None) or ()
    return before, after


def _at_breakpoint(
    before: Any,
    after: Any,
    tup: CheckpointTuple | None,
    snapshot: StateSnapshot,
    ran: Sequence[str],
) -> bool:
    """Whether a thread with no pause stands where a static breakpoint stopped its run.

    Such a stop (``interrupt_before`` / ``interrupt_after`` given to ``compile``) leaves the
    thread as a run that died does: nodes next, no pause. LangGraph notes the channels it saw
    at a breakpoint (``versions_seen["__interrupt__"]``) only when a run is resumed past it,
    so a thread whose channels changed since, with a breakpoint node next (before) or just run
    (*ran*, after), stands at one. It is not carried on: nobody said to pass it. (A run that
    was resumed past it and died before its next step was saved looks the same: it stays
    there too, for whoever resumes it.)
    """
    if tup is None:
        return False
    checkpoint: Mapping[str, Any] = tup.checkpoint
    seen: Mapping[str, Any] = checkpoint.get("versions_seen", {}).get("__interrupt__", {})
    versions: Mapping[str, Any] = checkpoint.get("channel_versions", {})
    # LangGraph's own test (`should_interrupt`): a version a saver gives is an int, a float
    # or a string, compared with the null version of its type.
    if not any(
        version > seen.get(channel, type(version)()) for channel, version in versions.items()
    ):
        return False
    hit_before = before == "*" or any(node in before for node in snapshot.next)
    hit_after = bool(after) and (after == "*" or any(node in after for node in ran))
    return hit_before or hit_after


def _on_live_pauses(rows: Sequence[Row], snapshot: StateSnapshot) -> list[ReviewItem]:
    """The decided items among *rows* whose pause the thread is still stopped at."""
    live = {i.id for i in snapshot.interrupts}
    return [item for item in map(_item, rows) if item.interrupt_id in live]


def _state_of(snapshot: StateSnapshot) -> dict[str, Any]:
    """What ``invoke`` returns for the thread as it stands: its values, and its pauses."""
    values: dict[str, Any] = dict(snapshot.values)
    if snapshot.interrupts:
        values["__interrupt__"] = list(snapshot.interrupts)
    return values


def _answer(item: ReviewItem) -> dict[str, Any]:
    """The resume value that applies *item*'s decision to its pause."""
    return {item.interrupt_id: item.decision}


def _leased_outcome(run: TaskRun) -> None:
    """Raise for a runner's task whose resumed run failed after its attempts.

    Raises:
        RunFailed: the run failed (the decision stands; the task is ``failed``).
    """
    if run.status == "failed":
        raise RunFailed(run.thread_id, "TaskFailed", run.error or "unknown error")


def review_id_for(thread_id: str, interrupt_id: str) -> str:
    """The queue id of the pause *interrupt_id* in *thread_id* (stable across processes).

    Example:
        ```python
        from harness_nodes.review_queue import review_id_for

        assert review_id_for("t1", "abc") == review_id_for("t1", "abc")
        assert len(review_id_for("t1", "abc")) == 16
        ```
    """
    return hashlib.sha256(f"{thread_id}\x00{interrupt_id}".encode()).hexdigest()[:16]


def pending_sql(
    *,
    task_type: str | None = None,
    reason: str | None = None,
    assignee: str | None = None,
    older_than: float | None = None,
    newer_than: float | None = None,
    limit: int = 100,
    offset: int = 0,
    order: PendingOrder = "age",
    now: float | None = None,
) -> tuple[str, list[Any]]:
    """The query `ReviewQueue.pending` runs (exposed so tests can EXPLAIN it)."""
    now = time.time() if now is None else now
    where = ["status = 'pending'"]
    params: list[Any] = []
    if task_type is not None:
        where.append("task_type = %s")
        params.append(task_type)
    if reason is not None:
        where.append("reason = %s")
        params.append(reason)
    if assignee is not None:
        where.append("assignee = %s")
        params.append(assignee)
    if older_than is not None:
        where.append("created_at <= %s")
        params.append(now - older_than)
    if newer_than is not None:
        where.append("created_at >= %s")
        params.append(now - newer_than)
    sort = _ORDERS.get(order)
    if sort is None:
        raise UserError(f"pending(order=...) must be one of {sorted(_ORDERS)}, not {order!r}")
    sql = (
        f"SELECT {_COLUMNS} FROM harness_reviews WHERE {' AND '.join(where)} "
        f"ORDER BY {sort} LIMIT {int(limit)} OFFSET {max(0, int(offset))}"
    )
    return sql, params


def _item(row: Row) -> ReviewItem:
    return ReviewItem(
        id=row["id"],
        thread_id=row["thread_id"],
        interrupt_id=row["interrupt_id"],
        task_type=row["task_type"],
        reason=row["reason"],
        risk=row["risk"],
        status=row["status"],
        priority=int(row["priority"]),
        assignee=row["assignee"],
        deadline=row["deadline"],
        created_at=float(row["created_at"]),
        requests=json.loads(row["request"]),
        decision=json.loads(row["decision"]) if row["decision"] else None,
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
    )


def masked_item(item: ReviewItem, masker: Masker) -> ReviewItem:
    """*item* as a reviewer is shown it: secrets in its requests and decision masked.

    `ReviewQueue.get`/`pending` return items as stored (a decision is made against the real
    arguments); what shows an item to a person shows this.
    """
    return replace(
        item,
        requests=masker(data=item.requests),
        decision=masker(data=item.decision) if item.decision is not None else None,
    )


def masked_items(items: Sequence[ReviewItem], checkpointer: Any) -> list[ReviewItem]:
    """*items* as a list shows them: each masked as `masked_item`, with its run's marked fields.

    The fields a run marked sensitive (``langfuse_callbacks(sensitive_fields=...)``) are in
    its checkpoints' metadata, not in the review row: one read of the newest checkpoint per
    thread on the list (a page is small), as the item page reads them.
    """
    masks: dict[str, Masker] = {}
    for item in items:
        if item.thread_id not in masks:
            tup = None
            if isinstance(checkpointer, BaseCheckpointSaver):
                cfg = {"configurable": {"thread_id": item.thread_id, "checkpoint_ns": ""}}
                tup = checkpointer.get_tuple(cast(RunnableConfig, cfg))
            masks[item.thread_id] = Masker(marked_fields([tup.metadata if tup else None]))
    return [masked_item(item, masks[item.thread_id]) for item in items]


def _is_review_interrupt(intr: Interrupt) -> bool:
    value = intr.value
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(v, Mapping) and "action_request" in v and "tool_call_id" in v for v in value
        )
    )


_PAGE = 25
"""Checkpoints read at a time for `ReviewQueue.show`'s history lines."""


def _as_history_line(snap: StateSnapshot, *, newest: bool) -> StateSnapshot:
    """What `_Core.trace` reads of a snapshot: the newest one whole, the others' step and next.

    Each snapshot holds the whole state, and `get_state_history` reads every checkpoint before
    it yields one: a task of 1,000 steps held ≈ 500,000 messages (1.8 GB) to show one line per
    checkpoint. Read a page at a time and kept thin, what is held grows with one page.
    """
    return snap if newest else snap._replace(values={}, tasks=(), interrupts=())


def _before(history: Sequence[StateSnapshot]) -> RunnableConfig | None:
    """Where the next page of a newest-first history starts (None: at the newest)."""
    return history[-1].config if history else None


def _task_type(snapshot: StateSnapshot) -> str:
    values = snapshot.values if isinstance(snapshot.values, Mapping) else {}
    task = values.get("task") if isinstance(values, Mapping) else None
    if isinstance(task, Mapping) and task.get("task_type"):
        return str(task["task_type"])
    meta = snapshot.metadata or {}
    return str(meta.get("task_type") or "default")


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts or 0.0, UTC).isoformat(timespec="seconds")


def _thread_config(thread_id: str, config: RunnableConfig | None) -> RunnableConfig:
    cfg: dict[str, Any] = dict(config or {})
    cfg["configurable"] = {**cfg.get("configurable", {}), "thread_id": thread_id}
    return cast(RunnableConfig, cfg)


def _resume_config(thread_id: str, metadata: Mapping[str, Any] | None) -> RunnableConfig:
    """The config the queue resumes *thread_id* with, from its newest checkpoint's *metadata*.

    It carries the fields the run marked sensitive (`carry_marks`).
    """
    return carry_marks(_thread_config(thread_id, None), metadata)


def _find_tools(graph: Any) -> dict[str, BaseTool]:
    """The tools of every `HumanReview` node in *graph* (to validate edited arguments)."""
    tools: dict[str, BaseTool] = {}
    builder = getattr(graph, "builder", None)
    for spec in getattr(builder, "nodes", {}).values():
        func = getattr(getattr(spec, "runnable", None), "func", None)
        if isinstance(func, HumanReview):
            tools.update({t.name: t for t in func.tools})
        elif isinstance(spec.runnable, ToolNode):  # create_agent: its tools node
            for name, t in spec.runnable.tools_by_name.items():
                tools.setdefault(name, t)
    return tools


def _answered_outside(item: ReviewItem) -> AlreadyDecided:
    return AlreadyDecided(item.id, "a resume outside the queue", "an unknown time", "closed")


def _decision_audit(
    item: ReviewItem, prepared: _Prepared, reviewer: str, now: float
) -> tuple[Any, ...]:
    """The audit row of a decision."""
    return (
        item.id,
        reviewer,
        "+".join(sorted({p["type"] for p in prepared.payload})),
        json.dumps(prepared.before, default=str),
        json.dumps(prepared.after, default=str),
        now,
    )


@dataclass(frozen=True)
class _Prepared:
    """A validated decision ready to claim: payload for the graph and the audit row."""

    payload: list[dict[str, Any]]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]


class _QueueCore:
    """What the sync and async queues share: configuration, rows → items, validation."""

    def __init__(
        self,
        graph: Pregel[Any, Any, Any, Any],
        *,
        tools: Sequence[BaseTool] | None,
        assignee: str | None,
        deadline: float | None,
        on_expire: Literal["reject", "escalate"],
        escalate_to: str | None,
    ) -> None:
        if on_expire not in ("reject", "escalate"):
            raise UserError(
                f"ReviewQueue.on_expire must be 'reject' or 'escalate', not {on_expire!r}"
            )
        if on_expire == "escalate" and not escalate_to:
            raise UserError("ReviewQueue(on_expire='escalate') needs escalate_to (an assignee)")
        if deadline is not None and deadline <= 0:
            raise UserError(
                f"ReviewQueue.deadline must be a positive number of seconds, not {deadline}"
            )
        if getattr(graph, "checkpointer", None) is None:
            raise UserError("ReviewQueue needs a graph compiled with a checkpointer")
        self.graph = graph
        self.tools = {t.name: t for t in tools} if tools is not None else _find_tools(graph)
        self.assignee = assignee
        self.deadline = deadline
        self.on_expire = on_expire
        self.escalate_to = escalate_to

    def rows_for(self, thread_id: str, snapshot: StateSnapshot) -> list[tuple[Any, ...]]:
        now = time.time()
        task_type = _task_type(snapshot)
        out = []
        for intr in snapshot.interrupts:
            if not _is_review_interrupt(intr):
                continue
            requests = cast(list[ReviewRequest], intr.value)
            top = max(requests, key=lambda r: _RISK_ORDER.get(r["risk"], 1))
            out.append(
                (
                    review_id_for(thread_id, intr.id),
                    thread_id,
                    intr.id,
                    task_type,
                    top["trigger"],
                    top["risk"],
                    json.dumps(requests, default=str),
                    _RISK_PRIORITY.get(top["risk"], 1),
                    self.assignee,
                    now + self.deadline if self.deadline else None,
                    now,
                )
            )
        return out

    def prepare(self, item: ReviewItem, decision: Any, reviewer: str) -> _Prepared:
        if not reviewer:
            raise InvalidDecision(item.id, "a reviewer name is required")
        decisions = check_decisions(item.requests, decision, self.tools, review_id=item.id)
        payload = [
            d.model_copy(update={"reviewer": reviewer, "review_id": item.id}).model_dump(
                exclude_none=True
            )
            for d in decisions
        ]
        before = [
            {
                "tool_call_id": r["tool_call_id"],
                "action": r["action_request"]["action"],
                "args": r["action_request"]["args"],
            }
            for r in item.requests
        ]
        after = [
            {
                **b,
                "args": d.args if d.type == "edit" else b["args"],
                "decision": d.type,
                **({"message": d.message} if d.message else {}),
            }
            for b, d in zip(before, decisions, strict=True)
        ]
        return _Prepared(payload, before, after)

    def expiry_action(self, item: ReviewItem) -> Literal["reject", "escalate", "keep"]:
        unknown_effect = any(r["trigger"] == "effect_unknown" for r in item.requests)
        if self.on_expire == "reject" and not unknown_effect:
            return "reject"
        return "escalate" if self.escalate_to else "keep"

    def escalate_params(self, review_id: str, now: float) -> tuple[Any, ...]:
        return (self.escalate_to, now + (self.deadline or 3600.0), review_id, now)

    def escalate_audit(self, review_id: str, now: float) -> tuple[Any, ...]:
        return (
            review_id,
            _EXPIRY_REVIEWER,
            "escalate",
            None,
            json.dumps(self.escalate_to),
            now,
        )

    @staticmethod
    def already(item: ReviewItem) -> AlreadyDecided:
        if item.status == "closed":  # the run was resumed directly, not through the queue
            return _answered_outside(item)
        words = sorted({d.get("type", "?") for d in item.decision or []}) or [item.status]
        by = item.decided_by or "?"
        return AlreadyDecided(item.id, by, _iso(item.decided_at), "+".join(words))

    @staticmethod
    def held_elsewhere(item: ReviewItem, run: TaskRun) -> AlreadyDecided:
        """Why a decision on a runner's task was not applied: its lease was not free."""
        if run.done:  # cancelled (or ended) while paused: its runner will not resume it
            at = _iso(run.finished_at or run.updated_at)
            return AlreadyDecided(item.id, "its task runner", at, run.status)
        return _answered_outside(item)  # another process is resuming it (TaskRunner.resume)

    @staticmethod
    def detail(
        item: ReviewItem,
        history: list[StateSnapshot],
        audit: list[dict[str, Any]],
        tree: Trace | None = None,
    ) -> ReviewDetail:
        """What `show` returns: a display, so secrets are masked as in `build_trace`'s tree."""
        masker = Masker(marked_fields(s.metadata for s in history))
        return ReviewDetail(
            item=masked_item(item, masker),
            trace=[masker.text(line) for line in _QueueCore.trace(item, history)],
            audit=masker(data=audit),
            tree=tree,
        )

    @staticmethod
    def trace(item: ReviewItem, history: list[StateSnapshot]) -> list[str]:
        lines: list[str] = []
        for snap in reversed(history):  # history is newest first
            meta = snap.metadata or {}
            nxt = ", ".join(snap.next) or "END"
            lines.append(f"checkpoint step {meta.get('step')} ({meta.get('source')}): next {nxt}")
        if history:
            values = history[0].values
            messages = values.get("messages", []) if isinstance(values, Mapping) else []
            excerpt = trace_excerpt(messages, limit=50)
            lines.extend(excerpt["steps"])
            usd = f", ${excerpt['usd']:.4f}" if excerpt["usd"] is not None else ""
            lines.append(f"spend so far: {excerpt['tokens']} tokens{usd}")
        lines.append(f"paused for review {item.id}: {item.requests[0]['description']}")
        return lines


class ReviewQueue:
    """The cross-thread review queue for one compiled graph, on a `Backend`.

    Args:
        backend: Where the queue rows live (the same database as the graph's checkpoints).
        graph: The compiled graph (with a checkpointer) whose runs pause for review.
        tools: The tools, to validate edited arguments (default: found on the graph's
            `HumanReview` nodes).
        assignee: Who new items are assigned to (optional).
        deadline: Seconds a reviewer has before the expiry policy applies (optional).
        on_expire: ``"reject"`` (the run continues as if rejected) or ``"escalate"``
            (reassign to ``escalate_to`` with a fresh deadline and a higher priority).
        escalate_to: The assignee expired items escalate to.
        runner: The `TaskRunner` of this graph, whose lease length, attempts and config
            resume the tasks it manages (default: a `TaskRunner` on the queue's graph).

    A thread a `TaskRunner` manages (it has a ``harness_runs`` row) is resumed under the
    runner's lease, as `TaskRunner.resume` does: one process runs it at a time, and a run
    that dies is carried on by `TaskRunner.recover`. Other threads are resumed directly.

    The module docstring walks a full pause → decide → resume; the queue alone:

    Example:
        ```python
        from langgraph.graph import START, MessagesState, StateGraph

        from checkpointers import open_backend
        from harness_nodes import ReviewQueue

        builder = StateGraph(MessagesState)
        builder.add_node("noop", lambda state: {})
        builder.add_edge(START, "noop")
        with open_backend("memory://") as backend:
            queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
            queue.invoke({"messages": []}, thread_id="t1")  # runs; nothing to review
            assert queue.pending(task_type="billing") == []
        ```
    """

    def __init__(
        self,
        backend: Backend,
        graph: Pregel[Any, Any, Any, Any],
        *,
        tools: Sequence[BaseTool] | None = None,
        assignee: str | None = None,
        deadline: float | None = None,
        on_expire: Literal["reject", "escalate"] = "reject",
        escalate_to: str | None = None,
        runner: TaskRunner | None = None,
    ) -> None:
        self.backend = backend
        self._core = _QueueCore(
            graph,
            tools=tools,
            assignee=assignee,
            deadline=deadline,
            on_expire=on_expire,
            escalate_to=escalate_to,
        )
        if runner is not None and runner.backend is not backend:
            raise UserError("ReviewQueue(runner=...) needs a TaskRunner on the queue's backend")
        self.graph = graph
        self._runner = runner

    @property
    def tools(self) -> dict[str, BaseTool]:
        """The tools edited arguments are validated against, by name."""
        return self._core.tools

    def _runner_for(self, thread_id: str) -> TaskRunner | None:
        """The runner whose lease *thread_id* is resumed under; None if no runner manages it."""
        if not self.backend.execute(SELECT_THREAD, (thread_id,)):
            return None
        if self._runner is None:
            from harness_nodes.runner import TaskRunner

            self._runner = TaskRunner(self.backend, self.graph)
        return self._runner

    # -- running and syncing --

    def invoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        thread_id: str | None = None,
    ) -> dict[str, Any]:
        """Run the graph (``durability="sync"``) and queue any review it paused for.

        Raises:
            UnknownThread: *input* is None (carry on) and the thread has no checkpoint.
        """
        cfg: dict[str, Any] = dict(config or {})
        tid = thread_id or dict(cfg.get("configurable") or {}).get("thread_id")
        if not tid:
            raise UserError("ReviewQueue.invoke needs a thread_id")
        run_cfg = _thread_config(str(tid), cast(RunnableConfig, cfg))
        with outage(self.backend, "review queue"):
            try:
                result = self.graph.invoke(input, run_cfg, durability="sync")
            except EmptyInputError:  # input None and no checkpoint: nothing to carry on
                raise UnknownThread(str(tid)) from None
            self.sync(str(tid))
        return cast(dict[str, Any], result)

    def sync(self, thread_id: str, *, recover: bool = False) -> list[ReviewItem]:
        """Queue the review pauses of *thread_id* (idempotent) and settle finished ones.

        Returns the thread's pending items. Rows whose pause was answered outside the queue
        are closed. With ``recover=True``, decided rows whose run never resumed (the process
        died between the decision and the resume) are resumed now, and a run that died after
        its resume, before it ended, is carried on — only do this when no other process is
        still applying that decision.

        A `TaskRunner`'s task needs no such care: its decision is resumed under the runner's
        lease (only once no live process holds it), and a run of it that died after its
        decision was recorded, before or after the run took it, is left to
        `TaskRunner.recover`, which carries it on with that decision when the lease expires;
        its row stays ``decided`` until a sync sees the run end.

        Raises:
            BackendUnavailable: the database could not be reached (see `decide` for what a
                decision whose resume it cut short leaves).
        """
        with outage(self.backend, "review queue"):
            return self._sync(thread_id, recover=recover)

    def _sync(self, thread_id: str, *, recover: bool) -> list[ReviewItem]:
        cfg = _thread_config(thread_id, None)
        snapshot = self.graph.get_state(cfg)
        live = {i.id for i in snapshot.interrupts}
        for row in self._core.rows_for(thread_id, snapshot):
            self.backend.execute(_INSERT, row)
        rows = self.backend.execute(
            f"SELECT {_COLUMNS} FROM harness_reviews WHERE thread_id = %s AND status IN "
            "('pending', 'decided')",
            (thread_id,),
        )
        pending: list[ReviewItem] = []
        carried_on = False
        died_after = _died_after(snapshot) and not self._stopped_at_breakpoint(snapshot)
        for item in map(_item, rows):
            if item.interrupt_id not in live:
                died = item.status == "decided" and died_after
                if died and (not recover or self._runner_for(thread_id) is not None):
                    continue  # stays decided: recovery carries its run on (it may be running)
                if died and not carried_on:
                    # The decision was applied, but its run died before it ended: carry it on.
                    self._settle_effects(item, item.decided_by or "")
                    resume_cfg = _resume_config(thread_id, snapshot.metadata)
                    self.graph.invoke(None, resume_cfg, durability="sync")
                    carried_on = True
                status = "applied" if item.status == "decided" else "closed"
                self.backend.execute(
                    "UPDATE harness_reviews SET status = %s WHERE id = %s AND status = %s",
                    (status, item.id, item.status),
                )
            elif item.status == "decided":
                if recover:  # a decision won but the run never resumed
                    self._resume_decided(item)
            else:
                pending.append(item)
        return self.sync(thread_id) if carried_on else pending  # it may have paused again

    def _stopped_at_breakpoint(self, snapshot: StateSnapshot) -> bool:
        """Whether the thread's run stopped at a static breakpoint (see `_at_breakpoint`)."""
        before, after = _breakpoints(self.graph)
        if not (before or after) or not _died_after(snapshot):
            return False
        checkpointer = self.graph.checkpointer
        if not isinstance(checkpointer, BaseCheckpointSaver):
            return False
        tup = checkpointer.get_tuple(snapshot.config)
        ran: Sequence[str] = ()
        if after and tup is not None and tup.parent_config is not None:
            ran = self.graph.get_state(tup.parent_config).next
        return _at_breakpoint(before, after, tup, snapshot, ran)

    # -- reading --

    def pending(
        self,
        *,
        task_type: str | None = None,
        reason: str | None = None,
        assignee: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int = 100,
        offset: int = 0,
        order: PendingOrder = "age",
    ) -> list[ReviewItem]:
        """Pending items across all threads, oldest first, filtered (served by an index).

        Args:
            task_type: Only this task type.
            reason: Only this trigger (``irreversible``, ``argument_rule``, ``verification``...).
            assignee: Only items assigned to this person.
            older_than: Only items waiting at least this many seconds.
            newer_than: Only items waiting at most this many seconds.
            limit: At most this many items.
            offset: Skip this many (pagination).
            order: ``"age"`` (oldest first) or ``"urgency"`` (priority, deadline, age).

        Raises:
            BackendUnavailable: the database could not be reached.
        """
        sql, params = pending_sql(
            task_type=task_type,
            reason=reason,
            assignee=assignee,
            older_than=older_than,
            newer_than=newer_than,
            limit=limit,
            offset=offset,
            order=order,
        )
        with outage(self.backend, "review queue"):
            return [_item(r) for r in self.backend.execute(sql, params)]

    def get(self, review_id: str) -> ReviewItem:
        """The item *review_id*, whatever its status.

        Raises:
            ReviewNotFound: no such item.
            BackendUnavailable: the database could not be reached.
        """
        with outage(self.backend, "review queue"):
            rows = self.backend.execute(
                f"SELECT {_COLUMNS} FROM harness_reviews WHERE id = %s", (review_id,)
            )
        if not rows:
            raise ReviewNotFound(review_id)
        return _item(rows[0])

    def show(self, review_id: str) -> ReviewDetail:
        """The item with the task's trace so far and its audit rows.

        Raises:
            ReviewNotFound: no such item.
            BackendUnavailable: the database could not be reached.
        """
        with outage(self.backend, "review queue"):
            return self._show(review_id)

    def _show(self, review_id: str) -> ReviewDetail:
        item = self.get(review_id)
        cfg = _thread_config(item.thread_id, None)
        history: list[StateSnapshot] = []
        while True:  # a page at a time: LangGraph reads the whole history before the first
            page = list(self.graph.get_state_history(cfg, before=_before(history), limit=_PAGE))
            first = not history
            history.extend(_as_history_line(s, newest=first and i == 0) for i, s in enumerate(page))
            if len(page) < _PAGE:
                break
        audit = self.backend.execute(
            "SELECT reviewer, decision, before, after, at FROM harness_review_audit "
            "WHERE review_id = %s ORDER BY id",
            (review_id,),
        )
        try:
            tree: Trace | None = build_trace(self.backend, item.thread_id)
        except HarnessError:
            tree = None
        return self._core.detail(item, history, audit, tree)

    # -- deciding --

    def decide(
        self,
        review_id: str,
        decision: ReviewDecision | Mapping[str, Any] | Sequence[Any],
        *,
        reviewer: str,
    ) -> dict[str, Any]:
        """Apply a reviewer's decision and resume the run; returns the run's new state.

        Raises:
            ReviewNotFound: no such item.
            InvalidDecision: the decision is malformed or not allowed (the item stays pending).
            AlreadyDecided: another reviewer decided first, or the pause was answered outside
                the queue (``Command(resume=...)`` on the graph); nothing was applied.
            BackendUnavailable: the database could not be reached, before or during the
                resumed run. The decision, its audit row and the task's lease are claimed in
                one transaction: before it commits, nothing is recorded (the item stays
                pending); after, the decision stands (``decided``) and is applied later —
                by ``sync(thread_id, recover=True)``, or for a `TaskRunner`'s task by
                `TaskRunner.recover` once the lease this call held expires.
        """
        with outage(self.backend, "review queue"):
            return self._decide(review_id, decision, reviewer)

    def _decide(self, review_id: str, decision: Any, reviewer: str) -> dict[str, Any]:
        item = self.get(review_id)
        if item.status == "pending" and item.id not in {i.id for i in self.sync(item.thread_id)}:
            item = self.get(review_id)  # its pause was answered outside the queue: closed now
        if item.status != "pending":
            raise self._core.already(item)
        prepared = self._core.prepare(item, decision, reviewer)
        self._check_against_the_ledger(item, prepared.payload)
        runner = self._runner_for(item.thread_id)
        owner = new_owner()
        try:
            won, leased = self._claim(item, prepared, reviewer, runner, owner)
        except _ThreadBusy:
            raise self._held_elsewhere(item) from None
        if not won:
            raise self._core.already(self.get(review_id))
        decided = self.get(review_id)
        if runner is not None and leased is not None:
            return self._resume_leased(runner, decided, leased, owner)
        self._settle_effects(decided, reviewer)
        return self._resume(decided)

    def _claim(
        self,
        item: ReviewItem,
        prepared: _Prepared,
        reviewer: str,
        runner: TaskRunner | None,
        owner: str,
    ) -> tuple[bool, Row | None]:
        """Claim the item and audit the decision; for a runner's task, claim its lease too.

        Both in one transaction: a decision is recorded only by the process that applies it.

        Raises:
            _ThreadBusy: the item was won but the task's lease was not free (rolled back).
        """
        now = time.time()
        with self.backend.transaction() as tx:
            won = tx.execute(_CLAIM, (json.dumps(prepared.payload), reviewer, now, item.id))
            if not won:
                return False, None
            leased = None
            if runner is not None:
                lease = claim(item.thread_id, owner, runner.lease_seconds, resuming=True)
                rows = tx.execute(*lease)
                if not rows:
                    raise _ThreadBusy
                leased = rows[0]
            tx.execute(_AUDIT, _decision_audit(item, prepared, reviewer, now))
        return True, leased

    def _held_elsewhere(self, item: ReviewItem) -> AlreadyDecided:
        """The error for a decision whose task's lease was not free; closes what is over."""
        self.sync(item.thread_id)  # closes the item if the other resume has moved past it
        run = TaskRun.from_row(self.backend.execute(SELECT_THREAD, (item.thread_id,))[0])
        if run.done:
            self.backend.execute(_CLOSE, (item.id,))
        return self._core.held_elsewhere(item, run)

    def _check_against_the_ledger(self, item: ReviewItem, payload: list[dict[str, Any]]) -> None:
        check_effect_answers(self.backend, item.thread_id, item.requests, payload, item.id)

    def _settle_effects(self, item: ReviewItem, reviewer: str) -> None:
        with outage(self.backend, "review queue"):
            record_effect_answers(
                self.backend, item.thread_id, item.requests, item.decision or [], reviewer
            )

    def _resume(self, item: ReviewItem) -> dict[str, Any]:
        cfg = _thread_config(item.thread_id, None)
        cfg = _resume_config(item.thread_id, self.graph.get_state(cfg).metadata)
        try:
            result = self.graph.invoke(Command(resume=_answer(item)), cfg, durability="sync")
        except InvalidDecision as e:
            # The graph refused what the queue accepted (e.g. a schema only the node knows):
            # nothing ran; put the item back so someone can decide again.
            self._undecide(item, e)
            raise
        self.backend.execute(_APPLIED, (item.id,))  # the run is past the pause: applied
        self.sync(item.thread_id)
        return cast(dict[str, Any], result)

    def _undecide(self, item: ReviewItem, error: InvalidDecision) -> None:
        """The graph refused *item*'s decision: pending again, and the audit says so."""
        with self.backend.transaction() as tx:
            if tx.execute(_UNDECIDE + " RETURNING id", (item.id,)):
                tx.execute(_AUDIT, _refused_audit(item, error))

    def _resume_leased(
        self, runner: TaskRunner, item: ReviewItem, row: Row, owner: str
    ) -> dict[str, Any]:
        """Apply a decided item to a runner's task whose lease *owner* holds, and settle both.

        The item is ``applied`` only once the checkpoint is past its pause: a run that
        stopped before (an outage outlasting the runner's wait, a lost lease, a failure in
        the review step itself) leaves it ``decided``, for the run that carries the task on
        (`TaskRunner.recover`) to apply.

        Raises:
            InvalidDecision: the graph refused the decision; item and task are paused again.
            RunFailed: the resumed run failed after the runner's attempts.
            BackendUnavailable: the database stayed away longer than the runner waits for
                it; the decision stands, and recovery applies it.
        """
        try:
            self._settle_effects(item, item.decided_by or "")
        except KeyboardInterrupt as e:
            # Stopped by its caller before anything ran: the lease is given back at once, the
            # task paused with its decision standing, which `TaskRunner.recover` applies.
            runner._stopped(item.thread_id, owner, Answer(_answer(item)), e)
            raise
        # A refused decision is undone while the lease is held, before the runner pauses the
        # task again: a resume claiming it as soon as it is free would otherwise find the item
        # still decided, and its run's sync would mark the refused decision applied.
        run = runner._run_claimed(
            row, owner, _answer(item), on_refused=functools.partial(self._undecide, item)
        )
        snapshot = self.graph.get_state(_thread_config(item.thread_id, None))
        self._settle_decided([item], snapshot)
        self.sync(item.thread_id)
        _leased_outcome(run)
        return _state_of(self.graph.get_state(_thread_config(item.thread_id, None)))

    def _resume_decided(self, item: ReviewItem) -> None:
        """``sync(recover=True)``: apply a decision whose run never resumed."""
        runner = self._runner_for(item.thread_id)
        if runner is None:
            self._settle_effects(item, item.decided_by or "")
            self._resume(item)
            return
        owner = new_owner()
        lease = claim(item.thread_id, owner, runner.lease_seconds, resuming=True)
        rows = self.backend.execute(*lease)
        if rows:  # else its dead holder's lease has not expired, or the task ended
            self._resume_leased(runner, item, rows[0], owner)

    def _decided_pauses(self, thread_id: str, snapshot: StateSnapshot) -> list[ReviewItem]:
        """Decided items on a pause *thread_id* is still stopped at: decisions never applied.

        `decide` records a decision and claims the task's lease in one transaction, then
        resumes the run; a process that dies in between leaves the decision recorded, the
        pause live and the lease to expire. The runner that recovers the task applies them
        under its own lease (`TaskRunner.recover`), as `decide` would have.
        """
        if not snapshot.interrupts:
            return []
        with outage(self.backend, "review queue"):
            return _on_live_pauses(self.backend.execute(_DECIDED, (thread_id,)), snapshot)

    def _settle_stopped(self, thread_id: str, snapshot: StateSnapshot) -> None:
        """*thread_id*'s run stopped (``interrupted``): decided items off its pauses are applied.

        The run went past their pause, so it took their decisions; it did not die after doing
        so. `sync` cannot tell a stop with no pause (a breakpoint: ``interrupt_before`` /
        ``interrupt_after``) from a run that died mid-way, and leaves such items ``decided``
        for recovery, whose every sweep would otherwise claim the task again to run nothing.
        """
        with outage(self.backend, "review queue"):
            rows = self.backend.execute(_DECIDED, (thread_id,))
        self._settle_decided(list(map(_item, rows)), snapshot)

    def _settle_decided(
        self,
        items: Sequence[ReviewItem],
        snapshot: StateSnapshot,
        refused: InvalidDecision | None = None,
    ) -> None:
        """After a recovery resumed *items*: ``applied`` once the run moved past their pause.

        An item the graph *refused* (its pause still live) is pending again, audited as
        refused, as in `decide`; one still live otherwise (the attempt failed before the run
        took it) stays decided for the next attempt.
        """
        live = {i.id for i in snapshot.interrupts}
        with outage(self.backend, "review queue"):
            for item in items:
                if item.interrupt_id not in live:
                    self.backend.execute(_APPLIED, (item.id,))
                elif refused is not None:
                    self._undecide(item, refused)

    def assign(self, review_id: str, assignee: str | None, *, by: str = "harness") -> ReviewItem:
        """Assign a pending item to someone (recorded in the audit).

        Raises:
            BackendUnavailable: the database could not be reached (nothing was recorded).
        """
        item = self.get(review_id)
        with outage(self.backend, "review queue"), self.backend.transaction() as tx:
            tx.execute(_ASSIGN, (assignee, review_id))
            tx.execute(_AUDIT, _assign_audit(item, assignee, by))
        return self.get(review_id)

    def expire(self, *, now: float | None = None) -> list[str]:
        """Apply the expiry policy to pending items past their deadline; returns their ids.

        ``on_expire="reject"`` rejects them (the run continues as if a reviewer had), except
        items asking whether an effect happened: a deadline says nothing about the refund, so
        those are escalated (to ``escalate_to``) or left pending. ``"escalate"`` reassigns
        to ``escalate_to`` with a fresh deadline and a higher priority.

        Raises:
            BackendUnavailable: the database could not be reached (items already expired
                stay so; a rejection cut short is a `decide` cut short).
        """
        with outage(self.backend, "review queue"):
            return self._expire(time.time() if now is None else now)

    def _expire(self, now: float) -> list[str]:
        done: list[str] = []
        for row in self.backend.execute(_EXPIRED, (now,)):
            item = _item(row)
            action = self._core.expiry_action(item)
            if action == "reject":
                try:
                    self.decide(item.id, _EXPIRED_REJECT, reviewer=_EXPIRY_REVIEWER)
                except AlreadyDecided:
                    continue
            elif action == "escalate":
                with self.backend.transaction() as tx:
                    if not tx.execute(_ESCALATE, self._core.escalate_params(item.id, now)):
                        continue
                    tx.execute(_AUDIT, self._core.escalate_audit(item.id, now))
            else:
                continue
            done.append(item.id)
        return done


class AsyncReviewQueue:
    """The async twin of `ReviewQueue`, for graphs run with ``ainvoke`` on an `AsyncBackend`.

    Example:
        ```python
        import asyncio

        from langgraph.graph import START, MessagesState, StateGraph

        from checkpointers import aopen_backend
        from harness_nodes import AsyncReviewQueue


        async def main() -> None:
            builder = StateGraph(MessagesState)
            builder.add_node("noop", lambda state: {})
            builder.add_edge(START, "noop")
            async with await aopen_backend("memory://") as backend:
                graph = builder.compile(checkpointer=backend.checkpointer)
                queue = AsyncReviewQueue(backend, graph)
                await queue.ainvoke({"messages": []}, thread_id="t1")
                assert await queue.pending() == []


        asyncio.run(main())
        ```
    """

    def __init__(
        self,
        backend: AsyncBackend,
        graph: Pregel[Any, Any, Any, Any],
        *,
        tools: Sequence[BaseTool] | None = None,
        assignee: str | None = None,
        deadline: float | None = None,
        on_expire: Literal["reject", "escalate"] = "reject",
        escalate_to: str | None = None,
        runner: AsyncTaskRunner | None = None,
    ) -> None:
        self.backend = backend
        self._core = _QueueCore(
            graph,
            tools=tools,
            assignee=assignee,
            deadline=deadline,
            on_expire=on_expire,
            escalate_to=escalate_to,
        )
        if runner is not None and runner.backend is not backend:
            raise UserError(
                "AsyncReviewQueue(runner=...) needs an AsyncTaskRunner on the queue's backend"
            )
        self.graph = graph
        self._runner = runner

    @property
    def tools(self) -> dict[str, BaseTool]:
        """The tools edited arguments are validated against, by name."""
        return self._core.tools

    async def _runner_for(self, thread_id: str) -> AsyncTaskRunner | None:
        """Async `ReviewQueue._runner_for` (default: an `AsyncTaskRunner` on the graph)."""
        if not await self.backend.execute(SELECT_THREAD, (thread_id,)):
            return None
        if self._runner is None:
            from harness_nodes.aio import AsyncTaskRunner

            self._runner = AsyncTaskRunner(self.backend, self.graph)
        return self._runner

    async def ainvoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        thread_id: str | None = None,
    ) -> dict[str, Any]:
        """Run the graph (``durability="sync"``) and queue any review it paused for."""
        cfg: dict[str, Any] = dict(config or {})
        tid = thread_id or dict(cfg.get("configurable") or {}).get("thread_id")
        if not tid:
            raise UserError("AsyncReviewQueue.ainvoke needs a thread_id")
        run_cfg = _thread_config(str(tid), cast(RunnableConfig, cfg))
        with outage(self.backend, "review queue"):
            try:
                result = await self.graph.ainvoke(input, run_cfg, durability="sync")
            except EmptyInputError:  # input None and no checkpoint: nothing to carry on
                raise UnknownThread(str(tid)) from None
            await self.sync(str(tid))
        return cast(dict[str, Any], result)

    async def sync(self, thread_id: str, *, recover: bool = False) -> list[ReviewItem]:
        """Async `ReviewQueue.sync` (an `AsyncTaskRunner`'s task is left to ``arecover``)."""
        with outage(self.backend, "review queue"):
            return await self._sync(thread_id, recover=recover)

    async def _sync(self, thread_id: str, *, recover: bool) -> list[ReviewItem]:
        snapshot = await self.graph.aget_state(_thread_config(thread_id, None))
        live = {i.id for i in snapshot.interrupts}
        for row in self._core.rows_for(thread_id, snapshot):
            await self.backend.execute(_INSERT, row)
        rows = await self.backend.execute(
            f"SELECT {_COLUMNS} FROM harness_reviews WHERE thread_id = %s AND status IN "
            "('pending', 'decided')",
            (thread_id,),
        )
        pending: list[ReviewItem] = []
        carried_on = False
        died_after = _died_after(snapshot) and not await self._stopped_at_breakpoint(snapshot)
        for item in map(_item, rows):
            if item.interrupt_id not in live:
                died = item.status == "decided" and died_after
                if died and (not recover or await self._runner_for(thread_id) is not None):
                    continue  # stays decided: recovery carries its run on (it may be running)
                if died and not carried_on:
                    # The decision was applied, but its run died before it ended: carry it on.
                    await self._settle_effects(item, item.decided_by or "")
                    cfg = _resume_config(thread_id, snapshot.metadata)
                    await self.graph.ainvoke(None, cfg, durability="sync")
                    carried_on = True
                status = "applied" if item.status == "decided" else "closed"
                await self.backend.execute(
                    "UPDATE harness_reviews SET status = %s WHERE id = %s AND status = %s",
                    (status, item.id, item.status),
                )
            elif item.status == "decided":
                if recover:  # a decision won but the run never resumed
                    await self._resume_decided(item)
            else:
                pending.append(item)
        return await self.sync(thread_id) if carried_on else pending

    async def _stopped_at_breakpoint(self, snapshot: StateSnapshot) -> bool:
        """Async `ReviewQueue._stopped_at_breakpoint`."""
        before, after = _breakpoints(self.graph)
        if not (before or after) or not _died_after(snapshot):
            return False
        checkpointer = self.graph.checkpointer
        if not isinstance(checkpointer, BaseCheckpointSaver):
            return False
        tup = await checkpointer.aget_tuple(snapshot.config)
        ran: Sequence[str] = ()
        if after and tup is not None and tup.parent_config is not None:
            ran = (await self.graph.aget_state(tup.parent_config)).next
        return _at_breakpoint(before, after, tup, snapshot, ran)

    async def pending(
        self,
        *,
        task_type: str | None = None,
        reason: str | None = None,
        assignee: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int = 100,
        offset: int = 0,
        order: PendingOrder = "age",
    ) -> list[ReviewItem]:
        """Async `ReviewQueue.pending`."""
        sql, params = pending_sql(
            task_type=task_type,
            reason=reason,
            assignee=assignee,
            older_than=older_than,
            newer_than=newer_than,
            limit=limit,
            offset=offset,
            order=order,
        )
        with outage(self.backend, "review queue"):
            return [_item(r) for r in await self.backend.execute(sql, params)]

    async def get(self, review_id: str) -> ReviewItem:
        """Async `ReviewQueue.get`."""
        with outage(self.backend, "review queue"):
            rows = await self.backend.execute(
                f"SELECT {_COLUMNS} FROM harness_reviews WHERE id = %s", (review_id,)
            )
        if not rows:
            raise ReviewNotFound(review_id)
        return _item(rows[0])

    async def show(self, review_id: str) -> ReviewDetail:
        """Async `ReviewQueue.show`."""
        with outage(self.backend, "review queue"):
            return await self._show(review_id)

    async def _show(self, review_id: str) -> ReviewDetail:
        item = await self.get(review_id)
        cfg = _thread_config(item.thread_id, None)
        history: list[StateSnapshot] = []
        while True:  # a page at a time (see `ReviewQueue.show`)
            before = _before(history)
            page = [s async for s in self.graph.aget_state_history(cfg, before=before, limit=_PAGE)]
            first = not history
            history.extend(_as_history_line(s, newest=first and i == 0) for i, s in enumerate(page))
            if len(page) < _PAGE:
                break
        audit = await self.backend.execute(
            "SELECT reviewer, decision, before, after, at FROM harness_review_audit "
            "WHERE review_id = %s ORDER BY id",
            (review_id,),
        )
        return self._core.detail(item, history, audit)

    async def decide(
        self,
        review_id: str,
        decision: ReviewDecision | Mapping[str, Any] | Sequence[Any],
        *,
        reviewer: str,
    ) -> dict[str, Any]:
        """Async `ReviewQueue.decide`."""
        with outage(self.backend, "review queue"):
            return await self._decide(review_id, decision, reviewer)

    async def _decide(self, review_id: str, decision: Any, reviewer: str) -> dict[str, Any]:
        item = await self.get(review_id)
        if item.status == "pending" and item.id not in {
            i.id for i in await self.sync(item.thread_id)
        }:
            item = await self.get(review_id)  # its pause was answered outside the queue
        if item.status != "pending":
            raise self._core.already(item)
        prepared = self._core.prepare(item, decision, reviewer)
        await self._check_against_the_ledger(item, prepared.payload)
        runner = await self._runner_for(item.thread_id)
        owner = new_owner()
        try:
            won, leased = await self._claim(item, prepared, reviewer, runner, owner)
        except _ThreadBusy:
            raise await self._held_elsewhere(item) from None
        if not won:
            raise self._core.already(await self.get(review_id))
        decided = await self.get(review_id)
        if runner is not None and leased is not None:
            return await self._resume_leased(runner, decided, leased, owner)
        await self._settle_effects(decided, reviewer)
        return await self._resume(decided)

    async def _claim(
        self,
        item: ReviewItem,
        prepared: _Prepared,
        reviewer: str,
        runner: AsyncTaskRunner | None,
        owner: str,
    ) -> tuple[bool, Row | None]:
        """Async `ReviewQueue._claim`: the item, its audit and (a runner's task) its lease."""
        now = time.time()
        async with self.backend.transaction() as tx:
            won = await tx.execute(_CLAIM, (json.dumps(prepared.payload), reviewer, now, item.id))
            if not won:
                return False, None
            leased = None
            if runner is not None:
                lease = claim(item.thread_id, owner, runner.lease_seconds, resuming=True)
                rows = await tx.execute(*lease)
                if not rows:
                    raise _ThreadBusy
                leased = rows[0]
            await tx.execute(_AUDIT, _decision_audit(item, prepared, reviewer, now))
        return True, leased

    async def _held_elsewhere(self, item: ReviewItem) -> AlreadyDecided:
        """Async `ReviewQueue._held_elsewhere`."""
        await self.sync(item.thread_id)
        rows = await self.backend.execute(SELECT_THREAD, (item.thread_id,))
        run = TaskRun.from_row(rows[0])
        if run.done:
            await self.backend.execute(_CLOSE, (item.id,))
        return self._core.held_elsewhere(item, run)

    async def _check_against_the_ledger(
        self, item: ReviewItem, payload: list[dict[str, Any]]
    ) -> None:
        await acheck_effect_answers(self.backend, item.thread_id, item.requests, payload, item.id)

    async def _settle_effects(self, item: ReviewItem, reviewer: str) -> None:
        with outage(self.backend, "review queue"):
            await arecord_effect_answers(
                self.backend, item.thread_id, item.requests, item.decision or [], reviewer
            )

    async def assign(
        self, review_id: str, assignee: str | None, *, by: str = "harness"
    ) -> ReviewItem:
        """Async `ReviewQueue.assign`."""
        item = await self.get(review_id)
        with outage(self.backend, "review queue"):
            async with self.backend.transaction() as tx:
                await tx.execute(_ASSIGN, (assignee, review_id))
                await tx.execute(_AUDIT, _assign_audit(item, assignee, by))
        return await self.get(review_id)

    async def expire(self, *, now: float | None = None) -> list[str]:
        """Async `ReviewQueue.expire`."""
        with outage(self.backend, "review queue"):
            return await self._expire(time.time() if now is None else now)

    async def _expire(self, now: float) -> list[str]:
        done: list[str] = []
        for row in await self.backend.execute(_EXPIRED, (now,)):
            item = _item(row)
            action = self._core.expiry_action(item)
            if action == "reject":
                try:
                    await self.decide(item.id, _EXPIRED_REJECT, reviewer=_EXPIRY_REVIEWER)
                except AlreadyDecided:
                    continue
            elif action == "escalate":
                async with self.backend.transaction() as tx:
                    params = self._core.escalate_params(item.id, now)
                    if not await tx.execute(_ESCALATE, params):
                        continue
                    await tx.execute(_AUDIT, self._core.escalate_audit(item.id, now))
            else:
                continue
            done.append(item.id)
        return done

    async def _resume(self, item: ReviewItem) -> dict[str, Any]:
        cfg = _thread_config(item.thread_id, None)
        cfg = _resume_config(item.thread_id, (await self.graph.aget_state(cfg)).metadata)
        try:
            result = await self.graph.ainvoke(Command(resume=_answer(item)), cfg, durability="sync")
        except InvalidDecision as e:
            await self._undecide(item, e)
            raise
        await self.backend.execute(_APPLIED, (item.id,))  # the run is past the pause: applied
        await self.sync(item.thread_id)
        return cast(dict[str, Any], result)

    async def _undecide(self, item: ReviewItem, error: InvalidDecision) -> None:
        """Async `ReviewQueue._undecide`."""
        async with self.backend.transaction() as tx:
            if await tx.execute(_UNDECIDE + " RETURNING id", (item.id,)):
                await tx.execute(_AUDIT, _refused_audit(item, error))

    async def _resume_leased(
        self, runner: AsyncTaskRunner, item: ReviewItem, row: Row, owner: str
    ) -> dict[str, Any]:
        """Async `ReviewQueue._resume_leased`."""
        try:
            await self._settle_effects(item, item.decided_by or "")
        except (asyncio.CancelledError, KeyboardInterrupt) as e:  # see ReviewQueue's
            await asyncio.shield(runner._stopped(item.thread_id, owner, Answer(_answer(item)), e))
            raise
        # Undone under the lease (see ReviewQueue._resume_leased).
        run = await runner._run_claimed(
            row, owner, _answer(item), on_refused=functools.partial(self._undecide, item)
        )
        # Applied only once the checkpoint is past its pause (see ReviewQueue._resume_leased).
        snapshot = await self.graph.aget_state(_thread_config(item.thread_id, None))
        await self._settle_decided([item], snapshot)
        await self.sync(item.thread_id)
        _leased_outcome(run)
        return _state_of(await self.graph.aget_state(_thread_config(item.thread_id, None)))

    async def _decided_pauses(self, thread_id: str, snapshot: StateSnapshot) -> list[ReviewItem]:
        """Async `ReviewQueue._decided_pauses` (applied by `AsyncTaskRunner.arecover`)."""
        if not snapshot.interrupts:
            return []
        with outage(self.backend, "review queue"):
            return _on_live_pauses(await self.backend.execute(_DECIDED, (thread_id,)), snapshot)

    async def _settle_stopped(self, thread_id: str, snapshot: StateSnapshot) -> None:
        """Async `ReviewQueue._settle_stopped`."""
        with outage(self.backend, "review queue"):
            rows = await self.backend.execute(_DECIDED, (thread_id,))
        await self._settle_decided(list(map(_item, rows)), snapshot)

    async def _settle_decided(
        self,
        items: Sequence[ReviewItem],
        snapshot: StateSnapshot,
        refused: InvalidDecision | None = None,
    ) -> None:
        """Async `ReviewQueue._settle_decided`."""
        live = {i.id for i in snapshot.interrupts}
        with outage(self.backend, "review queue"):
            for item in items:
                if item.interrupt_id not in live:
                    await self.backend.execute(_APPLIED, (item.id,))
                elif refused is not None:
                    await self._undecide(item, refused)

    async def _resume_decided(self, item: ReviewItem) -> None:
        """Async `ReviewQueue._resume_decided`."""
        runner = await self._runner_for(item.thread_id)
        if runner is None:
            await self._settle_effects(item, item.decided_by or "")
            await self._resume(item)
            return
        owner = new_owner()
        lease = claim(item.thread_id, owner, runner.lease_seconds, resuming=True)
        rows = await self.backend.execute(*lease)
        if rows:  # else its dead holder's lease has not expired, or the task ended
            await self._resume_leased(runner, item, rows[0], owner)
