"""Child processes for the multi-process tests (run as ``python -m tests.checkpointers._children``).

``startup URL BARRIER_DIR INDEX``: wait at a file barrier, then `open_backend(URL)` and
report what it saw. ``steps URL THREAD LOG CRASH_AT``: run (or resume) the 10-step graph,
killing itself with SIGKILL inside step CRASH_AT (0 = never).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from checkpointers import open_backend

STEPS = 10


def _wait_at_barrier(barrier: Path, index: int) -> None:
    (barrier / f"ready-{index}").touch()
    deadline = time.monotonic() + 30
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("barrier never opened")
        time.sleep(0.001)


def startup(url: str, barrier: str, index: str) -> None:
    _wait_at_barrier(Path(barrier), int(index))
    started = time.time()
    with open_backend(url) as backend:
        names = [r["name"] for r in backend.execute("SELECT name FROM harness_migrations")]
        backend.checkpointer.get_tuple({"configurable": {"thread_id": "probe"}})
    print(json.dumps({"index": int(index), "started": started, "migrations": names}))


class StepState(TypedDict):
    done: list[int]


def _append_durably(log: Path, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def steps_graph(log: Path, crash_at: int) -> StateGraph[StepState]:
    builder = StateGraph(StepState)

    def make_step(k: int) -> Any:
        def step(state: StepState) -> dict[str, Any]:
            _append_durably(log, f"start {k}")
            if k == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-step, after earlier steps committed
            _append_durably(log, f"end {k}")
            return {"done": [*state["done"], k]}

        return step

    for k in range(1, STEPS + 1):
        builder.add_node(f"step_{k}", make_step(k))
        builder.add_edge(START if k == 1 else f"step_{k - 1}", f"step_{k}")
    builder.add_edge(f"step_{STEPS}", END)
    return builder


def steps(url: str, thread_id: str, log: str, crash_at: str) -> None:
    with open_backend(url) as backend:
        graph = steps_graph(Path(log), int(crash_at)).compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": thread_id}}
        resuming = graph.get_state(config).next != ()
        out = graph.invoke(None if resuming else {"done": []}, config, durability="sync")
    print(json.dumps({"resumed": resuming, "done": out["done"]}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"startup": startup, "steps": steps}[command](*args)
