"""``harness worker``: execute background tasks from the procrastinate queue on Postgres.

Run as many as you like, on as many machines as you like, against the same database: each
task runs in one worker at a time (a lease on its run), a dead worker's tasks are picked up
by the others (stalled-job detection + expired leases) and resume from their last
checkpoint, and the effect ledger keeps irreversible calls to one execution.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from harness_nodes.cli._app import app, err_console


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
    from harness_nodes.background import WorkerOptions, run_worker

    url = db or default_url()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    options = WorkerOptions(
        concurrency=concurrency,
        lease_seconds=lease,
        recover_interval=recover_interval,
        heartbeat_interval=max(0.2, stalled_after / 3),
        stalled_after=stalled_after,
        name=name,
    )
    err_console.print(f"harness worker: {url.split('@')[-1]} (concurrency {concurrency})")
    asyncio.run(run_worker(url, options))
