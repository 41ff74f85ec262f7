"""``harness worker``: execute background tasks from the procrastinate queue on Postgres.

Run as many as you like, on as many machines as you like, against the same database: each
task runs in one worker at a time (a lease on its run), a dead worker's tasks are picked up
by the others (stalled-job detection + expired leases) and resume from their last
checkpoint, and the effect ledger keeps irreversible calls to one execution.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from harness_nodes.cli._app import app, console, err_console
from harness_nodes.errors import RunFailed, UserError

if TYPE_CHECKING:
    from checkpointers import Backend
    from harness_nodes._lease import TaskRun
    from harness_nodes.runner import TaskRunner


@app.command()
def worker(
    db: Annotated[
        str | None,
        typer.Option("--db", help="Postgres URL (default: $HARNESS_DATABASE_URL)"),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Tasks run at once")
    ] = 4,
    lease: Annotated[
        float, typer.Option("--lease", min=0.5, help="Seconds before a dead run is resumed")
    ] = 30.0,
    recover_interval: Annotated[
        float, typer.Option("--recover-interval", min=0.1, help="Seconds between sweeps")
    ] = 5.0,
    max_recoveries: Annotated[
        int,
        typer.Option(
            "--max-recoveries",
            min=-1,
            help="Times in a row a task whose run killed its process is run again before it "
            "is marked failed (-1: no bound)",
        ),
    ] = 5,
    stalled_after: Annotated[
        float,
        typer.Option("--stalled-after", min=0.5, help="Seconds of silence before a worker is dead"),
    ] = 15.0,
    name: Annotated[str | None, typer.Option("--name", help="Worker name in logs")] = None,
    wait_for_db: Annotated[
        float,
        typer.Option(
            "--wait-for-db",
            min=0,
            help="Seconds to wait for a database that is not up yet (starting) before failing",
        ),
    ] = 60.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each job")] = False,
) -> None:
    """Run a background worker: execute queued tasks, resume those of dead workers."""
    from checkpointers import default_url
    from harness_nodes.background import JobQueue, WorkerOptions, run_worker

    url = default_url() if db is None else db
    if db is None and not os.environ.get("HARNESS_DATABASE_URL"):
        raise UserError(
            "harness worker needs a Postgres database: pass --db postgresql://... or set "
            "$HARNESS_DATABASE_URL"
        )
    queue = JobQueue(url)  # refuses a non-Postgres URL with one clear line
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    options = WorkerOptions(
        concurrency=concurrency,
        lease_seconds=lease,
        recover_interval=recover_interval,
        max_recoveries=None if max_recoveries < 0 else max_recoveries,
        heartbeat_interval=max(0.2, stalled_after / 3),
        stalled_after=stalled_after,
        name=name,
        startup_wait=wait_for_db,
    )
    err_console.print(f"harness worker: {queue.masked_url} (concurrency {concurrency})")
    asyncio.run(run_worker(url, options))


def resume_managed(
    backend: Backend, thread_id: str, answer: Any, reviewer: str
) -> dict[str, Any] | None:
    """``harness resume THREAD`` for a task submitted through a `TaskRunner` with a graph path.

    Such a task is resumed through its runner, under its lease — never beside a live worker
    that holds it. An answer to a review pause is decided in the `ReviewQueue` with the runner,
    as for a thread without one: validated, audited with *reviewer*, applied under the lease.
    An answer to any other pause goes to `TaskRunner.resume`. Returns ``None`` for threads the
    runner does not manage.

    Raises:
        TaskNotPaused: an answer for a task that is not paused, or that another runner holds
            (the CLI prints it as a one-line error).
        InvalidDecision: a malformed or disallowed decision (the task stays paused).
        AlreadyDecided: another reviewer, or another process, is answering the pause.
        RunFailed: the run this resume carried on failed after the runner's attempts.
    """
    from harness_nodes.runner import TaskRunner

    rows = backend.execute(
        "SELECT task_key, graph, status FROM harness_runs WHERE thread_id = %s", (thread_id,)
    )
    if not rows or not rows[0]["graph"]:
        return None
    row = rows[0]
    runner = TaskRunner(backend, row["graph"])
    if answer is not None:
        run = _answer_pause(backend, runner, thread_id, row, answer, reviewer)
    elif row["status"] == "interrupted":
        console.print(
            escape(f"task {row['task_key']} is paused for review: pass --decision JSON"),
            highlight=False,
        )
        run = runner.status(row["task_key"])
    else:
        run = runner.execute(thread_id)
    outcome = escape(str(run.outcome or ""))
    console.print(f"task {escape(run.task_key)}: [bold]{escape(run.status)}[/] {outcome}")
    if run.status == "failed" and (answer is not None or row["status"] != "failed"):
        # This resume ran it and it failed: an error (exit 2), as `harness review approve` and
        # a thread without a runner have it, not a status line that exits 0.
        from harness_nodes.review_queue import _leased_outcome

        _leased_outcome(run)
    return {"task_key": run.task_key, "status": run.status, "outcome": run.outcome}


def _answer_pause(
    backend: Backend,
    runner: TaskRunner,
    thread_id: str,
    row: Mapping[str, Any],
    answer: Any,
    reviewer: str,
) -> TaskRun:
    """Apply *answer* to the paused runner task: its queued reviews, else the pause itself."""
    from harness_nodes.cli._review import _words
    from harness_nodes.review_queue import ReviewQueue

    queue = ReviewQueue(backend, runner.graph, runner=runner)
    # A task that is not paused (finished, held by another runner) is resume's to refuse.
    items = queue.sync(thread_id) if row["status"] == "interrupted" else []
    if not items:
        return runner.resume(row["task_key"], answer)
    for item in items:
        failed = False
        try:
            queue.decide(item.id, answer, reviewer=reviewer)
        except RunFailed:  # the decision stands; the task's line says it failed
            failed = True
        console.print(escape(f"review {item.id}: {_words(answer)} by {reviewer}"), highlight=False)
        if failed:
            break
    return runner.status(row["task_key"])
