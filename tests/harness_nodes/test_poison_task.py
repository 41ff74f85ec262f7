"""A task whose run kills its process every time is recovered a bounded number of times.

Nothing raises in such a run (an OOM kill, a segfault, ``os._exit``), so ``max_attempts``
never sees it: its lease expires and recovery claims it again. The claim that finds the row
still ``running`` counts the crash; past ``max_recoveries`` the task is ``failed``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from checkpointers import Backend, aopen_backend, open_backend
from harness_nodes import RunFailed, TaskRunner, UserError, build_trace, reliability_report
from harness_nodes._lease import claim
from harness_nodes.aio import AsyncTaskRunner
from harness_nodes.background import WorkerOptions, _runner
from tests.conftest import subprocess_env
from tests.harness_nodes import _poison_graph as poison

POISON = "tests.harness_nodes._poison_graph:build"
CHILD = """
import sys
from checkpointers import open_backend
from harness_nodes import TaskRunner

url, what = sys.argv[1], sys.argv[2]
with open_backend(url) as backend:
    with TaskRunner(backend, GRAPH, lease_seconds=0.3, max_recoveries=1) as runner:
        if what == "submit":
            runner.submit("poison", {"messages": []})
        else:
            print(runner.recover())
""".replace("GRAPH", repr(POISON))


def _child(url: str, what: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, url, what],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _row(backend: Backend, key: str) -> dict[str, Any]:
    return backend.execute("SELECT * FROM harness_runs WHERE task_key = %s", (key,))[0]


@pytest.mark.slow
def test_a_task_that_kills_its_process_every_time_is_failed_not_recovered_forever(
    durable_url: str,
) -> None:
    first = _child(durable_url, "submit")
    assert first.returncode == 137, first.stderr  # the run took its process down
    with open_backend(durable_url) as backend:
        seen = []
        for _ in range(4):  # the old code: 137 every time, ``running`` forever
            time.sleep(0.35)  # the dead run's lease expires
            proc = _child(durable_url, "recover")
            row = _row(backend, "poison")
            seen.append((proc.returncode, row["status"], row["attempts"]))
            if row["status"] == "failed":
                break
        # Recovered once (max_recoveries=1), which died too; the next claim fails it.
        assert seen == [(137, "running", 2), (0, "failed", 3)], seen
        assert poison.starts(backend, "poison") == 2
        error = _row(backend, "poison")["error"]
        assert re.fullmatch(
            r"crashed its process 2 times in a row \(last claimed by [^:]+:\d+:\w+\); "
            r"not recovered again \(max_recoveries=1\)",
            error,
        ), error
        # What a person sees: `harness runs` / `harness report`.
        trace = build_trace(backend, "poison")
        assert (trace.status, trace.reason) == ("failed", error)
        assert ("failed: " + error, 1) in reliability_report(backend).failure_reasons
        with TaskRunner(backend, POISON) as runner:
            assert runner.recover() == []  # nobody runs it again
            with pytest.raises(RunFailed, match="crashed its process 2 times"):
                runner.result("poison", timeout=5)
            assert runner.status("poison").crashes == 2


def _die(backend: Backend, thread_id: str) -> None:
    """A run claims the task and its process dies: the lease is left, already expired."""
    assert backend.execute(*claim(thread_id, "host:4242:dead", -1.0, resuming=False))


def _answer() -> StateGraph[MessagesState]:
    builder = StateGraph(MessagesState)
    builder.add_node("answer", lambda state: {"messages": [AIMessage("42")]})
    builder.add_edge(START, "answer")
    builder.add_edge("answer", END)
    return builder


def _insert(backend: Backend, key: str) -> None:
    backend.execute(
        "INSERT INTO harness_runs (thread_id, task_key, task_type, status, input, attempts, "
        "created_at, updated_at) VALUES (%s, %s, 'default', 'pending', %s, 0, 1, 1)",
        (key, key, '{"json": {"messages": []}}'),
    )


def test_crashes_are_counted_by_the_claim_and_bounded_by_max_recoveries(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        _insert(backend, "t")
        for _ in range(3):
            _die(backend, "t")
        # Two dead runs found by the claims after them; the third is found by this one.
        with TaskRunner(backend, _answer(), max_recoveries=2) as runner:
            run = runner.execute("t")
        assert (run.status, run.crashes, run.attempts) == ("failed", 3, 4)
        assert run.error == (
            "crashed its process 3 times in a row (last claimed by host:4242:dead); "
            "not recovered again (max_recoveries=2)"
        )
        assert backend.execute("SELECT * FROM checkpoints WHERE thread_id = 't'") == []


def test_a_task_within_its_bound_or_unbounded_is_recovered(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        for key, bound in (("within", 3), ("unbounded", None)):
            _insert(backend, key)
            for _ in range(3):
                _die(backend, key)
            with TaskRunner(backend, _answer(), max_recoveries=bound) as runner:
                run = runner.execute(key)
            assert (run.status, run.crashes) == ("completed", 3), key


def test_a_run_that_settles_starts_the_count_again(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        _insert(backend, "t")
        for _ in range(3):
            _die(backend, "t")
        # Released as pending (what a run waiting out an outage does): it was alive.
        backend.execute(
            "UPDATE harness_runs SET status = 'pending', lease_owner = NULL, "
            "lease_expires_at = NULL WHERE thread_id = 't'"
        )
        _die(backend, "t")
        assert _row(backend, "t")["crashes"] == 0
        with TaskRunner(backend, _answer(), max_recoveries=1) as runner:
            run = runner.execute("t")
        assert (run.status, run.crashes) == ("completed", 1)


def test_a_run_that_lost_its_lease_alive_is_not_counted_as_a_crash(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        _insert(backend, "t")

        def stalled(state: MessagesState) -> dict[str, Any]:
            # Stalled past its lease (a GC pause, its database away): another claim takes
            # the task over meanwhile and counts this run as dead.
            backend.execute("UPDATE harness_runs SET lease_expires_at = 0 WHERE thread_id = 't'")
            assert backend.execute(*claim("t", "other:1:x", 60.0, resuming=False))
            return {"messages": [AIMessage("late")]}

        builder = StateGraph(MessagesState)
        builder.add_node("stalled", stalled)
        builder.add_edge(START, "stalled")
        builder.add_edge("stalled", END)
        with TaskRunner(backend, builder, max_recoveries=0) as runner:
            run = runner.execute("t")  # its next checkpoint write finds the lease gone
        assert (run.status, run.crashes) == ("running", 0)
        assert _row(backend, "t")["lease_owner"] == "other:1:x"


@pytest.mark.anyio
async def test_the_async_runner_fails_a_crash_looping_task_too(
    durable_url: str, anyio_backend: str
) -> None:
    with open_backend(durable_url) as backend:
        _insert(backend, "t")
        for _ in range(2):
            _die(backend, "t")
    async with await aopen_backend(durable_url) as abackend:
        async with AsyncTaskRunner(abackend, _answer(), max_recoveries=1) as runner:
            run = await runner.aexecute("t")
    assert (run.status, run.crashes) == ("failed", 2)
    assert run.error is not None and run.error.startswith("crashed its process 2 times")


def test_max_recoveries_is_checked_and_reaches_the_workers_runner(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        for bad in (-1, 1.5, True):
            with pytest.raises(UserError, match="max_recoveries must be None or an int >= 0"):
                TaskRunner(backend, _answer(), max_recoveries=bad)  # type: ignore[arg-type]
        assert TaskRunner(backend, _answer()).max_recoveries == 5
        assert _runner(backend, WorkerOptions(max_recoveries=2), POISON).max_recoveries == 2
        assert _runner(backend, WorkerOptions(max_recoveries=None), POISON).max_recoveries is None


def test_an_existing_database_gains_the_crash_count(durable_url: str) -> None:
    with open_backend(durable_url) as backend:  # as it was before the migration
        _insert(backend, "old")
        backend.execute("ALTER TABLE harness_runs DROP COLUMN crashes")
        backend.execute("ALTER TABLE harness_runs DROP COLUMN crashed_owner")
        backend.execute("DELETE FROM harness_migrations WHERE name = '0203_runs_crash_count'")
    with open_backend(durable_url) as backend:
        assert _row(backend, "old")["crashes"] == 0
        _die(backend, "old")
        _die(backend, "old")
        assert (_row(backend, "old")["crashes"], _row(backend, "old")["crashed_owner"]) == (
            1,
            "host:4242:dead",
        )
