"""What the real Langfuse SDK sends for a harnessed task, captured with no server.

A loopback receiver (`LangfuseReceiver`) decodes the OTLP/HTTP span exports and the JSON score
posts exactly as a Langfuse server would receive them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import Command

from checkpointers import open_backend
from harness_nodes import HarnessState, Pricing, langfuse_callbacks, langfuse_handler, trace_id_for
from harness_nodes._events import aemit
from harness_nodes.testing import LangfuseReceiver, ReceivedSpan, ScriptedChatModel, ai, tool_call
from tests.conftest import subprocess_env
from tests.harness_nodes import traced_task

pytestmark = pytest.mark.anyio


@pytest.fixture
def receiver() -> Iterator[LangfuseReceiver]:
    with LangfuseReceiver() as r:
        yield r


@pytest.fixture
def public_key() -> Iterator[str]:
    # One Langfuse client per public key: a fresh key gives each test its own client.
    key = f"pk-lf-test-{uuid.uuid4().hex[:12]}"
    yield key
    from langfuse import get_client

    get_client(public_key=key).shutdown()


def _config(thread_id: str, receiver: LangfuseReceiver, public_key: str, **kw: Any) -> Any:
    return langfuse_callbacks(
        thread_id,
        task_type="refunds",
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url=receiver.base_url,
        flush_interval=0.05,
        **kw,
    )


def _handler(receiver: LangfuseReceiver, public_key: str, **kw: Any) -> Any:
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url=receiver.base_url,
        flush_interval=0.05,
        **kw,
    )
    assert handler is not None
    return handler


def _flush(public_key: str) -> None:
    from langfuse import get_client

    get_client(public_key=public_key).flush()


def _roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    # With a seeded trace id the SDK parents each leg's root under a synthetic remote span.
    ids = {s.span_id for s in spans}
    return [s for s in spans if s.parent_span_id not in ids]


def _by_type(spans: list[ReceivedSpan], kind: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.type == kind]


def test_a_task_is_one_trace_with_guardrails_generations_events_and_scores(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    with open_backend("memory://") as backend:
        handler = _handler(receiver, public_key, sensitive_fields=["card_number"])
        traced_task.run_to_end(backend, "lf-1", [handler])
    _flush(public_key)
    spans = receiver.spans
    trace_id = trace_id_for("lf-1")

    # one trace for both legs (start → review pause, resume → end)
    assert {s.trace_id for s in spans} == {trace_id}
    roots = _roots(spans)
    assert len(roots) == 2
    assert all(s.attributes["session.id"] == "lf-1" for s in spans)
    # Langfuse shows the latest leg's root input as the trace's input: the resumed leg's root
    # carries the reviewer's answer in its metadata, so the trace keeps the task's request
    first, resumed = sorted(roots, key=lambda s: s.start_ns)
    assert first.attr("input")["messages"][0]["content"] == "Refund order 42, it arrived broken."
    assert resumed.attr("input") is None
    ((decision,),) = resumed.attr("metadata.resume").values()  # interrupt id → decisions
    assert (decision["type"], decision["reviewer"]) == ("approve", "alice")
    assert all("refunds" in s.attributes["langfuse.trace.tags"] for s in spans)

    # verdicts → guardrail observations, under the node that ran the check
    guardrails = _by_type(spans, "guardrail")
    outputs = [(g.name, g.attr("output")["action"]) for g in guardrails]
    assert outputs == [("verify search", "retry"), ("verify search", "ok"), ("verify refund", "ok")]
    assert guardrails[0].attr("level") == "WARNING"
    assert guardrails[0].attr("output")["reasons"] == [traced_task.SEARCH_FAILURE]
    tools_spans = {s.span_id for s in spans if s.name == "tools"}
    assert all(g.parent_span_id in tools_spans for g in guardrails)

    # every generation has a model name and a cost, priced by the harness
    generations = _by_type(spans, "generation")
    assert [g.attr("model.name") for g in generations] == [
        "gpt-4o",
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4o-mini",
    ]
    pricing = Pricing()
    for g in generations:
        usage, cost = g.attr("usage_details"), g.attr("cost_details")
        expected = pricing.cost_nanos(g.attr("model.name"), usage["input"], usage["output"]) / 1e9
        assert cost["total"] == pytest.approx(expected) and cost["total"] > 0

    # budget, review and effect decisions → events with their figures
    events = {s.name: s for s in _by_type(spans, "event")}
    degrade = events["budget.degrade"]
    assert degrade.attr("level") == "WARNING"
    assert degrade.attr("output")["to_model"] == "gpt-4o-mini"
    settle = events["budget.settle"]
    assert settle.attr("output")["usd"] > 0
    assert settle.attr("output")["limit_usd"] == traced_task.ENVELOPE.max_usd
    requested = events["review requested"]  # the pause, once (not again on the resume)
    assert [s.name for s in _by_type(spans, "event")].count("review requested") == 1
    assert requested.attr("level") == "WARNING"
    assert [c["name"] for c in requested.attr("input")["tool_calls"]] == ["refund"]
    review = events["review approve by alice"]
    assert review.attr("metadata.reviewer") == "alice"
    assert events["effect run: refund"].attr("output")["idempotency_key"] == "lf-1:call-r1"
    assert "outcome: completed" in events

    # scores: verification per check, the review, the budget, the outcome on the trace
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))
    scores = receiver.scores
    assert all(s["traceId"] == trace_id for s in scores)
    outcome = [s for s in scores if s["name"] == "outcome"]
    assert {s["value"] for s in outcome} == {"completed"} and "observationId" not in outcome[0]
    verification = sorted(
        (s["value"], s["observationId"]) for s in scores if s["name"] == "verification"
    )
    assert [v for v, _ in verification] == [0.0, 1.0, 1.0]
    assert {o for _, o in verification} == {g.span_id for g in guardrails}
    assert {s["value"] for s in scores if s["name"] == "review"} == {"approve"}
    assert {s["value"] for s in scores if s["name"] == "budget"} == {"degraded"}


def test_secrets_never_reach_the_trace(
    receiver: LangfuseReceiver, public_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_secret = "env-secret-value-" + uuid.uuid4().hex
    monkeypatch.setenv("OPENAI_API_KEY", env_secret)
    with open_backend("memory://") as backend:
        handler = _handler(receiver, public_key, sensitive_fields=["card_number"])
        metadata = {"api_key": "sk-proj-FROMMETADATA0123456789", "note": f"key: {env_secret}"}
        traced_task.run_to_end(backend, "lf-2", [handler], metadata)
    _flush(public_key)
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))
    blob = b"\n".join(receiver.raw_bodies)
    for secret in (
        traced_task.SECRET,
        "4111111111111111",
        env_secret,
        "sk-proj-FROMMETADATA0123456789",
        "sk-lf-test-secret",
    ):
        assert secret.encode() not in blob, secret
    # the call itself is still there, with the non-sensitive arguments
    refund_calls = [
        s for s in receiver.spans if s.type == "generation" and "refund" in str(s.attr("output"))
    ]
    assert refund_calls
    assert '"amount": 10' in str(refund_calls[0].attributes["langfuse.observation.output"]) or (
        "'amount': 10" in str(refund_calls[0].attr("output"))
    )
    assert b"***" in blob


def test_without_keys_tracing_is_off_with_one_notice(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness_nodes._trace_langfuse as lf

    monkeypatch.setattr(lf, "_NOTICE_SHOWN", False)
    with caplog.at_level(logging.WARNING, logger="harness_nodes.tracing"):
        first = langfuse_callbacks("t-off", task_type="refunds")
        second = langfuse_callbacks("t-off-2")
    assert "callbacks" not in first and "callbacks" not in second
    assert first["configurable"]["thread_id"] == "t-off"
    notices = [r for r in caplog.records if r.name == "harness_nodes.tracing"]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    with open_backend("memory://") as backend:
        graph = traced_task.build(backend)
        graph.invoke(traced_task.first_input("t-off"), first, durability="sync")
    assert graph.get_state(first).interrupts  # ran untraced, to the review pause


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        pytest.param({}, "no LANGFUSE_PUBLIC_KEY and no LANGFUSE_SECRET_KEY", id="neither"),
        pytest.param({"LANGFUSE_PUBLIC_KEY": "pk-lf-1"}, "no LANGFUSE_SECRET_KEY)", id="no-secret"),
        pytest.param({"LANGFUSE_SECRET_KEY": "sk-lf-1"}, "no LANGFUSE_PUBLIC_KEY)", id="no-public"),
    ],
)
def test_the_notice_names_the_missing_key(
    env: dict[str, str],
    missing: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import harness_nodes._trace_langfuse as lf

    monkeypatch.setattr(lf, "_NOTICE_SHOWN", False)
    for name in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="harness_nodes.tracing"):
        config = langfuse_callbacks("t-half")
    assert "callbacks" not in config
    [notice] = [r.getMessage() for r in caplog.records if r.name == "harness_nodes.tracing"]
    assert f"Langfuse tracing is off ({missing}" in notice


def test_a_thread_id_is_required() -> None:
    from harness_nodes import UserError

    with pytest.raises(UserError, match="needs a thread id"):
        langfuse_callbacks({"configurable": {}})


async def test_async_graph_events_stay_in_the_task_trace(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    model = ScriptedChatModel(model_name="gpt-4o-mini", script=[ai("hello")])

    async def agent(state: MessagesState) -> dict[str, Any]:
        msg = await model.ainvoke(state["messages"])
        await aemit(
            "verdict",
            {
                "tool": "t",
                "tool_call_id": "c1",
                "ok": True,
                "reasons": [],
                "attempt": 1,
                "action": "ok",
            },
        )
        return {"messages": [msg]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    config = _config("lf-async", receiver, public_key)
    out = await graph.ainvoke({"messages": [HumanMessage("hi")]}, config)
    assert isinstance(out["messages"][-1], AIMessage)
    _flush(public_key)
    spans = receiver.spans
    assert {s.trace_id for s in spans} == {trace_id_for("lf-async")}
    (root,) = _roots(spans)
    assert root.attributes["langfuse.trace.metadata.harness_task_id"] == "lf-async"
    assert root.attributes["langfuse.trace.tags"] == ["refunds"]
    assert root.attributes["session.id"] == "lf-async"
    (guardrail,) = _by_type(spans, "guardrail")
    (node,) = [s for s in spans if s.name == "agent"]
    assert guardrail.parent_span_id == node.span_id
    (generation,) = _by_type(spans, "generation")
    assert generation.attr("model.name") == "gpt-4o-mini" and generation.attr("cost_details")


def test_the_sdks_span_exporter_hook_sees_the_same_tree(public_key: str) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    with open_backend("memory://") as backend:
        handler = langfuse_handler(
            public_key=public_key,
            secret_key="sk-lf-x",
            base_url="http://127.0.0.1:9",  # nothing listens: spans go to the exporter
            span_exporter=exporter,
        )
        traced_task.run_to_end(backend, "lf-mem", [handler])
    _flush(public_key)
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id_for("lf-mem")}
    types = [s.attributes.get("langfuse.observation.type") for s in spans]
    assert types.count("guardrail") == 3 and types.count("generation") == 4


# --- across processes --------------------------------------------------------------------


def _leg(
    leg: str, db: str, thread: str, receiver: LangfuseReceiver, public_key: str, **kw: Any
) -> subprocess.Popen[str]:
    env = subprocess_env(
        LANGFUSE_PUBLIC_KEY=public_key,
        LANGFUSE_SECRET_KEY="sk-lf-test-secret",
        LANGFUSE_BASE_URL=receiver.base_url,
    )
    args = [sys.executable, "-m", "tests.harness_nodes.traced_task", leg, "--db", db]
    args += ["--thread", thread]
    if "marker" in kw:
        args += ["--hang-marker", str(kw["marker"])]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run_leg(*args: Any) -> None:
    proc = _leg(*args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


@pytest.mark.slow
@pytest.mark.postgres
def test_interrupt_and_resume_in_two_processes_is_one_trace(
    postgres_url: str, receiver: LangfuseReceiver, public_key: str
) -> None:
    # Postgres here, SQLite in the kill -9 test below (whose last two legs are also an
    # interrupt and a resume in two processes): the trace id does not depend on the backend.
    durable_url = postgres_url
    _run_leg("start", durable_url, "x-1", receiver, public_key)
    first_leg = {s.span_id for s in receiver.spans}
    assert first_leg
    _run_leg("resume", durable_url, "x-1", receiver, public_key)
    spans = receiver.spans
    assert {s.trace_id for s in spans} == {trace_id_for("x-1")}
    roots = _roots(spans)
    assert len(roots) == 2  # one root per leg, one trace
    second_leg = [s for s in spans if s.span_id not in first_leg]
    assert any(s.name == "review approve by alice" for s in second_leg)
    assert [g.attr("output")["action"] for g in _by_type(spans, "guardrail")] == [
        "retry",
        "ok",
        "ok",
    ]
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))
    assert {s["traceId"] for s in receiver.scores} == {trace_id_for("x-1")}


@pytest.mark.slow
def test_kill_9_and_resume_is_still_one_trace(
    receiver: LangfuseReceiver, public_key: str, tmp_path: Path
) -> None:
    # SQLite (the test above covers Postgres); each leg is a new process.
    durable_url = f"sqlite:///{tmp_path / 'harness.db'}"
    marker = tmp_path / "in-tools"
    proc = _leg("crash", durable_url, "k-1", receiver, public_key, marker=marker)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # what finished before the crash was exported (flush_interval=0.1 in the leg)
        assert receiver.wait_for(lambda r: bool(_by_type(r.spans, "generation")))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    crashed = receiver.spans
    assert not [s for s in crashed if s.name == "LangGraph"]  # the crashed root never ended

    _run_leg("continue", durable_url, "k-1", receiver, public_key)  # recovery, to the pause
    _run_leg("resume", durable_url, "k-1", receiver, public_key)  # the review, to the end
    spans = receiver.spans
    assert {s.trace_id for s in spans} == {trace_id_for("k-1")}
    assert len(_by_type(spans, "generation")) == 4  # turn 0 before the crash, 1-3 after
    assert [g.attr("output")["action"] for g in _by_type(spans, "guardrail")] == [
        "retry",
        "ok",
        "ok",
    ]
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))


def test_one_handler_for_a_review_queue_keeps_each_task_in_its_own_trace(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from langchain_core.tools import tool
    from langgraph.prebuilt import ToolNode

    from harness_nodes import HumanReview, ReviewPolicy, ReviewQueue

    @tool
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        return f"refunded {amount} on {order}"

    model = ScriptedChatModel(
        model_name="gpt-4o-mini",
        script=[ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 5})]), ai("Done.")],
    )
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url=receiver.base_url,
        flush_interval=0.05,
    )
    assert handler is not None
    with open_backend("memory://") as backend:
        graph = builder.compile(checkpointer=backend.checkpointer).with_config(callbacks=[handler])
        queue = ReviewQueue(backend, graph)
        for thread in ("q-1", "q-2"):
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id=thread)
        for item in queue.pending():
            queue.decide(item.id, {"type": "approve"}, reviewer="bob")
    _flush(public_key)
    spans = receiver.spans
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    assert set(by_trace) == {trace_id_for("q-1"), trace_id_for("q-2")}
    for thread in ("q-1", "q-2"):
        legs = by_trace[trace_id_for(thread)]
        assert len(_roots(legs)) == 2  # the pause, and the queue's resume
        assert {s.attributes["session.id"] for s in legs} == {thread}
        assert any(s.name == "review approve by bob" for s in legs)
        assert len(_by_type(legs, "generation")) == 2


# --- what is exported, and what is not ---------------------------------------------------


def test_plumbing_chains_get_no_span_and_what_runs_in_them_attaches_to_the_node(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from langchain_core.runnables import RunnableLambda

    from harness_nodes._events import emit

    model = ScriptedChatModel(model_name="gpt-4o-mini", script=[ai("hello")])
    chain = RunnableLambda(lambda msgs: msgs, name="prepare_prompt") | model

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [chain.invoke(state["messages"])]}

    def route(state: MessagesState) -> str:
        verdict = {"tool": "t", "tool_call_id": "c1", "ok": True, "reasons": [], "attempt": 1}
        emit("verdict", {**verdict, "action": "ok"})
        return END

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, [END])
    graph = builder.compile(checkpointer=InMemorySaver())
    graph.invoke({"messages": [HumanMessage("hi")]}, _config("lf-plumb", receiver, public_key))
    _flush(public_key)
    spans = receiver.spans
    names = {s.name for s in spans}
    # the routing function and the sequence's pieces are plumbing: no observation of their own
    assert not names & {"route", "prepare_prompt", "RunnableSequence"}
    (root,) = _roots(spans)  # and nothing they ran became a stray root
    (node,) = [s for s in spans if s.name == "agent"]
    assert node.parent_span_id == root.span_id
    (generation,) = _by_type(spans, "generation")
    (guardrail,) = _by_type(spans, "guardrail")
    assert generation.parent_span_id == node.span_id
    assert guardrail.parent_span_id == node.span_id  # emitted in the route, run by the node
    # child observations keep their own metadata; the task's is on the trace, once
    assert node.attr("metadata.langgraph_node") == "agent"
    for s in spans:
        keys = {k.removeprefix("langfuse.observation.metadata.") for k in s.attributes}
        assert not keys & {"thread_id", "langgraph_triggers", "langgraph_path", "ls_provider"}
        assert "langfuse.trace.metadata.thread_id" not in s.attributes
    assert root.attributes["langfuse.trace.metadata.harness_task_id"] == "lf-plumb"


@pytest.mark.parametrize("outer", [False, True])
def test_trace_attributes_reach_every_span_also_the_applications_own(
    receiver: LangfuseReceiver, public_key: str, outer: bool
) -> None:
    from contextlib import nullcontext

    from langfuse import get_client, propagate_attributes

    model = ScriptedChatModel(model_name="gpt-4o-mini", script=[ai("hello")])

    def agent(state: MessagesState) -> dict[str, Any]:
        # the application's own span, inside a node: nested under it, in the task's trace
        with get_client(public_key=public_key).start_as_current_observation(name="app work"):
            pass
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    # an application that propagates attributes of its own around the run
    around = propagate_attributes(user_id="u-1") if outer else nullcontext()
    with around:
        graph.invoke({"messages": [HumanMessage("hi")]}, _config("lf-attrs", receiver, public_key))
    _flush(public_key)
    spans = receiver.spans
    assert len(spans) == 4  # the run, the node, the app's span, the generation
    assert {s.trace_id for s in spans} == {trace_id_for("lf-attrs")}
    for s in spans:
        assert s.attributes["session.id"] == "lf-attrs"
        assert s.attributes["langfuse.trace.tags"] == ["refunds"]
        assert s.attributes["langfuse.trace.metadata.harness_task_id"] == "lf-attrs"
        assert s.attributes.get("user.id") == ("u-1" if outer else None)
    (node,) = [s for s in spans if s.name == "agent"]
    (app,) = [s for s in spans if s.name == "app work"]
    assert app.parent_span_id == node.span_id


def test_retrievers_and_tool_errors_are_observations_under_their_node(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.tools import tool

    class Orders(BaseRetriever):
        def _get_relevant_documents(
            self, query: str, *, run_manager: CallbackManagerForRetrieverRun
        ) -> list[Document]:
            return [Document(page_content=f"order {query}: shipped", metadata={"id": 42})]

    @tool
    def cancel(order: str) -> str:
        """Cancel an order."""
        raise ValueError(f"order {order} has shipped; password=hunter22")

    def agent(state: MessagesState) -> dict[str, Any]:
        docs = Orders().invoke("A-42")
        try:
            cancel.invoke({"order": "42"})
        except ValueError:
            pass
        return {"messages": [AIMessage(docs[0].page_content)]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    graph.invoke({"messages": [HumanMessage("hi")]}, _config("lf-retr", receiver, public_key))
    _flush(public_key)
    spans = receiver.spans
    (node,) = [s for s in spans if s.name == "agent"]
    (retriever,) = _by_type(spans, "retriever")
    assert retriever.parent_span_id == node.span_id
    assert retriever.attr("input") == "A-42"
    assert retriever.attr("output")[0]["page_content"] == "order A-42: shipped"
    (failed,) = _by_type(spans, "tool")
    assert failed.parent_span_id == node.span_id
    assert failed.attr("level") == "ERROR"
    assert failed.attr("status_message") == "order 42 has shipped; password=***"


def test_generations_carry_the_whole_prompt_and_node_inputs_the_last_item(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from langchain_core.tools import tool
    from langgraph.prebuilt import ToolNode, tools_condition

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return f"value of {key}"

    turns = 3
    script = [ai(tool_calls=[tool_call("lookup", {"key": f"k{i}"}, id=f"c{i}")]) for i in range(3)]
    model = ScriptedChatModel(model_name="gpt-4o-mini", script=[*script, ai("done")])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([lookup]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    graph.invoke({"messages": [HumanMessage("go")]}, _config("lf-prompt", receiver, public_key))
    _flush(public_key)
    spans = sorted(receiver.spans, key=lambda s: s.start_ns)

    # prompt → tool call → result → next decision: the last generation saw all of it
    generations = _by_type(spans, "generation")
    assert [len(g.attr("input")) for g in generations] == [1, 3, 5, 7]
    last_prompt = generations[-1].attr("input")
    assert last_prompt[0] == {"role": "user", "content": "go"}
    calls = [m["tool_calls"][0] for m in last_prompt if m.get("tool_calls")]
    assert [c["args"] for c in calls] == [{"key": f"k{i}"} for i in range(turns)]
    results = [m["content"] for m in last_prompt if m["role"] == "tool"]
    assert results == [f"value of k{i}" for i in range(turns)]
    tools = [s for s in spans if s.name == "lookup"]
    assert [t.attr("input") for t in tools] == [{"key": f"k{i}"} for i in range(turns)]
    assert [t.attr("output")["content"] for t in tools] == results

    # a node's input is the state: each list keeps its last item and a count
    nodes = [s for s in spans if s.name in ("agent", "tools")]
    assert [len(n.attr("input")["messages"]) for n in nodes] == [1] * len(nodes)
    assert [n.attr("input").get("earlier_messages", 0) for n in nodes] == list(range(7))
    assert nodes[-1].attr("input")["messages"][0]["content"] == "value of k2"


def test_masker_remembers_a_message_only_while_it_is_the_same_object() -> None:
    from harness_nodes import Masker

    mask = Masker()
    first = AIMessage("my key is sk-abcdefghijklmnop1234", id="m1")
    assert mask(data={"messages": [first]})["messages"][0]["content"] == "my key is ***"
    # a reviewer's edit or a refused output is a new message object with the same id
    edited = first.model_copy(update={"content": "nothing to hide, plain text here"})
    assert mask(data=[edited])[0]["content"] == "nothing to hide, plain text here"
    remembered = mask(data=[edited])[0]
    mask.extend(sensitive_fields=["API_KEY"])  # known already: what is remembered stays
    assert mask(data=[edited])[0] is remembered
    mask.extend(secrets=["plain text"])  # new secrets apply to messages seen before
    assert mask(data=[edited])[0]["content"] == "nothing to hide, *** here"


def test_prepared_payloads_are_masked_json_and_media_goes_through_the_sdk() -> None:
    import json

    from harness_nodes import Masker

    mask = Masker(sensitive_fields=["card_number"])
    data = {"card_number": "4111", "messages": [AIMessage("key sk-abcdefghijklmnop1234")]}
    prepared = mask._prepare(data)
    assert prepared is not None
    assert json.loads(prepared) == mask(data=data)
    assert json.loads(prepared)["card_number"] == "***"
    assert mask(data=prepared) is prepared  # the client's mask passes it through
    # a base64 data URI is left to the SDK, which uploads media and references it
    assert mask._prepare({"image": "data:image/png;base64,iVBORw0KGgo="}) is None


@pytest.mark.parametrize("own_mask", [False, True])
def test_secrets_are_masked_when_the_app_built_its_langfuse_client_first(
    receiver: LangfuseReceiver, public_key: str, own_mask: bool
) -> None:
    from langfuse import Langfuse

    seen: list[Any] = []

    def app_mask(*, data: Any, **_: Any) -> Any:
        seen.append(data)
        return data

    # The application's client for this key exists first: no mask, or one of its own.
    Langfuse(
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url=receiver.base_url,
        flush_interval=0.05,
        mask=app_mask if own_mask else None,
    )
    with open_backend("memory://") as backend:
        handler = _handler(receiver, public_key, sensitive_fields=["card_number"])
        metadata = {"api_key": "sk-proj-FROMMETADATA0123456789"}
        traced_task.run_to_end(backend, "lf-early", [handler], metadata)
    _flush(public_key)
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))
    blob = b"\n".join(receiver.raw_bodies)
    for secret in (traced_task.SECRET, "4111111111111111", "sk-proj-FROMMETADATA0123456789"):
        assert secret.encode() not in blob, secret
    assert b"***" in blob
    assert bool(seen) == own_mask  # the application's own mask still runs, before ours


def test_outside_a_graph_the_handler_writes_what_the_sdks_handler_writes(
    public_key: str,
) -> None:
    """Attribute by attribute, the SDK's own LangChain handler and ours agree on a plain chain.

    Outside a graph no node input is compacted and no chain skipped, so the differences
    allowed are only the documented ones: the generation's ``cost_details`` (added), status
    messages (masked), and on children the root's metadata LangChain copies into every run,
    its ``ls_*``/``lc_*`` bookkeeping and a tool's console colour (left out). Names, types,
    parents, levels, statuses and every other attribute (payload encodings, metadata, model)
    must match: this pins the handler to the SDK's data model (re-run it on an SDK upgrade).
    """
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool
    from langfuse import Langfuse
    from langfuse.langchain import CallbackHandler
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from harness_nodes import Masker

    @tool
    def lookup(key: str, card_number: str) -> str:
        """Look a key up."""
        return f"value of {key}"

    def failing(_: Any) -> Any:
        raise ValueError("no such order; password=hunter22")

    mask = Masker(sensitive_fields=["card_number"])
    exporter = InMemorySpanExporter()
    Langfuse(
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url="http://127.0.0.1:9",
        span_exporter=exporter,
        mask=mask,
        environment="staging",
        release="r-7",
    )
    ours = _handler_for_exporter(public_key, mask)

    def run(handler: Any) -> list[Any]:
        exporter.clear()
        model = ScriptedChatModel(
            model_name="gpt-4o-mini",
            script=[ai(tool_calls=[tool_call("lookup", {"key": "k", "card_number": "4111"})])],
        )

        def agent(question: str) -> Any:
            reply = model.invoke([HumanMessage(question)])
            args = reply.tool_calls[0]["args"]
            return {"answer": lookup.invoke(args), "note": "key sk-abcdefghijklmnop1234"}

        chain = RunnableLambda(agent, name="agent_chain") | RunnableLambda(
            lambda out: out, name="finish"
        )
        config: Any = {"callbacks": [handler], "metadata": {"team": "refunds"}}
        chain.invoke("refund order 42", config)
        with pytest.raises(ValueError):
            RunnableLambda(failing, name="failing").invoke("x", config)
        get_client_for(public_key).flush()
        return sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    theirs, mine = run(CallbackHandler(public_key=public_key)), run(ours)
    assert [s.name for s in mine] == [s.name for s in theirs]
    assert len(mine) == 6  # the sequence, its two chains, the generation, the tool; the failure
    ids_theirs = {s.context.span_id: i for i, s in enumerate(theirs)}
    ids_mine = {s.context.span_id: i for i, s in enumerate(mine)}
    for t, m in zip(theirs, mine, strict=True):
        expected = dict(t.attributes or {})
        got = dict(m.attributes or {})
        if expected.get("langfuse.observation.type") == "generation":
            assert json.loads(got.pop("langfuse.observation.cost_details"))["total"] > 0
        if t.parent is not None and t.parent.span_id in ids_theirs:
            # On a child, the root's metadata (copied into every child run by LangChain) and
            # the sequence-position tags are left to the trace: the documented difference.
            for key in ("team", "tags"):
                expected.pop(f"langfuse.observation.metadata.{key}", None)
        for key in [k for k in expected if k.startswith(_LANGCHAIN_BOOKKEEPING)]:
            del expected[key]  # LangChain's ls_*/lc_* bookkeeping: documented as dropped
        expected.pop("langfuse.observation.metadata.color", None)  # a tool's console colour
        status = "langfuse.observation.status_message"
        if status in expected:  # the SDK sends status messages unmasked; the harness masks
            expected[status] = mask.text(str(expected[status]))
        assert got == expected, t.name
        parent_t = ids_theirs.get(t.parent.span_id) if t.parent else None
        parent_m = ids_mine.get(m.parent.span_id) if m.parent else None
        assert parent_m == parent_t, t.name
        assert (m.status.status_code, m.status.description) == (
            t.status.status_code,
            mask.text(t.status.description) if t.status.description else None,
        )
    blob = repr([dict(s.attributes or {}) for s in mine])
    assert "4111" not in blob and "sk-abcdefghijklmnop1234" not in blob and "hunter22" not in blob


_LANGCHAIN_BOOKKEEPING = ("langfuse.observation.metadata.ls_", "langfuse.observation.metadata.lc_")


def get_client_for(public_key: str) -> Any:
    from langfuse import get_client

    return get_client(public_key=public_key)


def _handler_for_exporter(public_key: str, mask: Any) -> Any:
    from harness_nodes._trace_langfuse import HarnessLangfuseHandler

    return HarnessLangfuseHandler(public_key=public_key, thread_id=None, pricing=None, masker=mask)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        pytest.param("PASSWORD: hunter22", "PASSWORD: ***", id="upper-case-key"),
        pytest.param("Card_Number=4111111111111111", "Card_Number=***", id="user-field"),
        pytest.param("Authorization: BEARER abcdefgh12345", "Authorization: ***", id="bearer"),
        pytest.param("paſſword: hunter22", "paſſword: ***", id="long-s-folds-to-s"),
        pytest.param("apİ_key: abcdefgh", "apİ_key: ***", id="dotted-capital-i"),
        pytest.param("copy of Literal-Secret-42 here", "copy of *** here", id="literal"),
        pytest.param("x sk-abcdefghijklmnop1234 y", "x *** y", id="key-shaped"),
        pytest.param("plain text, no secrets: none", "plain text, no secrets: none", id="clean"),
    ],
)
def test_masking_text_finds_secrets_whatever_their_case_or_script(text: str, masked: str) -> None:
    # Text with no trace of a secret skips the regex scans: every way a pattern can match
    # (case-insensitive keys, non-ASCII letters that fold to ASCII) must still be scanned.
    from harness_nodes import Masker

    mask = Masker(sensitive_fields=["card_number"], secrets=["Literal-Secret-42"])
    assert mask.text(text) == masked


_TEXT_PIECES = [
    *("api", "_", "-", "key", "KEY", "Api", "x", "openai", "token", "Tokens", "password"),
    *("card", "number", "Card_Number", "secret", "auth", "cookie", ":", "=", " ", "\n", "\t"),
    *("'", '"', "sk-", "SK-", "pk-lf-", "abcdefghijklmnop1234", "bearer ", "BEARER\t", "ghp_"),
    *("AKIA", "xoxb-", "AIza", "Literal-Secret-42", "literal-secret-42", "ſ", "İ", "K", "ü"),
    *(",", "}", "{", "[", "1234567890abcdef", "0123456789ABCDEFGHIJKLMNOPQRSTUV"),
]


_PIECES = st.lists(st.sampled_from(_TEXT_PIECES), max_size=6).map("".join)
_KEY_VALUE = st.tuples(  # `key: value` shapes, each part drawn on its own
    _PIECES,
    st.sampled_from(["", "x_", "X-", "openai_", "my"]),
    st.sampled_from(
        ["api_key", "API-KEY", "apikey", "Card_Number", "card-number", "token", "card-number_full"]
    ),
    st.sampled_from(["", "'", '"', "s"]),
    st.sampled_from(["", " ", "\t ", "\n"]),
    st.sampled_from([":", "=", "-", " "]),
    st.sampled_from(["", " ", "\n"]),
    st.sampled_from(["hunter22", "'a b'", '"x"', ""]),
    _PIECES,
).map("".join)


@settings(max_examples=800, deadline=None, derandomize=True)
@given(st.one_of(_KEY_VALUE, st.lists(st.sampled_from(_TEXT_PIECES), max_size=12).map("".join)))
def test_masking_text_scans_every_text_a_pattern_could_match(text: str) -> None:
    # The hint check lets text without a trace of a secret skip both regex scans: it must
    # never skip one that a scan would change (a field's name with "-" and "_" mixed, too).
    from harness_nodes import Masker
    from harness_nodes._trace_langfuse import MASK, _mask_pair

    mask = Masker(
        sensitive_fields=["card_number", "card_number_full"], secrets=["Literal-Secret-42"]
    )
    scanned = mask._any.sub(MASK, text)
    if ":" in scanned or "=" in scanned:
        scanned = mask._kv.sub(_mask_pair, scanned)
    assert mask.text(text) == scanned


def test_masking_text_finds_a_field_written_with_dashes_and_underscores_mixed() -> None:
    from harness_nodes import Masker

    mask = Masker(sensitive_fields=["card_number_full"])
    assert mask.text("card-number_full: 4111111111") == "card-number_full: ***"
    assert mask(data={"note": "CARD_number-full=4111111111"}) == {"note": "CARD_number-full=***"}


def test_prepared_payloads_reuse_a_remembered_messages_encoding_with_the_same_text() -> None:
    import json

    from harness_nodes import Masker

    mask = Masker()
    first, second = HumanMessage("hi, key sk-abcdefghijklmnop1234"), AIMessage("ü ok")
    payloads: list[Any] = [
        {"messages": [first], "earlier_messages": 3, "verdicts": [{"ok": True}]},
        [first, second],
        {"messages": [first, second], "other": {"nested": [first]}},
        {1: [first]},  # a non-string key: encoded whole, as json.dumps converts it
        # plain entries before, between and after remembered ones, order kept
        {"a": 1, "messages": [second], "b": [], "c": {}, "more": [first], "z": "end"},
        {"messages": [first], "count": -0.0, "flag": None},
    ]
    for _ in range(2):  # the second pass joins remembered encodings
        for data in payloads:
            assert mask._prepare(data) == json.dumps(mask(data=data))
    # graph state: messages in the chat form of a prompt, remembered for both
    state = {"messages": [second], "earlier_messages": 4}
    assert json.loads(str(mask._prepare(state, chat=True)))["messages"] == [
        {"role": "assistant", "content": "ü ok"}
    ]
    assert "sk-abcdefghijklmnop1234" not in str(mask._prepare(payloads[1]))


def test_masker_sees_the_id_langgraph_gives_a_message_after_it_was_masked() -> None:
    from harness_nodes import Masker

    mask = Masker()
    msg = AIMessage("hello there")
    assert mask(data=[msg])[0]["id"] is None  # a node's output, before the reducer ran
    msg.id = "run-1"  # what add_messages does to an id-less message, in place
    assert mask(data=[msg])[0]["id"] == "run-1"  # the next node's input


def test_masker_masks_sets_bytes_objects_and_what_lies_too_deep() -> None:
    # What Langfuse's own serialiser would write out as is (a payload with a NaN, a data URI
    # or the app's own mask takes the SDK's path): masked first, in the form it would write.
    from harness_nodes import Masker

    secret = "sk-proj-SETLEAK0123456789abcd"

    class Creds:
        def __init__(self) -> None:
            self.api_key = "plain-value-123"
            self.note = f"uses {secret}"

    deep: dict[str, Any] = {"api_key": "deep-secret-value-123"}
    for _ in range(70):
        deep = {"next": deep}
    mask = Masker()
    out = mask(data={"seen": {secret}, "raw": secret.encode(), "creds": Creds(), "deep": deep})
    text = json.dumps(out, default=str)
    for leaked in (secret, "plain-value-123", "deep-secret-value-123"):
        assert leaked not in text, leaked
    assert out["seen"] == ["***"] and out["raw"] == "***"
    assert out["creds"] == {"api_key": "***", "note": "uses ***"}


def test_masker_masks_names_ending_in_a_sensitive_field_and_short_declared_secrets() -> None:
    from harness_nodes import Masker, UserError

    mask = Masker(sensitive_fields=["cvv"], secrets=["493817"])
    args = {
        "x-api-key": "a1",
        "openai_api_key": "a2",
        "stripe_secret_key": "a3",
        "db_password": "a4",
        "card_cvv": "a5",
        "pin": "493817",
        "input_tokens": 12,  # not a token
    }
    assert mask(data=args) == {**{k: "***" for k in args}, "input_tokens": 12}
    assert mask(data="env OPENAI_API_KEY=abc123def") == "env OPENAI_API_KEY=***"
    assert mask(data="pin 493817 ok") == "pin *** ok"
    with pytest.raises(UserError, match="shorter than 4 characters"):
        Masker(secrets=["ab"])


def test_masker_masks_at_every_depth_and_in_every_container() -> None:
    from dataclasses import dataclass

    from harness_nodes import Masker

    @dataclass
    class Login:
        user: str
        password: str

    class Base:  # no __slots__: its instances have a __dict__, empty here
        pass

    @dataclass(slots=True)
    class Slotted(Base):  # as LangGraph's Command is
        resume: Any

    secret = "sk-abcdefghijklmnop1234"
    mask = Masker(sensitive_fields=["card_number"])
    data = {
        "calls": [{"args": {"Card_Number": "4111", "note": f"key {secret}"}}, (f"x {secret}", 1)],
        "login": Login("ann", "hunter22"),
        "slotted": Slotted({"password": "hunter22", "ok": True}),
        7: [True, None, 2.5, "short", {"token": ["a", "b"]}],
    }
    assert mask(data=data) == {
        "calls": [{"args": {"Card_Number": "***", "note": "key ***"}}, ["x ***", 1]],
        "login": {"user": "ann", "password": "***"},
        "slotted": {"resume": {"password": "***", "ok": True}},
        7: [True, None, 2.5, "short", {"token": "***"}],
    }


def test_a_stream_the_caller_stops_reading_is_not_an_error(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    import gc

    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, MessagesState, StateGraph

    builder = StateGraph(MessagesState)
    builder.add_node("a", lambda state: {"messages": [AIMessage("one")]})
    builder.add_node("b", lambda state: {"messages": [AIMessage("two")]})
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "early"}, "callbacks": [_handler(receiver, public_key)]}
    for _ in graph.stream({"messages": [HumanMessage("go")]}, config, stream_mode="updates"):
        break  # the caller has what it needs
    gc.collect()  # closes the abandoned generator
    _flush(public_key)
    assert receiver.wait_for(lambda r: bool(_roots(r.spans)))
    [root] = _roots(receiver.spans)
    assert root.attr("level") == "WARNING"
    assert root.attributes["langfuse.observation.status_message"] == (
        "stopped by the caller (GeneratorExit)"
    )


async def test_a_model_call_cancelled_in_flight_is_ended_with_its_node(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    import asyncio

    class SlowModel(ScriptedChatModel):
        async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(30)  # the provider is still answering when the task is cancelled
            raise AssertionError("not cancelled")

    model = SlowModel(model_name="gpt-4o-mini", script=[ai("never")])

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = _config("lf-cancel", receiver, public_key)
    handler = config["callbacks"][0]
    task = asyncio.create_task(graph.ainvoke({"messages": [HumanMessage("hi")]}, config))
    while not any(o.kind == "generation" for o in handler._obs.values()):
        await asyncio.sleep(0.01)
    task.cancel()  # a client gone, an asyncio.wait_for timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    _flush(public_key)
    # LangChain reports nothing for an ainvoke cut short: the generation ends with its node
    spans = receiver.spans
    (generation,) = _by_type(spans, "generation")
    (node,) = [s for s in spans if s.name == "agent"]
    assert generation.parent_span_id == node.span_id
    assert generation.attr("model.name") == "gpt-4o-mini"
    assert generation.attr("level") == node.attr("level") == "WARNING"
    assert generation.attr("status_message") == "stopped by the caller (CancelledError)"
    assert not handler._obs  # nothing left open in the handler


def test_a_generations_cost_prices_its_cache_reads_at_their_rate(public_key: str) -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-x",
        base_url="http://127.0.0.1:9",  # nothing listens: spans go to the exporter
        span_exporter=exporter,
    )
    usage: Any = {
        "input_tokens": 100_000,
        "output_tokens": 1_000,
        "total_tokens": 101_000,
        "input_token_details": {"cache_read": 90_000},
    }
    answer = AIMessage("hi", usage_metadata=usage, response_metadata={"model_name": "gpt-4o"})
    model = GenericFakeChatModel(messages=iter([answer]))
    model.invoke([HumanMessage("hi")], {"callbacks": [handler]})
    _flush(public_key)
    [generation] = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes.get("langfuse.observation.type") == "generation"
    ]
    cost = json.loads(str(generation.attributes["langfuse.observation.cost_details"]))
    expected = Pricing().cost_nanos("gpt-4o", 100_000, 1_000, 90_000) / 1e9
    assert cost["total"] == pytest.approx(expected)
    assert cost["total"] < Pricing().cost_nanos("gpt-4o", 100_000, 1_000) / 1e9


def _bank_down(state: MessagesState) -> dict[str, Any]:
    raise RuntimeError("the bank is down")


def _failing_task(receiver: LangfuseReceiver, public_key: str) -> tuple[Any, Any]:
    """A graph whose only node always fails, and a harness handler to the receiver."""
    builder = StateGraph(MessagesState)
    builder.add_node("agent", _bank_down)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url=receiver.base_url,
        flush_interval=0.05,
    )
    return builder, handler


def _failed_score(receiver: LangfuseReceiver, public_key: str) -> dict[str, Any]:
    _flush(public_key)
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))
    [score] = [s for s in receiver.scores if s["name"] == "outcome"]
    return score


def test_a_task_its_runner_gives_up_on_is_scored_failed(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from harness_nodes import RunFailed, TaskRunner

    builder, handler = _failing_task(receiver, public_key)
    with (
        open_backend("memory://") as backend,
        TaskRunner(backend, builder, max_attempts=1, config={"callbacks": [handler]}) as runner,
    ):
        runner.submit("t-fail", {"messages": [HumanMessage("pay")]})
        with pytest.raises(RunFailed):
            runner.result("t-fail", timeout=10)
        thread_id = runner.status("t-fail").thread_id
    score = _failed_score(receiver, public_key)
    assert (score["traceId"], score["value"]) == (trace_id_for(thread_id), "failed")
    assert "the bank is down" in score["comment"]


async def test_a_task_its_async_runner_gives_up_on_is_scored_failed(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from checkpointers import aopen_backend
    from harness_nodes import RunFailed
    from harness_nodes.aio import AsyncTaskRunner

    builder, handler = _failing_task(receiver, public_key)
    async with (
        await aopen_backend("memory://") as backend,
        AsyncTaskRunner(
            backend, builder, max_attempts=1, config={"callbacks": [handler]}
        ) as runner,
    ):
        await runner.asubmit("t-afail", {"messages": [HumanMessage("pay")]})
        with pytest.raises(RunFailed):
            await runner.aresult("t-afail", timeout=10)
        thread_id = (await runner.astatus("t-afail")).thread_id
    score = _failed_score(receiver, public_key)
    assert (score["traceId"], score["value"]) == (trace_id_for(thread_id), "failed")


@pytest.mark.parametrize("schema", [MessagesState, HarnessState], ids=["messages", "harness"])
def test_a_drop_in_apps_next_task_is_scored_completed_not_the_stop_before_it(
    receiver: LangfuseReceiver, public_key: str, schema: Any
) -> None:
    # add_harness: task 1 stops (verification_failed), task 2 on the thread completes. The
    # user's model node writes no outcome (a MessagesState app has no key for one; in a
    # HarnessState app task 1's is still there): task 2 is scored completed, as a
    # build_harnessed_agent graph scores it, and task 1's stop is not scored again.
    builder = traced_task.drop_in_two_tasks(schema)
    graph = builder.compile(checkpointer=InMemorySaver())

    def scored(r: LangfuseReceiver) -> list[Any]:
        return [s["value"] for s in r.scores if s["name"] == "outcome"]

    def outcomes(at_least: int) -> list[Any]:
        _flush(public_key)
        receiver.wait_for(lambda r: len(scored(r)) >= at_least)
        return scored(receiver)

    graph.invoke({"messages": [HumanMessage("q1")]}, _config("t-drop-in", receiver, public_key))
    first = outcomes(1)
    assert first and set(first) == {"verification_failed"}
    out = graph.invoke(
        {"messages": [HumanMessage("q2")]}, _config("t-drop-in", receiver, public_key)
    )
    assert out["messages"][-1].content == "Found r."
    assert outcomes(len(first) + 1) == [*first, "completed"]
    [*_, last] = [s for s in receiver.scores if s["name"] == "outcome"]
    assert last["traceId"] == trace_id_for("t-drop-in")


def test_a_drop_in_app_paused_for_review_is_not_scored_until_it_completes(
    receiver: LangfuseReceiver, public_key: str
) -> None:
    from langgraph.prebuilt import ToolNode, tools_condition

    from harness_nodes import ReviewPolicy, add_harness

    @tool
    def refund(order: str) -> str:
        """Refund an order."""
        return f"refunded {order}"

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("refund", {"order": "A1"})]), ai("Refunded A1.")]
    )
    builder: StateGraph[Any] = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([refund]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    add_harness(
        builder,
        model_node="agent",
        tools_node="tools",
        review_policy=ReviewPolicy(irreversible=["refund"]),
        tools=[refund],
    )
    graph = builder.compile(checkpointer=InMemorySaver())
    config = _config("t-paused", receiver, public_key)
    paused = graph.invoke({"messages": [HumanMessage("refund A1")]}, config)
    assert paused["__interrupt__"]
    _flush(public_key)
    assert receiver.wait_for(lambda r: bool(r.spans))
    assert not [s for s in receiver.scores if s["name"] == "outcome"]  # paused, not done
    out = graph.invoke(Command(resume={"type": "approve"}), config)
    assert out["messages"][-1].content == "Refunded A1."
    _flush(public_key)
    assert receiver.wait_for(lambda r: any(s["name"] == "outcome" for s in r.scores))
    [score] = [s for s in receiver.scores if s["name"] == "outcome"]
    assert (score["traceId"], score["value"]) == (trace_id_for("t-paused"), "completed")


class _UnreadableAnswer(ScriptedChatModel):
    """The provider answered 200 with a body that cannot be read: billed, never delivered."""

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise json.JSONDecodeError("Expecting value", '{"choices": [', 13)

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        raise json.JSONDecodeError("Expecting value", '{"choices": [', 13)


def _exported_generations(exporter: Any) -> list[Any]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.attributes.get("langfuse.observation.type") == "generation"
    ]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_failed_call_the_budget_keeps_at_its_worst_case_costs_that_in_langfuse(
    public_key: str, mode: str
) -> None:
    # The ledger keeps such a call at its reserved worst case; its generation was sent with
    # cost 0, so Langfuse's cost per task disagreed with the harness's own spend.
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from harness_nodes import Envelope, budgeted

    exporter = InMemorySpanExporter()
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-x",
        base_url="http://127.0.0.1:9",  # nothing listens: spans go to the exporter
        span_exporter=exporter,
    )
    model = _UnreadableAnswer(model_name="gpt-4o-mini", script=[ai("never")])
    llm = budgeted(model, envelope=Envelope(max_usd=1, max_output_tokens=500))

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent if mode == "invoke" else aagent)
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": f"lf-kept-{mode}"}, "callbacks": [handler]}
    with pytest.raises(json.JSONDecodeError):
        if mode == "invoke":
            graph.invoke({"messages": [HumanMessage("hi")]}, config)
        else:
            await graph.ainvoke({"messages": [HumanMessage("hi")]}, config)
    kept = llm.spend(config)["usd"]
    assert kept > 0  # the harness's own figure
    _flush(public_key)

    [generation] = _exported_generations(exporter)
    attributes = generation.attributes
    assert attributes["langfuse.observation.level"] == "ERROR"
    cost = json.loads(str(attributes["langfuse.observation.cost_details"]))
    assert cost["total"] == pytest.approx(kept)
    marker = json.loads(str(attributes["langfuse.observation.metadata.harness_cost"]))
    assert marker["kept"] == "reserved worst case"
    assert marker["reason"].startswith("answer unreadable")


def test_a_failed_call_the_budget_releases_stays_at_no_cost_in_langfuse(public_key: str) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from harness_nodes import Envelope, budgeted

    class Refused(ScriptedChatModel):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError("nothing listens")  # the request never left

    exporter = InMemorySpanExporter()
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-x",
        base_url="http://127.0.0.1:9",
        span_exporter=exporter,
    )
    llm = budgeted(
        Refused(model_name="gpt-4o-mini", script=[ai("never")]),
        envelope=Envelope(max_usd=1, max_output_tokens=500),
    )
    config: Any = {"configurable": {"thread_id": "lf-released"}, "callbacks": [handler]}
    with pytest.raises(ConnectionRefusedError):
        llm.invoke("hi", config)
    assert llm.spend(config)["usd"] == 0
    _flush(public_key)

    [generation] = _exported_generations(exporter)
    cost = json.loads(str(generation.attributes["langfuse.observation.cost_details"]))
    assert cost == {"total": 0}
    assert "langfuse.observation.metadata.harness_cost" not in generation.attributes


async def test_a_budgeted_call_cancelled_in_flight_costs_its_kept_worst_case_in_langfuse(
    public_key: str,
) -> None:
    import asyncio

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from harness_nodes import Envelope, budgeted

    class SlowModel(ScriptedChatModel):
        async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(30)  # the provider is still answering when the task is cancelled
            raise AssertionError("not cancelled")

    exporter = InMemorySpanExporter()
    handler = langfuse_handler(
        public_key=public_key,
        secret_key="sk-lf-x",
        base_url="http://127.0.0.1:9",
        span_exporter=exporter,
    )
    llm = budgeted(
        SlowModel(model_name="gpt-4o-mini", script=[ai("never")]),
        envelope=Envelope(max_usd=1, max_output_tokens=500),
    )

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "lf-kept-cancel"}, "callbacks": [handler]}
    task = asyncio.create_task(graph.ainvoke({"messages": [HumanMessage("hi")]}, config))
    while not any(o.kind == "generation" for o in handler._obs.values()):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = (await llm.aspend(config))["usd"]
    assert kept > 0
    _flush(public_key)

    [generation] = _exported_generations(exporter)
    cost = json.loads(str(generation.attributes["langfuse.observation.cost_details"]))
    assert cost["total"] == pytest.approx(kept)
    marker = json.loads(str(generation.attributes["langfuse.observation.metadata.harness_cost"]))
    assert marker["reason"] == "cancelled (CancelledError)"


# --- the handler's spans and the application's OpenTelemetry set-up ------------------------


def _node_app(public_key: str, inside: Any) -> Any:
    """A one-node graph whose node runs *inside* (the application's own tracing) first."""
    model = ScriptedChatModel(model_name="gpt-4o-mini", script=[ai("hello")] * 4)

    def agent(state: MessagesState) -> dict[str, Any]:
        inside(get_client_for(public_key))
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    return builder.compile(checkpointer=InMemorySaver())


def _exporting_client(public_key: str, **kw: Any) -> Any:
    from langfuse import Langfuse
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    Langfuse(
        public_key=public_key,
        secret_key="sk-lf-test-secret",
        base_url="http://127.0.0.1:9",  # nothing listens: spans go to the exporter
        span_exporter=exporter,
        **kw,
    )
    return exporter


def _run_node_app(graph: Any, public_key: str, thread_id: str, handler: Any = None) -> None:
    if handler is None:
        handler = langfuse_handler(public_key=public_key, secret_key="sk-lf-test-secret")
    config: Any = {"configurable": {"thread_id": thread_id}, "callbacks": [handler]}
    graph.invoke({"messages": [HumanMessage("hi")]}, config)
    _flush(public_key)


def test_what_the_application_writes_on_the_current_span_lands_on_the_nodes_observation(
    public_key: str,
) -> None:
    def inside(client: Any) -> None:
        from opentelemetry import trace

        client.update_current_span(metadata={"region": "eu"})
        span = trace.get_current_span()
        span.add_event("cache miss", {"key": "k-1"})
        span.record_exception(KeyError("k-1"))
        with client.start_as_current_observation(name="app work"):
            pass

    exporter = _exporting_client(public_key)
    _run_node_app(_node_app(public_key, inside), public_key, "lf-current")
    spans = exporter.get_finished_spans()
    (node,) = [s for s in spans if s.name == "agent"]
    (app,) = [s for s in spans if s.name == "app work"]
    ids = {s.context.span_id for s in spans}
    (root,) = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    assert node.attributes["langfuse.observation.metadata.region"] == '"eu"'
    assert [e.name for e in node.events] == ["cache miss", "exception"]
    assert node.events[0].attributes["key"] == "k-1"
    assert node.events[1].attributes["exception.type"] == "KeyError"
    # The application's span nests under the node, in the task's trace; only the leg's
    # root is the application root Langfuse derives the trace's input/output from.
    assert app.parent.span_id == node.context.span_id
    assert app.context.trace_id == node.context.trace_id == int(trace_id_for("lf-current"), 16)
    app_roots = [s.name for s in spans if s.attributes.get("langfuse.internal.is_app_root")]
    assert app_roots == [root.name]


def test_an_applications_own_span_processor_sees_every_span_start_and_end(
    public_key: str,
) -> None:
    """A processor of the application's on the same provider gets ``on_start`` with a live span.

    Such a processor may write attributes at a span's start (a baggage processor does): the
    handler's spans must go through the SDK's span path for it, also when it is added after
    the handler's first task.
    """
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Stamping(SpanProcessor):
        def __init__(self) -> None:
            self.started: list[str] = []
            self.ended: list[str] = []

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            self.started.append(span.name)
            span.set_attribute("app.stamp", "seen at start")

        def on_end(self, span: Any) -> None:
            self.ended.append(span.name)

    provider = TracerProvider()
    exporter = _exporting_client(public_key, tracer_provider=provider)
    graph = _node_app(public_key, lambda client: None)
    handler = langfuse_handler(public_key=public_key, secret_key="sk-lf-test-secret")
    _run_node_app(graph, public_key, "lf-proc-1", handler)
    first = exporter.get_finished_spans()
    assert {s.name for s in first} >= {"agent", "LangGraph"}
    stamping = Stamping()
    provider.add_span_processor(stamping)  # added after the handler's first task
    exporter.clear()
    _run_node_app(graph, public_key, "lf-proc-2", handler)
    spans = exporter.get_finished_spans()
    assert sorted(stamping.started) == sorted(s.name for s in spans) == sorted(stamping.ended)
    assert all(s.attributes["app.stamp"] == "seen at start" for s in spans)


@pytest.mark.parametrize(("rate", "exported"), [(0.0, False), (1.0, True)])
def test_the_providers_sampler_decides_for_the_handlers_spans(
    public_key: str, rate: float, exported: bool
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    provider = TracerProvider(sampler=TraceIdRatioBased(rate))
    exporter = _exporting_client(public_key, tracer_provider=provider)
    _run_node_app(_node_app(public_key, lambda client: None), public_key, "lf-sampled")
    names = {s.name for s in exporter.get_finished_spans()}
    assert (names >= {"LangGraph", "agent"}) if exported else names == set()


def _comparable(spans: Any, thread_id: str) -> list[Any]:
    """Spans as a tree of what a reviewer reads: ids, times and the thread id left out."""
    spans = sorted(spans, key=lambda s: s.start_time)
    index = {s.context.span_id: i for i, s in enumerate(spans)}

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            value = value.replace(thread_id, "<thread>")
            # ids that differ on every run: effect keys, span ids in scores, tool call ids...
            value = re.sub(
                r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<id>", value
            )
            value = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+(\+00:00|Z)?", "<time>", value)
            value = re.sub(r'(fingerprint": )-?\d+', r"\1<fp>", value)
            return re.sub(r"\b[0-9a-f]{16,64}\b", "<id>", value)
        return list(value) if isinstance(value, tuple) else value

    return [
        (
            s.name,
            index.get(s.parent.span_id) if s.parent else None,
            {
                k: plain(v)
                for k, v in (s.attributes or {}).items()
                if k != "langfuse.observation.completion_start_time"
            },
            (s.status.status_code, s.status.description),
            [(e.name, dict(e.attributes or {})) for e in s.events],
            s.kind,
            s.resource.attributes == spans[0].resource.attributes,
            s.instrumentation_scope,
        )
        for s in spans
    ]


@pytest.mark.parametrize("app_filter", [False, True])
def test_the_handlers_whole_spans_export_what_the_sdks_spans_export(
    public_key: str, app_filter: bool
) -> None:
    """The same task, its spans written whole and then through OpenTelemetry's SDK spans.

    The whole task (retry, budget degradation, review pause and resume, effects, scores),
    with the application's own span and writes inside a node; once with Langfuse's default
    export filter, once with a filter of the application's that drops the review node (its
    children then become Langfuse app roots: the app-root bookkeeping must agree too).
    Adding a processor of the application's to the provider switches the handler to the
    SDK's spans (`test_an_applications_own_span_processor_sees_every_span_start_and_end`).
    """
    from opentelemetry.sdk.trace import TracerProvider

    def drop_review(span: Any) -> bool:
        return span.name != "review"

    def run(thread_id: str, handler: Any) -> None:
        with open_backend("memory://") as backend:
            traced_task.run_to_end(backend, thread_id, [handler])

    whole, sdk_spans = (
        [span for span, _ in spans]
        for spans in _whole_then_sdk(
            public_key,
            run,
            TracerProvider(),
            **({"should_export_span": drop_review} if app_filter else {}),
        )
    )
    assert len(whole) > 20
    assert ("review" in [s[0] for s in whole]) is not app_filter
    app_roots = [s[0] for s in whole if s[2].get("langfuse.internal.is_app_root")]
    # Langfuse marks the spans it derives a trace's input/output from: each leg's root, and
    # under a dropped span its exported children.
    legs = ["LangGraph", "review requested", "LangGraph", "review approve by alice"]
    assert app_roots == (legs if app_filter else legs[::2])
    assert [s[:2] for s in whole] == [s[:2] for s in sdk_spans]  # names and tree
    for mine, theirs in zip(whole, sdk_spans, strict=True):
        assert mine == theirs, mine[0]


def _whole_then_sdk(public_key: str, run: Any, provider: Any, **client: Any) -> list[list[Any]]:
    """``run(thread_id, handler)`` once through the handler's whole spans, once through the SDK's.

    Adding a processor of the application's to the provider switches the handler to the SDK's
    spans (`test_an_applications_own_span_processor_sees_every_span_start_and_end`). Each run's
    spans as `_comparable` has them, with their links and dropped counts.
    """
    from opentelemetry.sdk.trace import SpanProcessor

    exporter = _exporting_client(public_key, tracer_provider=provider, **client)
    handler = langfuse_handler(public_key=public_key, secret_key="sk-lf-test-secret")
    runs = []
    for thread_id in ("lf-whole", "lf-sdk-1"):  # the same length: the same token counts
        if thread_id == "lf-sdk-1":
            provider.add_span_processor(SpanProcessor())  # does nothing; forces the SDK's path
        exporter.clear()
        run(thread_id, handler)
        _flush(public_key)
        spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time)
        extra = [
            (
                [(link.context.is_valid, dict(link.attributes or {})) for link in s.links],
                s.dropped_attributes,
                s.dropped_events,
                s.dropped_links,
            )
            for s in spans
        ]
        runs.append(list(zip(_comparable(spans, thread_id), extra, strict=True)))
    return runs


def _runs(public_key: str, graph: Any, around: Any = None) -> Any:
    """A `_whole_then_sdk` run of *graph* (inside ``around()``, when given)."""

    def run(thread_id: str, handler: Any) -> None:
        with around() if around is not None else contextlib.nullcontext():
            _run_node_app(graph, public_key, thread_id, handler)

    return run


class _AppError(Exception):
    pass


@pytest.mark.parametrize(
    "limits",
    [
        {"max_span_attribute_length": 24},  # OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT
        {"max_span_attributes": 6},  # OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, below the handler's
        {"max_span_attributes": 40},  # the application's writes go over it
    ],
)
def test_whole_spans_keep_the_providers_attribute_limits(
    public_key: str, limits: dict[str, int]
) -> None:
    """The span limits the provider was given bound the handler's spans as the SDK's.

    Values cut at the length limit (the handler's input/output too), the oldest attribute
    dropped for a new one over the count limit, a key written again the newest, and the
    dropped count exported.
    """
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    def inside(client: Any) -> None:
        from opentelemetry import trace

        span = trace.get_current_span()
        for i in range(30):
            span.set_attribute(f"app.k{i}", i)
        span.set_attribute("app.k0", "written again, a long value")
        span.set_attributes({f"app.k{i}": i for i in range(30, 45)})

    whole, sdk_spans = _whole_then_sdk(
        public_key,
        _runs(public_key, _node_app(public_key, inside)),
        TracerProvider(span_limits=SpanLimits(**limits)),
    )
    assert [s[0][0] for s in whole] == ["LangGraph", "agent", "ScriptedChatModel"]
    if "max_span_attribute_length" in limits:
        (graph,) = [s for s in sdk_spans if s[0][0] == "LangGraph"]
        assert len(graph[0][2]["langfuse.observation.input"]) == 24  # the SDK's cut
    else:
        assert any(s[1][1] for s in sdk_spans)  # attributes dropped
    for mine, theirs in zip(whole, sdk_spans, strict=True):
        assert mine == theirs, mine[0][0]


def test_attributes_the_application_propagates_never_push_out_the_handlers_own(
    public_key: str,
) -> None:
    """Propagated trace attributes over the count limit: the newest are dropped, as Langfuse's
    span processor drops them (``_set_span_attributes_within_limit``), never the observation's
    own type, input or metadata written at its start."""
    from langfuse import propagate_attributes
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    def around() -> Any:
        return propagate_attributes(
            user_id="u-1", metadata={f"k{i}": f"v{i}" for i in range(12)}, tags=["app"]
        )

    provider = TracerProvider(span_limits=SpanLimits(max_span_attributes=12))
    whole, sdk_spans = _whole_then_sdk(
        public_key, _runs(public_key, _node_app(public_key, lambda client: None), around), provider
    )
    (node,) = [s for s in whole if s[0][0] == "agent"]
    assert node[0][2]["langfuse.observation.type"] == "agent"
    assert node[0][2]["langfuse.observation.input"]
    assert node[0][2]["user.id"] == "u-1"
    propagated = [k for k in node[0][2] if k.startswith("langfuse.trace.metadata.k")]
    assert len(propagated) < 12  # what did not fit was left out
    for mine, theirs in zip(whole, sdk_spans, strict=True):
        assert mine == theirs, mine[0][0]


def test_whole_spans_bound_events_and_links_and_name_exceptions_as_the_sdks(
    public_key: str,
) -> None:
    """Events and links over the provider's limits, a link with attributes only, and an
    exception of the application's (its type with its module) — as the SDK's span has them."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    def inside(client: Any) -> None:
        span = trace.get_current_span()
        for i in range(6):
            span.add_event(f"step {i}", {"i": i})
        span.record_exception(_AppError("no stock"))
        span.add_link(trace.INVALID_SPAN_CONTEXT, {"reason": "a batch"})
        for i in range(4):
            span.add_link(trace.SpanContext(1, i + 1, False), {"i": i})

    whole, sdk_spans = _whole_then_sdk(
        public_key,
        _runs(public_key, _node_app(public_key, inside)),
        TracerProvider(span_limits=SpanLimits(max_events=4, max_links=3)),
    )
    (agent,) = [s for s in sdk_spans if s[0][0] == "agent"]
    assert agent[0][4][-1][1]["exception.type"].endswith("test_tracing_langfuse._AppError")
    assert agent[1][2:] == (3, 2)  # dropped events, links
    for mine, theirs in zip(whole, sdk_spans, strict=True):
        assert mine == theirs, mine[0][0]


def test_a_root_sampler_decides_on_the_handlers_span_attributes(public_key: str) -> None:
    """A run with no thread (no seeded trace): the root sampler sees the span's attributes."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

    class NoChains(Sampler):  # an application's root sampler, by observation type
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> Any:
            chain = (attributes or {}).get("langfuse.observation.type") == "chain"
            decision = Decision.DROP if chain else Decision.RECORD_AND_SAMPLE
            return SamplingResult(decision, attributes)

        def get_description(self) -> str:
            return "NoChains"

    model = ScriptedChatModel(model_name="gpt-4o-mini", script=[ai("hello")])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile()  # no checkpointer, no thread id
    exporter = _exporting_client(
        public_key, tracer_provider=TracerProvider(sampler=ParentBased(NoChains()))
    )
    handler = langfuse_handler(public_key=public_key, secret_key="sk-lf-test-secret")
    graph.invoke({"messages": [HumanMessage("hi")]}, {"callbacks": [handler]})
    _flush(public_key)
    assert [s.name for s in exporter.get_finished_spans()] == []  # the root dropped: its tree


def test_a_langfuse_tracer_disabled_after_the_handlers_first_task_exports_nothing(
    public_key: str,
) -> None:
    """The provider's tracer configurator turns Langfuse's tracer off: no more spans.

    The SDK's tracer then starts non-recording spans; the handler's whole spans must stop too.
    """
    from opentelemetry.sdk.trace import TracerProvider, _disable_tracer_configurator

    provider = TracerProvider()
    exporter = _exporting_client(public_key, tracer_provider=provider)
    handler = langfuse_handler(public_key=public_key, secret_key="sk-lf-test-secret")
    graph = _node_app(public_key, lambda client: None)
    _run_node_app(graph, public_key, "lf-on", handler)
    assert {s.name for s in exporter.get_finished_spans()} >= {"LangGraph", "agent"}
    exporter.clear()
    provider._set_tracer_configurator(tracer_configurator=_disable_tracer_configurator)
    _run_node_app(graph, public_key, "lf-off", handler)
    assert [s.name for s in exporter.get_finished_spans()] == []
