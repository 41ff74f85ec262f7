"""`HarnessState` reducers, exercised in real graphs on every backend."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph

from checkpointers import Backend
from harness_nodes import HarnessState, Outcome, Spend, Verdict
from harness_nodes.state import keep_first_outcome, merge_spend


def _verdict(call: str, ok: bool) -> Verdict:
    return {
        "tool": "search",
        "tool_call_id": call,
        "ok": ok,
        "reasons": [] if ok else ["empty result"],
        "attempt": 1,
        "action": "ok" if ok else "retry",
    }


def _graph() -> StateGraph[HarnessState]:
    def stop(state: HarnessState) -> dict[str, Any]:
        spend: Spend = {"usd": 0.10, "calls": 1, "model": "gpt-4o", "total_tokens": 900}
        outcome: Outcome = {"status": "budget_exhausted", "reason": "usd limit"}
        return {"spend": spend, "outcome": outcome, "verdicts": [_verdict("c1", False)]}

    def later(state: HarnessState) -> dict[str, Any]:
        # A later node reports more spend and tries to overwrite the outcome.
        spend: Spend = {"usd": 0.25, "calls": 2}
        outcome: Outcome = {"status": "completed"}
        return {"spend": spend, "outcome": outcome, "verdicts": [_verdict("c2", True)]}

    def silent(state: HarnessState) -> dict[str, Any]:
        return {"outcome": None, "messages": [HumanMessage("done")]}

    builder = StateGraph(HarnessState)
    builder.add_node("stop", stop)
    builder.add_node("later", later)
    builder.add_node("silent", silent)
    builder.add_edge(START, "stop")
    builder.add_edge("stop", "later")
    builder.add_edge("later", "silent")
    builder.add_edge("silent", END)
    return builder


def test_reducers_keep_first_outcome_merge_spend_append_verdicts(backend: Backend) -> None:
    graph = _graph().compile(checkpointer=backend.checkpointer)
    config = {"configurable": {"thread_id": "reducers"}}
    graph.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    # Read back from the checkpoint, not the return value: the reducers' result is durable.
    values = graph.get_state(config).values
    assert values["outcome"] == {"status": "budget_exhausted", "reason": "usd limit"}
    assert values["spend"] == {"usd": 0.25, "calls": 2, "model": "gpt-4o", "total_tokens": 900}
    assert [v["tool_call_id"] for v in values["verdicts"]] == ["c1", "c2"]


def test_outcome_reducer_ignores_none_and_keeps_the_first() -> None:
    first: Outcome = {"status": "verification_failed", "reason": "bad output"}
    assert keep_first_outcome(None, None) is None
    assert keep_first_outcome(first, None) is first
    assert keep_first_outcome(first, {"status": "completed"}) is first


def test_spend_reducer_tolerates_missing_sides() -> None:
    assert merge_spend(None, None) == {}
    assert merge_spend(None, {"usd": 1.0}) == {"usd": 1.0}
    assert merge_spend({"usd": 1.0}, None) == {"usd": 1.0}
    current: Spend = {"usd": 1.0}
    merge_spend(current, {"usd": 2.0})
    assert current == {"usd": 1.0}  # reducers must not mutate checkpointed values
