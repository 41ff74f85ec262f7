"""Runs and reliability metrics across tasks, from the database alone."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from harness_nodes._trace_langfuse import Masker
from harness_nodes._trace_local import Trace, build_trace, needs_sync_backend
from harness_nodes.pricing import Pricing

if TYPE_CHECKING:
    from checkpointers import Backend

__all__ = ["Report", "RunSummary", "list_runs", "reliability_report"]

_FAILED = frozenset({"budget_exhausted", "verification_failed", "rejected", "failed", "cancelled"})


@dataclass(frozen=True)
class RunSummary:
    """One task as `harness runs` lists it.

    Example:
        ```python
        from harness_nodes import RunSummary

        run = RunSummary("t-1", "support", "completed", 0.002, 1.5, 1700000000.0)
        assert run.status == "completed"
        ```
    """

    thread_id: str
    """The task's thread."""
    task_type: str
    """Its type."""
    status: str
    """Outcome status, or ``paused`` / ``incomplete`` / a runner status."""
    cost_usd: float
    """Dollars spent."""
    duration_s: float | None
    """First to last checkpoint."""
    started_at: float | None
    """First checkpoint (epoch seconds)."""


_UUID_EPOCH = 0x01B21DD213814000
"""100-ns intervals from the Gregorian epoch (UUID time) to the Unix epoch."""


def _last_checkpoints(backend: Backend) -> dict[str, float] | None:
    """Each thread's last checkpoint time from the saver's table, with no checkpoint loaded.

    Checkpoint ids are UUIDv6 (LangGraph's `uuid6`): time-ordered as text, and carrying their
    creation time. None where the checkpoints are not in a table (``memory://``).
    """
    if backend.kind not in ("sqlite", "postgres"):
        return None
    from langgraph.checkpoint.base.id import UUID

    rows = backend.execute(
        "SELECT thread_id, max(checkpoint_id) AS last FROM checkpoints "
        "WHERE checkpoint_ns = '' GROUP BY thread_id"
    )
    out: dict[str, float] = {}
    for row in rows:
        try:
            out[str(row["thread_id"])] = (UUID(str(row["last"])).time - _UUID_EPOCH) / 1e7
        except ValueError:  # not a LangGraph id (written by something else): undated
            out[str(row["thread_id"])] = 0.0
    return out


def _thread_ids(backend: Backend) -> dict[str, float]:
    """Every thread with checkpoints or a run record → its last activity (epoch seconds)."""
    seen: dict[str, float] = {}
    for row in backend.execute("SELECT thread_id, updated_at FROM harness_runs"):
        seen[str(row["thread_id"])] = float(row["updated_at"] or 0)
    last = _last_checkpoints(backend)
    if last is not None:  # one grouped query, no checkpoint deserialized
        for tid, ts in last.items():
            seen[tid] = max(seen.get(tid, 0.0), ts)
        return seen
    from datetime import datetime

    for tup in backend.checkpointer.list(None):  # memory: the saver's own listing
        if tup.config["configurable"].get("checkpoint_ns"):
            continue
        tid = str(tup.config["configurable"]["thread_id"])
        ts = datetime.fromisoformat(str(tup.checkpoint["ts"])).timestamp()
        seen[tid] = max(seen.get(tid, 0.0), ts)
    return seen


def _traces(backend: Backend, limit: int | None, pricing: Pricing | None, what: str) -> list[Trace]:
    needs_sync_backend(backend, what)
    ids = sorted(_thread_ids(backend).items(), key=lambda kv: kv[1], reverse=True)
    if limit is not None:
        ids = ids[:limit]
    masker = Masker()  # one for every thread (it compiles its patterns)
    return [build_trace(backend, tid, pricing=pricing, masker=masker) for tid, _ in ids]


def list_runs(
    backend: Backend, *, limit: int | None = 20, pricing: Pricing | None = None
) -> list[RunSummary]:
    """The most recent tasks (newest first): status, task type, cost, duration.

    Tasks come from the runs table and from the checkpoints themselves, so graphs invoked
    directly (not through a runner) are listed too.

    Example:
        ```python
        from checkpointers import open_backend
        from graphs.quickstart import build_graph, run
        from harness_nodes import list_runs

        with open_backend("memory://") as backend:
            run(build_graph(), backend, thread_id="t-1")
            assert [r.status for r in list_runs(backend)] == ["completed"]
        ```
    """
    return [
        RunSummary(
            thread_id=t.thread_id,
            task_type=t.task_type,
            status=t.status,
            cost_usd=t.cost_usd,
            duration_s=t.duration_s,
            started_at=t.started_at,
        )
        for t in _traces(backend, limit, pricing, "list_runs")
    ]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(0, math.ceil(q * len(ordered)) - 1)  # nearest-rank
    return ordered[rank]


@dataclass
class Report:
    """Reliability metrics across tasks (`harness report`).

    Example:
        ```python
        from checkpointers import open_backend
        from graphs.quickstart import build_graph, run
        from harness_nodes import reliability_report

        with open_backend("memory://") as backend:
            run(build_graph(), backend, thread_id="t-1")
            report = reliability_report(backend)
        assert report.completion_rate == 1.0
        ```
    """

    tasks: int = 0
    """Tasks seen."""
    finished: int = 0
    """Tasks that reached an outcome."""
    completion_rate: float = 0.0
    """Completed tasks / finished tasks."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """Status → count (paused and incomplete tasks included)."""
    failure_reasons: list[tuple[str, int]] = field(default_factory=list)
    """Most frequent failed-verification reasons and outcome reasons, with counts."""
    failing_tools: list[tuple[str, int]] = field(default_factory=list)
    """Tools whose outputs failed verification most often."""
    escalation_rate: float = 0.0
    """Tasks that went to human review / tasks."""
    review_latency_s: dict[str, float] = field(default_factory=dict)
    """``mean``, ``p95``, ``max`` seconds from review request to decision."""
    cost_by_task_type: dict[str, dict[str, float]] = field(default_factory=dict)
    """Task type → ``n``, ``mean``, ``p95``, ``max`` dollars per task."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def reliability_report(backend: Backend, *, top: int = 5, pricing: Pricing | None = None) -> Report:
    """Completion rate, outcomes, failure reasons, escalations and cost, across all tasks.

    Example:
        ```python
        from checkpointers import open_backend
        from harness_nodes import reliability_report

        with open_backend("memory://") as backend:
            assert reliability_report(backend).tasks == 0
        ```
    """
    traces = _traces(backend, None, pricing, "reliability_report")
    report = Report(tasks=len(traces))
    if not traces:
        return report
    outcomes = Counter(t.status for t in traces)
    finished = [t for t in traces if t.status == "completed" or t.status in _FAILED]
    report.outcomes = dict(outcomes.most_common())
    report.finished = len(finished)
    report.completion_rate = (
        sum(1 for t in finished if t.status == "completed") / len(finished) if finished else 0.0
    )
    reasons: Counter[str] = Counter()
    tools: Counter[str] = Counter()
    escalated = 0
    for t in traces:
        went_to_review = False
        for node in t.walk():
            if node.kind == "verdict" and not node.data.get("ok", True):
                tools[str(node.data.get("tool", "?"))] += 1
                for r in node.data.get("reasons") or []:
                    reasons[str(r)] += 1
            if node.kind in {"interrupt", "review"}:
                went_to_review = True
        if t.status in _FAILED and t.reason:
            reasons[f"{t.status}: {t.reason}"] += 1
        escalated += went_to_review
    report.failure_reasons = reasons.most_common(top)
    report.failing_tools = tools.most_common(top)
    report.escalation_rate = escalated / len(traces)
    latencies = [
        float(r["decided_at"]) - float(r["created_at"])
        for r in backend.execute(
            "SELECT created_at, decided_at FROM harness_reviews WHERE decided_at IS NOT NULL"
        )
    ]
    if latencies:
        report.review_latency_s = {
            "mean": sum(latencies) / len(latencies),
            "p95": _percentile(latencies, 0.95),
            "max": max(latencies),
        }
    by_type: dict[str, list[float]] = {}
    for t in traces:
        by_type.setdefault(t.task_type, []).append(t.cost_usd)
    report.cost_by_task_type = {
        k: {
            "n": float(len(v)),
            "mean": sum(v) / len(v),
            "p95": _percentile(v, 0.95),
            "max": max(v),
        }
        for k, v in sorted(by_type.items())
    }
    return report
