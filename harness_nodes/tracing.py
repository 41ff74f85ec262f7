"""Execution traces: one Langfuse trace per task, and the same decision tree locally.

Two views of the same facts:

- **Langfuse** (`langfuse_callbacks`): the run config that sends a task to Langfuse as one
  trace across interrupts, resumes, crashes and processes, with the harness's decisions as
  ``guardrail``/``event`` observations and scores, a model name and a cost on every
  generation, and secrets masked (`Masker`).
- **Local, no server** (`build_trace`): the decision tree rebuilt from checkpoint history
  plus the ledgers; `harness show THREAD` renders it, `list_runs` / `harness runs` lists
  tasks, `reliability_report` / `harness report` aggregates them.

Example:
    ```python
    from checkpointers import open_backend
    from graphs.quickstart import build_graph, run
    from harness_nodes.tracing import Trace, build_trace

    with open_backend("memory://") as backend:
        run(build_graph(), backend, thread_id="t-1")
        trace = build_trace(backend, "t-1")
    assert Trace.from_json(trace.to_json()) == trace
    ```
"""

from __future__ import annotations

from harness_nodes._trace_langfuse import (
    Masker,
    langfuse_callbacks,
    langfuse_handler,
    trace_id_for,
)
from harness_nodes._trace_local import Trace, TraceNode, build_trace
from harness_nodes._trace_report import Report, RunSummary, list_runs, reliability_report

__all__ = [
    "Masker",
    "Report",
    "RunSummary",
    "Trace",
    "TraceNode",
    "build_trace",
    "langfuse_callbacks",
    "langfuse_handler",
    "list_runs",
    "reliability_report",
    "trace_id_for",
]
