"""Background runs on procrastinate (a Postgres job queue): `JobQueue` and the worker loop.

``TaskRunner(backend, "pkg.module:graph", queue=JobQueue(url))`` defers each new task as a
procrastinate job instead of running it in the submitting process; ``harness worker --db
URL`` processes execute them. Scaling out is running more workers against the same Postgres.

Duplicates are refused twice over: a job carries the task's thread id as its
``queueing_lock`` (procrastinate refuses a second waiting job for it), and the run's lease in
``harness_runs`` lets only one process execute a thread at a time. When a worker dies
(SIGKILL, lost machine), procrastinate's stalled-job detection (worker heartbeats) puts its
jobs back in the queue, and ``TaskRunner.recover`` re-defers runs whose lease expired with no
job left to carry them; either way the graph resumes from its last checkpoint, and the effect
ledger keeps every irreversible call to one execution.

Example:
    ```python
    from harness_nodes.background import JobQueue

    queue = JobQueue("postgresql://postgres@127.0.0.1:5432/app")
    print(queue)  # opens nothing until used
    ```
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness_nodes.errors import BackendUnavailable, UserError

if TYPE_CHECKING:
    from checkpointers import Backend
    from harness_nodes.runner import TaskRunner

__all__ = ["JobQueue", "WorkerOptions", "run_worker"]

TASK_NAME = "harness.run_task"
LOCK_KEY = 0x6C67_6871  # "lghq": serialises procrastinate's schema set-up across processes
CONNECT_TIMEOUT = 10  # seconds, as open_backend's default: a dead host fails, not hangs

logger = logging.getLogger("harness.worker")


def _procrastinate() -> Any:
    try:
        import procrastinate
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise ImportError(
            'Background runs need procrastinate: pip install "procrastinate>=3.10"'
        ) from e
    return procrastinate


class JobQueue:
    """The procrastinate queue tasks are deferred to; one per Postgres database.

    Args:
        url: The Postgres URL (the same database as the backend is simplest).
        queue: The procrastinate queue name.

    Raises:
        UserError: the URL is not a Postgres URL.

    Example:
        ```python
        from harness_nodes import JobQueue, UserError

        # Construction opens nothing (no database needed for this example). In the submitting
        # service: TaskRunner(open_backend(url), "myapp.agents:build", queue=JobQueue(url)),
        # then run `harness worker --db URL` on as many machines as you like.
        queue = JobQueue("postgresql://app:secret@db:5432/app", queue="support")
        assert repr(queue) == "JobQueue('postgresql://app:***@db:5432/app', queue='support')"

        try:
            JobQueue("sqlite:///harness.db")  # background runs need Postgres (procrastinate)
        except UserError as exc:
            assert "need Postgres" in str(exc)
        else:
            raise AssertionError("expected UserError")
        ```
    """

    def __init__(self, url: str, *, queue: str = "harness") -> None:
        from checkpointers._url import parse_url

        parsed = parse_url(url)
        if parsed.kind != "postgres":
            raise UserError(
                f"Background runs need Postgres (procrastinate); got {parsed.masked!r}. "
                "Without a queue, TaskRunner runs tasks in its own process."
            )
        self.conninfo = parsed.target
        self.masked_url = parsed.masked
        self._parsed = parsed
        self.queue = queue
        self._app: Any = None
        self._opened = False

    def __repr__(self) -> str:
        return f"JobQueue({self.masked_url!r}, queue={self.queue!r})"

    @property
    def app(self) -> Any:
        """The procrastinate `App`, with the harness's task registered."""
        if self._app is None:
            procrastinate = _procrastinate()
            app = procrastinate.App(
                connector=procrastinate.PsycopgConnector(conninfo=self.conninfo)
            )
            app.task(name=TASK_NAME, queue=self.queue, pass_context=True)(_run_task)
            self._app = app
        return self._app

    def setup(self) -> None:
        """Apply procrastinate's schema if it is missing (safe from many processes at once).

        Raises:
            BackendUnavailable: the database did not answer (or refused us).
        """
        import psycopg

        from checkpointers.backend import _first_line

        try:
            with psycopg.connect(
                self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            ) as conn:
                conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
                try:
                    found = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
                    if found is None or found[0] is None:
                        conn.execute(_procrastinate().schema.SchemaManager.get_schema())
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        except psycopg.Error as e:
            reason = self._parsed.redact(_first_line(e))
            raise BackendUnavailable(self.masked_url, reason) from None

    def wait_until_up(self, timeout: float) -> None:
        """`setup`, retried while the server is not up yet, for at most *timeout* seconds.

        A server that does not answer (connection refused: not started) or refuses
        connections while it starts up (or shuts down, or recovers) is waited for, as
        ``pg_isready`` tells them apart; one that answers but refuses us (wrong password,
        no such database) fails at once: waiting would not help.

        Raises:
            BackendUnavailable: the server refused us, or was not up within *timeout*.
        """
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        ping = make_conninfo(self.conninfo, connect_timeout=CONNECT_TIMEOUT).encode()
        deadline = time.monotonic() + timeout
        delay = 0.1
        up_but_refused = False
        said, say_again = "", 0.0
        while True:
            try:
                self.setup()
                return
            except BackendUnavailable as e:
                # Ping after the failure: a server that is up now but refused us twice in a
                # row refuses us for good; once may be the end of its start-up.
                if pq.PGconn.ping(ping) == pq.Ping.OK:
                    if up_but_refused:
                        raise
                    up_but_refused = True
                    continue
                up_but_refused = False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailable(
                        self.masked_url, f"not up after {timeout:g} s: {e.reason}"
                    ) from e
                if e.reason != said or time.monotonic() >= say_again:  # not every retry
                    logger.warning(
                        "waiting for the database %s (up to %.0f s more): %s",
                        self.masked_url,
                        left,
                        e.reason,
                    )
                    said, say_again = e.reason, time.monotonic() + 10
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    def defer(self, thread_id: str, graph: str) -> bool:
        """Queue a run of *thread_id*; ``False`` if one is already waiting (not a duplicate)."""
        procrastinate = _procrastinate()
        if not self._opened:
            self.setup()
            self.app.open()
            self._opened = True
        try:
            self.app.tasks[TASK_NAME].configure(queueing_lock=thread_id).defer(
                thread_id=thread_id, graph=graph
            )
        except procrastinate.exceptions.AlreadyEnqueued:
            return False
        return True

    def close(self) -> None:
        """Close the submitting side's connections."""
        if self._opened:
            self.app.close()
            self._opened = False


@dataclass
class WorkerOptions:
    """How a ``harness worker`` process runs."""

    concurrency: int = 4
    """Tasks run at once in this process (each in a thread)."""
    lease_seconds: float = 30.0
    """A run's lease: a crashed run is resumed after this long."""
    recover_interval: float = 5.0
    """Seconds between sweeps for stalled jobs and expired leases."""
    max_recoveries: int | None = 5
    """Times in a row a task whose process died in its run is run again; past that it is
    ``failed`` ("crashed its process N times"), not given to another worker (None: no bound;
    see `TaskRunner`)."""
    heartbeat_interval: float = 5.0
    """procrastinate worker heartbeat."""
    stalled_after: float = 15.0
    """A worker silent this long is dead; its jobs go back to the queue."""
    poll_interval: float = 1.0
    """Fallback polling for new jobs (LISTEN/NOTIFY wakes workers at once)."""
    name: str | None = None
    """The worker's name in procrastinate's tables and logs."""
    startup_wait: float = 60.0
    """Seconds to wait for a database that is not up yet when the worker starts (0: none)."""
    runners: dict[str, TaskRunner] = field(default_factory=dict, repr=False)


def _runner(backend: Backend, options: WorkerOptions, graph: str) -> TaskRunner:
    from harness_nodes.runner import TaskRunner

    runner = options.runners.get(graph)
    if runner is None:
        runner = TaskRunner(
            backend,
            graph,
            lease_seconds=options.lease_seconds,
            max_recoveries=options.max_recoveries,
        )
        options.runners[graph] = runner
    return runner


async def _run_task(context: Any, thread_id: str, graph: str) -> str:
    """The procrastinate job: execute one task's run in a thread of this worker."""
    extra = context.additional_context
    runner = _runner(extra["harness_backend"], extra["harness_options"], graph)
    run = await asyncio.to_thread(runner.execute, thread_id)
    return run.status


async def _sweep(queue: JobQueue, backend: Backend, options: WorkerOptions) -> None:
    """Put stalled jobs back in the queue; re-defer runs whose lease expired with no job."""
    procrastinate = _procrastinate()
    manager = queue.app.job_manager
    for job in await manager.get_stalled_jobs(
        task_name=TASK_NAME, seconds_since_heartbeat=options.stalled_after
    ):
        try:
            await manager.retry_job(job)
        except procrastinate.exceptions.UniqueViolation as e:
            # ``retry_job`` reports a waiting job with the same queueing lock this way, not
            # as `AlreadyEnqueued`. After a database outage every worker's heartbeat is
            # stale, so the jobs running then look stalled while their runs were queued
            # again (lease expiry, or a submitter's retry): common, and not to stop the sweep.
            if e.constraint_name != procrastinate.manager.QUEUEING_LOCK_CONSTRAINT:
                raise
            await manager.finish_job(job, procrastinate.jobs.Status.FAILED, delete_job=False)
        except procrastinate.exceptions.AlreadyEnqueued:
            # Its run was re-deferred already (lease expiry): close this copy.
            await manager.finish_job(job, procrastinate.jobs.Status.FAILED, delete_job=False)
    from harness_nodes._lease import STALE, now

    stale = await asyncio.to_thread(backend.execute, STALE, (now(),))
    for row in stale:
        if row["graph"]:
            try:
                await (
                    queue.app.tasks[TASK_NAME]
                    .configure(queueing_lock=row["thread_id"])
                    .defer_async(thread_id=row["thread_id"], graph=row["graph"])
                )
            except procrastinate.exceptions.AlreadyEnqueued:
                pass


async def run_worker(
    url: str, options: WorkerOptions | None = None, *, stop: asyncio.Event | None = None
) -> None:
    """Run a worker until *stop* is set (or SIGINT/SIGTERM): what ``harness worker`` does.

    Args:
        url: The Postgres URL of the backend and the queue.
        options: Concurrency, lease and recovery timings.
        stop: Set it to stop the worker gracefully (running tasks finish first).
    """
    from checkpointers import open_backend

    options = options or WorkerOptions()
    queue = JobQueue(url)
    # Started beside the database (docker compose, a restarting host): wait until it is up.
    await asyncio.to_thread(queue.wait_until_up, options.startup_wait)
    backend = await asyncio.to_thread(open_backend, url, pool_size=max(4, 2 * options.concurrency))
    try:
        async with queue.app.open_async():
            worker = asyncio.create_task(
                queue.app.run_worker_async(
                    queues=[queue.queue],
                    concurrency=options.concurrency,
                    name=options.name,
                    fetch_job_polling_interval=options.poll_interval,
                    update_heartbeat_interval=options.heartbeat_interval,
                    stalled_worker_timeout=options.stalled_after,
                    install_signal_handlers=stop is None,
                    additional_context={
                        "harness_backend": backend,
                        "harness_options": options,
                    },
                )
            )
            stopping = asyncio.ensure_future((stop or asyncio.Event()).wait())
            while not worker.done():
                try:
                    await _sweep(queue, backend, options)
                except Exception:
                    logger.exception("recovery sweep failed; retrying")
                await asyncio.wait(
                    {worker, stopping},
                    timeout=options.recover_interval,
                    return_when="FIRST_COMPLETED",
                )
                if stopping.done():
                    worker.cancel()
                    break
            stopping.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
    finally:
        for runner in options.runners.values():
            runner.close()
        await asyncio.to_thread(backend.close)
