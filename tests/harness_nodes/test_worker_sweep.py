"""The worker's recovery sweep: a stalled job whose task was queued again does not stop it.

After a database outage every worker's procrastinate heartbeat is stale, so all jobs running
then look stalled, while the lease sweep (or a submitter) may already have queued their tasks
again. Putting such a stalled job back in the queue collides with the waiting job's
``queueing_lock``: procrastinate's ``retry_job`` raises its ``UniqueViolation`` there (not
``AlreadyEnqueued``), and the sweep used to stop on it, every round, with a traceback —
skipping the other stalled jobs and the runs whose lease expired.
"""

from __future__ import annotations

import json

import pytest

from checkpointers import open_backend
from harness_nodes.background import TASK_NAME, JobQueue, WorkerOptions, _sweep

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_stalled_job_whose_task_waits_in_the_queue_again_does_not_stop_the_sweep(
    postgres_url: str,
) -> None:
    queue = JobQueue(postgres_url)
    queue.setup()
    with open_backend(postgres_url) as backend:
        async with queue.app.open_async():
            task = queue.app.tasks[TASK_NAME]

            async def defer(thread_id: str) -> int:
                job_id: int = await task.configure(queueing_lock=thread_id).defer_async(
                    thread_id=thread_id, graph="pkg.mod:graph"
                )
                return job_id

            stalled = await defer("t-1")
            backend.execute(
                "WITH dead AS (INSERT INTO procrastinate_workers (last_heartbeat) "
                "VALUES (now() - interval '1 hour') RETURNING id) UPDATE procrastinate_jobs "
                "SET status = 'doing', worker_id = (SELECT id FROM dead) WHERE id = %s",
                (stalled,),
            )
            waiting = await defer("t-1")  # the task was queued again meanwhile
            # A run whose lease expired with no job left to carry it on.
            backend.execute(
                "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, "
                "input, lease_owner, lease_expires_at, attempts, created_at, updated_at) "
                "VALUES ('t-2', 't-2', 'default', 'pkg.mod:graph', 'running', %s, 'gone:1:x', "
                "1, 1, 1, 1)",
                (json.dumps({"json": {"messages": []}}),),
            )

            await _sweep(queue, backend, WorkerOptions(stalled_after=1.0))

            jobs = backend.execute(
                "SELECT id, queueing_lock, status FROM procrastinate_jobs ORDER BY id"
            )
    assert [(j["queueing_lock"], j["status"]) for j in jobs] == [
        ("t-1", "failed"),  # the stalled copy is closed: its task waits in the queue
        ("t-1", "todo"),
        ("t-2", "todo"),  # and the sweep went on to the expired lease
    ]
    assert [j["id"] for j in jobs][:2] == [stalled, waiting]
