"""A task that exercises every harness decision, for the tracing tests.

Every layer is the real one from main: a `budgeted` model ladder (gpt-4o → gpt-4o-mini) in an
`Envelope`, `VerifyToolOutputs` and the `EffectLedger` inside the `ToolNode`, `HumanReview` in
front of the irreversible refund, and a `ReviewQueue` on which alice approves it. The known
sequence both trace views are checked against:

search (its output fails verification → retry) → search (ok) → the budget degrades the model
(the next gpt-4o call would not fit the envelope) → refund (pauses for review, approved by
alice through the queue, runs once through the effect ledger) → answer → completed.

Run as a module it is one *leg* of the task in its own process (see ``main``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode

from checkpointers import Backend, open_backend
from harness_nodes import (
    EffectLedger,
    Envelope,
    HarnessState,
    HumanReview,
    ReviewPolicy,
    ReviewQueue,
    ToolContract,
    VerifyToolOutputs,
    budgeted,
    current_effect,
    irreversible,
    langfuse_handler,
)
from harness_nodes._events import emit
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

BIG, SMALL = "gpt-4o", "gpt-4o-mini"
SECRET = "sk-live-THISMUSTNEVERLEAK0123456789"
SEARCH_FAILURE = "the output carries an error: error='rate limited'"
"""The real verifier's reason for the first search output."""
USAGE = {"input_tokens": 60, "output_tokens": 100}
# Two gpt-4o calls spend ~$0.0023 of the $0.0052 envelope; for the third, the prompt's
# worst case plus the 256 output tokens the envelope requires no longer fit on gpt-4o
# (measured: degrades with 0.0050-0.0053), so it runs on gpt-4o-mini.
ENVELOPE = Envelope(max_usd=0.0052)
SCRIPT = [
    ai(tool_calls=[tool_call("search", {"query": "order 42"}, id="call-s1")], usage=USAGE),
    ai(tool_calls=[tool_call("search", {"query": "order #42"}, id="call-s2")], usage=USAGE),
    ai(
        tool_calls=[
            tool_call(
                "refund",
                {"order": 42, "amount": 10, "api_key": SECRET, "card_number": "4111111111111111"},
                id="call-r1",
            )
        ],
        usage=USAGE,
    ),
    ai("Refunded 10 USD on order 42.", usage=USAGE),
]


def build(
    backend: Backend,
    *,
    hang_in_tools: Path | None = None,
    callbacks: list[BaseCallbackHandler] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """The task's graph, compiled on *backend*'s checkpointer (with *callbacks* bound)."""
    model = budgeted(
        [ScriptedChatModel(model_name=name, script=SCRIPT) for name in (BIG, SMALL)],
        envelope=ENVELOPE,
        backend=backend,
        task_type="refunds",
    )

    @tool
    def search(query: str) -> str:
        """Look an order up."""
        if hang_in_tools is not None:
            hang_in_tools.write_text("in tools")
            time.sleep(3600)  # the test kills us here (kill -9)
        if query == "order 42":  # the first try: a "successful" call carrying an error
            return json.dumps({"error": "rate limited"})
        return json.dumps({"order": 42, "status": "paid", "amount": 10})

    @irreversible
    @tool
    def refund(order: int, amount: int, api_key: str, card_number: str) -> str:
        """Refund an order (irreversible: runs through the effect ledger, at most once)."""
        key = current_effect().idempotency_key  # what a payment API would be given
        return json.dumps({"refund_id": f"rf-{key}", "status": "ok"})

    # Verification wraps the effect ledger, which wraps the call: no extra superstep.
    verify = VerifyToolOutputs(
        {"search": ToolContract(), "refund": ToolContract(side_effects=True)}
    )
    ledger = EffectLedger(backend)

    def wrap(request: Any, execute: Any) -> Any:
        return verify.wrap_tool_call(request, lambda r: ledger.wrap_tool_call(r, execute))

    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[search, refund])

    def agent(state: HarnessState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def after_agent(state: HarnessState) -> str:
        step = review.route(state)
        return "finish" if step == END else step

    def finish(state: HarnessState) -> dict[str, Any]:
        outcome = {"status": "completed", "partial_result": state["messages"][-1].text}
        emit("outcome", {"status": "completed", "reason": ""})
        return {"outcome": outcome}

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([search, refund], wrap_tool_call=wrap))
    builder.add_node("finish", finish)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", after_agent, ["review", "tools", "finish"])
    builder.add_edge("tools", "agent")
    builder.add_edge("finish", END)
    graph = builder.compile(checkpointer=backend.checkpointer)
    if not callbacks:
        return graph
    # What a TaskRunner binds: the handler, and the task type for the trace's tag.
    return graph.with_config(
        callbacks=callbacks, metadata={"harness_task_type": "refunds", **(metadata or {})}
    )


def first_input(thread_id: str) -> dict[str, Any]:
    """The task's input."""
    return {
        "messages": [HumanMessage("Refund order 42, it arrived broken.")],
        "task": {"task_id": thread_id, "task_type": "refunds"},
    }


def start(backend: Backend, graph: Any, thread_id: str, *, resume: bool = False) -> None:
    """Run until the review pause (``resume``: continue a crashed run) and queue the review."""
    queue = ReviewQueue(backend, graph)
    cfg: Any = {"configurable": {"thread_id": thread_id}}
    graph.invoke(None if resume else first_input(thread_id), cfg, durability="sync")
    queue.sync(thread_id)


def approve(backend: Backend, graph: Any, thread_id: str) -> dict[str, Any]:
    """Alice approves the pending refund through the queue, which resumes the run."""
    queue = ReviewQueue(backend, graph)
    (item,) = [i for i in queue.pending() if i.thread_id == thread_id]
    return queue.decide(item.id, {"type": "approve"}, reviewer="alice")


def run_to_end(
    backend: Backend,
    thread_id: str,
    callbacks: list[BaseCallbackHandler] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole task in this process: start, pause, review, resume, finish."""
    graph = build(backend, callbacks=callbacks, metadata=metadata)
    start(backend, graph, thread_id)
    return approve(backend, graph, thread_id)


def main(argv: list[str] | None = None) -> None:
    """One leg in its own process: ``start``/``crash``/``continue`` (to the pause), ``resume``."""
    p = argparse.ArgumentParser()
    p.add_argument("leg", choices=["start", "resume", "crash", "continue"])
    p.add_argument("--db", required=True)
    p.add_argument("--thread", required=True)
    p.add_argument("--hang-marker")
    args = p.parse_args(argv)
    handler = langfuse_handler(flush_interval=0.1, sensitive_fields=["card_number"])
    with open_backend(args.db) as backend:
        graph = build(
            backend,
            hang_in_tools=Path(args.hang_marker) if args.leg == "crash" else None,
            callbacks=[handler] if handler else None,
        )
        if args.leg == "resume":
            approve(backend, graph, args.thread)
        else:
            start(backend, graph, args.thread, resume=args.leg == "continue")
    sys.stdout.write("leg done\n")  # spans and scores are flushed by the SDK's atexit hook


if __name__ == "__main__":
    main()


def drop_in_two_tasks(state_schema: Any) -> StateGraph[Any]:
    """A user's ReAct loop with `add_harness` whose first task stops and whose second completes.

    Task 1: `search` comes back empty and the contract allows no retry (verification_failed);
    task 2, the user's next question on the thread: `search` finds "r", the model answers.
    """
    from langgraph.prebuilt import tools_condition

    from harness_nodes import ToolContract, add_harness

    @tool
    def search(query: str) -> list[str]:
        """Search."""
        return [] if query == "x" else ["r"]

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("search", {"query": "x"})]),  # task 1: empty, no retry
            ai(tool_calls=[tool_call("search", {"query": "y"})]),  # task 2: fine
            ai("Found r."),
        ]
    )
    builder: StateGraph[Any] = StateGraph(state_schema)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    add_harness(
        builder,
        model_node="agent",
        tools_node="tools",
        contracts={"search": ToolContract(max_retries=0)},
    )
    return builder
