"""A task that exercises every harness decision, for the tracing tests and the benchmark.

Verification and effects are the real layers (`VerifyToolOutputs` and `EffectLedger` inside
the `ToolNode`). Until the budget and review layers land on main, this graph stands in for
them: it does what their
contracts (docs/decisions/0001) say they do — emits the ``harness.*`` events, writes the
message metadata under ``additional_kwargs["harness"]`` and the ledger rows — so both trace
views can be checked against a known sequence:

search (fails verification → retry) → search (ok) → budget degrades the model → refund
(pauses for review, approved by alice, runs through the effect ledger) → answer → completed.

Run as a module it is one *leg* of the task in its own process (see ``main``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt

from checkpointers import Backend, open_backend
from harness_nodes import (
    EffectLedger,
    HarnessState,
    ReviewRecord,
    ToolContract,
    VerifyToolOutputs,
    current_effect,
    irreversible,
    langfuse_callbacks,
)
from harness_nodes._events import emit
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

BIG, SMALL = "gpt-4o", "gpt-4o-mini"
SECRET = "sk-live-THISMUSTNEVERLEAK0123456789"
SCRIPT = [
    ai(tool_calls=[tool_call("search", {"query": "order 42"}, id="call-s1")]),
    ai(tool_calls=[tool_call("search", {"query": "order #42"}, id="call-s2")]),
    ai(
        tool_calls=[
            tool_call(
                "refund",
                {"order": 42, "amount": 10, "api_key": SECRET, "card_number": "4111111111111111"},
                id="call-r1",
            )
        ]
    ),
    ai("Refunded 10 USD on order 42."),
]
SEARCH_FAILURE = "the output carries an error: error='rate limited'"
"""The real verifier's reason for the first search output."""
PRICES = {BIG: (2.5e-6, 10e-6), SMALL: (0.15e-6, 0.6e-6)}  # USD per token (in, out)


def _turn(messages: list[Any]) -> int:
    return sum(1 for m in messages if isinstance(m, AIMessage))


def build(backend: Backend, *, hang_in_tools: Path | None = None) -> Any:
    """The task's graph, compiled on *backend*'s checkpointer."""
    models = {name: ScriptedChatModel(model_name=name, script=SCRIPT) for name in PRICES}

    def agent(state: HarnessState) -> dict[str, Any]:
        turn = _turn(state["messages"])
        task_id = (state.get("task") or {}).get("task_id", "task")
        model = SMALL if turn >= 2 else BIG
        if model == SMALL:
            emit(
                "budget.degrade",
                {
                    "task_id": task_id,
                    "from_model": BIG,
                    "to_model": SMALL,
                    "reason": "next call would not fit",
                },
            )
        msg = models[model].invoke(state["messages"])
        usage = msg.usage_metadata or {"input_tokens": 0, "output_tokens": 0}
        pin, pout = PRICES[model]
        usd = usage["input_tokens"] * pin + usage["output_tokens"] * pout
        spent = (
            sum(
                int(r["cost_nanos"])
                for r in backend.execute(
                    "SELECT cost_nanos FROM harness_spend WHERE task_id = %s", (task_id,)
                )
            )
            / 1e9
        )
        backend.execute(
            "INSERT INTO harness_spend (task_id, task_type, model, state, input_tokens, "
            "output_tokens, cost_nanos, created_at, settled_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                task_id,
                "refunds",
                model,
                "settled",
                usage["input_tokens"],
                usage["output_tokens"],
                round(usd * 1e9),
                time.time(),
                time.time(),
            ),
        )
        emit(
            "budget.settle",
            {
                "task_id": task_id,
                "model": model,
                "input_tokens": usage["input_tokens"],
                "output_tokens": usage["output_tokens"],
                "usd": usd,
                "spent_usd": spent + usd,
                "limit_usd": 1.0,
            },
        )
        budget = {
            "model": model,
            "degraded_from": BIG if model == SMALL else None,
            "reserved_usd": usd * 2,
            "spent_usd": usd,
        }
        msg.additional_kwargs["harness"] = {"budget": budget}
        return {"messages": [msg]}

    def review(state: HarnessState) -> dict[str, Any]:
        last = state["messages"][-1]
        assert isinstance(last, AIMessage)
        decision = interrupt(
            {
                "action_request": {"action": "refund", "args": last.tool_calls[0]["args"]},
                "description": "Refunds need a person",
                "reason": "irreversible",
                "risk": "high",
            }
        )
        record: ReviewRecord = {
            "review_id": decision["review_id"],
            "tool_call_ids": [c["id"] or "" for c in last.tool_calls],
            "decision": decision["type"],
            "reviewer": decision["reviewer"],
        }
        emit(
            "review.decision",
            {
                "review_id": decision["review_id"],
                "decision": decision["type"],
                "reviewer": decision["reviewer"],
                "args_before": last.tool_calls[0]["args"],
                "args_after": last.tool_calls[0]["args"],
                "message": "",
            },
        )
        return {"reviews": [record]}

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

    # The real verification and effect layers, inside the tool node (no extra superstep):
    # verification wraps the ledger, which wraps the call.
    verify = VerifyToolOutputs(
        {"search": ToolContract(), "refund": ToolContract(side_effects=True)}
    )
    ledger = EffectLedger(backend)

    def wrap(request: Any, execute: Any) -> Any:
        return verify.wrap_tool_call(request, lambda r: ledger.wrap_tool_call(r, execute))

    tools = ToolNode([search, refund], wrap_tool_call=wrap)

    def finish(state: HarnessState) -> dict[str, Any]:
        outcome = {"status": "completed", "partial_result": state["messages"][-1].text}
        emit("outcome", {"status": "completed", "reason": ""})
        return {"outcome": outcome}

    def after_agent(state: HarnessState) -> str:
        last = state["messages"][-1]
        assert isinstance(last, AIMessage)
        if not last.tool_calls:
            return "finish"
        return "review" if any(c["name"] == "refund" for c in last.tool_calls) else "tools"

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("review", review)
    builder.add_node("tools", tools)
    builder.add_node("finish", finish)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", after_agent, ["review", "tools", "finish"])
    builder.add_edge("review", "tools")
    builder.add_edge("tools", "agent")
    builder.add_edge("finish", END)
    return builder.compile(checkpointer=backend.checkpointer)


def first_input(thread_id: str) -> dict[str, Any]:
    """The task's input."""
    return {
        "messages": [HumanMessage("Refund order 42, it arrived broken.")],
        "task": {"task_id": thread_id, "task_type": "refunds"},
    }


def record_review(
    backend: Backend, graph: Any, thread_id: str, *, latency: float = 90.0
) -> dict[str, Any]:
    """Do what the review queue does: file the pending interrupt, then alice approves it."""
    state = graph.get_state({"configurable": {"thread_id": thread_id}})
    (intr,) = state.interrupts
    review_id = f"rev-{thread_id}"
    created = time.time()
    backend.execute(
        "INSERT INTO harness_reviews (id, thread_id, interrupt_id, task_type, reason, risk, "
        "request, status, created_at, decision, decided_by, decided_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            review_id,
            thread_id,
            intr.id,
            "refunds",
            "irreversible",
            "high",
            json.dumps(intr.value),
            "decided",
            created,
            json.dumps({"type": "approve"}),
            "alice",
            created + latency,
        ),
    )
    backend.execute(
        "INSERT INTO harness_review_audit (review_id, reviewer, decision, at) "
        "VALUES (%s, %s, %s, %s)",
        (review_id, "alice", "approve", created + latency),
    )
    return {"type": "approve", "reviewer": "alice", "review_id": review_id}


def run_to_end(
    backend: Backend, thread_id: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the whole task in this process: start, pause, review, resume, finish."""
    graph = build(backend)
    cfg: Any = config or {"configurable": {"thread_id": thread_id}}
    graph.invoke(first_input(thread_id), cfg, durability="sync")
    decision = record_review(backend, graph, thread_id)
    out: dict[str, Any] = graph.invoke(Command(resume=decision), cfg, durability="sync")
    return out


def main(argv: list[str] | None = None) -> None:
    """One leg in its own process: ``start`` (until the review pause), ``resume``, ``crash``."""
    p = argparse.ArgumentParser()
    p.add_argument("leg", choices=["start", "resume", "crash", "continue"])
    p.add_argument("--db", required=True)
    p.add_argument("--thread", required=True)
    p.add_argument("--hang-marker")
    args = p.parse_args(argv)
    with open_backend(args.db) as backend:
        graph = build(
            backend, hang_in_tools=Path(args.hang_marker) if args.leg == "crash" else None
        )
        config = langfuse_callbacks(
            args.thread, task_type="refunds", flush_interval=0.1, sensitive_fields=["card_number"]
        )
        if args.leg in {"start", "crash"}:
            graph.invoke(first_input(args.thread), config, durability="sync")
        elif args.leg == "continue":
            graph.invoke(None, config, durability="sync")
        else:
            decision = record_review(backend, graph, args.thread)
            graph.invoke(Command(resume=decision), config, durability="sync")
    sys.stdout.write("leg done\n")  # spans and scores are flushed by the SDK's atexit hook


if __name__ == "__main__":
    main()
