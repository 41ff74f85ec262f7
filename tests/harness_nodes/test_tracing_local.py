"""`build_trace` rebuilds the decision tree from checkpoints + ledgers; the CLI shows it."""

from __future__ import annotations

import json
import operator
import re
from typing import Annotated, Any

import pytest
from typing_extensions import TypedDict

from checkpointers import Backend
from harness_nodes import Trace, UnknownThread, build_trace, list_runs, reliability_report
from harness_nodes.cli import main
from tests.harness_nodes import traced_task


def _kinds(trace: Trace) -> list[tuple[str, str]]:
    return [(n.kind, n.name) for n in trace.decisions()]


def test_trace_shows_retry_review_degrade_and_completion_in_order(backend: Backend) -> None:
    traced_task.run_to_end(backend, "t-1")
    trace = build_trace(backend, "t-1")

    assert trace.status == "completed"
    assert trace.task_type == "refunds"
    assert [s.name for s in trace.steps] == [
        "input",
        "agent",
        "tools",
        "agent",
        "tools",
        "agent",
        "review",
        "tools",
        "agent",
        "finish",
    ]
    decisions = _kinds(trace)
    expected = [
        ("verdict", "search: retry"),
        ("verdict", "search: ok"),
        ("budget", "degrade gpt-4o → gpt-4o-mini"),
        ("interrupt", "paused → resumed"),
        ("review", "approve by alice"),
        ("effect", "ran"),
        ("verdict", "refund: ok"),
        ("budget", "degrade gpt-4o → gpt-4o-mini"),
        ("outcome", "completed"),
    ]
    assert decisions == expected

    # prompt → tool call with its full arguments → result → verdict → the next decision
    refund_call = next(n for n in trace.walk() if n.kind == "tool_call" and n.name == "refund")
    assert refund_call.data["args"]["amount"] == 10 and refund_call.data["args"]["order"] == 42
    first_result = next(n for n in trace.walk() if n.kind == "tool_result")
    assert "rate limited" in first_result.data["content"]
    assert first_result.children[0].data["reasons"] == [traced_task.SEARCH_FAILURE]

    # review: reason from the queue, decision + reviewer + latency from the ledger
    interrupt = next(n for n in trace.walk() if n.kind == "interrupt")
    assert interrupt.data["reason"] == "irreversible" and interrupt.data["risk"] == "high"
    (row,) = backend.execute("SELECT created_at, decided_at FROM harness_reviews")
    assert interrupt.duration_s == pytest.approx(row["decided_at"] - row["created_at"])
    assert interrupt.children[0].data["reviewer"] == "alice"

    # effect ledger: idempotency key and the call's own timing
    refund_result = next(n for n in trace.walk() if n.kind == "tool_result" and n.name == "refund")
    assert refund_result.duration_s is not None and refund_result.duration_s >= 0
    effect = next(c for c in refund_result.children if c.kind == "effect")
    assert effect.data["idempotency_key"] == "t-1:call-r1" and effect.data["status"] == "done"

    # timings, tokens and cost per node; the task's cost is the spend ledger's
    llm = [n for n in trace.walk() if n.kind == "llm"]
    assert [n.name for n in llm] == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    assert all(n.input_tokens > 0 and n.output_tokens > 0 and n.cost_usd > 0 for n in llm)
    assert all(s.duration_s is not None and s.duration_s >= 0 for s in trace.steps)
    assert trace.cost_usd == pytest.approx(sum(n.cost_usd for n in llm), rel=1e-6)
    assert trace.input_tokens == sum(n.input_tokens for n in llm)


def test_trace_json_round_trips(backend: Backend) -> None:
    traced_task.run_to_end(backend, "t-2")
    trace = build_trace(backend, "t-2")
    text = trace.to_json()
    again = Trace.from_json(text)
    assert again == trace
    assert again.to_json() == text
    assert json.loads(text)["steps"][0]["kind"] == "step"


def test_paused_task_shows_the_pending_review(backend: Backend) -> None:
    traced_task.start(backend, traced_task.build(backend), "t-3")
    trace = build_trace(backend, "t-3")
    assert trace.status == "paused"
    last = trace.steps[-1]
    assert last.name == "review"
    assert last.children[0].kind == "interrupt"
    pending = last.children[0]
    assert pending.data["reason"] == "irreversible" and pending.duration_s is None
    assert pending.data["request"][0]["action_request"]["action"] == "refund"


def test_unknown_thread_is_a_typed_error(backend: Backend) -> None:
    with pytest.raises(UnknownThread, match=re.escape("No task found for thread 'nope'")) as e:
        build_trace(backend, "nope")
    assert e.value.thread_id == "nope"


def test_runs_and_report_aggregate_across_tasks(backend: Backend) -> None:
    traced_task.run_to_end(backend, "done-1")
    graph = traced_task.build(backend)
    graph.invoke(
        traced_task.first_input("paused-1"),
        {"configurable": {"thread_id": "paused-1"}},
        durability="sync",
    )

    runs = {r.thread_id: r for r in list_runs(backend)}
    assert runs["done-1"].status == "completed" and runs["paused-1"].status == "paused"
    assert runs["done-1"].task_type == "refunds"
    assert runs["done-1"].cost_usd > runs["paused-1"].cost_usd > 0
    assert runs["done-1"].duration_s is not None

    report = reliability_report(backend)
    assert report.tasks == 2 and report.finished == 1
    assert report.completion_rate == 1.0
    assert report.outcomes == {"completed": 1, "paused": 1}
    assert report.failure_reasons == [(traced_task.SEARCH_FAILURE, 2)]
    assert report.failing_tools == [("search", 2)]
    assert report.escalation_rate == 1.0
    (row,) = backend.execute("SELECT created_at, decided_at FROM harness_reviews")
    latency = row["decided_at"] - row["created_at"]
    assert report.review_latency_s == pytest.approx(
        {"mean": latency, "p95": latency, "max": latency}
    )
    costs = report.cost_by_task_type["refunds"]
    assert costs["n"] == 2 and costs["max"] == pytest.approx(runs["done-1"].cost_usd)


def test_cli_show_runs_report(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from checkpointers import open_backend

    url = f"sqlite:///{tmp_path / 'h.db'}"
    with open_backend(url) as backend:
        traced_task.run_to_end(backend, "cli-1")

    main(["show", "cli-1", "--db", url])
    out = capsys.readouterr().out
    for text in (
        "cli-1",
        "status=completed",
        "verdict search: retry",
        "degrade gpt-4o",
        "approve by alice",
        "outcome completed",
        '"amount": 10',
    ):
        assert text in out, text

    main(["show", "cli-1", "--db", url, "--json"])
    trace = Trace.from_json(capsys.readouterr().out)
    assert trace.status == "completed"

    main(["runs", "--db", url])
    assert "cli-1" in capsys.readouterr().out
    main(["report", "--db", url, "--json"])
    assert json.loads(capsys.readouterr().out)["completion_rate"] == 1.0

    with pytest.raises(SystemExit) as exit_info:
        main(["show", "nope", "--db", url])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: No task found for thread 'nope'"


def test_plain_messages_state_app_with_real_verification_fails_visibly(backend: Backend) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    from harness_nodes import ToolContract, VerificationStop, VerifyToolOutputs, route_after_verify
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def search(query: str) -> str:
        """Always empty."""
        return "[]"

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("search", {"query": "x"}, id="c")])], loop=True
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([search]))
    builder.add_node("verify", VerifyToolOutputs({"search": ToolContract(max_retries=1)}))
    builder.add_node("stop", VerificationStop())
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "verify")
    routes = {"ok": "agent", "retry": "agent", "escalate": "stop", "fail": "stop"}
    builder.add_conditional_edges("verify", route_after_verify, routes)
    graph = builder.compile(checkpointer=backend.checkpointer)
    graph.invoke(
        {"messages": [HumanMessage("find x")]},
        {"configurable": {"thread_id": "plain-1"}},
        durability="sync",
    )

    trace = build_trace(backend, "plain-1")
    assert trace.status == "verification_failed"
    assert trace.reason is not None and trace.reason.startswith("search:")
    actions = [n.data["action"] for n in trace.walk() if n.kind == "verdict"]
    assert actions == ["retry", "fail"]
    assert [n.name for n in trace.decisions()][-1] == "verification_failed"
    report = reliability_report(backend)
    assert report.outcomes == {"verification_failed": 1} and report.completion_rate == 0.0
    assert report.failing_tools == [("search", 2)]


def test_a_drop_in_apps_next_task_is_not_reported_with_the_stop_of_the_one_before(
    backend: Backend,
) -> None:
    # add_harness in a MessagesState app: task 1 stops (verification_failed), the user asks
    # again on the thread and task 2 completes. Nothing in the drop-in form rewrites the
    # outcome the stop left in the state; the trace, the runs list and the report must not
    # take it for task 2's.
    from langchain_core.messages import HumanMessage
    from langgraph.graph import MessagesState

    builder = traced_task.drop_in_two_tasks(MessagesState)
    graph = builder.compile(checkpointer=backend.checkpointer)
    cfg = {"configurable": {"thread_id": "drop-in"}}
    graph.invoke({"messages": [HumanMessage("q1")]}, cfg, durability="sync")
    assert build_trace(backend, "drop-in").status == "verification_failed"
    out = graph.invoke({"messages": [HumanMessage("q2")]}, cfg, durability="sync")
    assert out["messages"][-1].content == "Found r."
    trace = build_trace(backend, "drop-in")
    assert trace.status == "completed" and trace.reason is None
    # Task 1's stop is still in its place in the tree.
    assert [n.name for n in trace.walk() if n.kind == "outcome"] == ["verification_failed"]
    assert [r.status for r in list_runs(backend)] == ["completed"]
    assert reliability_report(backend).outcomes == {"completed": 1}


def test_real_review_queue_decision_shows_with_reviewer_and_latency(backend: Backend) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from harness_nodes import EffectLedger, HumanReview, ReviewPolicy, ReviewQueue, irreversible
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @irreversible
    @tool
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        return f"refunded {amount} on {order}"

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250}, id="r1")]),
            ai("Done."),
        ]
    )
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
    ledger = EffectLedger(backend)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund], wrap_tool_call=ledger.wrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=backend.checkpointer)
    queue = ReviewQueue(backend, graph)
    queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="q-1")

    paused = build_trace(backend, "q-1")
    assert paused.status == "paused"
    assert paused.steps[-1].children[0].kind == "interrupt"
    assert paused.steps[-1].children[0].data["reason"] == "irreversible"

    [item] = queue.pending()
    edit = {"type": "edit", "args": {"order": "A1", "amount": 200}}
    queue.decide(item.id, edit, reviewer="alice")
    trace = build_trace(backend, "q-1")
    assert trace.status == "completed"
    kinds = [(n.kind, n.name) for n in trace.decisions()]
    assert kinds == [
        ("interrupt", "paused → resumed"),
        ("review", "edit by alice"),
        ("effect", "ran"),
    ]
    decision = trace.decisions()[1]
    assert decision.data["reviewer"] == "alice" and decision.data["latency_s"] >= 0
    refund_result = next(n for n in trace.walk() if n.kind == "tool_result")
    assert refund_result.data["content"] == "refunded 200.0 on A1"  # the edited amount ran


def test_a_budget_stop_message_is_a_budget_decision_not_a_model_call(backend: Backend) -> None:
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import START, MessagesState, StateGraph

    stopped = {"task_id": "b-1", "limit": "usd", "used": 0.5, "maximum": 0.5}
    refusal = AIMessage(
        "Budget exhausted for this task; no further model call was made.",
        additional_kwargs={"harness": {"budget": {"model": None, "stopped": stopped}}},
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [refusal]})
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=backend.checkpointer)
    graph.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "b-1"}})
    trace = build_trace(backend, "b-1")
    assert [(n.kind, n.name) for n in trace.decisions()] == [
        ("budget", "stop: usd 0.5/0.5"),
        ("outcome", "budget_exhausted"),  # it ended the task
    ]
    assert trace.status == "budget_exhausted"
    assert not [n for n in trace.walk() if n.kind == "llm"]


def test_an_answer_the_budget_cut_short_shows_why_the_task_stopped_there() -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from checkpointers import open_backend
    from harness_nodes import Envelope, build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    call = ai(tool_calls=[tool_call("ping", {})], usage={"input_tokens": 50, "output_tokens": 200})
    model = ScriptedChatModel(script=[call], loop=True, model_name="gpt-4o")
    envelope = Envelope(max_usd=0.006, max_output_tokens=256, min_output_tokens=64)
    with open_backend("memory://") as backend:
        agent = build_harnessed_agent(model, [ping], envelope=envelope, backend=backend)
        agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "cut"}})
        trace = build_trace(backend, "cut")
    cut, stop, outcome = trace.decisions()[-3:]
    assert cut.kind == "budget" and re.match(r"cut short at \d+ output tokens: usd ", cut.name)
    assert (stop.kind, outcome.name) == ("budget", "budget_exhausted")  # the finish note
    assert trace.status == "budget_exhausted" and "cut short" in str(trace.reason)
    (llm,) = [n for n in trace.walk() if n.kind == "llm" and n.data["finish_reason"] == "length"]
    assert llm.data["budget"]["truncated"]["limit"] == "usd"


def test_runs_are_listed_without_loading_every_checkpoint(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import datetime

    traced_task.run_to_end(backend, "old-1")
    traced_task.run_to_end(backend, "new-1")
    graph = traced_task.build(backend)
    created = {
        tid: datetime.fromisoformat(
            graph.get_state({"configurable": {"thread_id": tid}}).created_at or ""
        ).timestamp()
        for tid in ("old-1", "new-1")
    }
    if backend.kind != "memory":  # a table to query: the saver's listing must not be used
        configs: list[object] = []
        original = backend.checkpointer.list

        def listing(*a: object, **k: object) -> object:
            configs.append(a[0] if a else k.get("config"))
            return original(*a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(backend.checkpointer, "list", listing)
        list_runs(backend, limit=1)
        assert None not in configs  # no listing of every thread's checkpoints
    runs = list_runs(backend)
    assert [r.thread_id for r in runs] == ["new-1", "old-1"]  # newest activity first
    from harness_nodes._trace_report import _thread_ids

    seen = _thread_ids(backend)
    for tid, ts in created.items():
        assert seen[tid] == pytest.approx(ts, abs=0.01)  # the last checkpoint's own time


def test_each_task_on_a_thread_shows_its_own_outcome() -> None:
    # A second task on a finished thread, stopped by the budget before its first call: its
    # outcome replaces the first task's, and the tree shows both.
    from langchain_core.messages import HumanMessage

    from checkpointers import open_backend
    from harness_nodes import Envelope, build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai

    model = ScriptedChatModel(script=[ai("First answer.")], model_name="gpt-4o-mini")
    with open_backend("memory://") as backend:
        agent = build_harnessed_agent(model, [], envelope=Envelope(max_calls=1), backend=backend)
        cfg = {"configurable": {"thread_id": "chat"}}
        agent.invoke({"messages": [HumanMessage("one")]}, cfg, durability="sync")
        agent.invoke({"messages": [HumanMessage("two")]}, cfg, durability="sync")
        trace = build_trace(backend, "chat")
    outcomes = [n.name for n in trace.walk() if n.kind == "outcome"]
    assert outcomes == ["completed", "budget_exhausted"]
    assert trace.status == "budget_exhausted"


class _AppState(TypedDict, total=False):
    q: str
    outcome: str
    task: str
    verdicts: Annotated[list[str], operator.add]


@pytest.mark.parametrize(
    ("key", "value"),
    [("outcome", "shipped"), ("task", "summarise the report"), ("verdicts", ["looks fine"])],
)
def test_an_apps_own_keys_named_like_the_harnesss_are_its_data(key: str, value: Any) -> None:
    # `outcome: str` in an app's state crashed build_trace, and `harness runs` / `report`
    # for every thread in the database.
    from langgraph.graph import END, START, StateGraph

    from checkpointers import open_backend

    builder = StateGraph(_AppState)
    builder.add_node("work", lambda state: {key: value})
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    with open_backend("memory://") as backend:
        graph = builder.compile(checkpointer=backend.checkpointer)
        graph.invoke({"q": "hi"}, {"configurable": {"thread_id": "app"}})
        trace = build_trace(backend, "app")
        assert [s.name for s in trace.steps] == ["input", "work"]
        assert not [n for n in trace.walk() if n.kind in ("outcome", "verdict")]
        assert [r.thread_id for r in list_runs(backend)] == ["app"]
        assert reliability_report(backend).tasks == 1


def _agent_loop(model: Any, tool: Any) -> Any:
    """A plain ReAct loop: agent → tools → agent until the model answers."""
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([tool]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder


def test_a_budget_stop_without_a_guard_is_not_a_completion() -> None:
    # `budgeted` alone answers a refused call with a message that ends a plain agent loop.
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from checkpointers import open_backend
    from harness_nodes import Envelope, budgeted
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def look(q: str) -> str:
        """Look."""
        return "found"

    raw = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("look", {"q": "x"})])], loop=True, model_name="gpt-4o"
    )
    with open_backend("memory://") as backend:
        model = budgeted(raw, envelope=Envelope(max_calls=2), backend=backend)
        graph = _agent_loop(model, look).compile(checkpointer=backend.checkpointer)
        graph.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "raw"}})
        trace = build_trace(backend, "raw")
        assert (trace.status, trace.reason) == (
            "budget_exhausted",
            "calls limit reached: used 2 of 2",
        )
        assert reliability_report(backend).outcomes == {"budget_exhausted": 1}


def test_a_task_its_runner_gave_up_on_reports_why() -> None:
    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    from checkpointers import open_backend
    from harness_nodes import TaskRunner

    def flaky(state: MessagesState) -> dict[str, Any]:
        raise ConnectionError("upstream down")

    builder = StateGraph(MessagesState)
    builder.add_node("flaky", flaky)
    builder.add_edge(START, "flaky")
    builder.add_edge("flaky", END)
    with open_backend("memory://") as backend:
        with TaskRunner(backend, builder, max_attempts=1) as runner:
            runner.submit("always", {"messages": [HumanMessage("go")]})
            with pytest.raises(Exception, match="upstream down"):
                runner.result("always", timeout=10)
        trace = build_trace(backend, "always")
        assert (trace.status, trace.reason) == ("failed", "ConnectionError: upstream down")
        report = reliability_report(backend)
        assert report.failure_reasons == [("failed: ConnectionError: upstream down", 1)]


def test_the_json_of_a_trace_is_strict_json_also_with_nan_in_the_state() -> None:
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import END, START, StateGraph

    from checkpointers import open_backend
    from harness_nodes import HarnessState

    def finish(state: HarnessState) -> dict[str, Any]:
        outcome = {"status": "completed", "partial_result": {"score": float("nan")}}
        return {"messages": [AIMessage("done")], "outcome": outcome}

    builder = StateGraph(HarnessState)
    builder.add_node("finish", finish)
    builder.add_edge(START, "finish")
    builder.add_edge("finish", END)
    with open_backend("memory://") as backend:
        builder.compile(checkpointer=backend.checkpointer).invoke(
            {"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "nan"}}
        )
        text = build_trace(backend, "nan").to_json()
    assert '"score": "NaN"' in text

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    json.loads(text, parse_constant=refuse)  # what jq and other strict parsers do
    assert Trace.from_json(text).to_json() == text


def test_secrets_are_masked_in_the_local_trace_too() -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from checkpointers import open_backend
    from harness_nodes import Masker
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def look(api_key: str, card: str) -> str:
        """Look."""
        return "found with sk-proj-LOCALLEAK0123456789"

    args = {"api_key": "plain-secret-1234", "card": "4111111111111111"}
    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("look", args)]), ai("done")])
    with open_backend("memory://") as backend:
        graph = _agent_loop(model, look).compile(checkpointer=backend.checkpointer)
        graph.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "s"}})
        text = build_trace(backend, "s", masker=Masker(sensitive_fields=["card"])).to_json()
    for secret in ("plain-secret-1234", "sk-proj-LOCALLEAK0123456789", "4111111111111111"):
        assert secret not in text, secret
    assert '"api_key": "***"' in text and "found with ***" in text


def test_fields_marked_sensitive_for_the_run_are_masked_in_harness_show(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from checkpointers import open_backend
    from harness_nodes import langfuse_callbacks
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def charge(card: str, amount: float) -> str:
        """Charge a card."""
        return f"charged {amount} to card={card}"

    args = {"card": "4111111111111111", "amount": 12.5}
    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("charge", args)]), ai("done")])
    db = f"sqlite:///{tmp_path / 'h.db'}"
    with open_backend(db) as backend:
        graph = _agent_loop(model, charge).compile(checkpointer=backend.checkpointer)
        config = langfuse_callbacks("c-1", sensitive_fields=["card"])  # no Langfuse: a no-op
        graph.invoke({"messages": [HumanMessage("charge it")]}, config)
        texts = [build_trace(backend, "c-1").to_json()]
    for argv in (["show", "c-1", "--db", db], ["show", "c-1", "--db", db, "--json"]):
        main(argv)
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert "12.5" in text and "4111111111111111" not in text


@pytest.mark.parametrize(
    ("details", "priced"),
    [
        pytest.param({"cache_read": 90_000}, True, id="cache-reads"),
        pytest.param({"cache_creation": 50_000}, True, id="cache-writes"),
        pytest.param(None, True, id="no-details"),
        pytest.param({"cache_read": -5}, False, id="malformed"),
    ],
)
def test_a_model_call_is_costed_with_its_cache_reads_and_writes(
    details: dict[str, int] | None, priced: bool
) -> None:
    # An unbudgeted model's answer is priced from its usage as the budget settles it: cached
    # input at the cache rate, cache writes at theirs; malformed usage is unpriced, not a credit.
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import START, MessagesState, StateGraph

    from checkpointers import open_backend
    from harness_nodes import Pricing

    usage: dict[str, Any] = {
        "input_tokens": 100_000,
        "output_tokens": 1_000,
        "total_tokens": 101_000,
    }
    if details is not None:
        usage["input_token_details"] = details
    answer = AIMessage(
        "hi", usage_metadata=usage, response_metadata={"model_name": "claude-3-5-sonnet-latest"}
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [answer]})
    builder.add_edge(START, "agent")
    with open_backend("memory://") as backend:
        graph = builder.compile(checkpointer=backend.checkpointer)
        graph.invoke({"messages": [HumanMessage("hi")]}, {"configurable": {"thread_id": "c-1"}})
        [llm] = [n for n in build_trace(backend, "c-1").walk() if n.kind == "llm"]
    if not priced:
        assert (llm.input_tokens, llm.cost_usd) == (0, 0.0)
        return
    details = details or {}
    expected = Pricing().cost_nanos(
        "claude-3-5-sonnet-latest",
        100_000,
        1_000,
        details.get("cache_read", 0),
        cache_write_tokens=details.get("cache_creation", 0),
    )
    assert llm.input_tokens == 100_000
    assert llm.cost_usd == pytest.approx(expected / 1e9)


def _reviewed_refund_graph(backend: Backend, script: list[Any]) -> Any:
    """A plain `MessagesState` app: refunds pause for review and run through the effect ledger."""
    from langchain_core.tools import tool
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from harness_nodes import EffectLedger, HumanReview, ReviewPolicy, irreversible
    from harness_nodes.testing import ScriptedChatModel

    @irreversible
    @tool
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        return f"refunded {amount:g} on {order}"

    model = ScriptedChatModel(script=script)
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
    ledger = EffectLedger(backend)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund], wrap_tool_call=ledger.wrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    return builder


def test_a_runners_task_shows_the_outcome_and_effect_arguments_it_stored(
    backend: Backend,
) -> None:
    # The runner writes the outcome (and the effect ledger the arguments) through the
    # harness's codec: the trace read them as plain JSON and showed `outcome None` with
    # `{"json": {...}}` as its data, and the effect's arguments wrapped the same way.
    from langchain_core.messages import HumanMessage

    from harness_nodes import TaskNotFinished, TaskRunner
    from harness_nodes.testing import ai, tool_call

    script = [ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]), ai("Done.")]
    with TaskRunner(backend, _reviewed_refund_graph(backend, script)) as runner:
        runner.submit("k-1", {"messages": [HumanMessage("refund A1")]})
        with pytest.raises(TaskNotFinished):
            runner.result("k-1", timeout=2)
        assert runner.resume("k-1", {"type": "approve"}).status == "completed"
        thread_id = runner.status("k-1").thread_id

    trace = build_trace(backend, thread_id)
    assert (trace.status, trace.reason) == ("completed", None)
    [outcome] = [n for n in trace.walk() if n.kind == "outcome"]
    assert outcome.name == "completed"
    assert outcome.data == {"status": "completed", "partial_result": "Done."}
    [effect] = [n for n in trace.walk() if n.kind == "effect"]
    assert effect.data["args"] == {"order": "A1", "amount": 250}
    assert Trace.from_json(trace.to_json()) == trace


def test_a_task_cancelled_while_paused_is_listed_and_reported_as_cancelled(
    backend: Backend,
) -> None:
    from langchain_core.messages import HumanMessage

    from harness_nodes import TaskNotFinished, TaskRunner
    from harness_nodes.testing import ai, tool_call

    script = [ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]), ai("Done.")]
    with TaskRunner(backend, _reviewed_refund_graph(backend, script)) as runner:
        runner.submit("k-2", {"messages": [HumanMessage("refund A1")]})
        with pytest.raises(TaskNotFinished):
            runner.result("k-2", timeout=2)
        assert runner.cancel("k-2").status == "cancelled"
        thread_id = runner.status("k-2").thread_id

    trace = build_trace(backend, thread_id)
    assert trace.status == "cancelled"
    assert [n.name for n in trace.walk() if n.kind == "outcome"] == ["cancelled"]
    assert [r.status for r in list_runs(backend)] == ["cancelled"]
    report = reliability_report(backend)
    assert report.outcomes == {"cancelled": 1} and report.finished == 1


def _declined_charge() -> Any:
    from langchain_core.tools import tool

    @tool
    def charge(order: str) -> dict[str, str]:
        """Charge an order's card."""
        return {"status": "failed", "error": "card declined"}

    return charge


_DECLINED_REASONS = [
    "the output reports a failure: status='failed'",
    "the output carries an error: error='card declined'",
]


def _failed_verdicts_and_escalation_are_counted_once(backend: Backend) -> None:
    report = reliability_report(backend)
    assert report.failing_tools == [("charge", 1)]
    assert report.failure_reasons == [(r, 1) for r in _DECLINED_REASONS]
    assert report.escalation_rate == 1.0


def test_an_escalation_decided_in_the_queue_shows_its_verdict_once(backend: Backend) -> None:
    # The reviewer's answer replaces the escalated tool message (same id): the replaced message
    # was shown again with its old verdict, and `harness report` counted that verdict twice.
    from langchain_core.messages import HumanMessage

    from harness_nodes import ReviewPolicy, ReviewQueue, ToolContract, build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    charge = _declined_charge()
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("charge", {"order": "A1"}, id="c1")]), ai("Done.")]
    )
    agent = build_harnessed_agent(
        model,
        [charge],
        contracts={"charge": ToolContract(side_effects=True)},
        review_policy=ReviewPolicy(),
        backend=backend,
    )
    queue = ReviewQueue(backend, agent)
    queue.invoke({"messages": [HumanMessage("charge A1")]}, thread_id="esc-q")
    [item] = queue.pending()
    queue.decide(item.id, {"type": "approve"}, reviewer="ana")

    trace = build_trace(backend, "esc-q")
    assert [(n.kind, n.name) for n in trace.decisions()] == [
        ("verdict", "charge: escalate"),
        ("review", "escalate: verification"),
        ("interrupt", "paused → resumed"),
        ("review", "approve by ana"),
        ("outcome", "completed"),
    ]
    review_step = next(s for s in trace.steps if s.name == "review")
    [resolved] = [n for n in review_step.children if n.kind == "tool_result"]
    assert resolved.data["content"] == '{"status": "failed", "error": "card declined"}'
    assert resolved.children == []  # what changed: the output the reviewer accepted
    _failed_verdicts_and_escalation_are_counted_once(backend)
    assert Trace.from_json(trace.to_json()) == trace


def test_an_escalation_answered_directly_shows_the_decision_on_the_tool_result(
    backend: Backend,
) -> None:
    # A plain `MessagesState` app has no `reviews` channel: the decision is recorded only on
    # the tool message it resolves. The trace showed `paused → resumed` with no decision (and
    # the replaced message again with its old verdict).
    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode
    from langgraph.types import Command

    from harness_nodes import (
        HumanReview,
        ReviewPolicy,
        ToolContract,
        VerificationStop,
        VerifyToolOutputs,
        route_after_verify,
    )
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    charge = _declined_charge()
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("charge", {"order": "A1"}, id="c1")]), ai("Done.")]
    )
    review = HumanReview(ReviewPolicy(), tools=[charge])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([charge]))
    builder.add_node("verify", VerifyToolOutputs({"charge": ToolContract(side_effects=True)}))
    builder.add_node("review", review)
    builder.add_node("stop", VerificationStop())
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "verify")
    routes = {"ok": "agent", "retry": "agent", "escalate": "review", "fail": "stop"}
    builder.add_conditional_edges("verify", route_after_verify, routes)
    builder.add_edge("stop", END)
    graph = builder.compile(checkpointer=backend.checkpointer)
    config = {"configurable": {"thread_id": "esc-d"}}
    graph.invoke({"messages": [HumanMessage("charge A1")]}, config, durability="sync")
    decision = {"type": "reject", "message": "wrong card"}
    graph.invoke(Command(resume=decision), config, durability="sync")

    trace = build_trace(backend, "esc-d")
    assert [(n.kind, n.name) for n in trace.decisions()] == [
        ("verdict", "charge: escalate"),
        ("review", "escalate: verification"),
        ("interrupt", "paused → resumed"),
        ("review", "reject (reviewer not recorded)"),
    ]
    review_step = next(s for s in trace.steps if s.name == "review")
    [resolved] = [n for n in review_step.children if n.kind == "tool_result"]
    assert (
        resolved.data["content"]
        == "A human reviewer rejected this result. Reviewer's note: wrong card"
    )
    [decided] = resolved.children
    assert decided.kind == "review"
    assert decided.data["decision"] == "reject" and decided.data["message"] == "wrong card"
    assert decided.data["tool_call_id"] == "c1" and decided.data["escalation"] == "verification"
    _failed_verdicts_and_escalation_are_counted_once(backend)
    assert Trace.from_json(trace.to_json()) == trace


def test_an_escalation_answered_directly_in_a_harness_state_shows_one_decision(
    backend: Backend,
) -> None:
    # The decision is both a `reviews` record and on the tool message: one node.
    from langchain_core.messages import HumanMessage
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy, ToolContract, build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    charge = _declined_charge()
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("charge", {"order": "A1"}, id="c1")]), ai("Done.")]
    )
    agent = build_harnessed_agent(
        model,
        [charge],
        contracts={"charge": ToolContract(side_effects=True)},
        review_policy=ReviewPolicy(),
        backend=backend,
    )
    config = {"configurable": {"thread_id": "esc-h"}}
    agent.invoke({"messages": [HumanMessage("charge A1")]}, config, durability="sync")
    agent.invoke(Command(resume={"type": "approve"}), config, durability="sync")

    trace = build_trace(backend, "esc-h")
    assert [(n.kind, n.name) for n in trace.decisions()] == [
        ("verdict", "charge: escalate"),
        ("review", "escalate: verification"),
        ("interrupt", "paused → resumed"),
        ("review", "approve (reviewer not recorded)"),
        ("outcome", "completed"),
    ]
    _failed_verdicts_and_escalation_are_counted_once(backend)


def test_an_unknown_effect_confirmed_by_a_reviewer_shows_the_decision_and_the_effect_once(
    backend: Backend,
) -> None:
    # The reviewer's answer replaces the escalated tool message: the decision on it was not
    # shown, and the effect ledger's record was attached to it a second time.
    from langchain_core.messages import HumanMessage
    from langgraph.types import Command

    from harness_nodes import EffectLedger
    from tests.harness_nodes.test_effects import Counter, _reviewed_refund, _timing_out_refund

    ledger = EffectLedger(backend)
    refund = _timing_out_refund(Counter(), times=1)
    graph = _reviewed_refund(refund, ledger).compile(checkpointer=backend.checkpointer)
    config: Any = {"configurable": {"thread_id": "unknown-1"}}
    with pytest.raises(TimeoutError):
        graph.invoke({"messages": [HumanMessage("refund o1")]}, config, durability="sync")
    graph.invoke(None, config, durability="sync")  # paused: did the refund go through?
    ledger.resolve("unknown-1", "c1", happened=True, result="refunded", reviewer="ann")
    graph.invoke(Command(resume={"type": "approve"}), config, durability="sync")

    trace = build_trace(backend, "unknown-1")
    assert [(n.kind, n.name) for n in trace.decisions()] == [
        ("effect", "ran"),
        ("review", "escalate: effect_unknown"),
        ("interrupt", "paused → resumed"),
        ("review", "approve (reviewer not recorded)"),
    ]


def test_a_call_rejected_directly_shows_one_decision(backend: Backend) -> None:
    # The rejected call's answer carries the decision too, as the AI message does: one node.
    from langchain_core.messages import HumanMessage
    from langgraph.types import Command

    from harness_nodes.testing import ai, tool_call

    script = [ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]), ai("Done.")]
    graph = _reviewed_refund_graph(backend, script).compile(checkpointer=backend.checkpointer)
    config = {"configurable": {"thread_id": "rej-d"}}
    graph.invoke({"messages": [HumanMessage("refund A1")]}, config, durability="sync")
    decision = {"type": "reject", "message": "not this order"}
    graph.invoke(Command(resume=decision), config, durability="sync")

    trace = build_trace(backend, "rej-d")
    assert [(n.kind, n.name) for n in trace.decisions()] == [
        ("interrupt", "paused → resumed"),
        ("review", "reject (reviewer not recorded)"),
    ]
    [decided] = [n for n in trace.walk() if n.kind == "review"]
    assert decided.data["message"] == "not this order"


def test_harness_show_has_the_queue_reviewers_edited_arguments_and_message(
    backend: Backend,
) -> None:
    # A decision made in the queue is shown under its interrupt (reviewer, latency): the
    # arguments an edit gave a call and a reject's message were in no line of the tree.
    import io

    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from rich.console import Console

    from harness_nodes import ReviewPolicy, ReviewQueue, build_harnessed_agent
    from harness_nodes.cli._trace import render
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def refund(order: str, amount: float, api_key: str = "") -> str:
        """Refund an order."""
        return f"refunded {amount:g} on {order}"

    @tool
    def email(to: str, body: str) -> str:
        """Email a customer."""
        return f"emailed {to}"

    calls = [
        tool_call("refund", {"order": "A1", "amount": 250}, id="r1"),
        tool_call("email", {"to": "d@example.com", "body": "refunded"}, id="e1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Done.")])
    policy = ReviewPolicy(always=["refund", "email"])
    agent = build_harnessed_agent(model, [refund, email], review_policy=policy, backend=backend)
    queue = ReviewQueue(backend, agent)
    queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="edit-1")
    [item] = queue.pending()
    secret = "sk-live-EDITEDKEY0123456789abcdef"
    edited = {"order": "A1", "amount": 90, "api_key": secret}
    decisions = [{"type": "edit", "args": edited}, {"type": "reject", "message": "not yet"}]
    queue.decide(item.id, decisions, reviewer="ana")

    trace = build_trace(backend, "edit-1")
    shown = io.StringIO()
    Console(file=shown, width=300).print(render(trace))
    [line] = [ln for ln in shown.getvalue().splitlines() if "edit+reject by ana" in ln]
    assert 'refund → {"order": "A1", "amount": 90, "api_key": "***"}' in line
    assert "email: not yet" in line
    [decided] = [n for n in trace.walk() if n.kind == "review"]
    assert decided.name == "edit+reject by ana"
    assert decided.data["calls"] == [
        {
            "tool_call_id": "r1",
            "tool": "refund",
            "decision": "edit",
            "args_before": {"order": "A1", "amount": 250},
            "args_after": {"order": "A1", "amount": 90, "api_key": "***"},
        },
        {"tool_call_id": "e1", "tool": "email", "decision": "reject", "message": "not yet"},
    ]
    text = trace.to_json()
    assert secret not in text and Trace.from_json(text) == trace


def test_a_call_a_crash_cut_off_shows_where_its_charge_went(backend: Backend) -> None:
    # The crashed call's worst case was charged (it may have been billed) but no answer of it
    # reached a checkpoint: the tree's steps came to half the task's cost, with no word why.
    from langchain_core.messages import HumanMessage

    from checkpointers._spend import SpendLedger
    from graphs import SimulatedCrash, support
    from harness_nodes import Envelope

    config: Any = {"configurable": {"thread_id": "t-crash"}}
    first = support.build_graph(
        backend=backend, faults={"crash_at_turn": 2}, budget_usd=0.01, review_policy=None
    )
    with pytest.raises(SimulatedCrash):
        first.invoke({"messages": [HumanMessage(support.DEFAULT_TASK)]}, config)
    again = support.build_graph(backend=backend, budget_usd=0.01, review_policy=None)
    again.invoke(None, config)
    # ...and a call in flight in a process killed since: its worst case stays booked.
    limits = Envelope(max_usd=0.01).limits()
    SpendLedger(backend).reserve("t-crash", "support", "gpt-4o-mini", 10, 10, 5_000, limits)

    trace = build_trace(backend, "t-crash")
    lost = [n for n in trace.walk() if n.kind == "budget" and n.data.get("action") == "lost_call"]
    assert [n.data["state"] for n in lost] == ["settled", "reserved"]
    charged, booked = lost
    assert charged.name.startswith("lost call gpt-4o-mini: charged its worst case $0.00")
    assert charged.output_tokens == 4096 and charged.cost_usd > 0  # the output cap it was given
    assert booked.cost_usd == 0 and booked.data["booked_usd"] == pytest.approx(5e-6)
    assert "still in flight, or its process died" in booked.name
    # the steps add up to what the ledger says the task spent
    assert sum(s.cost_usd for s in trace.steps) == pytest.approx(trace.cost_usd)
    assert trace.status == "completed"
    assert Trace.from_json(trace.to_json()) == trace


def test_a_call_a_budget_callback_recorded_inside_a_node_is_not_a_lost_call(
    backend: Backend,
) -> None:
    # Its answer carries no spend id (no budgeted wrapper annotated it): it was shown as a
    # call a crash had cut off, "charged its worst case" (its real cost).
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    from harness_nodes import BudgetCallbackHandler
    from harness_nodes.testing import ScriptedChatModel

    handler = BudgetCallbackHandler(backend)
    raw = ScriptedChatModel(script=["summary ok"], model_name="gpt-4o-mini")

    def node(state: MessagesState) -> dict[str, Any]:
        config: Any = {"callbacks": [handler], "metadata": {"thread_id": "t-cb"}}
        return {"messages": [AIMessage(raw.invoke("summarise", config).content)]}

    builder = StateGraph(MessagesState)
    builder.add_node("n", node)
    builder.add_edge(START, "n")
    builder.add_edge("n", END)
    graph = builder.compile(checkpointer=backend.checkpointer)
    graph.invoke({"messages": [HumanMessage("hi")]}, {"configurable": {"thread_id": "t-cb"}})
    trace = build_trace(backend, "t-cb")
    assert trace.cost_usd > 0  # the handler's call is in the ledger...
    assert not [n for n in trace.walk() if n.data.get("action") == "lost_call"]  # ...not lost


@pytest.mark.anyio
async def test_the_local_traces_refuse_an_async_backend_with_a_clear_error(tmp_path: Any) -> None:
    # build_trace gave the async saver's InvalidStateError; list_runs and reliability_report
    # a "'coroutine' object is not iterable" TypeError (and an un-awaited coroutine warning).
    from checkpointers import aopen_backend
    from harness_nodes import UserError

    async with await aopen_backend(f"sqlite:///{tmp_path / 'a.db'}") as backend:
        for name, read in (
            ("build_trace", lambda: build_trace(backend, "t")),  # type: ignore[arg-type]
            ("list_runs", lambda: list_runs(backend)),  # type: ignore[arg-type]
            ("reliability_report", lambda: reliability_report(backend)),  # type: ignore[arg-type]
        ):
            with pytest.raises(UserError, match=f"{name} reads with a sync Backend"):
                read()


def _subgraph_refund_task(backend: Backend) -> Any:
    """A harnessed agent added as a node of a parent graph: a $50 refund runs, then a $500
    one pauses for review inside the subgraph."""
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph

    from harness_nodes import (
        HarnessState,
        ReviewPolicy,
        ReviewQueue,
        build_harnessed_agent,
        irreversible,
    )
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @irreversible
    @tool
    def refund(order: str, amount: float) -> dict[str, Any]:
        """Refund an order."""
        return {"refund_id": f"r-{amount:g}", "amount": amount}

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 50}, id="c-small")]),
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 500}, id="c-big")]),
            ai("Done."),
        ],
        model_name="gpt-4o-mini",
    )
    agent = build_harnessed_agent(
        model,
        [refund],
        review_policy=ReviewPolicy(rules={"refund": lambda a: a["amount"] > 100 and "big"}),
        backend=backend,
        checkpointer=None,
    )
    parent = StateGraph(HarnessState)
    parent.add_node("support", agent)
    parent.add_edge(START, "support")
    parent.add_edge("support", END)
    queue = ReviewQueue(backend, parent.compile(checkpointer=backend.checkpointer))
    queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t-sub")
    return queue


def _under_subgraph(trace: Trace) -> list[tuple[str, str]]:
    [sub] = [n for n in trace.walk() if n.kind == "subgraph"]
    assert sub.name == "support"
    return [(n.kind, n.name) for n in sub.walk() if n.kind in ("llm", "effect", "interrupt")]


def test_trace_of_a_pause_inside_a_subgraph_shows_what_the_subgraph_did(backend: Backend) -> None:
    queue = _subgraph_refund_task(backend)

    paused = build_trace(backend, "t-sub")

    # The reviewer sees the $50 refund that already went out and the call asking for $500.
    assert paused.status == "paused"
    assert _under_subgraph(paused) == [
        ("llm", "gpt-4o-mini"),
        ("effect", "ran"),
        ("llm", "gpt-4o-mini"),
        ("interrupt", "paused for review"),
    ]
    assert [n.kind for n in paused.walk()].count("interrupt") == 1
    assert paused.input_tokens > 0 and paused.cost_usd > 0

    [item] = queue.pending()
    queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    done = build_trace(backend, "t-sub")

    assert done.status == "completed"
    assert _under_subgraph(done) == [
        ("llm", "gpt-4o-mini"),
        ("effect", "ran"),
        ("llm", "gpt-4o-mini"),
        ("interrupt", "paused → resumed"),
        ("effect", "ran"),
        ("llm", "gpt-4o-mini"),
    ]
    # Each fact once: the parent's state repeats the subgraph's messages and its pause.
    assert [n.kind for n in done.walk()].count("llm") == 3
    assert [n.kind for n in done.walk()].count("interrupt") == 1
    assert [n.name for n in done.decisions() if n.kind in ("review", "outcome")] == [
        "approve by alice",
        "completed",
    ]
    assert Trace.from_json(done.to_json()) == done


def test_a_long_task_is_read_once_and_holds_each_message_once(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every checkpoint holds the whole state: a thread of n steps repeats ≈ n²/2 messages.
    # Listed twice and each copy kept, 1,000 steps took 1.9 GB and 90 s to show.
    from langchain_core.messages import BaseMessage, HumanMessage
    from langchain_core.tools import tool

    from harness_nodes import Envelope, build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def look(q: str) -> str:
        """Look."""
        return f"seen {q}"

    call = ai(tool_calls=[tool_call("look", {"q": "x"})])
    model = ScriptedChatModel(script=[call], loop=True, model_name="gpt-4o-mini")
    agent = build_harnessed_agent(model, [look], envelope=Envelope(max_calls=15), backend=backend)
    agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "long"}})
    read: list[Any] = []
    original = backend.checkpointer.list

    def listing(*a: Any, **k: Any) -> Any:
        for tup in original(*a, **k):
            read.append(tup)
            yield tup

    monkeypatch.setattr(backend.checkpointer, "list", listing)
    trace = build_trace(backend, "long")
    reads, checkpoints = (
        len(read),
        len({str(t.config["configurable"]["checkpoint_id"]) for t in read}),
    )
    assert reads == checkpoints > 30  # each checkpoint deserialized once
    held = {
        id(m)
        for t in read
        for m in t.checkpoint["channel_values"].get("messages", [])
        if isinstance(m, BaseMessage)
    }
    last = max(read, key=lambda t: str(t.config["configurable"]["checkpoint_id"]))
    distinct = len(last.checkpoint["channel_values"]["messages"])
    assert len(held) == distinct  # not one per copy
    assert len([n for n in trace.walk() if n.kind == "llm"]) == 15


def test_a_long_task_is_read_decoding_each_message_once_not_once_per_checkpoint(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every checkpoint holds the whole state: decoding every copy of every message made the
    # time to read n steps grow as n² (3,000 steps: minutes). Each distinct message's bytes
    # are decoded once; the checkpoints are read as bytes.
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from harness_nodes import Envelope, build_harnessed_agent
    from harness_nodes import _trace_local as local
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @tool
    def look(q: str) -> str:
        """Look."""
        return f"seen {q}"

    call = ai(tool_calls=[tool_call("look", {"q": "x"})])
    model = ScriptedChatModel(script=[call], loop=True, model_name="gpt-4o-mini")
    agent = build_harnessed_agent(model, [look], envelope=Envelope(max_calls=20), backend=backend)
    config: Any = {"configurable": {"thread_id": "long"}}
    agent.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    messages = agent.get_state(config).values["messages"]
    checkpoints = len(list(agent.get_state_history(config)))

    serde = backend.checkpointer.serde
    decode = serde._unpack_ext_hook
    decoded: list[int] = []

    def counting(code: int, data: bytes) -> Any:
        decoded.append(code)
        return decode(code, data)

    monkeypatch.setattr(serde, "_unpack_ext_hook", counting)
    trace = build_trace(backend, "long")
    monkeypatch.undo()

    assert len(messages) > 40 and checkpoints > 40
    # Each message once from the checkpoints, once from the write that added it: linear.
    # Decoding every checkpoint's copy is ≈ messages × checkpoints / 2 (over 800 here).
    assert len(decoded) <= 2 * len(messages) + 10, (len(decoded), len(messages), checkpoints)
    assert len([n for n in trace.walk() if n.kind == "llm"]) == 20
    assert Trace.from_json(trace.to_json()) == trace
    # The same tree as every checkpoint deserialized whole, as the saver's listing gives it.
    monkeypatch.setattr(local, "_reader", lambda saver: (saver, None))
    assert build_trace(backend, "long").to_json() == trace.to_json()


def test_building_a_trace_leaves_the_garbage_collector_as_it_found_it(backend: Backend) -> None:
    # The collector is paused while a history is read (its full passes revisit every
    # checkpoint's lists): on again afterwards, and still off for an app that turned it off.
    import gc

    traced_task.run_to_end(backend, "t-1")
    assert gc.isenabled()
    build_trace(backend, "t-1")
    assert gc.isenabled()
    gc.disable()
    try:
        build_trace(backend, "t-1")
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(UnknownThread):
        build_trace(backend, "nobody")
    assert gc.isenabled()


def test_traces_built_at_once_keep_the_collector_paused_until_the_last_ends() -> None:
    # An inbox builds traces on several request threads: the first to finish must not turn
    # the collector back on under one still reading, nor leave it off after the last.
    import gc

    from harness_nodes._trace_local import _collection_paused

    assert gc.isenabled()
    first, second = _collection_paused(), _collection_paused()
    first.__enter__()
    second.__enter__()
    assert not gc.isenabled()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the second is still reading
    second.__exit__(None, None, None)
    assert gc.isenabled()
