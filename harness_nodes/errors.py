"""The langgraph-harness error tree.

Every error the harness raises derives from one root, so ``except HarnessError`` catches
them all::

    HarnessError
    ├── UserError                 wiring mistake, raised at construction, never mid-run
    │   ├── UnknownGraph          no graph by that name (CLI, langgraph.json)
    │   └── ModelUnavailable      a ``provider:model`` cannot be used (package, credentials)
    ├── BackendError
    │   ├── BackendURLError       the URL cannot be parsed or names an unknown scheme
    │   └── BackendUnavailable    the database did not answer (or refused us)
    ├── BudgetError
    │   ├── UnpricedModelError    no price for a model and no fallback declared
    │   └── BudgetExceeded        an envelope limit was reached (exit_behavior="error")
    ├── VerificationFailed        a tool output failed its contract (on_fail="fail")
    ├── ReviewError
    │   ├── ReviewNotFound        no review item with that id
    │   ├── InvalidDecision       a malformed or disallowed review decision (item stays pending)
    │   └── AlreadyDecided        someone else decided this item first
    ├── EffectError
    │   ├── EffectOutcomeUnknown  an irreversible call started but its result was never recorded
    │   ├── EffectNotResolvable   a reviewer's answer for a call that is not unknown
    │   └── UnguardedEffect       an effectful tool ran outside an EffectLedger (wiring mistake)
    └── TaskError
        ├── UnknownThread         no task / checkpoint for that thread id
        ├── TaskNotFinished       a result was asked for before the task finished
        ├── TaskNotPaused         a resume for a task that is not paused (or held elsewhere)
        ├── RunFailed             a run stopped on an error; its checkpoints are kept
        ├── UnknownTask           no task was submitted with that key
        └── LeaseLost             another worker took the task over (or it was cancelled)

Errors carry typed fields and build their message from them in ``__str__``. They pickle
(they cross process boundaries: workers, job queues) because every field is also passed
positionally to ``Exception.__init__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyDecided",
    "BackendError",
    "BackendURLError",
    "BackendUnavailable",
    "BudgetError",
    "BudgetExceeded",
    "EffectError",
    "EffectNotResolvable",
    "EffectOutcomeUnknown",
    "HarnessError",
    "InvalidDecision",
    "LeaseLost",
    "ModelUnavailable",
    "ReviewError",
    "ReviewNotFound",
    "RunFailed",
    "TaskError",
    "TaskNotFinished",
    "TaskNotPaused",
    "UnguardedEffect",
    "UnknownGraph",
    "UnknownTask",
    "UnknownThread",
    "UnpricedModelError",
    "UserError",
    "VerificationFailed",
]


class HarnessError(Exception):
    """Root of every error raised by langgraph-harness.

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import HarnessError

        try:
            open_backend("mysql://db/x")
        except HarnessError as exc:  # one root catches every harness error
            caught = exc
        assert type(caught).__name__ == "BackendURLError"
        ```
    """


class UserError(HarnessError):
    """A usage mistake by the application developer, raised when the harness is wired up.

    For instance, a `ToolContract` for a tool the graph does not have.

    Example:
        ```python
        from harness_nodes import HarnessError, UserError

        err = UserError("ToolContract for unknown tool 'refund'")
        assert isinstance(err, HarnessError)
        assert str(err) == err.message == "ToolContract for unknown tool 'refund'"
        ```
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnknownGraph(UserError):
    """No graph is known by this name.

    Attributes:
        name: The name that was asked for.
        available: The names that are known.

    Example:
        ```python
        from harness_nodes import UnknownGraph, UserError

        err = UnknownGraph("suport", ["support", "research"])
        assert isinstance(err, UserError)
        assert err.available == ["support", "research"]
        assert "expected one of support, research" in str(err)
        ```
    """

    def __init__(self, name: str, available: list[str]) -> None:
        HarnessError.__init__(self, name, available)
        self.name = name
        self.available = list(available)
        self.message = str(self)

    def __str__(self) -> str:
        known = ", ".join(self.available) or "none"
        return (
            f"Unknown graph {self.name!r}: expected one of {known}, "
            "or a module path whose module defines build_graph()"
        )


class ModelUnavailable(UserError):
    """A chat model named ``provider:model`` cannot be used here.

    Attributes:
        model: The model spec, e.g. ``"openai:gpt-4o-mini"``.
        reason: What is missing (an integration package, an API key, a known provider).

    Example:
        ```python
        from harness_nodes import ModelUnavailable

        err = ModelUnavailable("openai:gpt-4o-mini", "OPENAI_API_KEY is not set")
        assert (err.model, err.reason) == ("openai:gpt-4o-mini", "OPENAI_API_KEY is not set")
        assert str(err).startswith("Cannot use model 'openai:gpt-4o-mini'")
        ```
    """

    def __init__(self, model: str, reason: str) -> None:
        HarnessError.__init__(self, model, reason)
        self.model = model
        self.reason = reason
        self.message = str(self)

    def __str__(self) -> str:
        return f"Cannot use model {self.model!r}: {self.reason}"


# --- backend -------------------------------------------------------------------------------


class BackendError(HarnessError):
    """A problem with the durable backend (URL, connection, schema).

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import BackendError

        try:
            open_backend("mysql://db/x")
        except BackendError as exc:  # URL and connection problems alike
            assert "mysql" in str(exc)
        else:
            raise AssertionError("expected BackendError")
        ```
    """


class BackendURLError(BackendError):
    """The backend URL cannot be used.

    Attributes:
        url: The URL with any password masked.
        reason: What is wrong with it.
        show_forms: Whether the message lists the URL forms the harness takes (not when the
            URL is well formed and the problem is what it points at).

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import BackendURLError

        try:
            open_backend("mysql://user:secret@db/x")
        except BackendURLError as exc:
            assert "secret" not in exc.url  # the password is masked
            assert exc.reason
        else:
            raise AssertionError("expected BackendURLError")
        ```
    """

    def __init__(self, url: str, reason: str, show_forms: bool = True) -> None:
        super().__init__(url, reason, show_forms)
        self.url = url
        self.reason = reason
        self.show_forms = show_forms

    def __str__(self) -> str:
        if not self.show_forms:
            return f"Cannot use backend URL {self.url!r}: {self.reason}"
        return (
            f"Cannot use backend URL {self.url!r}: {self.reason}. "
            "Expected memory://, sqlite:///path/to/file.db or postgresql://user@host:port/db"
        )


class BackendUnavailable(BackendError):
    """The database named by the URL could not be reached or set up.

    Attributes:
        url: The URL with any password masked.
        reason: The driver's one-line explanation.

    Example:
        ```python
        import pickle

        from harness_nodes import BackendError, BackendUnavailable

        err = BackendUnavailable("postgresql://app@db:5432/app", "connection refused")
        assert isinstance(err, BackendError)
        assert err.reason == "connection refused"
        assert str(pickle.loads(pickle.dumps(err))) == str(err)  # crosses process boundaries
        ```
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"Cannot open backend {self.url!r}: {self.reason}"


# --- budget --------------------------------------------------------------------------------


class BudgetError(HarnessError):
    """A problem with cost envelopes or pricing.

    Example:
        ```python
        from harness_nodes import BudgetError, BudgetExceeded, UnpricedModelError

        assert issubclass(BudgetExceeded, BudgetError)
        assert issubclass(UnpricedModelError, BudgetError)
        ```
    """


class UnpricedModelError(BudgetError):
    """A model has no known price and no fallback price was declared.

    Attributes:
        model: The model name as the harness saw it.
        provider: The provider, if known.

    Example:
        ```python
        from harness_nodes import UnpricedModelError

        err = UnpricedModelError("my-finetune", "openai")
        assert (err.model, err.provider) == ("my-finetune", "openai")
        assert "Pricing(fallback=ModelPrice(...))" in str(err)
        ```
    """

    def __init__(self, model: str, provider: str | None = None) -> None:
        super().__init__(model, provider)
        self.model = model
        self.provider = provider

    def __str__(self) -> str:
        where = f" (provider {self.provider!r})" if self.provider else ""
        return (
            f"No price known for model {self.model!r}{where}. Price it explicitly, e.g. "
            f"Pricing(overrides={{{self.model!r}: ModelPrice(input_per_mtok=..., "
            "output_per_mtok=...)}), or declare a fallback price: "
            "Pricing(fallback=ModelPrice(...))."
        )


class BudgetExceeded(BudgetError):
    """An envelope limit was reached (raised only with ``exit_behavior="error"``).

    Attributes:
        task_id: The task whose envelope is exhausted.
        limit: Which limit: ``"usd"``, ``"tokens"`` or ``"calls"`` (or a window cap name).
        used: How much was spent (or reserved) when the limit was hit.
        maximum: The limit's value.

    Example:
        ```python
        from harness_nodes import BudgetExceeded

        err = BudgetExceeded("ticket-42", "usd", 0.51, 0.5)
        assert (err.task_id, err.limit, err.used, err.maximum) == ("ticket-42", "usd", 0.51, 0.5)
        assert str(err) == "Budget exhausted for task 'ticket-42': usd used 0.51, limit 0.5"
        ```
    """

    def __init__(self, task_id: str, limit: str, used: float, maximum: float) -> None:
        super().__init__(task_id, limit, used, maximum)
        self.task_id = task_id
        self.limit = limit
        self.used = used
        self.maximum = maximum

    def __str__(self) -> str:
        return (
            f"Budget exhausted for task {self.task_id!r}: {self.limit} used {self.used:g}, "
            f"limit {self.maximum:g}"
        )


# --- verification --------------------------------------------------------------------------


class VerificationFailed(HarnessError):
    """A tool output failed its contract and the policy says fail.

    Attributes:
        tool: The tool's name.
        tool_call_id: The failing call.
        reasons: Why the output was refused (as found; the message masks secrets in them).

    Example:
        ```python
        from harness_nodes import VerificationFailed

        err = VerificationFailed("lookup_order", "call_1", ["missing key 'status'"])
        assert err.reasons == ["missing key 'status'"]
        assert "lookup_order" in str(err) and "missing key 'status'" in str(err)
        ```
    """

    def __init__(self, tool: str, tool_call_id: str, reasons: list[str]) -> None:
        super().__init__(tool, tool_call_id, reasons)
        self.tool = tool
        self.tool_call_id = tool_call_id
        self.reasons = list(reasons)

    def __str__(self) -> str:
        # Imported here: the tracing module imports this one.
        from harness_nodes._trace_langfuse import Masker

        # The reasons quote the output, which may hold a secret; a message reaches logs.
        return (
            f"Output of tool {self.tool!r} (call {self.tool_call_id}) failed verification: "
            + Masker().text("; ".join(self.reasons))
        )


# --- review --------------------------------------------------------------------------------


class ReviewError(HarnessError):
    """A problem with a human review item or decision.

    Example:
        ```python
        from harness_nodes import AlreadyDecided, InvalidDecision, ReviewError, ReviewNotFound

        for cls in (ReviewNotFound, InvalidDecision, AlreadyDecided):
            assert issubclass(cls, ReviewError)
        ```
    """


class ReviewNotFound(ReviewError):
    """No review item has this id.

    Attributes:
        review_id: The id that was asked for.

    Example:
        ```python
        from harness_nodes import ReviewNotFound

        err = ReviewNotFound("r-404")
        assert err.review_id == "r-404"
        assert str(err) == "No review item 'r-404'"
        ```
    """

    def __init__(self, review_id: str) -> None:
        super().__init__(review_id)
        self.review_id = review_id

    def __str__(self) -> str:
        return f"No review item {self.review_id!r}"


class InvalidDecision(ReviewError):
    """A review decision was malformed or not allowed; the item stays pending.

    Attributes:
        review_id: The item the decision was for (``""`` when unknown).
        reason: What is wrong with the decision.

    Example:
        ```python
        from harness_nodes import InvalidDecision

        err = InvalidDecision("r-1", "'edit' is not allowed for this action")
        assert err.review_id == "r-1"
        assert str(err).endswith("(the item is still pending)")
        ```
    """

    def __init__(self, review_id: str, reason: str) -> None:
        super().__init__(review_id, reason)
        self.review_id = review_id
        self.reason = reason

    def __str__(self) -> str:
        item = f" for review {self.review_id!r}" if self.review_id else ""
        return f"Invalid decision{item}: {self.reason} (the item is still pending)"


class AlreadyDecided(ReviewError):
    """Another reviewer decided this item first; nothing was applied.

    Attributes:
        review_id: The item.
        decided_by: Who decided it.
        decided_at: When (ISO 8601).
        decision: Which decision won.

    Example:
        ```python
        from harness_nodes import AlreadyDecided

        err = AlreadyDecided("r-1", "alice", "2026-01-01T12:00:00+00:00", "approve")
        assert (err.decided_by, err.decision) == ("alice", "approve")
        assert "already decided (approve) by alice" in str(err)
        ```
    """

    def __init__(self, review_id: str, decided_by: str, decided_at: str, decision: str) -> None:
        super().__init__(review_id, decided_by, decided_at, decision)
        self.review_id = review_id
        self.decided_by = decided_by
        self.decided_at = decided_at
        self.decision = decision

    def __str__(self) -> str:
        return (
            f"Review {self.review_id!r} was already decided ({self.decision}) "
            f"by {self.decided_by} at {self.decided_at}"
        )


# --- effects -------------------------------------------------------------------------------


class EffectError(HarnessError):
    """A problem with the side-effect ledger.

    Example:
        ```python
        from harness_nodes import (
            EffectError,
            EffectNotResolvable,
            EffectOutcomeUnknown,
            UnguardedEffect,
        )

        for cls in (EffectOutcomeUnknown, EffectNotResolvable, UnguardedEffect):
            assert issubclass(cls, EffectError)
        ```
    """


class EffectOutcomeUnknown(EffectError):
    """An irreversible call was started but its result was never recorded (a crash mid-call).

    The harness never re-runs such a call silently: it goes to a human, who checks whether
    the effect happened (did the refund go out?).

    Attributes:
        thread_id: The task's thread.
        tool_call_id: The call.
        tool: The tool's name.
        call_args: The call's arguments (``args`` is taken by `BaseException`).
        idempotency_key: The key the tool was given, to look the effect up downstream.

    Example:
        ```python
        from harness_nodes import EffectOutcomeUnknown

        err = EffectOutcomeUnknown("t-1", "call_7", "refund", {"order_id": "A1"}, "key-123")
        assert err.call_args == {"order_id": "A1"}
        assert err.idempotency_key == "key-123"
        assert "it started but no result was recorded" in str(err)
        ```
    """

    def __init__(
        self,
        thread_id: str,
        tool_call_id: str,
        tool: str,
        call_args: dict[str, Any] | None = None,
        idempotency_key: str = "",
    ) -> None:
        super().__init__(thread_id, tool_call_id, tool, call_args, idempotency_key)
        self.thread_id = thread_id
        self.tool_call_id = tool_call_id
        self.tool = tool
        self.call_args = dict(call_args or {})
        self.idempotency_key = idempotency_key

    def __str__(self) -> str:
        # Imported here: the tracing module imports this one.
        from harness_nodes._trace_langfuse import Masker

        # A message reaches logs and a person: secrets in the arguments masked, as in a trace.
        args = Masker()(data=self.call_args)
        return (
            f"Outcome unknown for irreversible call {self.tool}({args}) "
            f"[thread {self.thread_id}, call {self.tool_call_id}, "
            f"idempotency key {self.idempotency_key}]: it started but no result was recorded"
        )


class EffectNotResolvable(EffectError):
    """An answer to an unknown outcome could not be recorded; nothing was changed.

    Attributes:
        thread_id: The call's thread.
        tool_call_id: The call.
        reason: Why (no such call; its result is already recorded).

    Example:
        ```python
        from harness_nodes import EffectNotResolvable

        err = EffectNotResolvable("t-1", "call_7", "its result is already recorded")
        assert (err.thread_id, err.tool_call_id) == ("t-1", "call_7")
        assert str(err).endswith("its result is already recorded")
        ```
    """

    def __init__(self, thread_id: str, tool_call_id: str, reason: str) -> None:
        super().__init__(thread_id, tool_call_id, reason)
        self.thread_id = thread_id
        self.tool_call_id = tool_call_id
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"Cannot resolve effect [thread {self.thread_id}, call {self.tool_call_id}]: "
            f"{self.reason}"
        )


class UnguardedEffect(EffectError):
    """A tool marked `irreversible` (or `effect`) ran without an `EffectLedger` around it.

    The tool refuses to run rather than risk a duplicate. Wire the ledger into the tool node:
    ``ToolNode(tools, wrap_tool_call=ledger.wrap_tool_call, awrap_tool_call=...)``.

    Attributes:
        tool: The tool's name.

    Example:
        ```python
        from langchain_core.tools import tool

        from harness_nodes import UnguardedEffect, irreversible


        @irreversible
        @tool
        def refund(order_id: str) -> str:
            "Refund an order."
            return f"refunded {order_id}"


        try:
            refund.invoke({"order_id": "A1"})  # no EffectLedger around the call
        except UnguardedEffect as exc:
            assert exc.tool == "refund"
        else:
            raise AssertionError("expected UnguardedEffect")
        ```
    """

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        self.tool = tool

    def __str__(self) -> str:
        return (
            f"Tool {self.tool!r} has side effects and ran outside an EffectLedger; "
            "pass wrap_tool_call=ledger.wrap_tool_call (and awrap_tool_call=ledger."
            "awrap_tool_call) to its ToolNode"
        )


# --- tasks ---------------------------------------------------------------------------------


class TaskError(HarnessError):
    """A problem with a task or its thread.

    Example:
        ```python
        from harness_nodes import LeaseLost, RunFailed, TaskError, TaskNotFinished
        from harness_nodes import TaskNotPaused, UnknownTask, UnknownThread

        for cls in (
            UnknownThread, TaskNotFinished, TaskNotPaused, RunFailed, UnknownTask, LeaseLost
        ):
            assert issubclass(cls, TaskError)
        ```
    """


class UnknownThread(TaskError):
    """No task or checkpoint exists for this thread id.

    Attributes:
        thread_id: The id that was asked for.

    Example:
        ```python
        from harness_nodes import UnknownThread

        err = UnknownThread("no-such-thread")
        assert err.thread_id == "no-such-thread"
        assert str(err) == "No task found for thread 'no-such-thread'"
        ```
    """

    def __init__(self, thread_id: str) -> None:
        super().__init__(thread_id)
        self.thread_id = thread_id

    def __str__(self) -> str:
        return f"No task found for thread {self.thread_id!r}"


class TaskNotFinished(TaskError):
    """A task's result was asked for before it finished.

    Attributes:
        task_key: The task.
        status: Its current status.

    Example:
        ```python
        from harness_nodes import TaskNotFinished

        err = TaskNotFinished("ticket-42", "running")
        assert (err.task_key, err.status) == ("ticket-42", "running")
        assert "has not finished (status: running)" in str(err)
        ```
    """

    def __init__(self, task_key: str, status: str) -> None:
        super().__init__(task_key, status)
        self.task_key = task_key
        self.status = status

    def __str__(self) -> str:
        return f"Task {self.task_key!r} has not finished (status: {self.status})"


_NOT_PAUSED_BECAUSE = {
    "pending": "it is waiting to run",
    "running": "another runner holds it",
    "interrupted": "another resume answered its pause first",
    "completed": "it has finished",
    "failed": "it has finished",
    "cancelled": "it was cancelled",
}


class TaskNotPaused(TaskError):
    """A resume answered a task that is not paused for review; nothing was run or recorded.

    Another runner holds the task (it is applying an answer to the pause, e.g. from the
    review queue), or the task is not at a pause: it finished, was cancelled, or has not
    paused yet. The answer is not applied anywhere, so check the task's status before
    answering again.

    Attributes:
        task_key: The task.
        status: Its status when the resume tried to claim it.

    Example:
        ```python
        from harness_nodes import TaskNotPaused

        err = TaskNotPaused("ticket-42", "running")
        assert (err.task_key, err.status) == ("ticket-42", "running")
        assert str(err) == (
            "Task 'ticket-42' is not paused for review (running: another runner holds it); "
            "nothing was resumed"
        )
        ```
    """

    def __init__(self, task_key: str, status: str) -> None:
        super().__init__(task_key, status)
        self.task_key = task_key
        self.status = status

    def __str__(self) -> str:
        because = _NOT_PAUSED_BECAUSE.get(self.status, "it cannot be resumed now")
        return (
            f"Task {self.task_key!r} is not paused for review ({self.status}: {because}); "
            "nothing was resumed"
        )


class RunFailed(TaskError):
    """A run stopped on an error; everything checkpointed before it is kept.

    Attributes:
        thread_id: The task's thread (resume it with ``harness resume THREAD``).
        error: The error's type name.
        reason: The error's first line.

    Example:
        ```python
        from harness_nodes import RunFailed

        err = RunFailed("t-1", "TimeoutError", "tool took too long")
        assert (err.error, err.reason) == ("TimeoutError", "tool took too long")
        assert "harness resume t-1" in str(err)
        ```
    """

    def __init__(self, thread_id: str, error: str, reason: str) -> None:
        super().__init__(thread_id, error, reason)
        self.thread_id = thread_id
        self.error = error
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"Run of thread {self.thread_id!r} stopped: {self.error}: {self.reason} "
            f"(its checkpoints are kept: harness resume {self.thread_id})"
        )


class UnknownTask(TaskError):
    """No task was submitted with this key.

    Attributes:
        task_key: The key that was asked for.

    Example:
        ```python
        from harness_nodes import UnknownTask

        err = UnknownTask("ticket-404")
        assert err.task_key == "ticket-404"
        assert str(err) == "No task submitted with key 'ticket-404'"
        ```
    """

    def __init__(self, task_key: str) -> None:
        super().__init__(task_key)
        self.task_key = task_key

    def __str__(self) -> str:
        return f"No task submitted with key {self.task_key!r}"


class LeaseLost(TaskError):
    """This process no longer holds the task's lease, so its run stops writing checkpoints.

    The task was cancelled, or the run stalled past its lease and another worker took it
    over; either way two runs never interleave on one thread.

    Attributes:
        thread_id: The task's thread.
        owner: The lease this process held.

    Example:
        ```python
        from harness_nodes import LeaseLost

        err = LeaseLost("t-1", "worker-a:1234")
        assert (err.thread_id, err.owner) == ("t-1", "worker-a:1234")
        assert "Lost the lease on thread 't-1'" in str(err)
        ```
    """

    def __init__(self, thread_id: str, owner: str) -> None:
        super().__init__(thread_id, owner)
        self.thread_id = thread_id
        self.owner = owner

    def __str__(self) -> str:
        return (
            f"Lost the lease on thread {self.thread_id!r} (held as {self.owner}): the task "
            "was cancelled or another worker took it over; this run stops"
        )
