"""The pieces `TaskRunner` and `AsyncTaskRunner` share: SQL, graph resolution, the fence.

One process runs a thread at a time: a run holds a lease on its ``harness_runs`` row
(``lease_owner``, ``lease_expires_at``), renewed by a heartbeat while it runs. Claiming is one
conditional ``UPDATE`` (atomic on Postgres and, under SQLite's single writer, on SQLite). A
run that loses its lease (it stalled past the expiry and someone else took over, or the task
was cancelled) is stopped by the *fence*: a checkpointer wrapper that, before each write,
extends the lease in one conditional statement and refuses to write if the lease is no longer
this run's, so two runs never interleave checkpoints.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.graph import START, StateGraph
from langgraph.pregel import Pregel
from langgraph.types import Command, StateSnapshot, StateUpdate

from checkpointers.errors import outage
from harness_nodes import _codec
from harness_nodes._trace_langfuse import carry_marks
from harness_nodes.errors import LeaseLost, UserError

RunStatus = Literal["pending", "running", "interrupted", "completed", "failed", "cancelled"]
"""``pending``: submitted (or released by a run that waited longer than its runner's
``outage_seconds`` for its database, or that its caller stopped: see `stopped_status`),
waiting for a worker.
``running``: a worker holds its lease. ``interrupted``: paused for a person (not resumed by
`recover`, unless a review decision on its pause was recorded and never applied).
``completed`` / ``failed`` / ``cancelled``: final."""

FINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class TaskRun:
    """A snapshot of one task: what `submit`, `status` and `cancel` return.

    Example:
        ```python
        from langchain_core.messages import AIMessage
        from langgraph.graph import END, START, MessagesState, StateGraph

        from checkpointers import open_backend
        from harness_nodes import TaskRun, TaskRunner

        builder = StateGraph(MessagesState)
        builder.add_node("answer", lambda state: {"messages": [AIMessage("42")]})
        builder.add_edge(START, "answer")
        builder.add_edge("answer", END)

        with open_backend("memory://") as backend, TaskRunner(backend, builder) as runner:
            runner.submit("question-1", {"messages": []}, task_type="math")
            runner.result("question-1", timeout=10)
            run: TaskRun = runner.status("question-1")
        assert (run.task_key, run.task_type, run.status, run.done) == (
            "question-1", "math", "completed", True
        )
        assert run.outcome == {"status": "completed", "partial_result": "42"}
        ```
    """

    task_key: str
    """The caller's key: the same key is always the same task."""
    thread_id: str
    """The LangGraph thread the task runs on."""
    task_type: str
    status: RunStatus
    outcome: dict[str, Any] | None
    """The stored outcome once completed (or cancelled): ``{"status", "reason"?,
    "partial_result"?}``; every caller of `TaskRunner.result` gets this same value."""
    error: str | None
    """Why the last attempt failed."""
    attempts: int
    """How many times a worker claimed it."""
    graph: str | None
    """The graph's import path (``module:attr``) when workers can rebuild it."""
    created_at: float
    updated_at: float
    finished_at: float | None = None
    crashes: int = 0
    """How many of its runs in a row ended with their process dead (OOM kill, segfault...),
    counted when the next run claimed it; a task past its runner's ``max_recoveries`` is
    ``failed`` instead of run again."""

    @property
    def done(self) -> bool:
        """Whether the status is final (completed, failed or cancelled)."""
        return self.status in FINAL

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskRun:
        """Build a snapshot from a ``harness_runs`` row."""
        return cls(
            task_key=row["task_key"],
            thread_id=row["thread_id"],
            task_type=row["task_type"],
            status=row["status"],
            outcome=_codec.decode(row["outcome"]),
            error=row["error"],
            attempts=int(row["attempts"]),
            graph=row["graph"],
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
            finished_at=row["finished_at"],
            crashes=int(row.get("crashes") or 0),
        )


def new_owner() -> str:
    """A lease owner id: host, process and a fresh suffix (one per claim)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


SELECT_KEY = "SELECT * FROM harness_runs WHERE task_key = %s"
SELECT_THREAD = "SELECT * FROM harness_runs WHERE thread_id = %s"
INSERT = (
    "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, input, "
    "attempts, created_at, updated_at) VALUES (%s, %s, %s, %s, 'pending', %s, 0, %s, %s) "
    "ON CONFLICT DO NOTHING RETURNING *"
)
CLAIM = (
    "UPDATE harness_runs SET status = 'running', lease_owner = %s, lease_expires_at = %s, "
    "attempts = attempts + 1, updated_at = %s, "
    "crashes = CASE WHEN status = 'running' THEN crashes + 1 ELSE 0 END, "
    "crashed_owner = CASE WHEN status = 'running' THEN lease_owner ELSE NULL END "
    "WHERE thread_id = %s AND status IN ({statuses}) "
    "AND (lease_owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < %s) RETURNING *"
)
"""Claim a run: a new owner on a fresh lease, one more attempt.

The same statement counts a crash: a row still ``running`` (its lease expired, or it could
not be claimed) was left by a run whose process died before settling it (OOM kill, segfault,
``os._exit``). ``crashes`` counts such runs in a row, ``crashed_owner`` names the last; a
claim of a settled row (``pending``, ``interrupted``) starts the count again. Counted by the
claim itself, so a run that dies at once, even before its first step, is counted all the
same (see `crash_loop`)."""
UNCOUNT = (
    "UPDATE harness_runs SET crashes = crashes - 1, crashed_owner = NULL "
    "WHERE thread_id = %s AND crashed_owner = %s AND crashes > 0"
)
"""A run that lost its lease and is still alive to see it did not crash (it stalled, or
waited out its database): the claim that took over counted it, this takes it back."""
RENEW = (
    "UPDATE harness_runs SET lease_expires_at = %s, updated_at = %s "
    "WHERE thread_id = %s AND lease_owner = %s AND status = 'running' RETURNING thread_id"
)
SETTLE = (
    "UPDATE harness_runs SET status = %s, outcome = %s, error = %s, finished_at = %s, "
    "lease_owner = NULL, lease_expires_at = NULL, updated_at = %s "
    "WHERE thread_id = %s AND lease_owner = %s AND status = 'running' RETURNING *"
)
CANCEL = (
    "UPDATE harness_runs SET status = 'cancelled', outcome = %s, finished_at = %s, "
    "lease_owner = NULL, lease_expires_at = NULL, updated_at = %s "
    "WHERE task_key = %s AND status NOT IN ('completed', 'failed', 'cancelled') RETURNING *"
)
REVIEWED = (
    "UPDATE harness_runs SET status = 'completed', outcome = %s, finished_at = %s, "
    "updated_at = %s WHERE thread_id = %s AND status = 'interrupted' RETURNING *"
)
"""A paused task finished by a reviewer's resume made outside the runner (`ReviewQueue`)."""
DECIDED_REVIEW = (
    "EXISTS (SELECT 1 FROM harness_reviews WHERE harness_reviews.thread_id = "
    "harness_runs.thread_id AND harness_reviews.status = 'decided')"
)
"""A review of the run's thread was decided and is not yet known to be applied."""
STALE = (
    "SELECT thread_id, task_key, graph FROM harness_runs "
    "WHERE (lease_expires_at IS NULL OR lease_expires_at < %s) AND (status IN ('pending', "
    f"'running') OR (status = 'interrupted' AND {DECIDED_REVIEW})) ORDER BY created_at"
)
"""Runs to carry on: their process died (lease expired), or they are paused on a pause a
review decided that the run may never have taken (`TaskRunner.recover`)."""
CLAIM_DECIDED = CLAIM.format(statuses="'interrupted'").replace(
    " RETURNING *", f" AND {DECIDED_REVIEW} RETURNING *"
)
"""Claim a paused run with a decided review (see `claim_decided`)."""


def claim_sql(statuses: Sequence[str]) -> str:
    """The claim statement for rows in *statuses*."""
    return CLAIM.format(statuses=", ".join(f"'{s}'" for s in statuses))


def claim(
    thread_id: str, owner: str, lease_seconds: float, *, resuming: bool
) -> tuple[str, tuple[Any, ...]]:
    """The statement and parameters claiming *thread_id*'s run for *owner*.

    *resuming* claims a run paused for review (``interrupted``), to answer its pause; else a
    run waiting to start or whose process died (``pending``, or ``running`` on an expired
    lease).
    """
    statuses = ("interrupted",) if resuming else ("pending", "running")
    t = now()
    return claim_sql(statuses), (owner, t + lease_seconds, t, thread_id, t)


def claim_decided(thread_id: str, owner: str, lease_seconds: float) -> tuple[str, tuple[Any, ...]]:
    """The statement and parameters claiming *thread_id*'s paused run for *owner*.

    Only while a review of the thread is ``decided``: a decision recorded with the lease of
    a run that died before taking it, and left so by a recovery that paused the run again
    (before `TaskRunner.recover` applied such decisions). The claimer applies it if the
    thread is still stopped at its pause; one claimer wins.
    """
    t = now()
    return CLAIM_DECIDED, (owner, t + lease_seconds, t, thread_id, t)


def released(row: Mapping[str, Any], graph: str | None) -> bool:
    """Whether *row*'s task waits for a run that nobody will start unless asked.

    A run gave it back ``pending`` (stopped by its caller, or its database stayed away) and
    no process holds it: a submission that joins it starts the run, as `recover` would,
    instead of waiting on it. Never a task still waiting for its first claim (its own
    submission dispatched that run), nor one of another runner's graph.
    """
    return (
        row["status"] == "pending"
        and row["lease_owner"] is None
        and int(row["attempts"]) > 0
        and row["graph"] == graph
    )


def crash_loop(row: Mapping[str, Any], max_recoveries: int | None) -> str | None:
    """Why the run just claimed in *row* must not run again, or None if it may.

    Its process died in each of its last ``crashes`` runs; past *max_recoveries* (None:
    no bound) recovery stops: running it again would only kill another worker (after paying
    for the same model calls again). The task is then ``failed`` with this reason.
    """
    crashes = int(row.get("crashes") or 0)
    if max_recoveries is None or crashes <= max_recoveries:
        return None
    return (
        f"crashed its process {crashes} times in a row (last claimed by "
        f"{row.get('crashed_owner') or 'unknown'}); not recovered again "
        f"(max_recoveries={max_recoveries})"
    )


def check_max_recoveries(max_recoveries: int | None) -> None:
    """Raise `UserError` unless *max_recoveries* is None or a count >= 0."""
    if max_recoveries is None:
        return
    n = max_recoveries
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"max_recoveries must be None or an int >= 0, got {max_recoveries!r}")


def carries_on(row: Mapping[str, Any]) -> bool:
    """Whether the run just claimed in *row* carries its task on from where a run stopped.

    Not the task's first claim: it answers a pause (`TaskRunner.resume`, `ReviewQueue.decide`)
    or continues a run that died, perhaps after answering one; the runner then syncs the
    review queue after it, closing what it answered. A first run answers no pause, so a task
    that never paused costs no sync.
    """
    return int(row["attempts"]) > 1


def run_config(
    thread_id: str,
    task_key: str,
    task_type: str,
    base: RunnableConfig | None,
    head: Mapping[str, Any] | None = None,
) -> RunnableConfig:
    """The config every invocation of a task uses: its thread, tagged with its key and type.

    *head* is the metadata of the thread's newest checkpoint, when the invocation carries a
    run on (a resume, a recovery): the fields the run marked sensitive are carried on from
    it (`carry_marks`), for a runner built without the config that marked them (a worker,
    ``harness resume``).
    """
    config: dict[str, Any] = dict(base or {})
    config["configurable"] = {**dict(config.get("configurable") or {}), "thread_id": thread_id}
    config["metadata"] = {
        **dict(config.get("metadata") or {}),
        "harness_task_key": task_key,
        "harness_task_type": task_type,
    }
    return carry_marks(cast(RunnableConfig, config), head)


def outcome_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """The stored outcome of a finished graph: its ``outcome`` key, or ``completed``."""
    outcome = values.get("outcome")
    if isinstance(outcome, Mapping) and "status" in outcome:
        return dict(outcome)
    messages = values.get("messages") or []
    result: dict[str, Any] = {"status": "completed"}
    if messages:
        last = messages[-1]
        result["partial_result"] = getattr(last, "text", None) or str(
            getattr(last, "content", last)
        )
    return result


def input_not_taken(snapshot: StateSnapshot) -> bool:
    """The run failed on its input, before its first node (a router out of START raised).

    LangGraph keeps the failed input step's writes, and carrying it on with ``None`` applies
    them but never routes them: the run "completes" with the input as its state. The attempt
    is made again with the input (replacing that failed step, so nothing is doubled). The
    step is an input step whichever attempt made it (the first is step -1, a retry's the next).
    """
    return (
        snapshot.metadata is not None
        and snapshot.metadata.get("source") == "input"
        and any(t.name == START and t.error for t in snapshot.tasks)
    )


ROUTE_AGAIN = "thread %s: a router raised after node(s) %s; the step is replayed to route again"


class BranchLost(Exception):
    """A router raised after its node's writes, and its branch cannot be routed again.

    `lost_branch` raises it; the runner fails the task with it, at once (another attempt
    would find the same step), never ``completed``.
    """


# LangGraph's reserved channels (errors, interrupts, "no writes", returns) are dunder names;
# a task's other writes are its output. A step whose failed node has an error handler of
# LangGraph's own (``__error_source_node__``) is routed by LangGraph, not repaired here.
_ERROR_HANDLED = "__error_source_node__"


# The first element of a task's path: LangGraph's name for a task its node's edges scheduled
# (a ``Send`` is ``"__pregel_push"``). Spelt here, as the constant is private to LangGraph.
_PULL = "__pregel_pull"


def _reserved(channel: str) -> bool:
    return channel.startswith("__") and channel.endswith("__")


def lost_branch(
    snapshot: StateSnapshot, pending_writes: Sequence[tuple[str, str, Any]] | None
) -> list[StateUpdate] | None:
    """The updates that route again a step whose router raised after its node's writes.

    LangGraph runs a conditional edge's router inside the task of the node it leaves, after
    that node's writes. A router that raises fails the task with those writes kept, and
    LangGraph reads a failed task with writes as finished: carrying the run on (``None``,
    a retry, a recovery) applies the writes, finds no branch and ends, the task
    "completed" with, say, a tool call nobody ran. Replaying each finished task of the step
    with ``update_state(values=<its output>, as_node=<its node>)`` (one superstep, same task
    ids) runs the node's writers again, its branch included, so the router routes again (or
    raises again: nothing is saved then); ``add_messages`` replaces messages by id, so
    nothing is doubled.

    A task of the step that ended with no result is run again in the next step: under
    ``ainvoke`` LangGraph cancels a step's other tasks when one fails (a sync run lets them
    finish), so a sibling still running when the router raised is cut short. The replay of
    the failed node sends the run to it too (``Command(goto=...)``), as its own edge did.

    Args:
        snapshot: The thread's head (``get_state``).
        pending_writes: The head checkpoint's writes (``(task_id, channel, value)``).

    Returns:
        None when no task of the step failed after writing (nothing to repair), else the
        updates to apply as one superstep (``bulk_update_state(config, [updates])``).

    Raises:
        BranchLost: the step cannot be replayed faithfully: another of its tasks is paused
            or was sent (``Send``: its input is lost), or a task's writes are not its output
            keys once each (a ``Command``'s ``goto``, a channel written twice).
    """
    failed = [t for t in snapshot.tasks if t.error is not None and t.result is not None]
    if not failed or any(t.name == START for t in failed):
        return None  # the edge out of START is `input_not_taken`'s
    writes: dict[str, list[str]] = {}
    for task_id, channel, _ in pending_writes or ():
        if channel == _ERROR_HANDLED:
            return None
        writes.setdefault(task_id, []).append(channel)
    nodes = ", ".join(sorted({t.name for t in failed}))
    lost = f"a router raised after node {nodes}; its branch was lost"
    updates = []
    cut_short: list[str] = []
    for task in snapshot.tasks:
        if task.result is None and not task.interrupts and task.path[:1] == (_PULL,):
            cut_short.append(task.name)
            continue
        if task.result is None or task.interrupts:
            raise BranchLost(f"{lost} (task {task.name} of the same step has not finished)")
        output = [c for c in writes.get(task.id, ()) if not _reserved(c)]
        result = task.result
        if (
            not isinstance(result, dict)
            or len(set(output)) != len(output)
            or set(output) != set(result)
        ):
            raise BranchLost(f"{lost} (the writes of node {task.name} cannot be replayed)")
        updates.append(StateUpdate(result, task.name, task.id))
    if cut_short:
        first = next(i for i, u in enumerate(updates) if u.task_id == failed[0].id)
        # A Command is what a node returns to go somewhere; update_state takes it as one
        # (its writers apply the update and the goto), though StateUpdate is typed a dict.
        resend = Command(update=updates[first].values, goto=cut_short)
        updates[first] = updates[first]._replace(values=cast(dict[str, Any], resend))
    return updates


_INTERRUPT_ID = re.compile(r"[0-9a-f]{32}")
ANSWER_TAKEN = (
    "thread %s: an earlier attempt took the answer to its pause; the run carries on from its "
    "last checkpoint without it"
)


class Answer:
    """An answer to a thread's pause, sent again by a retried attempt only while it is pending.

    LangGraph keeps a resume value sent without an interrupt id as an answer for the thread,
    which the next ``interrupt()`` to run takes, whichever pause that is. So an attempt that
    took the answer, moved past its pause and then failed (or was cut short by the database)
    must not send it again: the retry's next pause would take it, and an approval of one
    refund would approve the next, which nobody saw. Keyed by interrupt id (what
    `ReviewQueue.decide` sends) it is matched to its pause, and one whose pause is gone is
    dropped, but only because LangGraph does not check it by default; it is filtered here too.

    The first attempt notes the pauses the thread stands at (and its head checkpoint: a
    thread stopped at a breakpoint has no pause). A retry sends the answer again only to
    those of them still pending, else carries the run on from its last checkpoint (``None``).
    A pause inside a subgraph is read from the subgraph's own state (`live_pauses`).
    """

    def __init__(self, value: Any) -> None:
        self.value = value
        self._pauses: frozenset[str] | None = None
        self._checkpoint: str | None = None

    def command(self, snapshot: StateSnapshot) -> Command[Any] | None:
        """The input for an attempt of the run on the thread as *snapshot* shows it.

        *snapshot* is read with ``get_state(config, subgraphs=True)``, so that a pause inside
        a subgraph the run has moved past is not taken for pending (see `live_pauses`).

        Returns:
            ``Command(resume=...)`` if the pauses the answer is for are still pending (for a
            keyed answer: the entries for those still pending), else None: the answer was
            taken by an earlier attempt, and the run carries on without it.
        """
        live = live_pauses(snapshot)
        head = (snapshot.config.get("configurable") or {}).get("checkpoint_id")
        if self._pauses is None:  # the first attempt: the answer is for what it finds
            self._pauses, self._checkpoint = live, head
            if len(live) == 1 and not _keyed(self.value):
                # Keyed to its one pause, as LangGraph would match it: sent without an id it
                # is saved with the parent's step, which a subgraph's pause does not end, so
                # a retry that carries on would hand it to the subgraph's next pause.
                [pause] = live
                self.value = {pause: self.value}
            return Command(resume=self.value)
        if _keyed(self.value):
            left = {k: v for k, v in self.value.items() if k in live}
            return Command(resume=left) if left else None
        if self._pauses <= live if self._pauses else head == self._checkpoint:
            return Command(resume=self.value)
        return None


STOPPED_NOTE = "stopped by its caller ({error}); not a crash"
"""A run row's ``error`` once its caller stopped the run (see `stopped_status`)."""


def stopped_status(snapshot: StateSnapshot, answer: Answer | None) -> RunStatus:
    """The status a run its caller stopped leaves its task in, its lease given back at once.

    A run is stopped by its caller when the coroutine running it is cancelled (an
    ``asyncio.wait_for`` timeout, a web request whose client went away, ``task.cancel()``,
    an event loop shutting down) or its thread gets ``KeyboardInterrupt``. Its process is
    alive, so it is not a crash: not counted toward ``max_recoveries``, and nobody should
    wait for its lease to expire before carrying the task on.

    ``interrupted`` if the run answered a pause (*answer*) and the thread still stands at
    that pause (the answer was not taken for good: the step that took it was never saved):
    the task is paused as before, and the next `TaskRunner.resume` (or the recovery of a
    ``decided`` review) answers it again. Otherwise ``pending``: the run had moved on (a
    side effect may have been executing), and the next run carries the task on from its last
    checkpoint, where the effect ledger answers for any call whose outcome is unknown.
    """
    if answer is not None and answer.command(snapshot) is not None:
        return "interrupted"
    return "pending"


def live_pauses(snapshot: StateSnapshot) -> frozenset[str]:
    """The ids of the pauses still pending on a thread, subgraphs' included.

    A pause raised inside a subgraph (a node that is a compiled graph, or one invoked from a
    node function) is listed by the parent from its own checkpoint, which only moves when the
    parent's step ends: a subgraph that took its answer, went past the pause and then failed
    leaves the parent still listing the answered pause. The subgraph's own state (in
    *snapshot* when read with ``subgraphs=True``) says which of its pauses are pending; a task
    whose subgraph state is not there (not read, or not found) counts as the parent lists it.
    """
    live: set[str] = set()
    for task in snapshot.tasks:
        sub = task.state
        if isinstance(sub, StateSnapshot) and sub.created_at is not None:
            live |= live_pauses(sub)
        else:
            live.update(i.id for i in task.interrupts)
    return frozenset(live)


def _keyed(value: Any) -> bool:
    """*value* answers pauses by interrupt id (``{interrupt_id: answer}``), as LangGraph reads."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and _INTERRUPT_ID.fullmatch(k) for k in value)
    )


# --- graphs ----------------------------------------------------------------------------------


def import_graph(path: str) -> Any:
    """``"package.module:attr"`` → the object (a builder, compiled graph, or factory)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"A graph path looks like 'package.module:attr', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"Cannot import graph module {module_name!r}: {e}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise UserError(f"Module {module_name!r} has no attribute {attr!r}") from None
    return obj


def compile_graph(source: Any, backend: Any, saver: BaseCheckpointSaver[Any]) -> Pregel[Any, Any]:
    """A compiled graph on *saver*, from a builder, a compiled graph, a factory or a path.

    A factory is called with the backend (so it can build an `EffectLedger` on it).
    """
    if isinstance(source, str):
        source = import_graph(source)
    if isinstance(source, StateGraph):
        return source.compile(checkpointer=saver)
    if isinstance(source, Pregel):
        return source.copy(update={"checkpointer": saver})
    if callable(source):
        return compile_graph(source(backend), backend, saver)
    raise UserError(
        "TaskRunner needs a StateGraph, a compiled graph, a factory taking the backend, or "
        f"an import path 'module:attr'; got {type(source).__name__}"
    )


# --- the fence -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """The lease the current execution holds (set for the duration of one run)."""

    thread_id: str
    owner: str
    seconds: float


CURRENT_LEASE: ContextVar[Lease | None] = ContextVar("harness_lease", default=None)

FENCE = (
    "UPDATE harness_runs SET lease_expires_at = %s, updated_at = %s WHERE thread_id = %s "
    "AND lease_owner = %s AND status = 'running' RETURNING thread_id"
)
"""Extend the lease only if it is still ours: done before every checkpoint write, so a run
that lost its lease (another run claimed the thread, or it was cancelled) can never write
after that. The check and the extension are one statement.

Ours, not "unexpired": every claim writes a new owner, so an owner that still matches proves
nobody took the thread over, and the claim (which needs an expired lease) and this statement
are serialised on the row. A lease can run out with no one to blame — the database was away
longer than the lease (a failover), so the heartbeat could not renew it — and a run that
stopped then would leave its task ``running`` with no process carrying it. If it was
expired, whichever comes first wins: this fence (the claim then fails) or a claim (this fence
then fails)."""


def _fence_params(lease: Lease) -> tuple[Any, ...]:
    t = time.time()
    return (t + lease.seconds, t, lease.thread_id, lease.owner)


def _leased(config: RunnableConfig) -> Lease | None:
    lease = CURRENT_LEASE.get()
    if lease is None:
        return None  # not written by a runner (get_state, a user's own invoke...)
    if str((config.get("configurable") or {}).get("thread_id")) != lease.thread_id:
        return None
    return lease


class FencedSaver(BaseCheckpointSaver[Any]):
    """Delegates to a saver; writes for a leased run first prove the lease is still held.

    A passing database fault in any of its calls (the fence's or the saver's) is raised as
    `BackendUnavailable` ("checkpointer"): a run cut short by it was cut short by its store,
    not by its own code, and the runner waits for the database instead of counting a failed
    attempt (see `TaskRunner`'s *outage_seconds*).
    """

    def __init__(
        self,
        inner: BaseCheckpointSaver[Any],
        backend: Any = None,
        abackend: Any = None,
    ) -> None:
        super().__init__(serde=inner.serde)
        self.inner = inner
        self.backend = backend
        self.abackend = abackend

    def _away(self) -> Any:
        """Raise a passing database fault in the block as `BackendUnavailable`."""
        return outage(self.abackend if self.abackend is not None else self.backend, "checkpointer")

    def _fence(self, config: RunnableConfig) -> None:
        lease = _leased(config)
        if lease is not None and not self.backend.execute(FENCE, _fence_params(lease)):
            raise LeaseLost(lease.thread_id, lease.owner)

    async def _afence(self, config: RunnableConfig) -> None:
        lease = _leased(config)
        if lease is None:
            return
        if self.abackend is not None:
            rows = await self.abackend.execute(FENCE, _fence_params(lease))
        else:
            rows = await asyncio.to_thread(self.backend.execute, FENCE, _fence_params(lease))
        if not rows:
            raise LeaseLost(lease.thread_id, lease.owner)

    @property
    def config_specs(self) -> list[Any]:
        return list(self.inner.config_specs)

    def get_next_version(self, current: Any, channel: None = None) -> Any:
        return self.inner.get_next_version(current, channel)

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        with self._away():
            return self.inner.get_tuple(config)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        with self._away():
            yield from self.inner.list(config, filter=filter, before=before, limit=limit)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        with self._away():
            self._fence(config)
            return self.inner.put(config, checkpoint, metadata, new_versions)

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        with self._away():
            self._fence(config)
            self.inner.put_writes(config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        with self._away():
            self.inner.delete_thread(thread_id)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        with self._away():
            return await self.inner.aget_tuple(config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        with self._away():
            async for item in self.inner.alist(config, filter=filter, before=before, limit=limit):
                yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        with self._away():
            await self._afence(config)
            return await self.inner.aput(config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        with self._away():
            await self._afence(config)
            await self.inner.aput_writes(config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        with self._away():
            await self.inner.adelete_thread(thread_id)


class OutageBudget:
    """How long a run waits for its database to come back, retrying with backoff.

    The clock starts at the first attempt the outage cuts short and stops (`over`) once an
    attempt gets past it; the waits are `backoff`'s, never past the budget.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._since: float | None = None
        self._retries = 0

    def wait(self) -> float | None:
        """Seconds to wait before the next attempt; None once the budget is spent."""
        t = time.monotonic()
        if self._since is None:
            self._since = t
        left = self._since + self.seconds - t
        if left <= 0:
            return None
        self._retries += 1
        return min(backoff(self._retries), left)

    def over(self) -> None:
        """The database answered: the next outage starts a budget of its own."""
        self._since, self._retries = None, 0


def backoff(attempt: int) -> float:
    """Seconds to wait before in-process retry *attempt* (1, 2, ...): 0.2, 0.4, 0.8 ... 5."""
    return float(min(5.0, 0.2 * 2 ** (attempt - 1)))


def error_line(error: BaseException) -> str:
    """*error*'s type and the first line of its message: a run row's ``error``."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def now() -> float:
    """Epoch seconds."""
    return time.time()
