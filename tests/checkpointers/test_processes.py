"""Durability across processes: concurrent start-up, and SIGKILL mid-graph then resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from checkpointers import open_backend
from checkpointers._schema import MIGRATIONS
from tests.checkpointers._children import STEPS
from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow

CHILD = [sys.executable, "-m", "tests.checkpointers._children"]
WORKERS = 4


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def _wait_for(paths: list[Path], procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 60
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"a child exited before the barrier: {err}")
        assert time.monotonic() < deadline, "children never reached the barrier"
        time.sleep(0.01)


def test_concurrent_startup_on_a_fresh_database(durable_url: str, tmp_path: Path) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_spawn("startup", durable_url, str(barrier), str(i)) for i in range(WORKERS)]
    # Every child has imported everything and waits; open the gate for all at once.
    _wait_for([barrier / f"ready-{i}" for i in range(WORKERS)], procs)
    (barrier / "go").touch()
    results: list[dict[str, Any]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["index"] for r in results) == list(range(WORKERS))
    expected = sorted(m.name for m in MIGRATIONS)
    assert all(sorted(r["migrations"]) == expected for r in results)
    # The barrier released them together (loose bound: the test machine may be loaded).
    starts = [r["started"] for r in results]
    assert max(starts) - min(starts) < 2.0
    with open_backend(durable_url) as backend:
        rows = backend.execute("SELECT name FROM harness_migrations")
        assert sorted(r["name"] for r in rows) == expected  # each recorded once, by one process
        assert backend.execute("SELECT count(*) AS n FROM harness_runs") == [{"n": 0}]


@pytest.mark.parametrize("crash_at", [4])
def test_sigkill_mid_graph_resumes_without_rerunning_completed_steps(
    durable_url: str, tmp_path: Path, crash_at: int
) -> None:
    log = tmp_path / "steps.log"
    thread_id = f"crash-{uuid.uuid4().hex[:8]}"

    first = _spawn("steps", durable_url, thread_id, str(log), str(crash_at))
    _, err = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, err
    before = log.read_text().splitlines()
    ran = [f"start {k}" for k in range(1, crash_at + 1)]
    assert before == [x for k in range(1, crash_at) for x in (f"start {k}", f"end {k}")] + [
        f"start {crash_at}"
    ], before
    assert [line for line in before if line.startswith("start")] == ran

    second = _spawn("steps", durable_url, thread_id, str(log), "0")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    result = json.loads(out)
    assert result == {"resumed": True, "done": list(range(1, STEPS + 1))}

    lines = log.read_text().splitlines()
    ends = [int(line.split()[1]) for line in lines if line.startswith("end")]
    starts = [int(line.split()[1]) for line in lines if line.startswith("start")]
    assert ends == list(range(1, STEPS + 1)), "a completed step ran again"
    # Only the step that was killed mid-way runs a second time.
    assert starts == [*range(1, crash_at + 1), *range(crash_at, STEPS + 1)]
