"""Chaos: a background worker SIGKILLed at random points while it runs 50 tasks.

Every task must complete after recovery; each irreversible effect must have happened exactly
once (or the task waits in review with an unknown outcome when the kill fell inside the
effect — then a person settles it and it completes); and no completed step may re-run: a
node execution that started after its step's checkpoint was committed would be one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from checkpointers import open_backend
from harness_nodes import EffectLedger, JobQueue, TaskRunner
from tests.conftest import subprocess_env
from tests.harness_nodes import _chaos_graph as chaos
from tests.harness_nodes.test_runner import linear_chain

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

GRAPH = "tests.harness_nodes._chaos_graph:build"
TASKS = 50
KILLS = 6
SEED = 20261125
LEASE = 1.0


def start_worker(url: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "harness_nodes.cli",
        "worker",
        "--db",
        url,
        "--concurrency",
        "8",
        "--lease",
        str(LEASE),
        "--recover-interval",
        "0.3",
        "--stalled-after",
        str(LEASE),
    ]
    return subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def progress(backend: Any) -> int:
    return int(backend.execute("SELECT count(*) AS n FROM chaos_steps")[0]["n"])


def unfinished(backend: Any) -> int:
    rows = backend.execute(
        "SELECT count(*) AS n FROM harness_runs WHERE status IN ('pending', 'running')"
    )
    return int(rows[0]["n"])


def checkpoint_times(backend: Any, thread_id: str) -> dict[int, float]:
    """Step number → when the checkpoint that committed it was written."""
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    return {
        int(t.metadata["step"]): datetime.fromisoformat(t.checkpoint["ts"]).timestamp()
        for t in backend.checkpointer.list(config)
    }


def test_sigkilled_worker_loses_no_task_and_repeats_no_effect(postgres_url: str) -> None:
    rng = random.Random(SEED)
    with open_backend(postgres_url) as backend:
        chaos.create_tables(backend)
        queue = JobQueue(postgres_url)
        submitter = TaskRunner(backend, GRAPH, queue=queue)
        keys = [f"task-{i:02d}" for i in range(TASKS)]
        for key in keys:
            submitter.submit(key, {"messages": [HumanMessage(f"refund {key}")]})
        queue.close()

        kills = 0
        worker = start_worker(postgres_url)
        # Generous: recovery waits for leases to expire, slower on a loaded machine.
        deadline = time.monotonic() + 300
        try:
            while unfinished(backend) and time.monotonic() < deadline:
                if kills < KILLS:
                    # Wait until this worker is making progress, then kill it at a random
                    # moment: inside a tool, a node, a checkpoint write or the ledger.
                    seen = progress(backend)
                    while progress(backend) == seen and worker.poll() is None:
                        assert time.monotonic() < deadline, "worker made no progress"
                        time.sleep(0.02)
                    time.sleep(rng.uniform(0.05, 0.6))
                    os.kill(worker.pid, signal.SIGKILL)
                    worker.wait()
                    kills += 1
                    worker = start_worker(postgres_url)
                else:
                    time.sleep(0.2)
                assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        assert unfinished(backend) == 0, "tasks left unfinished after recovery"
        assert kills == KILLS

        # Kills that fell inside an irreversible call left its outcome unknown: those tasks
        # wait for a person, who checks the world (did the refund go out?) and answers.
        ledger = EffectLedger(backend)
        reviewer = TaskRunner(backend, GRAPH)
        runs = {r["thread_id"]: r for r in backend.execute("SELECT * FROM harness_runs")}
        waiting = [t for t, r in runs.items() if r["status"] == "interrupted"]
        for thread_id in waiting:
            (pending,) = [e for e in ledger.list(thread_id) if e.status in ("started", "error")]
            happened = chaos.world(backend, thread_id).count(pending.tool) == 1
            assert chaos.world(backend, thread_id).count(pending.tool) <= 1
            answer = {"happened": happened, "result": f"{pending.tool} checked by hand"}
            assert reviewer.resume(thread_id, answer).status == "completed"
        statuses = Counter(r["status"] for r in backend.execute("SELECT status FROM harness_runs"))
        assert statuses == {"completed": TASKS}

        reruns = 0
        for key in keys:
            assert reviewer.result(key, timeout=1)["status"] == "completed"
            # Exactly once, every irreversible effect of every task.
            assert sorted(chaos.world(backend, key)) == ["email", "refund"], key
            # One linear chain of checkpoints per thread: nothing interleaved.
            linear_chain(backend, key)
            # No completed step ran again: every execution of a step started before the
            # checkpoint that committed it.
            committed = checkpoint_times(backend, key)
            counts = Counter((s["node"], s["step"]) for s in chaos.steps(backend, key))
            for s in chaos.steps(backend, key):
                assert s["started_at"] < committed.get(s["step"], 0), (key, s, sorted(committed))
            reruns += sum(n - 1 for n in counts.values())
        # Only steps in flight at a kill ran twice (each kill stops at most 8 runs).
        assert reruns <= KILLS * 8
        print(
            f"\nchaos: {TASKS} tasks, {kills} SIGKILLs, {len(waiting)} unknown outcomes "
            f"settled by review, {reruns} in-flight steps re-run"
        )
