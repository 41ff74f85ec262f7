"""The reference graphs: what they do by default, and what the harness does to each fault.

Every fault flag injects a *silent* failure (the tool "succeeds" with an empty, erroneous or
out-of-range output); the graphs' tool contracts catch each one and the scripted model
retries, so the task still ends with the right answer.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.errors import GraphRecursionError
from langgraph.types import Command

from checkpointers import AsyncBackend, open_backend
from graphs import Faults, SimulatedCrash, documents, research, support
from harness_nodes import UserError
from harness_nodes.testing import ScriptedChatModel, ai, tool_call


def _run(graph: Any, task: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run to the end, approving every review pause (as the demo's reviewer does)."""
    config = {**(config or {}), "configurable": {"thread_id": f"t-{uuid.uuid4().hex[:8]}"}}
    out: dict[str, Any] = graph.invoke({"messages": [HumanMessage(task)]}, config)
    while out.get("__interrupt__"):
        out = graph.invoke(Command(resume={"type": "approve"}), config)
    return out


async def _arun(graph: Any, task: str, thread_id: str) -> dict[str, Any]:
    """`_run` with ``ainvoke`` (durably, as a resumable async app runs)."""
    config = {"configurable": {"thread_id": thread_id}}
    out: dict[str, Any] = await graph.ainvoke(
        {"messages": [HumanMessage(task)]}, config, durability="sync"
    )
    while out.get("__interrupt__"):
        out = await graph.ainvoke(Command(resume={"type": "approve"}), config, durability="sync")
    return out


def _actions(out: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v["tool"], v["action"]) for v in out.get("verdicts", []) if v["action"] != "ok"]


def _tool_messages(state: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in state["messages"] if isinstance(m, ToolMessage)]


# --- research ------------------------------------------------------------------------------


def test_research_reads_the_top_hits_and_summarises_them() -> None:
    out = _run(research.build_graph(), research.DEFAULT_TASK)
    reads = [m for m in _tool_messages(out) if m.name == "read"]
    assert len(reads) == research.TOP_K
    answer = out["messages"][-1].text
    assert answer.startswith("Summary for:")
    assert "Lithium-ion batteries for grid storage" in answer
    assert out["outcome"]["status"] == "completed"


def test_research_prompt_grows_with_every_read() -> None:
    out = _run(research.build_graph(), research.DEFAULT_TASK)
    inputs = [
        m.usage_metadata["input_tokens"]
        for m in out["messages"]
        if isinstance(m, AIMessage) and m.usage_metadata
    ]
    assert inputs == sorted(inputs) and inputs[-1] > 5 * inputs[0]


def test_research_search_ranks_the_matching_note_first() -> None:
    search, _ = research.make_tools()
    hits = search.invoke({"query": "pumped hydro reservoirs"})
    assert hits[0]["doc_id"] == "pumped-hydro"
    assert all(0 <= h["score"] <= 1 for h in hits)


@pytest.mark.parametrize(
    ("flag", "refused"),
    [
        pytest.param("empty_results", ("search", "empty result"), id="empty"),
        pytest.param("embedded_error", ("read", "Too Many Requests"), id="embedded-error"),
        pytest.param("out_of_range", ("search", "outside [0, 1]"), id="out-of-range"),
    ],
)
def test_research_faults_are_refused_and_retried(flag: str, refused: tuple[str, str]) -> None:
    out = _run(research.build_graph(faults={flag: True}), research.DEFAULT_TASK)
    tool, reason = refused
    assert _actions(out) == [(tool, "retry")]
    assert reason in out["verdicts"][[v["ok"] for v in out["verdicts"]].index(False)]["reasons"][0]
    assert out["outcome"]["status"] == "completed"
    assert "Lithium-ion batteries for grid storage" in out["outcome"]["partial_result"]
    assert "429" not in out["outcome"]["partial_result"]


def test_research_faults_need_a_conversation_to_fire() -> None:
    search, _ = research.make_tools(Faults(out_of_range=True, empty_results=True))
    # outside a graph there is no conversation to count attempts in: no fault
    assert all(h["score"] <= 1 for h in search.invoke({"query": "hydrogen"}))


def test_research_runaway_never_stops_on_its_own() -> None:
    with pytest.raises(GraphRecursionError):
        _run(
            research.build_graph(faults={"runaway": True}, budget_usd=None),
            research.DEFAULT_TASK,
            config={"recursion_limit": 30},
        )


def test_research_degrades_to_the_cheaper_model_when_the_budget_runs_low() -> None:
    out = _run(research.build_graph(budget_usd=0.006), research.DEFAULT_TASK)
    models = [m.response_metadata.get("model_name") for m in out["messages"] if m.type == "ai"]
    assert models[0] == "gpt-4o" and models[-1] == "gpt-4o-mini"
    degraded = [
        m.additional_kwargs["harness"]["budget"]
        for m in out["messages"]
        if m.type == "ai" and m.additional_kwargs["harness"]["budget"].get("degraded_from")
    ]
    assert degraded and degraded[0]["degraded_from"] == "gpt-4o"
    assert out["outcome"]["status"] == "completed"


def test_research_runaway_is_stopped_by_its_budget() -> None:
    out = _run(
        research.build_graph(faults={"runaway": True}, budget_usd=0.01), research.DEFAULT_TASK
    )
    assert out["outcome"]["status"] == "budget_exhausted"
    assert "usd limit reached" in out["outcome"]["reason"]


def test_research_default_ladder_is_two_priced_model_names() -> None:
    names = [m.model_name for m in research.scripted_models()]  # type: ignore[attr-defined]
    assert names == ["gpt-4o", "gpt-4o-mini"]


# --- support -------------------------------------------------------------------------------


def test_support_refunds_the_duplicate_once_and_emails_the_customer() -> None:
    world = support.SupportWorld()
    out = _run(support.build_graph(world=world), support.DEFAULT_TASK)
    assert [(r["invoice_id"], r["amount_usd"]) for r in world.refunds] == [("inv_5003", 49.0)]
    assert [e["to"] for e in world.emails] == ["dana@example.com"]
    assert "$49.0" in out["messages"][-1].text


@pytest.mark.parametrize(
    ("flag", "tool"),
    [
        pytest.param("empty_results", "lookup_customer", id="empty-customer"),
        pytest.param("embedded_error", "list_invoices", id="embedded-error"),
        pytest.param("out_of_range", "list_invoices", id="cents-as-dollars"),
    ],
)
def test_support_faults_are_refused_and_the_right_refund_goes_out(flag: str, tool: str) -> None:
    world = support.SupportWorld()
    out = _run(support.build_graph(world=world, faults={flag: True}), support.DEFAULT_TASK)
    assert _actions(out) == [(tool, "retry")]
    assert out["outcome"]["status"] == "completed"
    assert [r["amount_usd"] for r in world.refunds] == [49.0]


def test_support_retries_a_call_answered_with_an_error_message() -> None:
    """What a verifier's corrective error message makes the scripted model do."""
    lookup = tool_call("lookup_customer", {"email": "dana@example.com"}, id="c1")
    prompt = [
        HumanMessage(support.DEFAULT_TASK),
        AIMessage("", tool_calls=[lookup]),
        ToolMessage("output failed verification: empty result", tool_call_id="c1", status="error"),
    ]
    retry = support.scripted_model().invoke(prompt)
    assert [(c["name"], c["args"]) for c in retry.tool_calls] == [
        ("lookup_customer", {"email": "dana@example.com"})
    ]
    assert retry.tool_calls[0]["id"] != "c1"


def test_support_world_on_a_file_is_shared_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "effects.jsonl"
    support.SupportWorld(path).record("refund", {"amount_usd": 1.0})
    assert [r["id"] for r in support.SupportWorld(path).refunds] == ["re_0001"]


def _requests(out: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for intr in out.get("__interrupt__", []) for r in intr.value]


def test_support_crash_mid_turn_replays_the_refund_and_asks_about_the_email(
    backend_url: str,
) -> None:
    world = support.SupportWorld()
    approve = Command(resume={"type": "approve"})
    with open_backend(backend_url) as backend:
        graph = support.build_graph(world=world, backend=backend, faults={"crash_in": "send_email"})
        config = {"configurable": {"thread_id": "t-crash"}}
        first = graph.invoke(
            {"messages": [HumanMessage(support.DEFAULT_TASK)]}, config, durability="sync"
        )
        assert [r["action_request"]["action"] for r in _requests(first)] == [
            "issue_refund",
            "send_email",
        ]
        with pytest.raises(SimulatedCrash):  # approved; the email dies mid-call
            graph.invoke(approve, config, durability="sync")
        assert len(world.refunds) == 1 and world.emails == []
        # A new process would resume here; the refund is replayed from the effect ledger,
        # and the email — raised mid-call, so did it go out? — goes to a person.
        resumed = graph.invoke(None, config, durability="sync")
        (question,) = _requests(resumed)
        assert (question["kind"], question["trigger"]) == ("escalation", "effect_unknown")
        assert len(world.refunds) == 1
        # The reviewer checked the mail server: it did not go out. The agent sends it again,
        # which is an irreversible call, so it is reviewed again.
        again = graph.invoke(Command(resume={"type": "reject"}), config, durability="sync")
        assert [r["action_request"]["action"] for r in _requests(again)] == ["send_email"]
        out = graph.invoke(approve, config, durability="sync")
    assert out["outcome"]["status"] == "completed"
    assert len(world.refunds) == 1 and len(world.emails) == 1
    refund_msg = next(m for m in _tool_messages(out) if m.name == "issue_refund")
    assert refund_msg.additional_kwargs["harness"]["effect"]["replayed"] is True


def test_support_model_crash_resumes_without_rerunning_finished_steps(backend_url: str) -> None:
    world = support.SupportWorld()
    with open_backend(backend_url) as backend:
        graph = support.build_graph(world=world, backend=backend, faults={"crash_at_turn": 3})
        config = {"configurable": {"thread_id": "t-model-crash"}}
        graph.invoke({"messages": [HumanMessage(support.DEFAULT_TASK)]}, config, durability="sync")
        with pytest.raises(SimulatedCrash):
            graph.invoke(Command(resume={"type": "approve"}), config, durability="sync")
        assert len(world.refunds) == 1 and len(world.emails) == 1
        out = graph.invoke(None, config, durability="sync")
    assert out["outcome"]["status"] == "completed"
    assert len(world.refunds) == 1 and len(world.emails) == 1


# --- documents -----------------------------------------------------------------------------


def _records(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["doc_id"]: r for r in json.loads(out["messages"][-1].text)}


def test_documents_extracts_every_field_of_the_batch() -> None:
    records = _records(_run(documents.build_graph(), documents.DEFAULT_TASK))
    assert len(records) == 6
    assert records["doc-004"] == {
        "doc_id": "doc-004",
        "vendor": "Tailspin Travel",
        "date": "2026-11-02",
        "total": 1480.0,
        "currency": "GBP",
    }
    assert all(all(r[k] is not None for k in documents.FIELDS) for r in records.values())


def test_documents_extracts_the_batch_in_one_parallel_turn() -> None:
    out = _run(documents.build_graph(), documents.DEFAULT_TASK)
    fan_out = [m for m in out["messages"] if isinstance(m, AIMessage) and len(m.tool_calls) > 1]
    assert len(fan_out) == 1 and len(fan_out[0].tool_calls) == 6


def test_documents_faults_each_hit_a_different_document_and_are_retried() -> None:
    faults = {"empty_results": True, "embedded_error": True, "out_of_range": True}
    out = _run(documents.build_graph(faults=faults), documents.DEFAULT_TASK)
    refused = {v["tool_call_id"]: v["reasons"][0] for v in out["verdicts"] if not v["ok"]}
    assert len(refused) == 3
    reasons = " | ".join(refused.values())
    assert "empty result" in reasons and "HTML" in reasons and "out of range" in reasons
    clean = _records(_run(documents.build_graph(), documents.DEFAULT_TASK))
    assert _records(out) == clean


# --- shared --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [research, support, documents], ids=lambda m: m.TASK_TYPE)
def test_each_graph_runs_with_any_chat_model(module: Any) -> None:
    model = ScriptedChatModel(
        script=[ai("I cannot help with that.")], model_name="claude-3-5-haiku"
    )
    out = _run(module.build_graph(model), module.DEFAULT_TASK)
    assert out["outcome"] == {"status": "completed", "partial_result": "I cannot help with that."}


@pytest.mark.parametrize("module", [research, support, documents], ids=lambda m: m.TASK_TYPE)
def test_an_unpriced_model_needs_a_price_or_no_budget(module: Any) -> None:
    from harness_nodes import UnpricedModelError

    model = ScriptedChatModel(script=[ai("ok")], model_name="acme-local-7b")
    with pytest.raises(UnpricedModelError, match="acme-local-7b"):
        module.build_graph(model)
    out = _run(module.build_graph(model, budget_usd=None), module.DEFAULT_TASK)
    assert out["outcome"]["status"] == "completed"


@pytest.mark.parametrize("module", [research, support, documents], ids=lambda m: m.TASK_TYPE)
def test_each_graph_s_contracts_name_its_tools(module: Any) -> None:
    tools = {t.name for t in module.make_tools()}
    assert set(module.CONTRACTS) <= tools


@pytest.mark.parametrize("module", [research, support, documents], ids=lambda m: m.TASK_TYPE)
def test_each_module_exposes_a_compiled_graph_for_deployment(module: Any) -> None:
    from langgraph.graph.state import CompiledStateGraph

    assert isinstance(module.graph, CompiledStateGraph)
    assert module.graph.checkpointer is None  # the server brings its own persistence
    assert module.graph.name == module.TASK_TYPE


def test_unknown_fault_flag_is_a_user_error() -> None:
    with pytest.raises(UserError, match="Unknown fault flag\\(s\\) emtpy_results"):
        Faults.parse({"emtpy_results": True})


def test_documents_batches_run_as_background_tasks_once_per_key(durable_url: str) -> None:
    from harness_nodes import TaskRunner

    faults = {"empty_results": True, "embedded_error": True, "out_of_range": True}
    batch = {"messages": [HumanMessage(documents.DEFAULT_TASK)]}
    with (
        open_backend(durable_url) as backend,
        TaskRunner(backend, lambda b: documents.build_graph(backend=b, faults=faults)) as runner,
    ):
        first = runner.submit("batch-11", batch, task_type=documents.TASK_TYPE)
        again = runner.submit("batch-11", batch, task_type=documents.TASK_TYPE)
        result = runner.result("batch-11", timeout=60)
        threads = backend.execute("SELECT DISTINCT thread_id FROM checkpoints")
    assert first.thread_id == again.thread_id and len(threads) == 1
    assert result["status"] == "completed"
    records = json.loads(result["partial_result"])
    assert len(records) == 6 and all(r["total"] > 0 for r in records)


def test_support_tools_run_unguarded_in_a_bare_agent() -> None:
    # The bare baseline of bench/chaos.py runs the same tools with no effect ledger: the
    # effects land, without an idempotency key, and a second call is a second refund.
    world = support.SupportWorld()
    refund = support.make_tools(world, guarded=False)[2]
    args = {"invoice_id": "inv_1", "amount_usd": 49.0, "reason": "dup"}
    for _ in range(2):
        assert refund.invoke(args)["status"] == "succeeded"
    assert [r["idempotency_key"] for r in world.refunds] == [None, None]


# --- async apps ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("module", [research, support, documents], ids=lambda m: m.TASK_TYPE)
async def test_each_graph_runs_on_an_async_backend_under_ainvoke(
    module: Any, abackend: AsyncBackend
) -> None:
    """Budget, verification and (support) the effect ledger on an `AsyncBackend`."""
    kwargs: dict[str, Any] = {"world": support.SupportWorld()} if module is support else {}
    graph = module.build_graph(backend=abackend, **kwargs)
    out = await _arun(graph, module.DEFAULT_TASK, "t-async")
    assert out["outcome"]["status"] == "completed", out["outcome"]
    assert [m.type for m in out["messages"]][-1] == "ai"
    spent = await abackend.execute(
        "SELECT task_id FROM harness_spend WHERE task_id = %s LIMIT 1", ("t-async",)
    )
    assert spent  # the budget's reservations are in the backend
    if module is support:
        world = kwargs["world"]
        assert [r["amount_usd"] for r in world.refunds] == [49.0] and len(world.emails) == 1
        effects = await abackend.execute("SELECT tool, status FROM harness_effects")
        assert sorted((r["tool"], r["status"]) for r in effects) == [
            ("issue_refund", "done"),
            ("send_email", "done"),
        ]


@pytest.mark.anyio
async def test_support_resumed_under_ainvoke_after_a_model_error_sends_nothing_twice(
    abackend: AsyncBackend,
) -> None:
    world = support.SupportWorld()
    model = support.scripted_model()
    # A provider error after the refund and the email went out. (Not `crash_at_turn`: a
    # BaseException raised by a chat model's async path surfaces from langchain-core as
    # an AttributeError.)
    model.faults[3] = RuntimeError("provider down")
    graph = support.build_graph(model, world=world, backend=abackend)
    config = {"configurable": {"thread_id": "t-model-error"}}
    task = {"messages": [HumanMessage(support.DEFAULT_TASK)]}
    await graph.ainvoke(task, config, durability="sync")
    with pytest.raises(RuntimeError, match="provider down"):
        await graph.ainvoke(Command(resume={"type": "approve"}), config, durability="sync")
    assert len(world.refunds) == 1 and len(world.emails) == 1
    out = await graph.ainvoke(None, config, durability="sync")
    assert out["outcome"]["status"] == "completed"
    assert len(world.refunds) == 1 and len(world.emails) == 1


@pytest.mark.anyio
async def test_documents_batches_run_as_async_background_tasks(abackend: AsyncBackend) -> None:
    """`AsyncTaskRunner` with the graph factory: the agent is built on the runner's backend."""
    from harness_nodes.aio import AsyncTaskRunner

    batch = {"messages": [HumanMessage(documents.DEFAULT_TASK)]}
    async with AsyncTaskRunner(abackend, "graphs.documents:build") as runner:
        await runner.asubmit("batch-12", batch, task_type=documents.TASK_TYPE)
        result = await runner.aresult("batch-12", timeout=60)
    assert result["status"] == "completed", result
    assert len(json.loads(result["partial_result"])) == 6


def test_quickstart_a_malformed_tool_call_is_no_answer() -> None:
    # A provider's tool call whose arguments are not JSON lands in invalid_tool_calls, so
    # tools_condition ends the loop: the task failed, it did not complete with "".
    from graphs import quickstart

    bad = AIMessage(
        "",
        invalid_tool_calls=[
            {
                "name": "get_weather",
                "args": '{"city": "Par',
                "id": "call-bad",
                "error": None,
                "type": "invalid_tool_call",
            }
        ],
    )
    with open_backend("memory://") as backend:
        builder = quickstart.build_graph(ScriptedChatModel(script=[bad]))
        out = quickstart.run(builder, backend, thread_id="t-bad-args")
    assert out["outcome"]["status"] == "failed"
    assert "get_weather" in out["outcome"]["reason"]
