"""Async twins over an `AsyncBackend`: `AsyncEffectLedger` and `AsyncTaskRunner`.

Example:
    ```python
    import asyncio

    from checkpointers import aopen_backend
    from harness_nodes.aio import AsyncEffectLedger


    async def main() -> None:
        async with await aopen_backend("memory://") as backend:
            ledger = AsyncEffectLedger(backend)

            async def send(ctx):
                return f"sent {ctx.idempotency_key}"

            first = await ledger.arun(send, name="email", thread_id="t", call_id="c1")
            again = await ledger.arun(send, name="email", thread_id="t", call_id="c1")
            assert first == again == "sent t:c1"


    asyncio.run(main())
    ```
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp
from langgraph.types import Command

from checkpointers.errors import is_transient
from harness_nodes import _codec
from harness_nodes._events import aemit
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
from harness_nodes.effects import (
    _ABORT,
    _ABORT_CUT,
    _FINISH,
    _FINISH_LATE,
    _FINISH_SUPERSEDED,
    _RESOLVE,
    _RUNNING,
    _SELECT,
    LATE_NOTE,
    SUPERSEDED_NOTE,
    EffectContext,
    EffectRecord,
    EffectStatus,
    _abegin,
    _aborted_if_cut,
    _active,
    _Begin,
    _Call,
    _call_of,
    _error_text,
    _event,
    _ledger_retry,
    _list_query,
    _log_late,
    _replay_result,
    _replayed,
    _resolution,
    _unknown_message,
    _with_effect_meta,
    effect_kind,
)
from harness_nodes.errors import (
    BackendUnavailable,
    HarnessError,
    InvalidDecision,
    LeaseLost,
    RunFailed,
    TaskNotFinished,
    TaskNotPaused,
    UnknownTask,
    UserError,
)

if TYPE_CHECKING:
    from langgraph.prebuilt.tool_node import ToolCallRequest
    from langgraph.types import Command

    from checkpointers import AsyncBackend
    from harness_nodes.review_queue import AsyncReviewQueue, ReviewItem

__all__ = ["AsyncEffectLedger", "AsyncTaskRunner"]

logger = logging.getLogger("harness_nodes.runner")

_NO_RESUME = object()

T = TypeVar("T")


class AsyncEffectLedger:
    """The async `EffectLedger`, over an `AsyncBackend`; same guarantees, awaited.

    Pass ``awrap_tool_call=ledger.awrap_tool_call`` to the `ToolNode` of a graph run with
    ``ainvoke``.

    Args:
        backend: Where the ledger lives.
        on_unknown: ``"escalate"`` (default) or ``"raise"``, as in `EffectLedger`.

    Example:
        ```python
        import asyncio

        from checkpointers import aopen_backend
        from harness_nodes import AsyncEffectLedger


        async def main() -> None:
            async with await aopen_backend("memory://") as backend:
                ledger = AsyncEffectLedger(backend)
                sent: list[str] = []

                async def send(ctx):
                    sent.append(ctx.idempotency_key)
                    return "sent"

                await ledger.arun(send, name="email", thread_id="t", call_id="c1")
                await ledger.arun(send, name="email", thread_id="t", call_id="c1")  # a replay
                record = await ledger.aget("t", "c1")
                assert sent == ["t:c1"] and record is not None and record.status == "done"


        asyncio.run(main())
        ```
    """

    def __init__(
        self, backend: AsyncBackend, *, on_unknown: Literal["escalate", "raise"] = "escalate"
    ) -> None:
        from checkpointers import AsyncBackend

        if not isinstance(backend, AsyncBackend):
            raise UserError(
                f"AsyncEffectLedger needs a checkpointers.AsyncBackend, got "
                f"{type(backend).__name__}; for a Backend use harness_nodes.EffectLedger"
            )
        if on_unknown not in ("escalate", "raise"):
            raise UserError(f"on_unknown must be 'escalate' or 'raise', not {on_unknown!r}")
        self.backend = backend
        self.on_unknown = on_unknown

    def __repr__(self) -> str:
        return f"AsyncEffectLedger({self.backend!r}, on_unknown={self.on_unknown!r})"

    async def aget(self, thread_id: str, tool_call_id: str) -> EffectRecord | None:
        """The ledger row for one call, or ``None``."""
        rows = await self.backend.execute(_SELECT, (thread_id, tool_call_id))
        return EffectRecord.from_row(rows[0]) if rows else None

    async def alist(
        self, thread_id: str | None = None, *, status: EffectStatus | None = None
    ) -> list[EffectRecord]:
        """Ledger rows, oldest first, optionally for one thread and/or one status."""
        sql, params = _list_query(thread_id, status)
        return [EffectRecord.from_row(r) for r in await self.backend.execute(sql, params)]

    async def aresolve(
        self,
        thread_id: str,
        tool_call_id: str,
        *,
        happened: bool,
        result: Any = None,
        reviewer: str,
    ) -> EffectRecord:
        """Record a person's answer to an unknown outcome (see `EffectLedger.resolve`)."""
        lock = " FOR UPDATE" if self.backend.dialect == "postgres" else ""
        async with self.backend.transaction() as tx:
            rows = await tx.execute(_SELECT + lock, (thread_id, tool_call_id))
            status, encoded = _resolution(thread_id, tool_call_id, happened, result, rows)
            rows = await tx.execute(
                _RESOLVE, (status, encoded, time.time(), reviewer, thread_id, tool_call_id)
            )
        return EffectRecord.from_row(rows[0])

    async def arun(
        self,
        fn: Callable[[EffectContext], Awaitable[T]],
        *,
        name: str,
        thread_id: str,
        call_id: str,
        args: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> T:
        """Run ``await fn(context)`` at most once for ``(thread_id, call_id)``.

        Raises:
            EffectOutcomeUnknown: an earlier execution started and never recorded a result.
        """
        call = _Call(thread_id, call_id, name, dict(args or {}), idempotent)
        begin = await self._begin(call)
        if begin.unknown is not None:
            await aemit("effect.unknown", _event(call))
            raise begin.unknown
        if begin.replay is not None:
            await aemit("effect.replay", _event(begin.replay))
            return _replayed(begin.replay)  # type: ignore[no-any-return]
        assert begin.run is not None
        await self._reported(call, begin.run, None)
        with _active(begin.run):
            try:
                value = await fn(begin.run)
            except GraphBubbleUp:
                await self._abort(call, begin.run.attempt)
                raise
            except BaseException as e:
                await self._finish(call, begin.run.attempt, "error", None, _error_text(e))
                raise
        await self._finish(call, begin.run.attempt, "done", value, None)
        return value

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        execute: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """`ToolNode` hook (``awrap_tool_call=``): marked tools run through the ledger."""
        kind = effect_kind(request.tool)
        if kind is None:
            return await execute(request)
        call = _call_of(request, idempotent=kind == "idempotent")
        config = request.runtime.config
        begin = await self._begin(call)
        if begin.unknown is not None:
            await aemit("effect.unknown", _event(call), config)
            if self.on_unknown == "raise":
                raise begin.unknown
            return _unknown_message(begin.unknown)
        if begin.replay is not None:
            await aemit("effect.replay", _event(begin.replay), config)
            return _replay_result(begin.replay, call)
        assert begin.run is not None
        await self._reported(call, begin.run, config)
        with _active(begin.run):
            try:
                out = await execute(request)
            except GraphBubbleUp:
                await self._abort(call, begin.run.attempt)
                raise
            except BaseException as e:
                await self._finish(call, begin.run.attempt, "error", None, _error_text(e))
                raise
        if isinstance(out, ToolMessage):
            out = _with_effect_meta(out, call.key, replayed=False)
        await self._finish(call, begin.run.attempt, "done", out, None)
        return out

    async def _reported(
        self, call: _Call, run: EffectContext, config: RunnableConfig | None
    ) -> None:
        """Report the execution about to start; cut short, it is recorded as never made.

        The intent is already recorded (``started``): a task cancelled while a callback
        handler takes the event (a slow tracer and a client that disconnects, an
        ``asyncio.wait_for`` timeout) never ran the call, so it is aborted — the next
        execution runs it — instead of left for a person to answer "did it happen?".
        """
        try:
            await aemit("effect.run", _event(run), config)
        except BaseException:
            await self._abort(call, run.attempt)
            raise

    async def _begin(self, call: _Call) -> _Begin:
        while True:  # see `_Running`: a call still running here is waited for, not unknown
            mine = _RUNNING.enter(self.backend, call)
            began = None
            try:
                began = await self._begin_once(call)
            finally:
                running = _RUNNING.decided(self.backend, call, mine, began)
            if running is None or not await asyncio.to_thread(_RUNNING.waited, running.wait, call):
                assert began is not None
                return began

    async def _begin_once(self, call: _Call) -> _Begin:
        now = time.time()

        async def begin() -> _Begin:
            async with self.backend.transaction() as tx:
                return await _abegin(tx, self.backend.dialect, call, now)

        try:
            return await _aledger_statement(self.backend, begin)
        except BaseException as e:
            if _aborted_if_cut(self.backend.dialect, e):
                # Queued behind the transaction's COMMIT or ROLLBACK (the connection's lock).
                params = (time.time(), call.thread_id, call.call_id, now)
                await _aledger_statement(
                    self.backend, lambda: self.backend.execute(_ABORT_CUT, params)
                )
            raise

    async def _finish(
        self, call: _Call, attempt: int, status: str, value: Any, error: str | None
    ) -> None:
        encoded = None if value is None else _codec.encode(value)
        now = time.time()
        params = (status, encoded, error, now, call.thread_id, call.call_id, attempt)

        async def finish() -> tuple[str, list[dict[str, Any]]]:
            if await self.backend.execute(_FINISH, params) or status != "done":
                return "", []
            key = (call.thread_id, call.call_id, attempt)
            late = await self.backend.execute(_FINISH_LATE, (encoded, LATE_NOTE, now, *key))
            if late:
                return "late", list(late)
            note = SUPERSEDED_NOTE.format(attempt=attempt)
            return "twice", list(await self.backend.execute(_FINISH_SUPERSEDED, (note, *key)))

        try:
            _log_late(call, attempt, *await _aledger_statement(self.backend, finish))
        finally:
            _RUNNING.leave(self.backend, call, attempt)

    async def _abort(self, call: _Call, attempt: int) -> None:
        params = (time.time(), call.thread_id, call.call_id, attempt)
        try:
            await _aledger_statement(self.backend, lambda: self.backend.execute(_ABORT, params))
        finally:
            _RUNNING.leave(self.backend, call, attempt)


async def _aledger_statement(backend: Any, run: Callable[[], Awaitable[T]]) -> T:
    """Async `harness_nodes.effects._ledger_statement`."""
    for attempt in range(1, 4):
        try:
            return await run()
        except HarnessError:
            raise
        except Exception as e:
            await asyncio.sleep(_ledger_retry(backend, e, attempt))
    raise AssertionError("unreachable")  # pragma: no cover


class _AsyncHeartbeat:
    """Renews a lease every third of its length while a step runs long."""

    def __init__(self, backend: AsyncBackend, thread_id: str, owner: str, lease: float) -> None:
        self.backend = backend
        self.thread_id, self.owner, self.lease = thread_id, owner, lease
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _AsyncHeartbeat:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        # Waited for, not awaited: a cancellation of this task meanwhile propagates (awaiting
        # the heartbeat and suppressing its CancelledError swallowed that one too).
        await asyncio.wait({self._task})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                t = now()
                rows = await self.backend.execute(
                    RENEW, (t + self.lease, t, self.thread_id, self.owner)
                )
            except Exception:
                continue  # unreachable database: the fence decides at the next write
            if not rows:
                return


class AsyncTaskRunner:
    """The async `TaskRunner`, over an `AsyncBackend`: tasks run as asyncio tasks.

    Same arguments and guarantees as `TaskRunner` (*reviews* is an `AsyncReviewQueue`; no
    queue: background workers run the sync runner); methods are ``a``-prefixed.

    Example:
        ```python
        import asyncio

        from langchain_core.messages import AIMessage, HumanMessage
        from langgraph.graph import END, START, MessagesState, StateGraph

        from checkpointers import aopen_backend
        from harness_nodes.aio import AsyncTaskRunner

        builder = StateGraph(MessagesState)
        builder.add_node("answer", lambda state: {"messages": [AIMessage("42")]})
        builder.add_edge(START, "answer")
        builder.add_edge("answer", END)


        async def main() -> None:
            async with await aopen_backend("memory://") as backend:
                async with AsyncTaskRunner(backend, builder) as runner:
                    await runner.asubmit("q-1", {"messages": [HumanMessage("6 x 7?")]})
                    outcome = await runner.aresult("q-1", timeout=10)
                    assert outcome["partial_result"] == "42"
                    # or both at once; a second call joins the same task
                    again = await runner.arun("q-1", {"messages": []}, timeout=10)
                    assert again == outcome


        asyncio.run(main())
        ```
    """

    def __init__(
        self,
        backend: AsyncBackend,
        graph: Any,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        max_recoveries: int | None = 5,
        outage_seconds: float = 60.0,
        config: RunnableConfig | None = None,
        reviews: AsyncReviewQueue | None = None,
    ) -> None:
        from checkpointers import AsyncBackend

        if not isinstance(backend, AsyncBackend):
            raise UserError(
                f"AsyncTaskRunner needs a checkpointers.AsyncBackend, got "
                f"{type(backend).__name__}; for a Backend use harness_nodes.TaskRunner"
            )
        if lease_seconds <= 0 or outage_seconds < 0 or max_attempts < 1:
            raise UserError("lease_seconds must be > 0, outage_seconds >= 0 and max_attempts >= 1")
        self.backend = backend
        self.lease_seconds = lease_seconds
        check_max_recoveries(max_recoveries)
        self.max_attempts = max_attempts
        self.max_recoveries = max_recoveries
        self.outage_seconds = outage_seconds
        self.graph_path: str | None = graph if isinstance(graph, str) else None
        self._config = config
        self._saver = FencedSaver(backend.checkpointer, abackend=backend)
        self.graph = compile_graph(graph, backend, self._saver)
        self._tasks: set[asyncio.Task[TaskRun]] = set()
        if reviews is not None and reviews.backend is not backend:
            raise UserError(
                "AsyncTaskRunner(reviews=...) needs an AsyncReviewQueue on the runner's backend"
            )
        self._reviews = reviews

    def __repr__(self) -> str:
        return f"AsyncTaskRunner({self.backend!r}, graph={self.graph_path or self.graph.name!r})"

    async def __aenter__(self) -> AsyncTaskRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the tasks running in this event loop."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def asubmit(self, task_key: str, input: Any, *, task_type: str = "default") -> TaskRun:
        """Start the task *task_key*, or join it if it exists (see `TaskRunner.submit`)."""
        if not isinstance(task_key, str) or not task_key:
            raise UserError(f"task_key must be a non-empty string, got {task_key!r}")
        t = now()
        created = await self.backend.execute(
            INSERT,
            (task_key, task_key, task_type, self.graph_path, _codec.encode(input), t, t),
        )
        if created:
            self._dispatch(task_key)
            return TaskRun.from_row(created[0])
        rows = await self.backend.execute(SELECT_KEY, (task_key,))
        if rows and released(rows[0], self.graph_path):  # see TaskRunner.submit
            self._dispatch(rows[0]["thread_id"])
        return await self.astatus(task_key)

    async def astatus(self, task_key: str) -> TaskRun:
        """The task as it is now (raises `UnknownTask`)."""
        rows = await self.backend.execute(SELECT_KEY, (task_key,))
        if not rows:
            raise UnknownTask(task_key)
        run = TaskRun.from_row(rows[0])
        if run.status != "interrupted":
            return run
        # Resumed outside the runner (a Command on the graph itself)? Record its outcome.
        config = run_config(run.thread_id, run.task_key, run.task_type, self._config)
        snapshot = await self.graph.aget_state(config)
        if snapshot.tasks:
            return run
        t = now()
        outcome = _codec.encode(outcome_of(snapshot.values))
        updated = await self.backend.execute(REVIEWED, (outcome, t, t, run.thread_id))
        return TaskRun.from_row(updated[0]) if updated else await self._current(run.thread_id)

    async def arun(
        self, task_key: str, input: Any, *, task_type: str = "default", timeout: float | None = None
    ) -> dict[str, Any]:
        """`asubmit` then `aresult`: the task's outcome, however many times it is called."""
        await self.asubmit(task_key, input, task_type=task_type)
        return await self.aresult(task_key, timeout=timeout)

    async def aresult(self, task_key: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the task's stored outcome (see `TaskRunner.result`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                run = await self.astatus(task_key)
            except Exception as e:
                # A dropped connection while polling is not the task's failure: poll again.
                if not is_transient(e) or (deadline is not None and time.monotonic() >= deadline):
                    raise
                await asyncio.sleep(delay)
                delay = min(0.25, delay * 2)
                continue
            if run.done:
                if run.status == "failed":
                    raise RunFailed(run.thread_id, "TaskFailed", run.error or "unknown error")
                return dict(run.outcome or {"status": run.status})
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskNotFinished(task_key, run.status)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(0.25, delay * 2)

    async def acancel(self, task_key: str) -> TaskRun:
        """Cancel the task unless it already finished."""
        t = now()
        rows = await self.backend.execute(
            CANCEL, (_codec.encode({"status": "cancelled"}), t, t, task_key)
        )
        return TaskRun.from_row(rows[0]) if rows else await self.astatus(task_key)

    async def arecover(self) -> list[str]:
        """Resume this runner's runs whose process died (see `TaskRunner.recover`).

        Also a paused run whose thread is still stopped at a pause with a ``decided`` review
        (an earlier recovery paused it again without applying the decision): applied once.
        """
        stale = await self.backend.execute(STALE, (now(),))
        threads = [r["thread_id"] for r in stale if r["graph"] == self.graph_path]
        for thread_id in threads:
            self._dispatch(thread_id)
        return threads

    async def aresume(self, task_key: str, value: Any) -> TaskRun:
        """Answer the interrupt a task is paused on and run it on (see `TaskRunner.resume`).

        Not through the review queue: once the run has moved past the pause, the queue is
        synced and the pause's item closed (answered outside the queue, no reviewer).

        Raises:
            UnknownTask: nothing was submitted with this key.
            TaskNotPaused: the task is not paused for review, or another runner holds it;
                nothing was run or recorded.
            InvalidDecision: *value* is not a valid answer to the pause; the task stays
                ``interrupted`` and a corrected answer can be given.
        """
        run = await self.astatus(task_key)
        return await self._resume(run.thread_id, value)

    async def _resume(self, thread_id: str, value: Any) -> TaskRun:
        """Claim the paused task's lease, then answer its pause under it (`aresume`)."""
        owner = new_owner()
        claimed = await self.backend.execute(
            *claim(thread_id, owner, self.lease_seconds, resuming=True)
        )
        if not claimed:
            rows = await self.backend.execute(SELECT_THREAD, (thread_id,))
            if not rows:
                raise UnknownTask(thread_id)
            raise TaskNotPaused(rows[0]["task_key"], rows[0]["status"])
        try:
            await self._answer_effects(thread_id, value)
        except BaseException:
            # Nothing ran: give the lease back, the task paused as before.
            await self._settle(thread_id, owner, "interrupted", None, None)
            raise
        return await self._run_claimed(claimed[0], owner, value)

    async def _answer_effects(self, thread_id: str, value: Any) -> None:
        """Check an answer to "did this call take effect?" against the ledger; record it there.

        As `TaskRunner.resume` and `AsyncReviewQueue.decide` do.
        """
        from harness_nodes.review_queue import (
            _effect_answer_of,
            acheck_effect_answers,
            arecord_effect_answers,
        )

        snapshot = await self.graph.aget_state(_thread_config(thread_id))
        answer = _effect_answer_of(snapshot, value)
        if answer is None:
            return
        requests, decisions, reviewer = answer
        await acheck_effect_answers(self.backend, thread_id, requests, decisions)
        await arecord_effect_answers(self.backend, thread_id, requests, decisions, reviewer)

    async def aexecute(self, thread_id: str, *, resume: Any = _NO_RESUME) -> TaskRun:
        """Run the task on *thread_id* here if its lease can be claimed (see `TaskRunner.execute`).

        With *resume* it is `aresume` by thread id, and raises as `aresume` does.
        """
        if resume is not _NO_RESUME:
            return await self._resume(thread_id, resume)
        owner = new_owner()
        claimed = await self.backend.execute(
            *claim(thread_id, owner, self.lease_seconds, resuming=False)
        )
        if not claimed:
            rows = await self.backend.execute(SELECT_THREAD, (thread_id,))
            if not rows:
                raise UnknownTask(thread_id)
            if rows[0]["status"] == "interrupted":
                claimed = await self.backend.execute(
                    *claim_decided(thread_id, owner, self.lease_seconds)
                )
                if claimed:
                    return await self._carry_on_decided(claimed[0], owner)
            return TaskRun.from_row(rows[0])
        reason = crash_loop(claimed[0], self.max_recoveries)
        if reason is not None:  # see TaskRunner._crashed_out
            logger.error("thread %s %s: marked failed", thread_id, reason)
            self._score_failure(thread_id, reason)
            return await self._settle(thread_id, owner, "failed", None, reason)
        return await self._run_claimed(claimed[0], owner, resume)

    async def _carry_on_decided(self, row: dict[str, Any], owner: str) -> TaskRun:
        """Apply the decisions a paused task's run never took (see `TaskRunner`)."""
        thread_id = row["thread_id"]
        try:
            snapshot = await self.graph.aget_state(_thread_config(thread_id))
            decided = await self._queue()._decided_pauses(thread_id, snapshot)
            if not decided:  # see TaskRunner._carry_on_decided
                await self._queue()._settle_stopped(thread_id, snapshot)
        except BaseException:
            await self._settle(thread_id, owner, "interrupted", None, None)
            raise
        if decided:
            return await self._run_claimed(row, owner)
        await self._sync_reviews(thread_id)
        return await self._settle(thread_id, owner, "interrupted", None, None)

    async def _run_claimed(
        self,
        row: dict[str, Any],
        owner: str,
        resume: Any = _NO_RESUME,
        *,
        on_refused: Callable[[InvalidDecision], Awaitable[None]] | None = None,
    ) -> TaskRun:
        """Run the task whose row *owner* just claimed (see `TaskRunner._run_claimed`)."""
        thread_id = row["thread_id"]
        token = CURRENT_LEASE.set(Lease(thread_id, owner, self.lease_seconds))
        try:
            async with _AsyncHeartbeat(self.backend, thread_id, owner, self.lease_seconds):
                return await self._attempts(row, owner, resume, on_refused)
        finally:
            CURRENT_LEASE.reset(token)

    async def _attempts(
        self,
        row: dict[str, Any],
        owner: str,
        resume: Any,
        on_refused: Callable[[InvalidDecision], Awaitable[None]] | None = None,
    ) -> TaskRun:
        answer = None if resume is _NO_RESUME else Answer(resume)  # see TaskRunner._attempts
        try:
            return await self._attempt_loop(row, owner, answer, on_refused)
        except (asyncio.CancelledError, KeyboardInterrupt) as e:
            # Stopped by its caller, not crashed: the lease is given back now (see
            # `stopped_status`), shielded from a second cancellation while it is.
            await asyncio.shield(self._stopped(row["thread_id"], owner, answer, e))
            raise

    async def _stopped(
        self, thread_id: str, owner: str, answer: Answer | None, error: BaseException
    ) -> None:
        """Give back the lease of a run its caller stopped (see `TaskRunner._stopped`)."""
        try:
            snapshot = await self.graph.aget_state(_thread_config(thread_id), subgraphs=True)
            status = stopped_status(snapshot, answer)
            note = STOPPED_NOTE.format(error=type(error).__name__)
            await self.backend.execute(SETTLE, (status, None, note, None, now(), thread_id, owner))
        except Exception:
            logger.warning(
                "could not give back the lease of thread %s, stopped by its caller: its task "
                "is left to recovery once its lease expires",
                thread_id,
                exc_info=True,
            )

    async def _attempt_loop(
        self,
        row: dict[str, Any],
        owner: str,
        answer: Answer | None,
        on_refused: Callable[[InvalidDecision], Awaitable[None]] | None,
    ) -> TaskRun:
        thread_id = row["thread_id"]
        attempt = 0
        outage = OutageBudget(self.outage_seconds)
        while True:
            try:
                status, outcome = await self._invoke(row, answer)
            except LeaseLost:
                try:  # alive, so not a crash (see TaskRunner._uncount)
                    await self.backend.execute(UNCOUNT, (thread_id, owner))
                except Exception:
                    logger.warning("could not uncount the lease of %s", thread_id, exc_info=True)
                return await self._current(thread_id)
            except InvalidDecision as e:
                # A bad answer to the pause, not a failed run; undone by whoever gave it
                # before the task is freed (see TaskRunner._attempts).
                try:
                    if on_refused is not None:
                        await on_refused(e)
                finally:
                    await self._settle(thread_id, owner, "interrupted", None, None)
                raise
            except BackendUnavailable as e:
                # The store was away: no attempt spent, never failed (see TaskRunner).
                wait = outage.wait()
                if wait is None:
                    await self._release(thread_id, owner, error_line(e))
                    raise
                await asyncio.sleep(wait)
                continue
            except Exception as e:
                outage.over()
                attempt += 1
                error = error_line(e)
                # A lost branch that cannot be routed again is lost to every attempt.
                if attempt < self.max_attempts and not isinstance(e, BranchLost):
                    await asyncio.sleep(backoff(attempt))
                    continue
                self._score_failure(thread_id, error)
                if carries_on(row):
                    await self._sync_reviews(thread_id)
                return await self._settle(thread_id, owner, "failed", None, error)
            if status == "interrupted" or carries_on(row):
                # Before the row says so (see TaskRunner._attempts): never a pause nobody
                # lists, nor one listed for a reviewer after the run moved past it.
                await self._sync_reviews(thread_id)
            return await self._settle(thread_id, owner, status, outcome, None)

    async def _release(self, thread_id: str, owner: str, error: str) -> None:
        """Give up a run whose database stayed away (see `TaskRunner._release`)."""
        try:
            await self.backend.execute(
                SETTLE, ("pending", None, error, None, now(), thread_id, owner)
            )
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

    async def _sync_reviews(self, thread_id: str) -> None:
        """Bring the review queue up to date with the task's pauses (see `TaskRunner`)."""
        try:
            await self._queue().sync(thread_id)
        except Exception:  # the pause is in the checkpoint: a later sync records it
            logger.warning(
                "could not record the review pauses of thread %s in the review queue "
                "(AsyncReviewQueue.sync(%r) will)",
                thread_id,
                thread_id,
                exc_info=True,
            )

    def _queue(self) -> AsyncReviewQueue:
        """The review queue this runner keeps up to date (*reviews*, or a default one)."""
        if self._reviews is None:
            from harness_nodes.review_queue import AsyncReviewQueue

            self._reviews = AsyncReviewQueue(self.backend, self.graph, runner=self)
        return self._reviews

    async def _invoke(self, row: dict[str, Any], answer: Answer | None) -> tuple[RunStatus, Any]:
        thread_id = row["thread_id"]
        head = await self._saver.aget_tuple(_thread_config(thread_id))
        metadata = None if head is None else head.metadata
        config = run_config(thread_id, row["task_key"], row["task_type"], self._config, metadata)
        if answer is not None:
            command = answer.command(await self.graph.aget_state(config, subgraphs=True))
            if command is not None:
                await self.graph.ainvoke(command, config, durability="sync")
                return await self._ran(config)
            logger.info(ANSWER_TAKEN, thread_id)
        inputs: Any
        if head is None:
            inputs = _codec.decode(row["input"])
        else:
            snapshot = await self.graph.aget_state(config)
            if not snapshot.tasks:
                return "completed", outcome_of(snapshot.values)
            decided = await self._queue()._decided_pauses(thread_id, snapshot)
            if decided:
                return await self._apply_decided(config, decided)
            updates = lost_branch(snapshot, head.pending_writes)
            if updates:
                # A router raised after its node's writes (see `lost_branch`): route again.
                logger.warning(ROUTE_AGAIN, thread_id, ", ".join(u.as_node or "" for u in updates))
                await self.graph.abulk_update_state(config, [updates])
            inputs = _codec.decode(row["input"]) if input_not_taken(snapshot) else None
        await self.graph.ainvoke(inputs, config, durability="sync")
        return await self._ran(config)

    async def _ran(self, config: RunnableConfig) -> tuple[RunStatus, Any]:
        snapshot = await self.graph.aget_state(config)
        if snapshot.tasks:
            return "interrupted", None
        return "completed", outcome_of(snapshot.values)

    async def _apply_decided(
        self, config: RunnableConfig, items: list[ReviewItem]
    ) -> tuple[RunStatus, Any]:
        """Carry the task on with the decisions its dead run never applied.

        See `TaskRunner._apply_decided`.
        """
        queue = self._queue()
        for item in items:
            await queue._settle_effects(item, item.decided_by or "")
        answer: Command[Any] = Command(resume={i.interrupt_id: i.decision for i in items})
        try:
            await self.graph.ainvoke(answer, config, durability="sync")
        except InvalidDecision as e:
            # Nothing ran and the task is paused as before: a reviewer decides again.
            await queue._settle_decided(items, await self.graph.aget_state(config), refused=e)
            return "interrupted", None
        except Exception:
            await queue._settle_decided(items, await self.graph.aget_state(config))
            raise
        await queue._settle_decided(items, await self.graph.aget_state(config))
        return await self._ran(config)

    async def _settle(
        self, thread_id: str, owner: str, status: str, outcome: Any, error: str | None
    ) -> TaskRun:
        t = now()
        finished = t if status in ("completed", "failed") else None
        encoded = None if outcome is None else _codec.encode(outcome)
        params = (status, encoded, error, finished, t, thread_id, owner)
        for attempt in range(1, 4):  # idempotent: see TaskRunner._settle
            try:
                rows = await self.backend.execute(SETTLE, params)
                break
            except Exception as e:
                if not is_transient(e) or attempt == 3:
                    raise
                await asyncio.sleep(backoff(attempt))
        return TaskRun.from_row(rows[0]) if rows else await self._current(thread_id)

    async def _current(self, thread_id: str) -> TaskRun:
        rows = await self.backend.execute(SELECT_THREAD, (thread_id,))
        return TaskRun.from_row(rows[0])

    def _dispatch(self, thread_id: str) -> None:
        task = asyncio.create_task(self.aexecute(thread_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _thread_config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
