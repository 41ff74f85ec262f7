"""Checkpoint-resume vs restart-from-scratch under injected crashes.

The same scripted tasks (a research-style agent: six tool calls whose results grow the prompt,
one of them an irreversible refund, then an answer) run to completion under a crash rate of
0%, 10% and 30% of steps. A crash kills the step in flight after its work was done (the model
call was paid for, the tool ran), the way SIGKILL would. Then:

- **resume**: the task carries on from its last checkpoint (``invoke(None)`` on the same
  thread, ``durability="sync"``, irreversible calls through the `EffectLedger`);
- **scratch**: the task starts again on a fresh thread (what a client retry does without the
  harness).

Printed per completed task: tokens billed (every model call, including those a crash threw
away), wall time, and irreversible effects that happened more than once. Ratios are
scratch / resume, measured in the same run on the same backend.

    python bench/resume.py [--tasks 12] [--db sqlite:///bench.db] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from checkpointers import Backend, open_backend
from harness_nodes import EffectLedger, current_effect, irreversible
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

STEPS_PER_TASK = 13  # 7 agent steps + 6 tool steps


class SimulatedCrash(BaseException):
    """The process died here (BaseException: nothing in the graph may catch it)."""


@dataclass
class Meter:
    """What one mode spent: tokens billed, effects made, crashes met."""

    tokens: int = 0
    crashes: int = 0
    steps: int = 0
    effects: dict[str, int] = field(default_factory=dict)


@dataclass
class Chaos:
    """Decides, step by step, whether the process dies (seeded)."""

    rate: float
    rng: random.Random

    def maybe_crash(self, meter: Meter) -> None:
        meter.steps += 1
        if self.rng.random() < self.rate:
            meter.crashes += 1
            raise SimulatedCrash()


def script(task: int) -> list[Any]:
    calls = [
        ("search", {"query": f"topic {task} background"}),
        ("read", {"doc": f"doc-{task}-1"}),
        ("read", {"doc": f"doc-{task}-2"}),
        ("search", {"query": f"topic {task} counterpoints"}),
        ("refund", {"order": f"order-{task}"}),
        ("read", {"doc": f"doc-{task}-3"}),
    ]
    turns: list[Any] = [
        ai(f"Step {i}: calling {name}.", tool_calls=[tool_call(name, args, id=f"call-{i}")])
        for i, (name, args) in enumerate(calls)
    ]
    turns.append(lambda msgs: f"Summary of {len(msgs)} messages for task {task}.")
    return turns


def build(backend: Backend, task: int, meter: Meter, chaos: Chaos) -> Any:
    model = ScriptedChatModel(script=script(task), model_name="gpt-4o-mini")
    ledger = EffectLedger(backend)
    corpus = "lorem ipsum dolor sit amet " * 60  # ~1.6 kB per tool result

    @tool
    def search(query: str) -> str:
        """Search the corpus."""
        return f"results for {query}: {corpus}"

    @tool
    def read(doc: str) -> str:
        """Read a document."""
        return f"{doc}: {corpus}"

    @irreversible
    @tool
    def refund(order: str) -> str:
        """Refund an order (irreversible)."""
        key = f"{order}"
        meter.effects[key] = meter.effects.get(key, 0) + 1
        return f"refunded {order} (key {current_effect().idempotency_key})"

    def agent(state: MessagesState) -> dict[str, list[BaseMessage]]:
        answer = model.invoke(state["messages"])
        usage = answer.usage_metadata or {"total_tokens": 0}
        meter.tokens += int(usage["total_tokens"])  # billed even if the crash loses it
        chaos.maybe_crash(meter)
        return {"messages": [answer]}

    tools: list[BaseTool] = [search, read, refund]

    def tools_step(request: Any, execute: Callable[[Any], Any]) -> Any:
        out = ledger.wrap_tool_call(request, execute)
        chaos.maybe_crash(meter)
        return out

    inner = ToolNode(tools, wrap_tool_call=tools_step)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", inner)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=backend.checkpointer)


def run_task(backend: Backend, mode: str, task: int, rate: float, seed: int, meter: Meter) -> None:
    chaos = Chaos(rate, random.Random(f"{seed}-{rate}-{task}"))
    graph = build(backend, task, meter, chaos)
    inputs: Any = {"messages": [HumanMessage(f"Research topic {task} and refund its order.")]}
    attempt = 0
    while True:
        retry = f"-{attempt}" if mode.endswith("scratch") else ""
        thread = f"{mode}-{rate}-{task}{retry}"
        try:
            graph.invoke(inputs, {"configurable": {"thread_id": thread}}, durability="sync")
            return
        except SimulatedCrash:
            attempt += 1
            if mode.endswith("resume"):
                inputs = None  # carry on from the last checkpoint


def measure(
    backend: Backend, modes: tuple[str, ...], rate: float, tasks: int, seed: int
) -> dict[str, dict[str, float]]:
    """Run every task in every mode, interleaved task by task so drift hits all modes alike."""
    meters = {m: Meter() for m in modes}
    walls = dict.fromkeys(modes, 0.0)
    for task in range(tasks):
        for mode in modes:
            start = time.perf_counter()
            run_task(backend, mode, task, rate, seed, meters[mode])
            walls[mode] += time.perf_counter() - start
    return {
        mode: {
            "tokens": m.tokens / tasks,
            "seconds": walls[mode] / tasks,
            "crashes": m.crashes / tasks,
            "steps": m.steps / tasks,
            "dup_effects": sum(n - 1 for n in m.effects.values()),
        }
        for mode, m in meters.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--db", default=None, help="backend URL (default: a temp SQLite file)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'bench.db'}"
        with open_backend(url) as backend:
            print(f"backend {backend.url}, {args.tasks} tasks of {STEPS_PER_TASK} steps per cell")
            header = (
                f"{'crash rate':>10} | {'mode':>7} | {'tokens/task':>11} | {'ms/task':>8} | "
                f"{'crashes':>7} | {'steps':>6} | {'dup effects':>11}"
            )
            print(header)
            print("-" * len(header))
            measure(backend, ("warmup-resume", "warmup-scratch"), 0.0, 2, args.seed)
            ratios = []
            for rate in (0.0, 0.1, 0.3):
                cells = measure(backend, ("resume", "scratch"), rate, args.tasks, args.seed)
                for mode, c in cells.items():
                    print(
                        f"{rate:>10.0%} | {mode:>7} | {c['tokens']:>11.0f} | "
                        f"{c['seconds'] * 1000:>8.1f} | {c['crashes']:>7.1f} | "
                        f"{c['steps']:>6.1f} | {c['dup_effects']:>11.0f}"
                    )
                r, s = cells["resume"], cells["scratch"]
                ratios.append((rate, s["tokens"] / r["tokens"], s["seconds"] / r["seconds"], r, s))
            print()
            print(
                f"{'crash rate':>10} | {'tokens scratch/resume':>21} | {'token saving':>12} | "
                f"{'time scratch/resume':>19}"
            )
            for rate, tok, sec, r, s in ratios:
                saving = 1 - r["tokens"] / s["tokens"]
                print(f"{rate:>10.0%} | {tok:>21.2f} | {saving:>12.0%} | {sec:>19.2f}")


if __name__ == "__main__":
    main()
