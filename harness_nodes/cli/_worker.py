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
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from harness_nodes.cli._app import app, console, err_console
from harness_nodes.errors import UserError

if TYPE_CHECKING:
    from checkpointers import Backend


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
    stalled_after: Annotated[
        float,
        typer.Option("--stalled-after", min=0.5, help="Seconds of silence before a worker is dead"),
    ] = 15.0,
    name: Annotated[str | None, typer.Option("--name", help="Worker name in logs")] = None,
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
        heartbeat_interval=max(0.2, stalled_after / 3),
        stalled_after=stalled_after,
        name=name,
    )
    err_console.print(f"harness worker: {queue.masked_url} (concurrency {concurrency})")
    asyncio.run(run_worker(url, options))


def resume_managed(backend: Backend, thread_id: str, answer: Any) -> dict[str, Any] | None:
    """``harness resume THREAD`` for a task submitted through a `TaskRunner` with a queue.

    Such a task is resumed through its runner, under its lease — never beside a live worker
    that holds it. Returns ``None`` for threads the runner does not manage.

    Raises:
        TaskNotPaused: an answer for a task that is not paused, or that another runner holds
            (the CLI prints it as a one-line error).
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
        run = runner.resume(row["task_key"], answer)
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
    return {"task_key": run.task_key, "status": run.status, "outcome": run.outcome}
