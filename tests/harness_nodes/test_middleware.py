"""The harness as LangChain v1 middleware: ``create_agent`` with the same core objects."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Annotated, Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import (
    AgentMiddleware,
    ModelCallLimitMiddleware,
    ModelFallbackMiddleware,
    before_model,
    wrap_model_call,
)
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage, ToolMessage
from langchain_core.runnables import Runnable
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command
from pydantic import BaseModel

from checkpointers import AsyncBackend, Backend, aopen_backend, open_backend
from harness_nodes import (
    CostEnvelopeMiddleware,
    EffectLedger,
    EffectLedgerMiddleware,
    Envelope,
    ReviewPolicy,
    ReviewQueue,
    ReviewQueueMiddleware,
    ToolContract,
    Trace,
    UserError,
    VerifyToolOutputsMiddleware,
    budgeted,
    build_harnessed_agent,
    build_trace,
    irreversible,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

pytestmark = pytest.mark.anyio

REFUNDS: list[str] = []


@tool
def ping() -> str:
    """Ping."""
    return "pong"


@tool
def search(query: str) -> list[str]:
    """Search the notes."""
    return [] if query == "typo" else ["note-1"]


@irreversible
def refund(order: str, amount: float) -> str:
    """Refund an order."""
    REFUNDS.append(order)
    return f"refunded {amount} on {order}"


@pytest.fixture(autouse=True)
def _clear_refunds() -> None:
    REFUNDS.clear()


def _runaway() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("ping", {})])], loop=True, model_name="gpt-4o-mini"
    )


def _model_calls(messages: list[Any]) -> int:
    return sum(1 for m in messages if isinstance(m, AIMessage) and m.tool_calls)


def test_runaway_loop_stopped_across_resumes_unlike_model_call_limit(backend: Backend) -> None:
    """Each resume resets ModelCallLimitMiddleware's run counter; the envelope's spend persists."""
    resumes = 6
    limit = ModelCallLimitMiddleware(run_limit=3)
    theirs = create_agent(
        _runaway(),
        [ping],
        middleware=[limit],
        checkpointer=backend.checkpointer,
        interrupt_after=["tools"],
    )
    ours = create_agent(
        _runaway(),
        [ping],
        middleware=[CostEnvelopeMiddleware(Envelope(max_calls=3), backend=backend)],
        checkpointer=backend.checkpointer,
        interrupt_after=["tools"],
    )
    results = {}
    for name, agent in (("theirs", theirs), ("ours", ours)):
        cfg: Any = {"configurable": {"thread_id": f"runaway-{name}"}}
        out = agent.invoke({"messages": [HumanMessage("go")]}, cfg)
        for _ in range(resumes):  # each pause after the tools is resumed, as a runner would
            if not agent.get_state(cfg).next:
                break
            out = agent.invoke(None, cfg)
        results[name] = out
    # ModelCallLimitMiddleware never stops it: one call per run, the counter resets each time.
    assert _model_calls(results["theirs"]["messages"]) == resumes + 1
    assert "limit" not in results["theirs"]["messages"][-1].text
    # The envelope stops it at 3 calls, whatever the number of resumes.
    assert _model_calls(results["ours"]["messages"]) == 3
    assert results["ours"]["outcome"]["status"] == "budget_exhausted"
    assert "calls limit reached: used 3 of 3" in results["ours"]["outcome"]["reason"]
    assert results["ours"]["spend"]["calls"] == 3


def test_budget_error_exit_behavior_raises() -> None:
    from harness_nodes import BudgetExceeded

    with open_backend("memory://") as backend:
        budget = CostEnvelopeMiddleware(
            Envelope(max_calls=1, exit_behavior="error"), backend=backend
        )
        agent = create_agent(
            _runaway(), [ping], middleware=[budget], checkpointer=backend.checkpointer
        )
        with pytest.raises(BudgetExceeded) as info:
            agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "e"}})
        assert info.value.limit == "calls"


@pytest.mark.parametrize("way", ["invoke", "ainvoke"])
async def test_an_answer_the_budget_cut_short_ends_the_agent_as_a_budget_stop(way: str) -> None:
    # Each turn a tool call of 200 output tokens on gpt-4o, under $0.006: the third call fits
    # only with its output cap lowered below 200, and is cut there (its tool call lost).
    call = ai(tool_calls=[tool_call("ping", {})], usage={"input_tokens": 50, "output_tokens": 200})
    model = ScriptedChatModel(script=[call], loop=True, model_name="gpt-4o")
    envelope = Envelope(max_usd=0.006, max_output_tokens=256, min_output_tokens=64)
    with open_backend("memory://") as backend:
        agent = create_agent(
            model,
            [ping],
            middleware=[CostEnvelopeMiddleware(envelope, backend=backend)],
            checkpointer=backend.checkpointer,
        )
        state = {"messages": [HumanMessage("go")]}
        config: Any = {"configurable": {"thread_id": f"cut-{way}"}}
        out = agent.invoke(state, config) if way == "invoke" else await agent.ainvoke(state, config)

    cut, note = out["messages"][-2:]
    assert cut.response_metadata["finish_reason"] == "length" and not cut.tool_calls
    truncated = cut.additional_kwargs["harness"]["budget"]["truncated"]
    assert truncated["limit"] == "usd" and truncated["output_cap"] < 200
    assert note.content.startswith("Stopped: budget exhausted")
    assert out["outcome"]["status"] == "budget_exhausted"
    assert "the last answer was cut short" in out["outcome"]["reason"]
    results = out["outcome"]["partial_result"]["tool_results"]
    assert [r["content"] for r in results] == ["pong", "pong"]


def _search_model() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("search", {"query": "typo"})]),
            ai(tool_calls=[tool_call("search", {"query": "storage"})]),
            ai("Found note-1."),
        ],
        model_name="gpt-4o-mini",
    )


def _check_retried(out: dict[str, Any]) -> None:
    feedback = out["messages"][2]
    assert isinstance(feedback, ToolMessage) and feedback.status == "error"
    assert "empty" in feedback.text  # the model is told what was wrong
    assert [v["action"] for v in out["verdicts"]] == ["retry", "ok"]
    assert out["messages"][-1].text == "Found note-1."


def test_bad_tool_output_retried_with_feedback() -> None:
    agent = create_agent(
        _search_model(),
        [search],
        middleware=[VerifyToolOutputsMiddleware({"search": ToolContract()})],
    )
    _check_retried(agent.invoke({"messages": [HumanMessage("find storage notes")]}))


async def test_bad_tool_output_retried_with_feedback_async() -> None:
    agent = create_agent(
        _search_model(),
        [search],
        middleware=[VerifyToolOutputsMiddleware({"search": ToolContract()})],
    )
    _check_retried(await agent.ainvoke({"messages": [HumanMessage("find storage notes")]}))


def test_failed_verification_ends_the_agent() -> None:
    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("search", {"query": "typo"})])])
    verify = VerifyToolOutputsMiddleware({"search": ToolContract(max_retries=0)})
    out = create_agent(model, [search], middleware=[verify]).invoke(
        {"messages": [HumanMessage("x")]}
    )
    assert out["outcome"]["status"] == "verification_failed"
    assert _model_calls(out["messages"]) == 1  # no second model call


@tool
def find_notes(query: str) -> dict[str, Any]:
    """Look a query up in the knowledge base."""
    if query == "typo":
        return {"results": [], "total": 0}
    if query == "busy":
        return {"data": None, "response": {"error": "quota exceeded"}}
    return {"results": ["note-1"], "total": 1}


@tool
def read_docs(topic: str) -> str:
    """The API documentation on a topic."""
    return f"{topic.title()}\nOur API has a rate limit of 100 requests per minute."


def test_empty_wrappers_and_nested_errors_go_back_to_the_model_docs_do_not() -> None:
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("find_notes", {"query": "typo"})]),
            ai(tool_calls=[tool_call("find_notes", {"query": "busy"})]),
            ai(tool_calls=[tool_call("read_docs", {"topic": "rate limits"})]),
            ai(tool_calls=[tool_call("find_notes", {"query": "storage"})]),
            ai("Found note-1."),
        ]
    )
    contracts = {"find_notes": ToolContract(), "read_docs": ToolContract()}
    verify = VerifyToolOutputsMiddleware(contracts)
    out = create_agent(model, [find_notes, read_docs], middleware=[verify]).invoke(
        {"messages": [HumanMessage("find storage notes")]}
    )

    assert [(v["tool"], v["action"]) for v in out["verdicts"]] == [
        ("find_notes", "retry"),
        ("find_notes", "retry"),
        ("read_docs", "ok"),
        ("find_notes", "ok"),
    ]
    assert out["verdicts"][0]["reasons"] == ["empty result: {'results': [], 'total': 0}"]
    assert out["verdicts"][1]["reasons"] == [
        "the output carries an error: response.error='quota exceeded'"
    ]
    assert out["messages"][-1].text == "Found note-1."


@before_model
def keep_last_turn(state: Any, runtime: Runtime[Any]) -> dict[str, Any] | None:
    """The LangChain docs' trimming middleware: keep the first message and the last turn."""
    messages = state["messages"]
    if len(messages) <= 3:
        return None
    return {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), messages[0], *messages[-2:]]}


@pytest.mark.parametrize("trim_first", [True, False], ids=["trim-first", "verify-first"])
def test_retry_limit_holds_when_a_middleware_trims_the_history(trim_first: bool) -> None:
    """The refused outputs are trimmed away before each model call; `verdicts` keeps the
    count, so max_retries=2 stops a model that repeats the same bad call."""
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("search", {"query": "typo"})])], loop=True
    )
    verify = VerifyToolOutputsMiddleware({"search": ToolContract(max_retries=2)})
    middleware: list[Any] = [keep_last_turn, verify] if trim_first else [verify, keep_last_turn]
    agent = create_agent(model, [search], middleware=middleware)

    out = agent.invoke({"messages": [HumanMessage("find")]}, {"recursion_limit": 40})

    assert [(v["attempt"], v["action"]) for v in out["verdicts"]] == [
        (1, "retry"),
        (2, "retry"),
        (3, "fail"),
    ]
    assert out["outcome"]["status"] == "verification_failed"
    assert model.calls == 3


@pytest.mark.parametrize("trim", [False, True], ids=["whole-history", "trimmed"])
def test_a_new_task_on_the_thread_gets_its_full_retry_budget(trim: bool) -> None:
    """A chat app: task 1 exhausts search's retries (max_retries=1) and stops; the user's
    next question on the same thread is a new task, with one retry of its own again."""
    answers = iter(
        [
            ai(tool_calls=[tool_call("search", {"query": "typo"}, id="s1")]),
            ai(tool_calls=[tool_call("search", {"query": "typo"}, id="s2")]),
            ai(tool_calls=[tool_call("search", {"query": "typo"}, id="s3")]),
            ai(tool_calls=[tool_call("search", {"query": "storage"}, id="s4")]),
            ai("Found note-1."),
        ]
    )
    # In order, whatever the (trimmed) prompt: the script's turns count AI messages.
    model = ScriptedChatModel(script=[lambda _: next(answers)], loop=True)
    verify = VerifyToolOutputsMiddleware({"search": ToolContract(max_retries=1)})
    middleware: list[Any] = [verify, keep_last_turn] if trim else [verify]
    with open_backend("memory://") as backend:
        agent = create_agent(
            model, [search], middleware=middleware, checkpointer=backend.checkpointer
        )
        config: Any = {"configurable": {"thread_id": "chat-1"}}
        first = agent.invoke({"messages": [HumanMessage("find typo")]}, config)
        assert first["outcome"]["status"] == "verification_failed"

        second = agent.invoke({"messages": [HumanMessage("notes on storage?")]}, config)

    assert [(v["attempt"], v["action"]) for v in second["verdicts"]] == [
        (1, "retry"),
        (2, "fail"),
        (1, "retry"),
        (2, "ok"),
    ]
    assert second["messages"][-1].content == "Found note-1."
    assert model.calls == 5
    # task 1's verification_failed is not task 2's: task 2 answered
    assert second["outcome"] == {"status": "completed", "partial_result": "Found note-1."}


def _refund_agent(backend: Backend, extra: list[AgentMiddleware[Any, Any, Any]] = []) -> Any:  # noqa: B006
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 5})]),
            ai("Refunded."),
        ],
        model_name="gpt-4o-mini",
    )
    middleware: list[Any] = [
        ReviewQueueMiddleware(ReviewPolicy(irreversible=["refund"]), tools=[refund]),
        *extra,
        EffectLedgerMiddleware(backend),
    ]
    return create_agent(model, [refund], middleware=middleware, checkpointer=backend.checkpointer)


def test_irreversible_call_paused_listed_approved_resumed(backend: Backend) -> None:
    queue = ReviewQueue(backend, _refund_agent(backend))
    queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="r1")
    assert REFUNDS == []  # nothing ran before the review
    (item,) = queue.pending()
    assert item.thread_id == "r1"
    assert item.requests[0]["action_request"] == {
        "action": "refund",
        "args": {"order": "A1", "amount": 5},
    }
    with pytest.raises(Exception, match="decision"):
        queue.decide(item.id, {"type": "maybe"}, reviewer="ana")
    assert [i.id for i in queue.pending()] == [item.id]  # a bad decision leaves it pending
    out = queue.decide(item.id, {"type": "approve"}, reviewer="ana")
    assert out["messages"][-1].text == "Refunded."
    assert REFUNDS == ["A1"]
    assert queue.pending() == []
    assert [r.status for r in EffectLedger(backend).list("r1")] == ["done"]
    (record,) = out["reviews"]  # the decision, appended to the agent's state
    assert (record["review_id"], record["decision"], record["reviewer"]) == (
        item.id,
        "approve",
        "ana",
    )
    assert record["tool_call_ids"] == [item.requests[0]["tool_call_id"]]


def test_rejected_call_goes_back_to_the_model() -> None:
    with open_backend("memory://") as backend:
        queue = ReviewQueue(backend, _refund_agent(backend))
        queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="r2")
        (item,) = queue.pending()
        out = queue.decide(item.id, {"type": "reject", "message": "no"}, reviewer="bo")
        assert REFUNDS == []
        assert out["messages"][-1].text == "Refunded."  # the script's next turn


class _CrashAfterTool(AgentMiddleware[Any, Any, Any]):
    """Crash the process's run after the effect completed, before the step is saved."""

    def __init__(self) -> None:
        super().__init__()
        self.crashed = False

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[..., Any]) -> Any:
        result = handler(request)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("crash after the effect")
        return result


@pytest.mark.slow
def test_crash_mid_run_resumes_without_duplicate_effect(durable_url: str) -> None:
    cfg: Any = {"configurable": {"thread_id": "c1"}}
    with open_backend(durable_url) as backend:
        queue = ReviewQueue(backend, _refund_agent(backend, [_CrashAfterTool()]))
        queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="c1")
        (item,) = queue.pending()
        with pytest.raises(RuntimeError, match="crash after the effect"):
            queue.decide(item.id, {"type": "approve"}, reviewer="ana")
    assert REFUNDS == ["A1"]
    # A fresh backend and agent (nothing shared in memory with the crashed run) resume it.
    with open_backend(durable_url) as backend:
        agent = _refund_agent(backend)
        out = agent.invoke(None, cfg)
        assert out["messages"][-1].text == "Refunded."
        (record,) = EffectLedger(backend).list("c1")
        assert record.status == "done"
    assert REFUNDS == ["A1"]  # replayed from the ledger, not run again


def _decisions(trace: Trace) -> list[tuple[str, str]]:
    kinds = {"llm", "tool_call", "tool_result", "verdict", "budget", "interrupt", "review"}
    return [(n.kind, n.name) for n in trace.walk() if n.kind in kinds | {"effect", "outcome"}]


def test_same_agent_both_ways_same_trace() -> None:
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("search", {"query": "typo"})]),
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 5})]),
            ai("Done."),
        ],
        model_name="gpt-4o-mini",
    )
    envelope = Envelope(max_usd=0.05)
    contracts = {"search": ToolContract()}
    policy = ReviewPolicy(irreversible=["refund"])
    with open_backend("memory://") as backend:
        graph = build_harnessed_agent(
            budgeted(model, envelope=envelope, backend=backend),
            [search, refund],
            contracts=contracts,
            review_policy=policy,
            backend=backend,
        )
        agent = create_agent(
            model,
            [search, refund],
            middleware=[
                CostEnvelopeMiddleware(envelope, backend=backend),
                VerifyToolOutputsMiddleware(contracts),
                ReviewQueueMiddleware(policy, tools=[search, refund]),
                EffectLedgerMiddleware(backend),
            ],
            checkpointer=backend.checkpointer,
        )
        for thread, app in (("graph", graph), ("agent", agent)):
            queue = ReviewQueue(backend, app)
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id=thread)
            (item,) = queue.pending()
            queue.decide(item.id, {"type": "approve"}, reviewer="ana")
        by_graph, by_agent = build_trace(backend, "graph"), build_trace(backend, "agent")
    assert _decisions(by_graph) == _decisions(by_agent)
    assert ("verdict", "search: retry") in _decisions(by_agent)
    assert ("review", "approve by ana") in _decisions(by_agent)
    assert by_graph.status == by_agent.status == "completed"
    assert by_graph.cost_usd == pytest.approx(by_agent.cost_usd)


CHARGES: list[str] = []


@irreversible
def charge(card: str) -> dict[str, str]:
    """Charge a card."""
    CHARGES.append(card)
    return {"error": "gateway timeout"}


def test_bad_output_of_side_effecting_tool_escalates_to_the_queue_not_rerun() -> None:
    CHARGES.clear()
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("charge", {"card": "c1"})]), ai("Charged once.")]
    )
    with open_backend("memory://") as backend:
        agent = create_agent(
            model,
            [charge],
            middleware=[
                VerifyToolOutputsMiddleware(),
                ReviewQueueMiddleware(ReviewPolicy(), tools=[charge]),
                EffectLedgerMiddleware(backend),
            ],
            checkpointer=backend.checkpointer,
        )
        queue = ReviewQueue(backend, agent)
        queue.invoke({"messages": [HumanMessage("charge c1")]}, thread_id="x1")
        (item,) = queue.pending()
        assert item.requests[0]["kind"] == "escalation"
        assert CHARGES == ["c1"]
        out = queue.decide(
            item.id, {"type": "respond", "message": "It went through."}, reviewer="ana"
        )
        assert out["messages"][-1].text == "Charged once."
        assert CHARGES == ["c1"]  # verification never re-ran the side-effecting tool


@tool
def book(room: str) -> dict[str, str]:
    """Book a room."""
    return {"booking_id": "", "room": room}


@tool
def lookup(key: str) -> dict[str, str]:
    """Look a key up."""
    return {"error": "db down"}


@pytest.mark.parametrize("verify_first", [True, False], ids=["verify-first", "review-first"])
def test_a_sibling_fail_verdict_still_ends_the_agent_once_the_escalation_is_reviewed(
    verify_first: bool,
) -> None:
    """`book` escalates and `lookup` fails for good in one turn: after the reviewer answers
    the escalation the agent ends on the failure, whichever hook runs first."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    contracts = {
        "book": ToolContract(required=("booking_id",), side_effects=True),
        "lookup": ToolContract(on_fail="fail"),
    }
    calls = [tool_call("book", {"room": "A"}), tool_call("lookup", {"key": "k"})]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("All done, everything worked.")])
    verify = VerifyToolOutputsMiddleware(contracts)
    review = ReviewQueueMiddleware(ReviewPolicy(), tools=[book, lookup])
    middleware: list[Any] = [verify, review] if verify_first else [review, verify]
    agent = create_agent(model, [book, lookup], middleware=middleware, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    paused = agent.invoke({"messages": [HumanMessage("book A, look k up")]}, config)
    [request] = paused["__interrupt__"][0].value
    assert request["action_request"]["action"] == "book"

    out = agent.invoke(Command(resume={"type": "respond", "message": "booking id B-7"}), config)

    assert out["outcome"] == {
        "status": "verification_failed",
        "reason": "lookup: the output carries an error: error='db down'",
    }
    assert model.calls == 1
    assert out["messages"][-1].text.startswith("I stopped: a tool output failed verification.")


@tool
def pay(order: str) -> dict[str, str]:
    """Pay for an order (a side effect)."""
    return {"status": "failed", "error": "card declined"}


@pytest.mark.parametrize("verify_first", [True, False], ids=["verify-first", "review-first"])
def test_calls_left_after_a_rejection_wait_for_the_escalation_before_the_model(
    verify_first: bool,
) -> None:
    """As in the graph form: `ping` is rejected; of the calls left, `pay` escalates while
    `search` is fine, and the model answers once, after the escalation is decided."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    calls = [
        tool_call("ping", {}, id="p1"),
        tool_call("pay", {"order": "A1"}, id="c1"),
        tool_call("search", {"query": "a"}, id="s1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Payment held.")])
    verify = VerifyToolOutputsMiddleware({"pay": ToolContract(side_effects=True)})
    review = ReviewQueueMiddleware(ReviewPolicy(always=["ping"]), tools=[ping, pay, search])
    middleware: list[Any] = [verify, review] if verify_first else [review, verify]
    agent = create_agent(
        model, [ping, pay, search], middleware=middleware, checkpointer=InMemorySaver()
    )
    config = {"configurable": {"thread_id": "t"}}
    agent.invoke({"messages": [HumanMessage("go")]}, config)
    paused = agent.invoke(Command(resume={"type": "reject"}), config)
    [request] = paused["__interrupt__"][0].value
    assert (request["kind"], request["tool_call_id"]) == ("escalation", "c1")
    assert model.calls == 1

    out = agent.invoke(Command(resume={"type": "approve"}), config)

    assert model.calls == 2
    answers = [m.text for m in out["messages"] if isinstance(m, AIMessage) and not m.tool_calls]
    assert answers == ["Payment held."]


def test_edited_arguments_validated_by_the_queue_against_the_agents_tools() -> None:
    from harness_nodes import InvalidDecision

    with open_backend("memory://") as backend:
        model = ScriptedChatModel(
            script=[
                ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 5})]),
                ai("Refunded."),
            ]
        )
        review = ReviewQueueMiddleware(ReviewPolicy(irreversible=["refund"]))  # no tools given
        agent = create_agent(
            model,
            [refund],
            middleware=[review, EffectLedgerMiddleware(backend)],
            checkpointer=backend.checkpointer,
        )
        queue = ReviewQueue(backend, agent)
        assert set(queue.tools) == {"refund"}  # found on create_agent's tools node
        queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="e1")
        (item,) = queue.pending()
        bad = {"type": "edit", "args": {"order": "A1"}}  # amount missing
        with pytest.raises(InvalidDecision):
            queue.decide(item.id, bad, reviewer="ana")
        assert queue.get(item.id).status == "pending"
        good = {"type": "edit", "args": {"order": "A1", "amount": 2}}
        queue.decide(item.id, good, reviewer="ana")
        assert REFUNDS == ["A1"]
        (record,) = EffectLedger(backend).list("e1")
        assert "refunded 2" in str(record.result)


async def test_async_budget_review_and_effects(abackend: Any) -> None:
    from harness_nodes import AsyncReviewQueue

    runaway = create_agent(
        _runaway(),
        [ping],
        middleware=[CostEnvelopeMiddleware(Envelope(max_calls=2), backend=abackend)],
        checkpointer=abackend.checkpointer,
    )
    out = await runaway.ainvoke(
        {"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "a-loop"}}
    )
    assert out["outcome"]["status"] == "budget_exhausted"
    assert _model_calls(out["messages"]) == 2

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "B2", "amount": 5})]),
            ai("Refunded."),
        ],
        model_name="gpt-4o-mini",
    )
    agent = create_agent(
        model,
        [refund],
        middleware=[
            CostEnvelopeMiddleware(Envelope(max_usd=0.05), backend=abackend),
            VerifyToolOutputsMiddleware(),
            ReviewQueueMiddleware(ReviewPolicy(irreversible=["refund"]), tools=[refund]),
            EffectLedgerMiddleware(abackend),
        ],
        checkpointer=abackend.checkpointer,
    )
    queue = AsyncReviewQueue(abackend, agent)
    await queue.ainvoke({"messages": [HumanMessage("refund B2")]}, thread_id="a-review")
    (item,) = await queue.pending()
    done = await queue.decide(item.id, {"type": "approve"}, reviewer="ana")
    assert done["outcome"]["status"] == "completed"
    assert REFUNDS == ["B2"]


# --- escalations with no reviewer --------------------------------------------------------


@tool
def charge_card(amount: float) -> dict[str, str]:
    """Charge a card."""
    return {"status": "failed", "error": "card declined"}


def _charge_model() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("charge_card", {"amount": 5})]), ai("Charged.")],
        model_name="gpt-4o-mini",
    )


def _graph_form_outcome(contract: ToolContract) -> Any:
    """The same agent through `add_harness` without a review policy (its escalate → stop)."""
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    from harness_nodes import add_harness

    model = _charge_model().bind_tools([charge_card])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([charge_card]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    contracts = {"charge_card": contract}
    add_harness(builder, model_node="agent", tools_node="tools", contracts=contracts)
    out = builder.compile().invoke({"messages": [HumanMessage("charge 5")]})
    return out["messages"][-1].additional_kwargs["harness"]["outcome"]


@pytest.mark.parametrize(
    "contract",
    [
        pytest.param(ToolContract(side_effects=True), id="side-effects"),
        pytest.param(ToolContract(on_fail="escalate"), id="on-fail-escalate"),
    ],
)
def test_an_escalation_with_no_reviewer_ends_the_agent_with_its_reasons(
    contract: ToolContract,
) -> None:
    model = _charge_model()
    verify = VerifyToolOutputsMiddleware({"charge_card": contract})
    out = create_agent(model, [charge_card], middleware=[verify]).invoke(
        {"messages": [HumanMessage("charge 5")]}
    )
    assert model.calls == 1  # not called again with "it is held for a person's review"
    (verdict,) = out["verdicts"]
    assert verdict["action"] == "escalate"
    reason = "charge_card: " + "; ".join(verdict["reasons"])
    assert out["outcome"] == {"status": "verification_failed", "reason": reason}
    assert out["outcome"] == _graph_form_outcome(contract)  # as add_harness without review
    assert out["messages"][-1].text.startswith(
        "I stopped: a tool output failed verification and needs a person, "
        "but no human review is set up."
    )


async def test_an_escalation_with_no_reviewer_ends_the_agent_async() -> None:
    model = _charge_model()
    with open_backend("memory://") as backend:
        agent = create_agent(
            model,
            [charge_card],
            middleware=[
                CostEnvelopeMiddleware(Envelope(max_usd=0.05), backend=backend),
                VerifyToolOutputsMiddleware({"charge_card": ToolContract(side_effects=True)}),
            ],
            checkpointer=backend.checkpointer,
        )
        out = await agent.ainvoke(
            {"messages": [HumanMessage("charge 5")]}, {"configurable": {"thread_id": "s1"}}
        )
    assert model.calls == 1
    assert out["outcome"]["status"] == "verification_failed"  # not the budget's "completed"
    assert "card declined" in out["outcome"]["reason"]


def test_an_escalation_with_no_reviewer_raises_with_exit_behavior_error() -> None:
    from harness_nodes import VerificationFailed

    verify = VerifyToolOutputsMiddleware(
        {"charge_card": ToolContract(side_effects=True)}, exit_behavior="error"
    )
    agent = create_agent(_charge_model(), [charge_card], middleware=[verify])
    with pytest.raises(VerificationFailed) as info:
        agent.invoke({"messages": [HumanMessage("charge 5")]})
    assert info.value.tool == "charge_card"
    assert any("card declined" in r for r in info.value.reasons)


@pytest.mark.parametrize("review_first", [False, True], ids=["verify-first", "review-first"])
def test_an_escalation_with_a_reviewer_still_pauses_whatever_the_order(
    review_first: bool,
) -> None:
    model = _charge_model()
    contracts = {"charge_card": ToolContract(side_effects=True)}
    middleware: list[Any] = [VerifyToolOutputsMiddleware(contracts), ReviewQueueMiddleware()]
    if review_first:
        middleware.reverse()
    with open_backend("memory://") as backend:
        agent = create_agent(
            model, [charge_card], middleware=middleware, checkpointer=backend.checkpointer
        )
        queue = ReviewQueue(backend, agent)
        queue.invoke({"messages": [HumanMessage("charge 5")]}, thread_id="p1")
        (item,) = queue.pending()
        assert item.requests[0]["kind"] == "escalation"
        out = queue.decide(item.id, {"type": "respond", "message": "Declined."}, reviewer="ana")
    assert out["messages"][-1].text == "Charged."  # the model carried on after the review
    assert model.calls == 2
    assert out["outcome"]["status"] == "completed"  # no harness layer stopped it


# --- contracts for tools the agent does not have ------------------------------------------

WEATHER_CALLS: list[str] = []


@tool
def weather(city: str) -> dict[str, Any]:
    """Current weather."""
    WEATHER_CALLS.append(city)
    return {"city": city, "temp_c": 999}


def _misspelt_weather_agent() -> Any:
    WEATHER_CALLS.clear()
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("weather", {"city": "Paris"})]), ai("999C.")]
    )
    misspelt = {"weathr": ToolContract(ranges={"temp_c": (-90, 60)})}
    return create_agent(model, [weather], middleware=[VerifyToolOutputsMiddleware(misspelt)])


MISSPELT = re.escape("contracts name tools the agent does not have: weathr (tools: weather)")


def test_a_contract_for_a_tool_the_agent_lacks_raises_before_any_tool_runs() -> None:
    with pytest.raises(UserError, match=MISSPELT):
        _misspelt_weather_agent().invoke({"messages": [HumanMessage("weather?")]})
    assert WEATHER_CALLS == []


async def test_a_contract_for_a_tool_the_agent_lacks_raises_before_any_tool_runs_async() -> None:
    with pytest.raises(UserError, match=MISSPELT):
        await _misspelt_weather_agent().ainvoke({"messages": [HumanMessage("weather?")]})
    assert WEATHER_CALLS == []


class _PickSearch(AgentMiddleware[Any, Any, Any]):
    """Narrow each model call to the ``search`` tool, as a tool-selecting middleware does."""

    def wrap_model_call(self, request: Any, handler: Callable[..., Any]) -> Any:
        tools = [t for t in request.tools if getattr(t, "name", "") == "search"]
        return handler(request.override(tools=tools))


def test_contracts_for_tools_a_model_call_does_not_see_are_kept() -> None:
    contracts = {"search": ToolContract(), "ping": ToolContract()}
    agent = create_agent(
        _search_model(),
        [search, ping],
        middleware=[_PickSearch(), VerifyToolOutputsMiddleware(contracts)],
    )
    _check_retried(agent.invoke({"messages": [HumanMessage("find storage notes")]}))


# --- return_direct tools --------------------------------------------------------------------

ANSWERS: list[str] = []


@tool(return_direct=True)
def answer_directly(q: str) -> dict[str, str]:
    """Answer the user directly."""
    ANSWERS.append(q)
    return {"status": "error", "error": "backend down"} if q != "ok" else {"answer": "42"}


def _direct_model(*queries: str) -> ScriptedChatModel:
    calls = [ai(tool_calls=[tool_call("answer_directly", {"q": q})]) for q in queries]
    return ScriptedChatModel(script=[*calls, ai("Fallback answer.")])


def test_a_refused_output_of_a_return_direct_tool_goes_back_to_the_model() -> None:
    """As in the graph form: the verdict says retry, so the run does not end on the refusal."""
    runs = {}
    for form in ("middleware", "graph"):
        model = _direct_model("x", "y")
        agent = (
            create_agent(model, [answer_directly], middleware=[VerifyToolOutputsMiddleware()])
            if form == "middleware"
            else build_harnessed_agent(model, [answer_directly])
        )
        out = agent.invoke({"messages": [HumanMessage("q")]})
        runs[form] = ([v["action"] for v in out["verdicts"]], out["messages"][-1].text)
        assert model.calls == 3
    assert runs["middleware"] == runs["graph"] == (["retry", "retry"], "Fallback answer.")


async def test_a_good_output_of_a_return_direct_tool_still_ends_the_run_async() -> None:
    model = _direct_model("ok")
    agent = create_agent(model, [answer_directly], middleware=[VerifyToolOutputsMiddleware()])
    out = await agent.ainvoke({"messages": [HumanMessage("q")]})
    assert model.calls == 1
    assert isinstance(out["messages"][-1], ToolMessage)
    assert [v["action"] for v in out["verdicts"]] == ["ok"]


async def test_a_failed_output_of_a_return_direct_tool_ends_as_verification_failed_async() -> None:
    model = _direct_model("x")
    verify = VerifyToolOutputsMiddleware({"answer_directly": ToolContract(max_retries=0)})
    agent = create_agent(model, [answer_directly], middleware=[verify])
    out = await agent.ainvoke({"messages": [HumanMessage("q")]})
    assert model.calls == 1
    assert out["outcome"]["status"] == "verification_failed"
    assert "backend down" in out["outcome"]["reason"]


def test_an_escalated_output_of_a_return_direct_tool_waits_for_review() -> None:
    ANSWERS.clear()
    model = _direct_model("x")
    contracts = {"answer_directly": ToolContract(side_effects=True)}
    with open_backend("memory://") as backend:
        agent = create_agent(
            model,
            [answer_directly],
            middleware=[VerifyToolOutputsMiddleware(contracts), ReviewQueueMiddleware()],
            checkpointer=backend.checkpointer,
        )
        queue = ReviewQueue(backend, agent)
        queue.invoke({"messages": [HumanMessage("q")]}, thread_id="d1")
        (item,) = queue.pending()
        assert item.requests[0]["kind"] == "escalation"
        out = queue.decide(item.id, {"type": "respond", "message": "It is 42."}, reviewer="ana")
    assert out["messages"][-1].text == "Fallback answer."
    assert ANSWERS == ["x"]  # never re-run


def test_a_new_question_on_the_thread_gets_its_own_outcome(backend: Backend) -> None:
    model = ScriptedChatModel(
        model_name="gpt-4o-mini", script=[ai("first answer"), ai("second answer")]
    )
    agent = create_agent(
        model,
        [],
        middleware=[CostEnvelopeMiddleware(Envelope(max_usd=1.0), backend=backend)],
        checkpointer=backend.checkpointer,
    )
    cfg: Any = {"configurable": {"thread_id": "two-questions"}}
    first = agent.invoke({"messages": [HumanMessage("q1")]}, cfg)["outcome"]
    second = agent.invoke({"messages": [HumanMessage("q2")]}, cfg)["outcome"]
    assert first == {"status": "completed", "partial_result": "first answer"}
    assert second == {"status": "completed", "partial_result": "second answer"}


def _stopped_then_asked_again() -> tuple[ScriptedChatModel, Envelope]:
    """Two calls a task: the first task loops into its stop, the second answers in two."""
    ping_call = ai(tool_calls=[tool_call("ping", {})])
    model = ScriptedChatModel(
        model_name="gpt-4o-mini",
        # By turn (AI messages in the prompt): turn 2 is the first task's refused call, its
        # stop note the third AI message; the second task pings at turn 3, answers at 4.
        script=[ping_call, ping_call, ping_call, ping_call, ai("second answer")],
    )
    return model, Envelope(max_calls=2)


def test_a_new_task_does_not_show_the_previous_tasks_outcome_while_it_runs(
    backend: Backend,
) -> None:
    model, envelope = _stopped_then_asked_again()
    agent = create_agent(
        model,
        [ping],
        middleware=[CostEnvelopeMiddleware(envelope, backend=backend)],
        checkpointer=backend.checkpointer,
        interrupt_before=["tools"],  # a look at the state mid-task
    )

    def run(text: str, task_id: str) -> dict[str, Any]:
        cfg: Any = {"configurable": {"thread_id": "asked-again", "task_id": task_id}}
        out = agent.invoke({"messages": [HumanMessage(text)]}, cfg)
        while agent.get_state(cfg).next:  # each pause before the tools, resumed
            assert agent.get_state(cfg).values.get("outcome") is None, task_id
            out = agent.invoke(None, cfg)
        return out

    assert run("loop", "task-1")["outcome"]["status"] == "budget_exhausted"
    assert run("answer", "task-2")["outcome"] == {
        "status": "completed",
        "partial_result": "second answer",
    }


async def test_a_new_task_does_not_show_the_previous_tasks_outcome_while_it_runs_async(
    abackend: Any,
) -> None:
    model, envelope = _stopped_then_asked_again()
    agent = create_agent(
        model,
        [ping],
        middleware=[CostEnvelopeMiddleware(envelope, backend=abackend)],
        checkpointer=abackend.checkpointer,
        interrupt_before=["tools"],
    )

    async def run(text: str, task_id: str) -> dict[str, Any]:
        cfg: Any = {"configurable": {"thread_id": "asked-again", "task_id": task_id}}
        out = await agent.ainvoke({"messages": [HumanMessage(text)]}, cfg)
        while (await agent.aget_state(cfg)).next:
            assert (await agent.aget_state(cfg)).values.get("outcome") is None, task_id
            out = await agent.ainvoke(None, cfg)
        return out

    assert (await run("loop", "task-1"))["outcome"]["status"] == "budget_exhausted"
    assert (await run("answer", "task-2"))["outcome"] == {
        "status": "completed",
        "partial_result": "second answer",
    }


def test_a_task_the_budget_stops_after_an_answered_one_reports_its_own_stop(
    backend: Backend,
) -> None:
    ping_call = ai(tool_calls=[tool_call("ping", {})])
    model = ScriptedChatModel(
        model_name="gpt-4o-mini", script=[ai("first answer"), ping_call], loop=True
    )
    agent = create_agent(
        model,
        [ping],
        middleware=[CostEnvelopeMiddleware(Envelope(max_calls=2), backend=backend)],
        checkpointer=backend.checkpointer,
    )
    outcomes = []
    for text, task_id in (("q1", "task-1"), ("q2", "task-2")):
        cfg: Any = {"configurable": {"thread_id": "stopped-second", "task_id": task_id}}
        outcomes.append(agent.invoke({"messages": [HumanMessage(text)]}, cfg)["outcome"])
    assert outcomes[0] == {"status": "completed", "partial_result": "first answer"}
    assert outcomes[1]["status"] == "budget_exhausted"  # not task 1's "completed"
    assert outcomes[1]["reason"] == "calls limit reached: used 2 of 2"


# --- structured output (response_format) -------------------------------------------------


class Order(BaseModel):
    """The order found."""

    order: str


def _answer(strategy: str) -> AIMessage:
    if strategy == "tool":  # the response-format tool's call, answered in the model node
        return ai(tool_calls=[tool_call("Order", {"order": "note-1"})])
    return ai('{"order": "note-1"}')  # the provider's native structured output


def _two_structured_tasks(strategy: str) -> tuple[ScriptedChatModel, list[str]]:
    """Each task: an empty search (retried), a good one, then the structured answer."""
    turn = [
        ai(tool_calls=[tool_call("search", {"query": "typo"})]),
        ai(tool_calls=[tool_call("search", {"query": "storage"})]),
        _answer(strategy),
    ]
    model = ScriptedChatModel(script=[*turn, *turn], model_name="gpt-4o-mini")
    return model, ["find the order", "and the next one?"]


def _structured_agent(model: ScriptedChatModel, strategy: str, backend: Any) -> Any:
    return create_agent(
        model,
        [search],
        middleware=[
            CostEnvelopeMiddleware(Envelope(max_usd=0.5), backend=backend),
            VerifyToolOutputsMiddleware({"search": ToolContract(max_retries=1)}),
        ],
        response_format=ToolStrategy(Order) if strategy == "tool" else ProviderStrategy(Order),
        checkpointer=backend.checkpointer,
        interrupt_before=["tools"],  # a look at the state mid-task
    )


def _check_structured_tasks(first: dict[str, Any], second: dict[str, Any]) -> None:
    done = {"status": "completed", "partial_result": Order(order="note-1")}
    assert first["structured_response"] == Order(order="note-1")
    assert first["outcome"] == done
    # Task 2 gets its own retry: task 1's failed search does not count against it.
    task_2 = second["verdicts"][len(first["verdicts"]) :]
    assert [(v["action"], v["attempt"]) for v in task_2] == [("retry", 1), ("ok", 2)]
    assert second["structured_response"] == Order(order="note-1")
    assert second["outcome"] == done


STRATEGIES = [
    pytest.param("tool", id="ToolStrategy"),
    pytest.param("provider", id="ProviderStrategy"),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_structured_response_completes_the_task_and_the_next_question_is_a_new_task(
    strategy: str,
) -> None:
    """With ToolStrategy the run ends on the response-format tool's message, not on an AI
    answer: the task still completes (with the structured response) and ends there."""
    model, questions = _two_structured_tasks(strategy)
    with open_backend("memory://") as backend:
        agent = _structured_agent(model, strategy, backend)
        cfg: Any = {"configurable": {"thread_id": f"structured-{strategy}"}}

        def run(question: str) -> dict[str, Any]:
            out = agent.invoke({"messages": [HumanMessage(question)]}, cfg)
            while agent.get_state(cfg).next:  # each pause before the tools, resumed
                assert agent.get_state(cfg).values.get("outcome") is None, question
                out = agent.invoke(None, cfg)
            return out

        first, second = run(questions[0]), run(questions[1])
    _check_structured_tasks(first, second)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_structured_response_completes_the_task_async(strategy: str) -> None:
    model, questions = _two_structured_tasks(strategy)
    backend = await aopen_backend("memory://")
    try:
        agent = _structured_agent(model, strategy, backend)
        cfg: Any = {"configurable": {"thread_id": f"structured-{strategy}"}}

        async def run(question: str) -> dict[str, Any]:
            out = await agent.ainvoke({"messages": [HumanMessage(question)]}, cfg)
            while (await agent.aget_state(cfg)).next:
                assert (await agent.aget_state(cfg)).values.get("outcome") is None, question
                out = await agent.ainvoke(None, cfg)
            return out

        first, second = await run(questions[0]), await run(questions[1])
    finally:
        await backend.close()
    _check_structured_tasks(first, second)


@pytest.mark.parametrize("beside_a_tool", [False, True], ids=["alone", "beside-a-tool-call"])
def test_after_a_structured_response_the_next_question_gets_its_own_retries(
    beside_a_tool: bool,
) -> None:
    """Verification alone: the response-format tool's message (or the results of the tools
    called beside it), then the user's next message, is the end of a task, as an answer
    without tool calls is."""
    model, questions = _two_structured_tasks("tool")
    if beside_a_tool:  # task 1 answers in the same turn as its good search
        good, answer = model.script[1], model.script[2]
        assert isinstance(good, AIMessage) and isinstance(answer, AIMessage)
        both = ai(tool_calls=[*good.tool_calls, *answer.tool_calls])
        model = model.model_copy(update={"script": [model.script[0], both, *model.script[3:]]})
    verify = VerifyToolOutputsMiddleware({"search": ToolContract(max_retries=1)})
    with open_backend("memory://") as backend:
        agent = create_agent(
            model,
            [search],
            middleware=[verify],
            response_format=ToolStrategy(Order),
            checkpointer=backend.checkpointer,
        )
        cfg: Any = {"configurable": {"thread_id": "structured-verify"}}
        first = agent.invoke({"messages": [HumanMessage(questions[0])]}, cfg)
        assert first["structured_response"] == Order(order="note-1")
        second = agent.invoke({"messages": [HumanMessage(questions[1])]}, cfg)
    assert [(v["action"], v["attempt"]) for v in second["verdicts"]] == [
        ("retry", 1),
        ("ok", 2),
        ("retry", 1),  # not ("fail", 2): task 1's failed search is not task 2's
        ("ok", 2),
    ]
    assert second["structured_response"] == Order(order="note-1")
    assert second["outcome"] == {"status": "completed", "partial_result": Order(order="note-1")}


def test_a_bare_schema_resolves_to_the_tool_strategy_under_the_budget() -> None:
    """LangChain picks ProviderStrategy for gpt-4o by its name; through the budget wrapper it
    cannot see the model, and picks ToolStrategy (README: pass ProviderStrategy explicitly)."""
    with open_backend("memory://") as backend:
        agent = create_agent(
            ScriptedChatModel(script=[_answer("tool")], model_name="gpt-4o"),
            [search],
            middleware=[CostEnvelopeMiddleware(Envelope(max_usd=0.5), backend=backend)],
            response_format=Order,
        )
        out = agent.invoke({"messages": [HumanMessage("find the order")]})
    assert isinstance(out["messages"][-1], ToolMessage)  # the response-format tool's
    assert out["structured_response"] == Order(order="note-1")
    assert out["outcome"] == {"status": "completed", "partial_result": Order(order="note-1")}


# --- a model another middleware swaps in -------------------------------------------------

ORDERS = [
    pytest.param("cost-first", id="cost-first"),  # the order the README lists them in
    pytest.param("fallback-first", id="fallback-first"),
]


def _fallback_agent(
    order: str, envelope: Envelope, backend: Any
) -> tuple[Any, CostEnvelopeMiddleware, ScriptedChatModel, ScriptedChatModel]:
    """An agent whose model always fails (503), with LangChain's ModelFallbackMiddleware."""
    primary = ScriptedChatModel(
        script=[ai("from the primary")],
        model_name="gpt-4o-mini",
        faults={0: RuntimeError("503 Service Unavailable")},
        fault_attempts=99,
    )
    backup = ScriptedChatModel(
        script=[ai("from the backup", usage={"input_tokens": 40, "output_tokens": 900})],
        model_name="gpt-4o",
    )
    cost = CostEnvelopeMiddleware(envelope, backend=backend)
    fallback = ModelFallbackMiddleware(backup)
    middleware: list[Any] = [cost, fallback] if order == "cost-first" else [fallback, cost]
    agent = create_agent(primary, [], middleware=middleware, checkpointer=backend.checkpointer)
    return agent, cost, primary, backup


def _check_backup_budgeted(out: dict[str, Any], cost: CostEnvelopeMiddleware, cfg: Any) -> None:
    answer = out["messages"][-1]
    assert answer.text == "from the backup"
    assert answer.additional_kwargs["harness"]["budget"]["model"] == "gpt-4o"
    spend = cost.budgeted_model(ScriptedChatModel(model_name="gpt-4o-mini")).spend(cfg)
    assert spend["calls"] == 1
    assert spend["by_model"]["gpt-4o"]["output_tokens"] == 900  # settled to its usage
    assert spend["usd"] == pytest.approx((40 * 2.5 + 900 * 10) / 1e6)
    assert out["outcome"] == {"status": "completed", "partial_result": "from the backup"}


@pytest.mark.parametrize("order", ORDERS)
def test_a_fallback_models_call_is_reserved_and_settled_whatever_the_order(order: str) -> None:
    """ModelFallbackMiddleware swaps its model into the request: listed inside the cost
    middleware, that call was made unbudgeted (no reservation, no ledger row: free)."""
    with open_backend("memory://") as backend:
        agent, cost, primary, backup = _fallback_agent(order, Envelope(max_usd=1.0), backend)
        cfg: Any = {"configurable": {"thread_id": f"fallback-{order}"}}
        out = agent.invoke({"messages": [HumanMessage("hi")]}, cfg)
        _check_backup_budgeted(out, cost, cfg)
    assert (primary.calls, backup.calls) == (1, 1)


@pytest.mark.parametrize("order", ORDERS)
async def test_a_fallback_models_call_is_reserved_and_settled_whatever_the_order_async(
    order: str,
) -> None:
    backend = await aopen_backend("memory://")
    try:
        agent, cost, primary, backup = _fallback_agent(order, Envelope(max_usd=1.0), backend)
        cfg: Any = {"configurable": {"thread_id": f"fallback-{order}"}}
        out = await agent.ainvoke({"messages": [HumanMessage("hi")]}, cfg)
        spend = await cost.budgeted_model(ScriptedChatModel(model_name="gpt-4o-mini")).aspend(cfg)
    finally:
        await backend.close()
    answer = out["messages"][-1]
    assert answer.additional_kwargs["harness"]["budget"]["model"] == "gpt-4o"
    assert (spend["calls"], spend["by_model"]["gpt-4o"]["output_tokens"]) == (1, 900)
    assert (primary.calls, backup.calls) == (1, 1)


@pytest.mark.parametrize("run", ["invoke", "ainvoke"])
@pytest.mark.parametrize("order", ORDERS)
async def test_a_fallback_model_the_envelope_cannot_pay_for_is_not_called(
    order: str, run: str
) -> None:
    """$0.001 pays for a short gpt-4o-mini answer (the failing primary), not for the
    gpt-4o fallback's smallest one (256 output tokens, $0.00256): the hard limit holds."""
    with open_backend("memory://") as backend:
        agent, _, primary, backup = _fallback_agent(order, Envelope(max_usd=0.001), backend)
        cfg: Any = {"configurable": {"thread_id": f"fallback-{order}"}}
        question = {"messages": [HumanMessage("hi")]}
        out = agent.invoke(question, cfg) if run == "invoke" else await agent.ainvoke(question, cfg)
    assert (primary.calls, backup.calls) == (1, 0)
    assert out["outcome"]["status"] == "budget_exhausted"
    assert out["outcome"]["reason"] == "usd limit reached: used 0 of 0.001"


def test_a_model_a_middleware_assigns_to_the_request_is_budgeted_too() -> None:
    """LangChain deprecates ``request.model = ...`` (use ``override``), but it still works."""
    backup = ScriptedChatModel(script=[ai("from the backup")], model_name="gpt-4o")

    @wrap_model_call
    def swap(request: Any, handler: Callable[[Any], Any]) -> Any:
        with pytest.warns(DeprecationWarning, match="request.override"):
            request.model = backup
        return handler(request)

    with open_backend("memory://") as backend:
        cost = CostEnvelopeMiddleware(Envelope(max_usd=0.001), backend=backend)
        agent = create_agent(
            ScriptedChatModel(script=[ai("from the primary")], model_name="gpt-4o-mini"),
            [],
            middleware=[cost, swap],
            checkpointer=backend.checkpointer,
        )
        out = agent.invoke({"messages": [HumanMessage("hi")]}, {"configurable": {"thread_id": "a"}})
    assert backup.calls == 0  # $0.001 cannot pay for a gpt-4o answer
    assert out["outcome"]["status"] == "budget_exhausted"


def _swapping_agent(backend: Any, swapped: Any, tools: list[Any]) -> tuple[Any, Any]:
    """An agent whose inner middleware swaps *swapped* into every model request."""

    class Swap(AgentMiddleware[Any, Any, Any]):
        def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
            return handler(request.override(model=swapped))

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            return await handler(request.override(model=swapped))

    cost = CostEnvelopeMiddleware(Envelope(max_usd=1.0), backend=backend)
    agent = create_agent(
        ScriptedChatModel(script=[ai("from the primary")], model_name="gpt-4o-mini"),
        tools,
        middleware=[cost, Swap()],
        checkpointer=backend.checkpointer,
    )
    return agent, cost


@pytest.mark.parametrize("run", ["invoke", "ainvoke"])
@pytest.mark.parametrize(
    "tools", [pytest.param([], id="no-tools"), pytest.param([ping], id="tools")]
)
async def test_a_bound_model_a_middleware_swaps_in_is_budgeted_with_its_bindings(
    run: str, tools: list[Any]
) -> None:
    """``request.override(model=backup.bind(...))``: a RunnableBinding, not a chat model. It
    failed mid-run with a UserError (pass the unbound model to create_agent), a model the user
    never passed there; the model inside is budgeted and the binding's kwargs still apply."""
    answer = ai("word " * 400, usage={"input_tokens": 40, "output_tokens": 900})
    backup = ScriptedChatModel(script=[answer], model_name="gpt-4o")
    with open_backend("memory://") as backend:
        agent, cost = _swapping_agent(backend, backup.bind(max_tokens=5), tools)
        cfg: Any = {"configurable": {"thread_id": f"bound-{run}"}}
        question = {"messages": [HumanMessage("hi")]}
        out = agent.invoke(question, cfg) if run == "invoke" else await agent.ainvoke(question, cfg)
        spend = cost.budgeted_model(ScriptedChatModel(model_name="gpt-4o-mini")).spend(cfg)
    last = out["messages"][-1]
    assert last.additional_kwargs["harness"]["budget"]["model"] == "gpt-4o"
    assert last.response_metadata["finish_reason"] == "length"  # the bound max_tokens=5
    assert (spend["calls"], spend["by_model"]["gpt-4o"]["output_tokens"]) == (1, 5)
    assert backup.calls == 1


class RoutedModel(Runnable[Any, Any]):
    """A model picked per call, as ``init_chat_model(configurable_fields=...)`` does: a
    Runnable that is no chat model, so the harness cannot put its wrapper around it."""

    def __init__(self, model: ScriptedChatModel) -> None:
        self.model = model

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.model.bind_tools(tools, **kwargs)

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        return self.model.invoke(input, config, **kwargs)


def test_a_model_the_budget_cannot_wrap_is_accounted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A configurable model swapped in failed mid-run with a UserError; it runs, and its
    reported usage is recorded in the task's ledger (as BudgetCallbackHandler records it)."""
    routed = ScriptedChatModel(
        script=[ai("from the router", usage={"input_tokens": 40, "output_tokens": 900})],
        model_name="gpt-4o",
    )
    with open_backend("memory://") as backend:
        agent, cost = _swapping_agent(backend, RoutedModel(routed), [])
        cfg: Any = {"configurable": {"thread_id": "routed"}}
        with caplog.at_level(logging.WARNING, logger="harness_nodes.middleware"):
            out = agent.invoke({"messages": [HumanMessage("hi")]}, cfg)
        spend = cost.budgeted_model(ScriptedChatModel(model_name="gpt-4o-mini")).spend(cfg)
    assert out["messages"][-1].text == "from the router"
    assert spend["by_model"]["gpt-4o"] == {
        "input_tokens": 40,
        "output_tokens": 900,
        "usd": pytest.approx((40 * 2.5 + 900 * 10) / 1e6),
        "calls": 1,
    }
    assert "RoutedModel" in caplog.text and "cannot wrap" in caplog.text


_MIRROR_USAGE = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}


def _mirror_agent(backend: Any) -> Any:
    model = ScriptedChatModel(
        model_name="gpt-4o-mini",
        script=[
            ai(tool_calls=[tool_call("ping", {})], usage=_MIRROR_USAGE),
            ai("Done.", usage=_MIRROR_USAGE),
        ],
    )
    budget = CostEnvelopeMiddleware(Envelope(max_usd=1), backend=backend)
    return create_agent(model, [ping], middleware=[budget], checkpointer=backend.checkpointer)


def _assert_completed_with_mirror(out: dict[str, Any]) -> None:
    assert out["outcome"]["status"] == "completed"
    answers = [m for m in out["messages"] if isinstance(m, AIMessage)]
    usd = sum(m.additional_kwargs["harness"]["budget"]["spent_usd"] for m in answers)
    assert out["spend"]["calls"] == len(answers) == 2
    assert out["spend"]["usd"] == pytest.approx(usd) and usd > 0
    assert out["spend"]["model"] == "gpt-4o-mini"


def test_cost_middleware_writes_the_spend_mirror_when_the_task_completes(backend: Backend) -> None:
    # Only a budget stop wrote it: an agent that answered kept spend {} in its state.
    agent = _mirror_agent(backend)
    out = agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "m1"}})
    _assert_completed_with_mirror(out)


async def test_cost_middleware_writes_the_spend_mirror_under_ainvoke() -> None:
    backend = await aopen_backend("memory://")
    try:
        agent = _mirror_agent(backend)
        config: Any = {"configurable": {"thread_id": "m2"}}
        _assert_completed_with_mirror(
            await agent.ainvoke({"messages": [HumanMessage("go")]}, config)
        )
    finally:
        await backend.close()


@tool
def lookup_and_answer(key: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command[Any]:
    """Look a key up and hand the answer straight back to the model."""
    answer = ToolMessage('{"error": "upstream 503"}', tool_call_id=tool_call_id)
    return Command(update={"messages": [answer]}, goto="model")


def test_a_refused_output_of_a_tool_that_routes_itself_stops_the_task() -> None:
    """The tool's ``goto="model"`` skipped the stop before the model: the model answered after
    the task had stopped. A refused output now goes where its verdict sends it."""
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("lookup_and_answer", {"key": "k"})]), ai("All fine.")]
    )
    verify = VerifyToolOutputsMiddleware({"lookup_and_answer": ToolContract(max_retries=0)})
    agent = create_agent(model, [lookup_and_answer], middleware=[verify])
    out = agent.invoke({"messages": [HumanMessage("go")]})
    assert out["outcome"]["status"] == "verification_failed"
    assert out["messages"][-1].text.startswith("I stopped: a tool output failed verification")


def _answering_model() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("Found note-1.")],
        model_name="gpt-4o-mini",
    )


@pytest.mark.parametrize(
    "middleware",
    [
        pytest.param(lambda: [VerifyToolOutputsMiddleware()], id="verify"),
        pytest.param(lambda: [ReviewQueueMiddleware()], id="review"),
        pytest.param(
            lambda: [ReviewQueueMiddleware(), VerifyToolOutputsMiddleware()], id="review-verify"
        ),
    ],
)
async def test_a_middleware_agent_that_answers_has_outcome_completed_as_the_graph_form(
    backend: Backend, middleware: Callable[[], list[Any]]
) -> None:
    # build_harnessed_agent (and CostEnvelopeMiddleware) write `completed` on the answer;
    # with only the verification or review middleware the task ended with no outcome.
    agent = create_agent(
        _answering_model(), [search], middleware=middleware(), checkpointer=backend.checkpointer
    )
    config: Any = {"configurable": {"thread_id": "t-done"}}
    out = agent.invoke({"messages": [HumanMessage("notes on storage?")]}, config)
    graph = build_harnessed_agent(_answering_model(), [search])
    expected = graph.invoke({"messages": [HumanMessage("notes on storage?")]})["outcome"]
    assert out["outcome"] == expected == {"status": "completed", "partial_result": "Found note-1."}


async def test_a_second_task_on_a_middleware_agent_is_completed_after_a_stop(
    backend: Backend,
) -> None:
    # Task 1 stops (verification_failed), task 2 on the thread answers: its own outcome.
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("search", {"query": "typo"})]),
            ai(tool_calls=[tool_call("search", {"query": "storage"})]),
            ai("Found note-1."),
        ],
        model_name="gpt-4o-mini",
    )
    budget = CostEnvelopeMiddleware(Envelope(max_usd=1.0), backend=backend)
    verify = VerifyToolOutputsMiddleware({"search": ToolContract(max_retries=0)})
    agent = create_agent(
        model,
        [search],
        middleware=[verify, ReviewQueueMiddleware(), budget],
        checkpointer=backend.checkpointer,
    )
    config: Any = {"configurable": {"thread_id": "t-two"}}
    first = agent.invoke({"messages": [HumanMessage("typo?")]}, config)
    assert first["outcome"]["status"] == "verification_failed"
    second = agent.invoke({"messages": [HumanMessage("storage?")]}, config)
    assert second["outcome"] == {"status": "completed", "partial_result": "Found note-1."}
    assert build_trace(backend, "t-two").status == "completed"


async def test_a_middleware_agent_that_answers_under_ainvoke_has_outcome_completed(
    abackend: AsyncBackend,
) -> None:
    agent = create_agent(
        _answering_model(),
        [search],
        middleware=[ReviewQueueMiddleware(), VerifyToolOutputsMiddleware()],
        checkpointer=abackend.checkpointer,
    )
    config: Any = {"configurable": {"thread_id": "t-adone"}}
    out = await agent.ainvoke({"messages": [HumanMessage("notes on storage?")]}, config)
    assert out["outcome"] == {"status": "completed", "partial_result": "Found note-1."}
