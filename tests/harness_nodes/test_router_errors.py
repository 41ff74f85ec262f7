"""A router that raises never ends a task with a tool call nobody reviewed nor ran.

LangGraph runs a conditional edge's router inside the task of the node it leaves, after that
node's writes: a router that raises leaves those writes recorded and no branch, and a resume
(or a runner's retry) from there ends the run at once, the model's tool call unanswered. The
harness's routers send their error to a node that routes again (``reroute_after_<node>``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command

from checkpointers import Backend, open_backend
from harness_nodes import (
    ReviewPolicy,
    ReviewQueue,
    ReviewQueueMiddleware,
    TaskRunner,
    add_harness,
    build_harnessed_agent,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

ASK = {"messages": [HumanMessage("refund A1")]}
REFUNDED: list[float] = []


@tool
def refund(order: str, amount: float) -> str:
    """Refund an order."""
    REFUNDED.append(amount)
    return f"refunded {amount} on {order}"


class FlakyRule:
    """An argument rule that raises on its first *failures* calls (a transient error)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, args: dict[str, Any]) -> str | bool:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("rule backend timed out")
        return args["amount"] > 100 and "refund over $100"


def script() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250}, id="call_1")]),
            ai("Refunded."),
        ]
    )


@pytest.fixture
def durable(durable_url: str) -> Iterator[Backend]:
    REFUNDED.clear()
    with open_backend(durable_url) as backend:
        yield backend


def config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id}}


def paused_on_refund(graph: Any, cfg: Any) -> None:
    """The run waits on a review of ``call_1``: nothing ran, nothing is recorded as done."""
    snapshot = graph.get_state(cfg)
    [pause] = snapshot.interrupts
    [request] = pause.value
    assert (request["tool_call_id"], request["reason"]) == ("call_1", "refund over $100")
    assert snapshot.next
    assert REFUNDED == []


def agent(backend: Backend, rule: FlakyRule) -> Any:
    policy = ReviewPolicy(rules={"refund": rule})
    return build_harnessed_agent(script(), [refund], review_policy=policy).copy(
        update={"checkpointer": backend.checkpointer}
    )


def test_rule_raising_once_still_pauses_for_review(durable: Backend) -> None:
    graph = agent(durable, FlakyRule(failures=1))
    graph.invoke(ASK, config("t1"), durability="sync")
    paused_on_refund(graph, config("t1"))
    out = graph.invoke(Command(resume={"type": "approve"}), config("t1"), durability="sync")
    assert out["messages"][-1].content == "Refunded."
    assert REFUNDED == [250]


def test_rule_raising_until_resume_pauses_after_the_resume(durable: Backend) -> None:
    """A lasting error fails the run at the routing step, which a resume with None redoes."""
    graph = agent(durable, FlakyRule(failures=2))
    with pytest.raises(RuntimeError, match="rule backend timed out"):
        graph.invoke(ASK, config("t2"), durability="sync")
    assert graph.get_state(config("t2")).next == ("reroute_after_agent",)
    graph.invoke(None, config("t2"), durability="sync")  # as a user would after a crash
    paused_on_refund(graph, config("t2"))


def test_runner_retry_after_a_raising_rule_pauses_instead_of_completing(
    durable: Backend,
) -> None:
    rule = FlakyRule(failures=2)  # the first attempt fails; the runner's retry routes again

    def build(backend: Backend) -> Any:
        return build_harnessed_agent(
            script(), [refund], review_policy=ReviewPolicy(rules={"refund": rule})
        )

    with TaskRunner(durable, build, max_attempts=3) as runner:
        runner.submit("order-A1", ASK)
        run = runner.status("order-A1")
        for _ in range(200):
            if run.status not in ("pending", "running"):
                break
            time.sleep(0.05)
            run = runner.status("order-A1")
        assert (run.status, run.outcome) == ("interrupted", None)
        assert rule.calls >= 3
        paused_on_refund(runner.graph, config(run.thread_id))
        [item] = ReviewQueue(durable, runner.graph).pending()
        assert (item.thread_id, item.reason) == (run.thread_id, "argument_rule")


def _user_graph(route: Callable[[MessagesState], str]) -> StateGraph[Any]:
    model = script()

    def llm(state: MessagesState) -> dict[str, list[Any]]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("llm", llm)
    builder.add_node("tool_node", ToolNode([refund]))
    builder.add_edge(START, "llm")
    builder.add_conditional_edges("llm", route, {"go": "tool_node", "done": END})
    builder.add_edge("tool_node", "llm")
    return builder


def test_add_harness_user_router_raising_once_is_routed_again(durable: Backend) -> None:
    """The user's router, wrapped with the review detour, raising once after the review."""
    raised: list[bool] = []

    def should_continue(state: MessagesState) -> str:
        last = state["messages"][-1]
        if not raised:
            raised.append(True)
            raise RuntimeError("router hiccup")
        return "go" if isinstance(last, AIMessage) and last.tool_calls else "done"

    builder = add_harness(
        _user_graph(should_continue),
        model_node="llm",
        tools_node="tool_node",
        review_policy=ReviewPolicy(never=["refund"]),
        tools=[refund],
    )
    graph = builder.compile(checkpointer=durable.checkpointer)
    out = graph.invoke(ASK, config("t4"), durability="sync")
    assert [type(m).__name__ for m in out["messages"]] == [
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    assert out["messages"][-1].content == "Refunded."
    assert REFUNDED == [250]


def test_middleware_rule_raising_once_pauses_on_resume(durable: Backend) -> None:
    """create_agent checks the policy in a node (after_model): its error fails that node
    alone, with no writes kept, so a resume checks again: no router loses a branch there."""
    policy = ReviewPolicy(rules={"refund": FlakyRule(failures=1)})
    graph = create_agent(
        script(),
        [refund],
        middleware=[ReviewQueueMiddleware(policy, tools=[refund])],
        checkpointer=durable.checkpointer,
    )
    with pytest.raises(RuntimeError, match="rule backend timed out"):
        graph.invoke(ASK, config("t5"), durability="sync")
    graph.invoke(None, config("t5"), durability="sync")
    paused_on_refund(graph, config("t5"))
    assert not any(
        isinstance(m, ToolMessage) for m in graph.get_state(config("t5")).values["messages"]
    )
