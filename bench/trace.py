"""Tracing overhead per step: the Langfuse handler exporting to a loopback receiver vs untraced.

The same graph (agent → tools loop with a verification verdict on every tool call, scripted
model, checkpointed) runs untraced and traced, alternating, several times; the traced runs
export every span and score to a `LangfuseReceiver` on 127.0.0.1 over real OTLP/HTTP. Export
runs on the SDK's background threads, as in production: their work competes with the graph
for the GIL while it runs, and is counted that way; the final flush is outside the timed
region (it is a wait, not work per step), and the receiver's count proves every span arrived.
Reports the median time per superstep, the overhead in ms, and the ratio (target <= 1.3).

    python bench/trace.py [--turns 10] [--repeats 7] [--db memory|sqlite]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langfuse import get_client
from langgraph.graph import START, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from checkpointers import open_backend
from harness_nodes import (
    HarnessState,
    ToolContract,
    VerifyToolOutputs,
    langfuse_callbacks,
)
from harness_nodes.testing import LangfuseReceiver, ScriptedChatModel, ai, tool_call


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    return json.dumps({"key": key, "value": "v" * 200})


def build(turns: int, checkpointer: Any) -> Any:
    script: list[Any] = [
        ai(tool_calls=[tool_call("lookup", {"key": f"k{i}"}, id=f"call-{i}")]) for i in range(turns)
    ]
    script.append(ai("done"))
    model = ScriptedChatModel(model_name="gpt-4o-mini", script=script)
    verify = VerifyToolOutputs({"lookup": ToolContract()})

    def agent(state: HarnessState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([lookup], wrap_tool_call=verify.wrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer)


def run_once(graph: Any, config: Any) -> int:
    out = graph.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    msgs = out["messages"]
    assert isinstance(msgs[-1], AIMessage) and msgs[-1].content == "done"
    return sum(1 for m in msgs if isinstance(m, AIMessage | ToolMessage))  # supersteps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--db", choices=["memory", "sqlite"], default="sqlite")
    args = p.parse_args()
    public_key = f"pk-lf-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, LangfuseReceiver() as receiver:
        url = "memory://" if args.db == "memory" else f"sqlite:///{tmp}/bench.db"
        with open_backend(url) as backend:
            graph = build(args.turns, backend.checkpointer)
            base: list[float] = []
            traced: list[float] = []
            for i in range(args.repeats + 1):  # the first round warms both paths up
                thread = f"bench-{i}"
                t0 = time.perf_counter()
                steps = run_once(graph, {"configurable": {"thread_id": thread + "-plain"}})
                t1 = time.perf_counter()
                config = langfuse_callbacks(
                    thread + "-traced",
                    task_type="bench",
                    public_key=public_key,
                    secret_key="sk-lf-bench",
                    base_url=receiver.base_url,
                )
                run_once(graph, config)
                t2 = time.perf_counter()
                if i:
                    base.append((t1 - t0) / steps)
                    traced.append((t2 - t1) / steps)
        get_client(public_key=public_key).flush()
        spans = len(receiver.spans)
    b, t = statistics.median(base), statistics.median(traced)
    print(f"backend={args.db} turns={args.turns} repeats={args.repeats} spans received={spans}")
    print(
        f"untraced: {b * 1000:.2f} ms/step   traced (Langfuse → loopback): {t * 1000:.2f} ms/step"
    )
    print(f"ratio traced/untraced: {t / b:.2f}x (target <= 1.30x)")


if __name__ == "__main__":
    main()
