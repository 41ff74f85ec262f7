"""`TaskRunner`: idempotent task submission, one process per thread, crash recovery.

A *task* is identified by the caller's key. ``submit(key, input)`` maps the key to one thread
(the ``harness_runs`` row's unique ``task_key``): the first submission starts the run; a
submission while it runs attaches to it; a submission after it finished returns the stored
outcome. So a client that times out at 30 s and retries does not run the agent twice.

A run holds a lease on its row while it executes (renewed by a heartbeat), so only one
process runs a thread at a time, and invokes the graph with ``durability="sync"`` so a crash
loses no completed step. `recover()` finds runs whose lease expired (their process died) and
resumes them from their last checkpoint; runs paused for review (``interrupted``) wait for
their reviewer instead. With a `JobQueue` the runs execute on ``harness worker`` processes
(procrastinate on Postgres), which is how a deployment scales past one machine.

Example:
    ```python
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    from checkpointers import open_backend
    from harness_nodes import TaskRunner

    builder = StateGraph(MessagesState)
    builder.add_node("answer", lambda state: {"messages": [AIMessage("42")]})
    builder.add_edge(START, "answer")
    builder.add_edge("answer", END)

    with open_backend("memory://") as backend, TaskRunner(backend, builder) as runner:
        first = runner.submit("question-1", {"messages": [HumanMessage("6 x 7?")]})
        assert runner.result("question-1", timeout=10) == {
            "status": "completed",
            "partial_result": "42",
        }
        again = runner.submit("question-1", {"messages": [HumanMessage("6 x 7?")]})
        assert again.thread_id == first.thread_id and again.attempts == 1
    ```
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig
from langgraph.types import Command

from checkpointers.errors import is_transient
from harness_nodes import _codec
from harness_nodes._lease import (
    ANSWER_TAKEN,
    CANCEL,
    CURRENT_LEASE,
    INSERT,
    RENEW,
    REVIEWED,
    ROUTE_AGAIN,
    SELECT_KEY,
    SELECT_THREAD,
    SETTLE,
    STALE,
    STOPPED_NOTE,
    UNCOUNT,
    Answer,
    BranchLost,
    FencedSaver,
    Lease,
    OutageBudget,
    RunStatus,
    TaskRun,
    backoff,
    carries_on,
    check_max_recoveries,
    claim,
    claim_decided,
    compile_graph,
    crash_loop,
    error_line,
    input_not_taken,
    lost_branch,
    new_owner,
    now,
    outcome_of,
    released,
    run_config,
    stopped_status,
)
from harness_nodes.errors import (
    BackendUnavailable,
    InvalidDecision,
    LeaseLost,
    RunFailed,
    TaskNotFinished,
    TaskNotPaused,
    UnknownTask,
    UserError,
)

if TYPE_CHECKING:
    from checkpointers import Backend
    from harness_nodes.background import JobQueue
    from harness_nodes.review_queue import ReviewItem, ReviewQueue

__all__ = ["RunStatus", "TaskRun", "TaskRunner"]

logger = logging.getLogger("harness_nodes.runner")

_NO_RESUME = object()


class _Heartbeat:
    """Renews a lease every third of its length while a step runs long (an LLM call)."""

    def __init__(self, backend: Backend, thread_id: str, owner: str, lease: float) -> None:
        self.backend = backend
        self.thread_id, self.owner, self.lease = thread_id, owner, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{thread_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                t = now()
                rows = self.backend.execute(RENEW, (t + self.lease, t, self.thread_id, self.owner))
            except Exception:
                continue  # the database is unreachable; the fence decides at the next write
            if not rows:
                return  # cancelled or taken over: the fence stops the run at its next write


class TaskRunner:
    """Runs tasks on a graph: idempotent by key, one process per thread, resumable.

    Args:
        backend: Where the runs, checkpoints and ledgers live.
        graph: A `StateGraph` builder, a compiled graph, a factory ``f(backend)`` returning
            either, or an import path ``"package.module:attr"`` to one of those (required
            with *queue*, since workers rebuild the graph from it).
        lease_seconds: How long a run's lease lasts without a heartbeat; a crashed run is
            resumed by `recover` after this long.
        max_attempts: In-process attempts of a run that raises before it is ``failed``.
            An attempt cut short by the database being away (`BackendUnavailable`: the
            checkpointer, a ledger or the queue could not reach it) is not one of them: it
            is not the task's failure.
        max_recoveries: How many times in a row recovery runs a task again after its
            process died in its run (an OOM kill, a segfault, ``os._exit``: nothing raised,
            so *max_attempts* never saw it). Past that, the claim that finds the task dead
            once more marks it ``failed`` ("crashed its process N times in a row (last
            claimed by ...)") instead of killing another worker. A run that settles (even
            ``pending``, given up for an outage) starts the count again; None: no bound. A
            run stopped by its caller (``KeyboardInterrupt``; in `AsyncTaskRunner`, its
            coroutine cancelled) is no crash: it gives its lease back at once, the task
            paused again or ``pending`` (docs/decisions/0011).
        outage_seconds: How long a run whose database is away waits for it, retrying with
            backoff, before it stops and leaves the task to recovery: released as
            ``pending`` if the database answers that, else ``running`` on a lease nobody
            renews; `recover` (a worker's sweep) carries it on from its last checkpoint.
            The run then raises the `BackendUnavailable` (`ReviewQueue.decide` does too).
        max_workers: Threads running submitted tasks in this process (without *queue*).
        config: Extra `RunnableConfig` for every invocation (callbacks, recursion_limit...).
        queue: Run tasks on ``harness worker`` processes instead of in this process.
        reviews: The `ReviewQueue` kept up to date with a task's review pauses: synced after
            a run that pauses, so ``harness review`` and the inbox list them, and after one
            that carries on from a pause, which closes what it answered (default: a queue on
            this runner's graph with the default policies; pass yours for its deadline,
            assignee...).

    Raises:
        UserError: a graph that cannot be compiled, or *queue* without an import path.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool
        from langgraph.graph import START, MessagesState, StateGraph
        from langgraph.prebuilt import ToolNode, tools_condition

        from checkpointers import open_backend
        from harness_nodes import TaskRunner
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call

        calls = []


        @tool
        def lookup_order(order_id: str) -> str:
            "Look an order up."
            calls.append(order_id)
            return "shipped"


        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("lookup_order", {"order_id": "A1"})]), ai("Shipped.")]
        )
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_node("tools", ToolNode([lookup_order]))
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", tools_condition)
        builder.add_edge("tools", "agent")

        with open_backend("memory://") as backend, TaskRunner(backend, builder) as runner:
            ask = {"messages": [HumanMessage("Where is A1?")]}
            outcome = runner.run("ticket-1", ask, timeout=10)
            again = runner.run("ticket-1", ask, timeout=10)  # a client retrying: same task
            assert runner.status("ticket-1").status == "completed"
        assert outcome == again == {"status": "completed", "partial_result": "Shipped."}
        assert calls == ["A1"]  # the agent ran once
        ```
    """

    def __init__(
        self,
        backend: Backend,
        graph: Any,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        max_recoveries: int | None = 5,
        outage_seconds: float = 60.0,
        max_workers: int = 4,
        config: RunnableConfig | None = None,
        queue: JobQueue | None = None,
        reviews: ReviewQueue | None = None,
    ) -> None:
        from checkpointers import Backend

        if not isinstance(backend, Backend):
            raise UserError(
                f"TaskRunner needs a checkpointers.Backend, got {type(backend).__name__}; "
                "for an AsyncBackend use harness_nodes.aio.AsyncTaskRunner"
            )
        if lease_seconds <= 0 or outage_seconds < 0 or max_attempts < 1 or max_workers < 1:
            raise UserError(
                "lease_seconds must be > 0, outage_seconds >= 0, max_attempts and max_workers >= 1"
            )
        if queue is not None and not isinstance(graph, str):
            raise UserError(
                "A TaskRunner with a queue needs the graph as an import path "
                "'package.module:attr', so that workers can rebuild it"
            )
        self.backend = backend
        self.lease_seconds = lease_seconds
        check_max_recoveries(max_recoveries)
        self.max_attempts = max_attempts
        self.max_recoveries = max_recoveries
        self.outage_seconds = outage_seconds
        self.queue = queue
        self.graph_path: str | None = graph if isinstance(graph, str) else None
        self._config = config
        self._saver = FencedSaver(backend.checkpointer, backend)
        self.graph = compile_graph(graph, backend, self._saver)
        self._max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if reviews is not None and reviews.backend is not backend:
            raise UserError("TaskRunner(reviews=...) needs a ReviewQueue on the runner's backend")
        self._reviews = reviews

    def __repr__(self) -> str:
        return f"TaskRunner({self.backend!r}, graph={self.graph_path or self.graph.name!r})"

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the tasks running in this process, then stop its threads."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, task_key: str, input: Any, *, task_type: str = "default") -> TaskRun:
        """Start the task *task_key*, or join it if it exists. Never runs it twice.

        Args:
            task_key: The caller's id for the task (an order id, a request id...).
            input: The graph's input for the first run (ignored if the task exists).
            task_type: Selects the envelope, groups reports.

        Returns:
            The task as it is now; its outcome if it already finished.
        """
        if not isinstance(task_key, str) or not task_key:
            raise UserError(f"task_key must be a non-empty string, got {task_key!r}")
        t = now()
        created = self.backend.execute(
            INSERT,
            (task_key, task_key, task_type, self.graph_path, _codec.encode(input), t, t),
        )
        if created:
            self._dispatch(task_key)
            return TaskRun.from_row(created[0])
        if self.queue is None:
            # A run stopped by its caller (or by a database outage) gave the task back
            # ``pending``: joining it starts it again here (workers' sweeps do with a queue).
            rows = self.backend.execute(SELECT_KEY, (task_key,))
            if rows and released(rows[0], self.graph_path):
                self._dispatch(rows[0]["thread_id"])
        return self.status(task_key)

    def run(
        self, task_key: str, input: Any, *, task_type: str = "default", timeout: float | None = None
    ) -> dict[str, Any]:
        """`submit` then `result`: the task's outcome, however many times it is called."""
        self.submit(task_key, input, task_type=task_type)
        return self.result(task_key, timeout=timeout)

    def status(self, task_key: str) -> TaskRun:
        """The task as it is now.

        Raises:
            UnknownTask: nothing was submitted with this key.
        """
        rows = self.backend.execute(SELECT_KEY, (task_key,))
        if not rows:
            raise UnknownTask(task_key)
        run = TaskRun.from_row(rows[0])
        if run.status == "interrupted":
            return self._reconcile(run)
        return run

    def _reconcile(self, run: TaskRun) -> TaskRun:
        # The graph may have been resumed outside the runner (``Command(resume=...)`` on it
        # directly): if nothing is left to run, record the outcome so result() returns it.
        config = run_config(run.thread_id, run.task_key, run.task_type, self._config)
        snapshot = self.graph.get_state(config)
        if snapshot.tasks:
            return run
        t = now()
        outcome = _codec.encode(outcome_of(snapshot.values))
        rows = self.backend.execute(REVIEWED, (outcome, t, t, run.thread_id))
        return TaskRun.from_row(rows[0]) if rows else self._current(run.thread_id)

    def result(self, task_key: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the task to finish and return its stored outcome.

        Raises:
            TaskNotFinished: *timeout* seconds passed first (the task may be paused for review).
            RunFailed: the task failed after its attempts.
            UnknownTask: nothing was submitted with this key.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                run = self.status(task_key)
            except Exception as e:
                # A dropped connection while polling is not the task's failure: poll again.
                if not is_transient(e) or (deadline is not None and time.monotonic() >= deadline):
                    raise
                time.sleep(delay)
                delay = min(0.25, delay * 2)
                continue
            if run.done:
                if run.status == "failed":
                    raise RunFailed(run.thread_id, "TaskFailed", run.error or "unknown error")
                return dict(run.outcome or {"status": run.status})
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskNotFinished(task_key, run.status)
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(0.25, delay * 2)

    def cancel(self, task_key: str) -> TaskRun:
        """Cancel the task unless it already finished; a running attempt stops at its next step.

        Raises:
            UnknownTask: nothing was submitted with this key.
        """
        t = now()
        rows = self.backend.execute(
            CANCEL, (_codec.encode({"status": "cancelled"}), t, t, task_key)
        )
        return TaskRun.from_row(rows[0]) if rows else self.status(task_key)

    def recover(self) -> list[str]:
        """Resume the runs of this runner's graph whose process died (lease expired).

        Runs paused for review are left to their reviewer. A run that died after a
        reviewer's decision was recorded (`ReviewQueue.decide` claims the lease with it) is
        carried on with that decision, whether or not the run had taken it: it is applied
        once. So is a paused run whose thread is still stopped at a pause with a ``decided``
        review (one an earlier recovery paused again without applying it). Call it at
        start-up (workers do, and periodically).

        Returns:
            The thread ids dispatched again.
        """
        stale = self.backend.execute(STALE, (now(),))
        threads = [r["thread_id"] for r in stale if r["graph"] == self.graph_path]
        for thread_id in threads:
            self._dispatch(thread_id)
        return threads

    def resume(self, task_key: str, value: Any) -> TaskRun:
        """Answer the interrupt a task is paused on (a review decision) and run it on, here.

        The task's lease is claimed first, as `ReviewQueue.decide` does: the answer is
        checked, recorded (an answer to "did this call take effect?" goes to the effect
        ledger) and applied only by the process that holds the task.

        The answer does not go through the review queue: it has no reviewer to audit. Once
        the run has moved past the pause, the runner syncs the queue, which closes the
        pause's item (``closed``: answered outside the queue), so no reviewer is left a
        decision that can no longer apply. A person's decision goes through
        `ReviewQueue.decide` (validated, audited with their name, applied under this same
        lease); ``harness resume THREAD --decision`` does that.

        Returns:
            The task after this run (``completed``, or ``interrupted`` again).

        Raises:
            UnknownTask: nothing was submitted with this key.
            TaskNotPaused: the task is not paused for review (it finished, was cancelled, or
                has not paused yet), or another runner holds it (it is answering the pause);
                nothing was run or recorded.
            InvalidDecision: *value* is not a valid answer to the pause (a malformed or
                disallowed review decision, or "it did not happen" for a call the effect
                ledger records as done); the task stays ``interrupted``, nothing ran, and a
                corrected decision can be given.
        """
        run = self.status(task_key)
        return self._resume(run.thread_id, value)

    def _resume(self, thread_id: str, value: Any) -> TaskRun:
        """Claim the paused task's lease, then answer its pause under it (`resume`)."""
        owner = new_owner()
        claimed = self.backend.execute(*claim(thread_id, owner, self.lease_seconds, resuming=True))
        if not claimed:
            rows = self.backend.execute(SELECT_THREAD, (thread_id,))
            if not rows:
                raise UnknownTask(thread_id)
            raise TaskNotPaused(rows[0]["task_key"], rows[0]["status"])
        try:
            self._answer_effects(thread_id, value)
        except BaseException:
            # Nothing ran: give the lease back, the task paused as before.
            self._settle(thread_id, owner, "interrupted", None, None)
            raise
        return self._run_claimed(claimed[0], owner, value)

    def _answer_effects(self, thread_id: str, value: Any) -> None:
        """Check an answer to "did this call take effect?" against the ledger; record it there.

        As `ReviewQueue.decide` does, for a task answered through its runner.
        """
        from harness_nodes.review_queue import (
            _effect_answer_of,
            check_effect_answers,
            record_effect_answers,
        )

        answer = _effect_answer_of(self.graph.get_state(_thread_config(thread_id)), value)
        if answer is None:
            return
        requests, decisions, reviewer = answer
        check_effect_answers(self.backend, thread_id, requests, decisions)
        record_effect_answers(self.backend, thread_id, requests, decisions, reviewer)

    # -- executing ----------------------------------------------------------------------------

    def execute(self, thread_id: str, *, resume: Any = _NO_RESUME) -> TaskRun:
        """Run the task on *thread_id* in this thread if its lease can be claimed.

        Workers call this. If another process holds the lease, or the task is finished, it
        returns the task as it is without running anything; a task paused for review too,
        unless a ``decided`` review of it was never applied (see `recover`). With *resume*
        (an answer to the task's pause) it is `resume` by thread id, and raises as `resume`
        does.
        """
        if resume is not _NO_RESUME:
            return self._resume(thread_id, resume)
        owner = new_owner()
        claimed = self.backend.execute(*claim(thread_id, owner, self.lease_seconds, resuming=False))
        if not claimed:
            rows = self.backend.execute(SELECT_THREAD, (thread_id,))
            if not rows:
                raise UnknownTask(thread_id)
            if rows[0]["status"] == "interrupted":
                claimed = self.backend.execute(*claim_decided(thread_id, owner, self.lease_seconds))
                if claimed:
                    return self._carry_on_decided(claimed[0], owner)
            return TaskRun.from_row(rows[0])
        reason = crash_loop(claimed[0], self.max_recoveries)
        if reason is not None:
            return self._crashed_out(thread_id, owner, reason)
        return self._run_claimed(claimed[0], owner, resume)

    def _crashed_out(self, thread_id: str, owner: str, reason: str) -> TaskRun:
        """Fail a task whose runs keep killing their process, under the lease just claimed."""
        logger.error("thread %s %s: marked failed", thread_id, reason)
        self._score_failure(thread_id, reason)
        return self._settle(thread_id, owner, "failed", None, reason)

    def _carry_on_decided(self, row: dict[str, Any], owner: str) -> TaskRun:
        """Apply the decisions a paused task's run never took, under the lease *owner* holds.

        A run that died after `ReviewQueue.decide` recorded a decision, before it took it,
        was recovered (before `recover` applied such decisions) with no answer, which paused
        it again at the same spot: the task ``interrupted``, the item ``decided``. If the
        thread is still stopped at a decided pause, the run carries on with the decision as
        any recovery does; else (the decision was applied and its item not yet settled, e.g.
        the run stopped at a breakpoint of the graph) the item is settled ``applied``, the
        queue is synced and the task is left paused, nothing run.
        """
        thread_id = row["thread_id"]
        try:
            snapshot = self.graph.get_state(_thread_config(thread_id))
            decided = self._queue()._decided_pauses(thread_id, snapshot)
            if not decided:
                # Settled here, not left to the sync: it cannot tell a breakpoint from a run
                # that died, so the item would stay decided and every sweep claim the task.
                self._queue()._settle_stopped(thread_id, snapshot)
        except BaseException:
            # Nothing ran: give the lease back, the task paused as before (the next sweep
            # tries again; an expired lease would have it carried on with no answer).
            self._settle(thread_id, owner, "interrupted", None, None)
            raise
        if decided:
            return self._run_claimed(row, owner)
        self._sync_reviews(thread_id)
        return self._settle(thread_id, owner, "interrupted", None, None)

    def _run_claimed(
        self,
        row: dict[str, Any],
        owner: str,
        resume: Any = _NO_RESUME,
        *,
        on_refused: Callable[[InvalidDecision], None] | None = None,
    ) -> TaskRun:
        """Run the task whose row *owner* just claimed, under that lease, and settle it.

        `execute` calls it after its claim; `ReviewQueue.decide` after claiming the lease in
        the transaction that claims its review, with *on_refused*: called with the graph's
        `InvalidDecision` while the lease is still held, before the task is paused again.
        """
        thread_id = row["thread_id"]
        token = CURRENT_LEASE.set(Lease(thread_id, owner, self.lease_seconds))
        try:
            with _Heartbeat(self.backend, thread_id, owner, self.lease_seconds):
                return self._attempts(row, owner, resume, on_refused)
        finally:
            CURRENT_LEASE.reset(token)

    def _attempts(
        self,
        row: dict[str, Any],
        owner: str,
        resume: Any,
        on_refused: Callable[[InvalidDecision], None] | None = None,
    ) -> TaskRun:
        # Each attempt goes on from the last checkpoint: an answer to the pause is sent again
        # only while that pause is pending, never to the next one (see `Answer`).
        answer = None if resume is _NO_RESUME else Answer(resume)
        try:
            return self._attempt_loop(row, owner, answer, on_refused)
        except KeyboardInterrupt as e:
            self._stopped(row["thread_id"], owner, answer, e)
            raise

    def _stopped(
        self, thread_id: str, owner: str, answer: Answer | None, error: BaseException
    ) -> None:
        """Give back the lease of a run its caller stopped (Ctrl-C): it did not crash.

        Left to expire, the lease kept the task from everyone (a resume was refused as held
        by another runner) for up to *lease_seconds*, and the claim that then found the task
        still ``running`` counted a crash toward *max_recoveries*. The task is settled
        ``interrupted`` if the run's answer to its pause was not taken for good, else
        ``pending`` for the next run to carry on (see `stopped_status`). One try: if the
        database does not answer, recovery carries the task on once the lease expires.
        """
        try:
            snapshot = self.graph.get_state(_thread_config(thread_id), subgraphs=True)
            status = stopped_status(snapshot, answer)
            note = STOPPED_NOTE.format(error=type(error).__name__)
            self.backend.execute(SETTLE, (status, None, note, None, now(), thread_id, owner))
        except Exception:
            logger.warning(
                "could not give back the lease of thread %s, stopped by its caller: its task "
                "is left to recovery once its lease expires",
                thread_id,
                exc_info=True,
            )

    def _attempt_loop(
        self,
        row: dict[str, Any],
        owner: str,
        answer: Answer | None,
        on_refused: Callable[[InvalidDecision], None] | None,
    ) -> TaskRun:
        thread_id = row["thread_id"]
        attempt = 0
        outage = OutageBudget(self.outage_seconds)
        while True:
            try:
                status, outcome = self._invoke(row, answer)
            except LeaseLost:
                self._uncount(thread_id, owner)
                return self._current(thread_id)
            except InvalidDecision as e:
                # A bad answer to the pause, not a failed run: LangGraph keeps it unsaved,
                # so the task is paused as before and the caller may answer again. Whoever
                # gave the answer undoes it first, under the lease: once the task is paused
                # again another resume can claim it, and its run must not find the refused
                # answer still standing (the queue's sync would mark it applied).
                try:
                    if on_refused is not None:
                        on_refused(e)
                finally:
                    self._settle(thread_id, owner, "interrupted", None, None)
                raise
            except BackendUnavailable as e:
                # The store was away, not the task at fault: no attempt spent. Wait for it
                # (what the attempt saved stays; the next carries on from there), or leave
                # the task to recovery, never ``failed`` for an outage.
                wait = outage.wait()
                if wait is None:
                    self._release(thread_id, owner, error_line(e))
                    raise
                time.sleep(wait)
                continue
            except Exception as e:
                outage.over()
                attempt += 1
                error = error_line(e)
                # A lost branch that cannot be routed again is lost to every attempt.
                if attempt < self.max_attempts and not isinstance(e, BranchLost):
                    time.sleep(backoff(attempt))
                    continue
                self._score_failure(thread_id, error)
                if carries_on(row):
                    self._sync_reviews(thread_id)
                return self._settle(thread_id, owner, "failed", None, error)
            if status == "interrupted" or carries_on(row):
                # Before the row says so: a crash in between is recovered (the run pauses
                # again and records its pauses again), never a pause nobody lists, nor one
                # listed for a reviewer after the run moved past it.
                self._sync_reviews(thread_id)
            return self._settle(thread_id, owner, status, outcome, None)

    def _uncount(self, thread_id: str, owner: str) -> None:
        """This run lost its lease but is alive: not a crash (see `UNCOUNT`).

        It stalled, or waited out its database; the claim that took over counted it.
        """
        try:
            self.backend.execute(UNCOUNT, (thread_id, owner))
        except Exception:  # at worst the task keeps one crash too many
            logger.warning("could not uncount the lost lease of %s", thread_id, exc_info=True)

    def _release(self, thread_id: str, owner: str, error: str) -> None:
        """Give up a run whose database stayed away: the task ``pending``, for recovery.

        One try: the database is likely still away, and then the lease, which nobody renews,
        expires and recovery carries the task on all the same.
        """
        try:
            self.backend.execute(SETTLE, ("pending", None, error, None, now(), thread_id, owner))
        except Exception:
            logger.warning(
                "the database of thread %s is still away: its task is left to recovery once "
                "its lease expires",
                thread_id,
                exc_info=True,
            )

    def _score_failure(self, thread_id: str, error: str) -> None:
        """The task failed for good: its Langfuse trace (when traced) gets that outcome."""
        callbacks = (self._config or {}).get("callbacks")
        if callbacks:
            from harness_nodes._trace_langfuse import score_failed_task

            score_failed_task(callbacks, thread_id, error)

    def _sync_reviews(self, thread_id: str) -> None:
        """Bring the review queue up to date with the task's pauses (`ReviewQueue.sync`).

        A pause the run stopped on is listed (the inbox shows it); one the run went past is
        closed (answered by `resume`, outside the queue) or applied (decided in the queue).
        """
        try:
            self._queue().sync(thread_id)
        except Exception:  # the pause is in the checkpoint: a later sync records it
            logger.warning(
                "could not record the review pauses of thread %s in the review queue "
                "(ReviewQueue.sync(%r) will)",
                thread_id,
                thread_id,
                exc_info=True,
            )

    def _queue(self) -> ReviewQueue:
        """The review queue this runner keeps up to date (*reviews*, or a default one)."""
        if self._reviews is None:
            from harness_nodes.review_queue import ReviewQueue

            self._reviews = ReviewQueue(self.backend, self.graph, runner=self)
        return self._reviews

    def _invoke(self, row: dict[str, Any], answer: Answer | None) -> tuple[RunStatus, Any]:
        thread_id = row["thread_id"]
        head = self._saver.get_tuple(_thread_config(thread_id))
        metadata = None if head is None else head.metadata
        config = run_config(thread_id, row["task_key"], row["task_type"], self._config, metadata)
        if answer is not None:
            command = answer.command(self.graph.get_state(config, subgraphs=True))
            if command is not None:
                self.graph.invoke(command, config, durability="sync")
                return self._ran(config)
            logger.info(ANSWER_TAKEN, thread_id)
        inputs: Any
        if head is None:
            inputs = _codec.decode(row["input"])
        else:
            snapshot = self.graph.get_state(config)
            if not snapshot.tasks:
                # Died after its last checkpoint, before recording the outcome. (Not
                # `snapshot.next`: it omits tasks whose writes were saved before a crash
                # cut the step short, and those still have to be applied.)
                return "completed", outcome_of(snapshot.values)
            decided = self._queue()._decided_pauses(thread_id, snapshot)
            if decided:
                return self._apply_decided(config, decided)
            updates = lost_branch(snapshot, head.pending_writes)
            if updates:
                # A router raised after its node's writes (see `lost_branch`): route again.
                logger.warning(ROUTE_AGAIN, thread_id, ", ".join(u.as_node or "" for u in updates))
                self.graph.bulk_update_state(config, [updates])
            inputs = _codec.decode(row["input"]) if input_not_taken(snapshot) else None
        self.graph.invoke(inputs, config, durability="sync")
        return self._ran(config)

    def _ran(self, config: RunnableConfig) -> tuple[RunStatus, Any]:
        snapshot = self.graph.get_state(config)
        if snapshot.tasks:
            return "interrupted", None
        return "completed", outcome_of(snapshot.values)

    def _apply_decided(
        self, config: RunnableConfig, items: list[ReviewItem]
    ) -> tuple[RunStatus, Any]:
        """Carry the task on with review decisions its dead run recorded but never applied.

        Carrying it on with no answer (``None``) would only pause it again at the same spot,
        its item still ``decided``: listed nowhere, and refused to a second decision. So the
        recovering run does what `ReviewQueue.decide` would have done under the lease it
        claimed: records the answers to "did this call take effect?" in the ledger, resumes
        with the decisions, and marks the items ``applied`` once the run is past their pause
        (``pending`` again, audited as refused, if the graph refuses one).
        """
        queue = self._queue()
        for item in items:
            queue._settle_effects(item, item.decided_by or "")
        answer: Command[Any] = Command(resume={i.interrupt_id: i.decision for i in items})
        try:
            self.graph.invoke(answer, config, durability="sync")
        except InvalidDecision as e:
            # Nothing ran and the task is paused as before: a reviewer decides again.
            queue._settle_decided(items, self.graph.get_state(config), refused=e)
            return "interrupted", None
        except Exception:
            queue._settle_decided(items, self.graph.get_state(config))
            raise
        queue._settle_decided(items, self.graph.get_state(config))
        return self._ran(config)

    def _settle(
        self, thread_id: str, owner: str, status: str, outcome: Any, error: str | None
    ) -> TaskRun:
        t = now()
        finished = t if status in ("completed", "failed") else None
        encoded = None if outcome is None else _codec.encode(outcome)
        params = (status, encoded, error, finished, t, thread_id, owner)
        # The settle is idempotent (conditional on our lease), so a passing connection fault
        # is retried rather than leaving a finished run to look dead until its lease expires.
        for attempt in range(1, 4):
            try:
                rows = self.backend.execute(SETTLE, params)
                break
            except Exception as e:
                if not is_transient(e) or attempt == 3:
                    raise
                time.sleep(backoff(attempt))
        return TaskRun.from_row(rows[0]) if rows else self._current(thread_id)

    def _current(self, thread_id: str) -> TaskRun:
        return TaskRun.from_row(self.backend.execute(SELECT_THREAD, (thread_id,))[0])

    def _dispatch(self, thread_id: str) -> None:
        if self.queue is not None:
            assert self.graph_path is not None
            self.queue.defer(thread_id, self.graph_path)
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="harness-task"
                )
            self._pool.submit(self.execute, thread_id)


def _thread_config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
