"""Child processes for the budget tests: ``python -m tests.harness_nodes._budget_children``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from langchain_core.messages import HumanMessage

from checkpointers import open_backend
from checkpointers._spend import flush_pending
from harness_nodes import Envelope, Envelopes, WindowCap, budgeted
from harness_nodes.testing import ScriptedChatModel
from tests.harness_nodes._budget_graphs import guarded_loop, runaway_llm

LONG = "word " * 8000


def _spent(backend: Any, task_id: str) -> int:
    flush_pending(backend)
    rows = backend.execute(
        "SELECT COALESCE(SUM(cost_nanos), 0) AS n FROM harness_spend WHERE task_id = %s",
        (task_id,),
    )
    return int(rows[0]["n"])


def runaway(url: str, thread_id: str, resume: bool) -> None:
    with open_backend(url) as backend:
        graph = guarded_loop(runaway_llm(backend)).compile(checkpointer=backend.checkpointer)
        config: Any = {"configurable": {"thread_id": thread_id}, "recursion_limit": 10_000}
        inputs = None if resume else {"messages": [HumanMessage("research this forever")]}
        out = graph.invoke(inputs, config, durability="sync")
        outcome = out.get("outcome") or {}
        print(
            json.dumps(
                {
                    "status": outcome.get("status"),
                    "tool_results": len(outcome.get("partial_result", {}).get("tool_results", [])),
                    "spent_nanos": _spent(backend, thread_id),
                }
            )
        )


def window(url: str, prefix: str, tasks: int, cap_usd: float) -> None:
    """Run *tasks* tasks of type "research" that each want to spend, sharing a daily cap."""
    with open_backend(url, pool_size=4) as backend:
        model = ScriptedChatModel(
            script=[lambda _: (time.sleep(0.02), LONG)[1]], loop=True, model_name="gpt-4o"
        )
        llm = budgeted(
            model,
            envelope=Envelopes(
                default=Envelope(max_usd=0),
                by_type={"research": Envelope(max_usd=1.0, type_cap=WindowCap(max_usd=cap_usd))},
            ),
            backend=backend,
        )
        answered = 0
        for i in range(tasks):
            config: Any = {"configurable": {"thread_id": f"{prefix}-{i}", "task_type": "research"}}
            msg = llm.invoke([HumanMessage("write a long report")], config)
            answered += 0 if msg.additional_kwargs["harness"]["budget"].get("stopped") else 1
        print(json.dumps({"answered": answered}))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "runaway":
        runaway(args[0], args[1], resume=args[2] == "resume")
    elif mode == "window":
        window(args[0], args[1], int(args[2]), float(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
