"""A task whose run kills its process every time, as an OOM kill or a native crash does.

Imported by path in child processes: ``tests.harness_nodes._poison_graph:build``. The node
``work`` records that it started (``poison_starts``, in the backend's own database, so every
process sees the count), then ends the process with ``os._exit(137)``: no exception, no
``finally``, no settle, the lease left to expire, exactly like a SIGKILL.
"""

from __future__ import annotations

import os
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph

from checkpointers import Backend


def starts(backend: Backend, thread_id: str) -> int:
    """How many times the node started on *thread_id*, in any process."""
    backend.execute("CREATE TABLE IF NOT EXISTS poison_starts (thread_id TEXT, pid INTEGER)")
    rows = backend.execute("SELECT pid FROM poison_starts WHERE thread_id = %s", (thread_id,))
    return len(rows)


def build(backend: Backend) -> StateGraph[MessagesState]:
    backend.execute("CREATE TABLE IF NOT EXISTS poison_starts (thread_id TEXT, pid INTEGER)")

    def work(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        thread_id = config["configurable"]["thread_id"]
        backend.execute(
            "INSERT INTO poison_starts (thread_id, pid) VALUES (%s, %s)", (thread_id, os.getpid())
        )
        if os.environ.get("POISON_SPARE") != "1":
            os._exit(137)
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    return builder
