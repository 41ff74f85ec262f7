from __future__ import annotations

import asyncio
import json
import logging
import math
import operator
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import httpx2
import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.exceptions import ModelTimeoutError
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, Send
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import TypedDict

from checkpointers import AsyncBackend, Backend, open_backend
from checkpointers._spend import Limits, SpendLedger, aflush_pending, flush_pending
from harness_nodes import (
    BudgetCallbackHandler,
    BudgetExceeded,
    BudgetGuard,
    Envelope,
    Envelopes,
    HarnessState,
    ModelPrice,
    Pricing,
    UnpricedModelError,
    UserError,
    WindowCap,
    budgeted,
)
from harness_nodes.budget import bytes_bound
from harness_nodes.testing import ScriptedChatModel, ai, tool_call
from tests.conftest import subprocess_env
from tests.harness_nodes._budget_graphs import (
    MAX_USD,
    RESULT,
    guarded_loop,
    runaway_llm,
    search,
    search_after_approval,
    unguarded_loop,
)

pytestmark = pytest.mark.anyio

NANOS = 1_000_000_000
LIMIT_NANOS = int(MAX_USD * NANOS)
LONG = "word " * 8000  # ~10k output tokens wanted: every call uses its whole output cap


class Events(BaseCallbackHandler):
    """Collects the harness.* custom events of a run."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name.startswith("harness."):
            with self.lock:
                self.seen.append((name.removeprefix("harness."), dict(data)))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.seen]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, d in self.seen if k == kind]


def _config(thread_id: str, **extra: Any) -> Any:
    return {"configurable": {"thread_id": thread_id}, "recursion_limit": 10_000, **extra}


def _ledger_nanos(backend: Backend, task_id: str) -> tuple[int, int]:
    """(settled spend, spend + open reservations) of a task, straight from the ledger rows."""
    flush_pending(backend)  # settlements ride on the task's next statement; write them now
    rows = backend.execute(
        "SELECT COALESCE(SUM(cost_nanos), 0) AS spent, "
        "COALESCE(SUM(CASE WHEN state = 'reserved' THEN reserved_nanos ELSE 0 END), 0) AS open "
        "FROM harness_spend WHERE task_id = %s",
        (task_id,),
    )
    spent, open_ = int(rows[0]["spent"]), int(rows[0]["open"])
    return spent, spent + open_


# --- the runaway loop ----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["route", "node"])
def test_runaway_loop_ends_budget_exhausted_within_the_envelope(
    backend: Backend, form: Any
) -> None:
    events = Events()
    llm = runaway_llm(backend)
    graph = guarded_loop(llm, form=form).compile(checkpointer=backend.checkpointer)
    out = graph.invoke(
        {"messages": [HumanMessage("research this forever")]},
        _config("runaway", callbacks=[events]),
        durability="sync",
    )
    outcome = out["outcome"]
    assert outcome["status"] == "budget_exhausted"
    assert "usd limit reached" in outcome["reason"]
    partial = outcome["partial_result"]
    assert partial["last_answer"] == "Searching once more."
    assert len(partial["tool_results"]) >= 5
    assert all(r["content"] == RESULT for r in partial["tool_results"])
    spent, committed = _ledger_nanos(backend, "runaway")
    assert committed == spent <= LIMIT_NANOS  # never above, and nothing left reserved
    assert spent > LIMIT_NANOS * 0.6  # it did use most of the envelope before stopping
    assert out["spend"]["usd"] == pytest.approx(spent / NANOS)
    assert out["spend"]["by_model"]["gpt-4o"]["calls"] == out["spend"]["calls"]
    assert out["spend"]["calls"] == len(partial["tool_results"])
    # The trace channel saw every reservation, settlement and the stop.
    assert events.kinds().count("budget.reserve") == out["spend"]["calls"]
    assert events.kinds().count("budget.settle") == out["spend"]["calls"]
    assert events.of("budget.stop")[-1]["limit"] == "usd"
    assert len(events.of("budget.warn")) == 1
    assert events.of("budget.warn")[0]["used"] >= 0.8 * MAX_USD
    settles = events.of("budget.settle")
    assert all(s["limit_usd"] == MAX_USD for s in settles)
    assert settles[-1]["spent_usd"] == pytest.approx(spent / NANOS)


def test_runaway_in_a_plain_messages_state_app_keeps_the_outcome_on_the_last_message(
    backend: Backend,
) -> None:
    llm = runaway_llm(backend)
    graph = guarded_loop(llm, state=MessagesState).compile(checkpointer=backend.checkpointer)
    out = graph.invoke({"messages": [HumanMessage("go")]}, _config("plain"), durability="sync")
    assert set(out) == {"messages"}
    outcome = out["messages"][-1].additional_kwargs["harness"]["outcome"]
    assert outcome["status"] == "budget_exhausted"
    assert outcome["partial_result"]["tool_results"]
    assert _ledger_nanos(backend, "plain")[1] <= LIMIT_NANOS


def test_wrapped_model_alone_refuses_the_call_that_would_overspend(backend: Backend) -> None:
    llm = runaway_llm(backend)
    graph = unguarded_loop(llm).compile(checkpointer=backend.checkpointer)
    out = graph.invoke({"messages": [HumanMessage("go")]}, _config("bare"), durability="sync")
    last = out["messages"][-1]
    assert isinstance(last, AIMessage) and not last.tool_calls
    stopped = last.additional_kwargs["harness"]["budget"]["stopped"]
    assert stopped["limit"] == "usd" and stopped["maximum"] == MAX_USD
    spent, committed = _ledger_nanos(backend, "bare")
    assert committed == spent <= LIMIT_NANOS


def test_exit_behavior_error_raises_budget_exceeded_with_fields(backend: Backend) -> None:
    llm = runaway_llm(backend, exit_behavior="error")
    graph = guarded_loop(llm).compile(checkpointer=backend.checkpointer)
    with pytest.raises(BudgetExceeded, match=re.escape("Budget exhausted for task 'strict'")) as e:
        graph.invoke({"messages": [HumanMessage("go")]}, _config("strict"), durability="sync")
    assert (e.value.task_id, e.value.limit, e.value.maximum) == ("strict", "usd", MAX_USD)
    assert 0 < e.value.used <= MAX_USD
    assert _ledger_nanos(backend, "strict")[1] <= LIMIT_NANOS


async def test_async_runaway_ends_budget_exhausted(abackend: AsyncBackend) -> None:
    llm = runaway_llm(abackend)
    guard = BudgetGuard(llm)

    async def agent(s: HarnessState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(s["messages"])]}

    from langgraph.prebuilt import ToolNode, tools_condition

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search]))
    builder.add_node("budget_exhausted", guard.afinish)
    routes = {"ok": "agent", "degrade": "agent", "stop": "budget_exhausted"}
    builder.add_conditional_edges(START, guard.aroute, routes)
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_conditional_edges("tools", guard.aroute, routes)
    builder.add_edge("budget_exhausted", END)
    graph = builder.compile(checkpointer=abackend.checkpointer)
    out = await graph.ainvoke(
        {"messages": [HumanMessage("go")]}, _config("async"), durability="sync"
    )
    assert out["outcome"]["status"] == "budget_exhausted"
    assert 0 < out["spend"]["usd"] <= MAX_USD
    await aflush_pending(abackend)
    rows = await abackend.execute(
        "SELECT COALESCE(SUM(cost_nanos), 0) AS n, COUNT(*) AS c FROM harness_spend "
        "WHERE task_id = %s AND state = 'settled'",
        ("async",),
    )
    assert int(rows[0]["n"]) <= LIMIT_NANOS and int(rows[0]["c"]) == out["spend"]["calls"]


@pytest.mark.parametrize("state", [HarnessState, MessagesState], ids=["harness", "messages"])
async def test_the_guard_node_stops_an_async_runaway_on_an_async_backend(
    abackend: AsyncBackend, state: type[Any]
) -> None:
    # The node form, in an async graph run with ainvoke: it used to fail at its first step
    # with "invoke() needs a sync Backend ...; with an AsyncBackend use ainvoke()".
    llm = runaway_llm(abackend)
    builder = guarded_loop(llm, form="node", state=state, asynchronous=True)
    graph = builder.compile(checkpointer=abackend.checkpointer)
    out = await graph.ainvoke(
        {"messages": [HumanMessage("go")]}, _config("async-node"), durability="sync"
    )
    outcome = out["messages"][-1].additional_kwargs["harness"]["outcome"]
    assert outcome["status"] == "budget_exhausted"
    assert "usd limit reached" in outcome["reason"]
    assert len(outcome["partial_result"]["tool_results"]) >= 5
    if state is HarnessState:
        assert out["outcome"]["status"] == "budget_exhausted"
        assert 0 < out["spend"]["usd"] <= MAX_USD
    await aflush_pending(abackend)
    rows = await abackend.execute(
        "SELECT COALESCE(SUM(cost_nanos), 0) AS n, COUNT(*) AS c FROM harness_spend "
        "WHERE task_id = %s AND state = 'settled'",
        ("async-node",),
    )
    assert 0 < int(rows[0]["n"]) <= LIMIT_NANOS
    assert int(rows[0]["c"]) == len(outcome["partial_result"]["tool_results"])


# --- degradation ---------------------------------------------------------------------------


def _ladder_script() -> list[Any]:
    return [
        ai("Let me search.", tool_calls=[tool_call("search", {"query": "a"}, id="c1")]),
        ai("One more.", tool_calls=[tool_call("search", {"query": "b"}, id="c2")]),
        ai("Here is the summary."),
    ]


@pytest.mark.parametrize("lease", [1, 4], ids=["per-call", "lease"])
def test_degrades_to_the_cheaper_model_and_completes(backend: Backend, lease: int) -> None:
    # With a lease (Postgres), the same decisions: a lease only books room, never decides.
    events = Events()
    ladder = [
        ScriptedChatModel(script=_ladder_script(), model_name=name)
        for name in ("gpt-4o", "gpt-4o-mini")
    ]
    # $0.045: the first call fits gpt-4o; after an 18 KB tool result the prompt alone would
    # cost gpt-4o about $0.045 at the byte bound, so the next calls step down to gpt-4o-mini.
    llm = budgeted(
        ladder, envelope=Envelope(max_usd=0.045), backend=backend, lease=lease
    ).bind_tools([search])
    graph = guarded_loop(llm, form="node").compile(checkpointer=backend.checkpointer)
    out = graph.invoke(
        {"messages": [HumanMessage("research")]},
        _config("ladder", callbacks=[events]),
        durability="sync",
    )
    answers = [m for m in out["messages"] if isinstance(m, AIMessage)]
    assert answers[-1].content == "Here is the summary."  # the task completed
    budgets = [m.additional_kwargs["harness"]["budget"] for m in answers]
    assert [b["model"] for b in budgets] == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    assert [b["degraded_from"] for b in budgets] == [None, "gpt-4o", "gpt-4o"]
    if lease > 1 and backend.kind == "postgres":  # the last call came from the mini's lease
        assert ["lease_id" in b for b in budgets] == [False, False, True]
    assert [a.response_metadata["model_name"] for a in answers] == [b["model"] for b in budgets]
    # Visible in state (the guard node mirrors spend) and in the trace.
    assert out["spend"]["model"] == "gpt-4o-mini"
    assert set(out["spend"]["by_model"]) == {"gpt-4o", "gpt-4o-mini"}
    degrade = events.of("budget.degrade")
    assert (
        degrade
        and degrade[0]["from_model"] == "gpt-4o"
        and degrade[0]["to_model"] == ("gpt-4o-mini")
    )
    assert "outcome" not in out
    assert _ledger_nanos(backend, "ladder")[1] <= 0.045 * NANOS


def test_envelope_ladder_picks_models_per_task_type(backend: Backend) -> None:
    ladder = [
        ScriptedChatModel(script=["big"], model_name="gpt-4o"),
        ScriptedChatModel(script=["small"], model_name="gpt-4o-mini"),
    ]
    llm = budgeted(
        ladder,
        envelope=Envelopes(
            default=Envelope(max_usd=1), by_type={"cheap": Envelope(ladder=("gpt-4o-mini",))}
        ),
        backend=backend,
    )
    cheap = llm.invoke("hi", {"configurable": {"thread_id": "a", "task_type": "cheap"}})
    default = llm.invoke("hi", {"configurable": {"thread_id": "b"}})
    assert (cheap.content, default.content) == ("small", "big")


def test_output_cap_is_lowered_to_what_remains(backend: Backend) -> None:
    model = ScriptedChatModel(script=[LONG], model_name="gpt-4o")
    envelope = Envelope(max_usd=0.01, max_output_tokens=4096, min_output_tokens=16)
    llm = budgeted(model, envelope=envelope, backend=backend)
    msg = llm.invoke("write", {"configurable": {"thread_id": "cap"}})
    out_tokens = msg.usage_metadata["output_tokens"] if msg.usage_metadata else -1
    # $0.01 at $10/M output tokens leaves < 1000 tokens after the prompt.
    assert 16 <= out_tokens < 1000
    assert msg.response_metadata["finish_reason"] == "length"
    spent, committed = _ledger_nanos(backend, "cap")
    assert committed == spent <= 0.01 * NANOS


# --- concurrency (Postgres, real threads and processes) ------------------------------------


class _Fan(TypedDict):
    messages: Annotated[list[BaseMessage], operator.add]


class _Branch(TypedDict):
    i: int


@pytest.mark.postgres
@pytest.mark.parametrize("lease", [1, 4], ids=["per-call", "lease"])
def test_twenty_parallel_branches_of_one_task_never_exceed_its_envelope(
    postgres_url: str, lease: int
) -> None:
    with open_backend(postgres_url, pool_size=20) as backend:
        model = ScriptedChatModel(
            script=[lambda _: (time.sleep(0.05), LONG)[1]], loop=True, model_name="gpt-4o"
        )
        # Each call reserves ~4.1k output tokens at gpt-4o's price (~$0.041) and uses them all.
        llm = budgeted(model, envelope=Envelope(max_usd=0.30), backend=backend, lease=lease)

        def branch(state: _Branch) -> dict[str, Any]:
            return {"messages": [llm.invoke([HumanMessage(f"report {state['i']}")])]}

        builder = StateGraph(_Fan)
        builder.add_node("branch", branch)
        builder.add_conditional_edges(
            START, lambda _: [Send("branch", {"i": i}) for i in range(20)], ["branch"]
        )
        builder.add_edge("branch", END)
        graph = builder.compile(checkpointer=backend.checkpointer)
        out = graph.invoke({"messages": []}, _config("fan"), durability="sync")
        answered = [
            m
            for m in out["messages"]
            if not m.additional_kwargs["harness"]["budget"].get("stopped")
        ]
        assert len(out["messages"]) == 20
        spent, committed = _ledger_nanos(backend, "fan")
        assert committed == spent <= 0.30 * NANOS
        # Without the atomic reservation all 20 would have run (20 x ~$0.041 = $0.82): 7 fit
        # whole, an 8th with its output capped to what was left.
        assert 6 <= len(answered) <= 8
        assert spent >= 0.20 * NANOS
        leased = ["lease_id" in m.additional_kwargs["harness"]["budget"] for m in answered]
        assert any(leased) == (lease > 1)  # $0.30 leaves room for a lease of 3 calls at first


@pytest.mark.postgres
def test_twenty_concurrent_tasks_share_a_per_type_cap(postgres_url: str) -> None:
    cap = 0.25
    with open_backend(postgres_url, pool_size=20) as backend:
        model = ScriptedChatModel(
            script=[lambda _: (time.sleep(0.05), LONG)[1]], loop=True, model_name="gpt-4o"
        )
        llm = budgeted(
            model,
            envelope=Envelope(max_usd=1.0, type_cap=WindowCap(max_usd=cap, seconds=86400)),
            backend=backend,
            task_type="research",
        )
        results: list[AIMessage] = []
        lock = threading.Lock()

        def task(i: int) -> None:
            msg = llm.invoke([HumanMessage("report")], {"configurable": {"thread_id": f"t{i}"}})
            with lock:
                results.append(msg)

        threads = [threading.Thread(target=task, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flush_pending(backend)
        total = backend.execute(
            "SELECT COALESCE(SUM(cost_nanos), 0) AS n FROM harness_spend WHERE task_type = %s",
            ("research",),
        )[0]["n"]
        assert int(total) <= cap * NANOS
        refused = [m for m in results if m.additional_kwargs["harness"]["budget"].get("stopped")]
        assert len(results) == 20 and len(refused) >= 12
        assert {m.additional_kwargs["harness"]["budget"]["stopped"]["limit"] for m in refused} == {
            "window_usd"
        }


@pytest.mark.postgres
@pytest.mark.slow
def test_tasks_in_four_processes_share_a_per_type_cap(postgres_url: str) -> None:
    cap = 0.25
    with open_backend(postgres_url):
        pass  # set the schema up once, before the children race
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.harness_nodes._budget_children",
                "window",
                postgres_url,
                f"p{p}",
                "3",
                str(cap),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for p in range(4)
    ]
    answered = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        answered += json.loads(out)["answered"]
    with open_backend(postgres_url) as backend:
        total = int(
            backend.execute("SELECT COALESCE(SUM(cost_nanos), 0) AS n FROM harness_spend")[0]["n"]
        )
    assert total <= cap * NANOS
    assert 5 <= answered <= 7  # ~$0.041 each: 6 fit whole, a 7th with a capped output


# --- resume --------------------------------------------------------------------------------


def test_spend_survives_interrupt_and_resume_and_the_cap_still_holds(backend: Backend) -> None:
    model = ScriptedChatModel(
        script=[
            ai("Searching.", tool_calls=[tool_call("search", {"query": "a"}, id="c0")]),
            ai("Searching.", tool_calls=[tool_call("search", {"query": "b"}, id="c1")]),
            ai("Need approval.", tool_calls=[tool_call("search_after_approval", {"query": "c"})]),
            ai("Searching.", tool_calls=[tool_call("search", {"query": "d"}, id="cx")]),
        ],
        loop=True,
        model_name="gpt-4o",
    )
    tools = [search, search_after_approval]

    def build() -> Any:
        # A fresh wrapper each leg: nothing cached in memory, the ledger is the only memory.
        llm = budgeted(model, envelope=Envelope(max_usd=MAX_USD), backend=backend).bind_tools(tools)
        return guarded_loop(llm, tools=tools).compile(checkpointer=backend.checkpointer)

    config = _config("paused")
    first = build().invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    assert "__interrupt__" in first
    spent_before, _ = _ledger_nanos(backend, "paused")
    assert spent_before > 0
    out = build().invoke(Command(resume=True), config, durability="sync")
    assert out["outcome"]["status"] == "budget_exhausted"
    spent, committed = _ledger_nanos(backend, "paused")
    assert spent > spent_before and committed == spent <= LIMIT_NANOS
    assert out["spend"]["usd"] == pytest.approx(spent / NANOS)  # the mirror includes leg one


def _child(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.harness_nodes._budget_children", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        timeout=120,
    )


@pytest.mark.slow
def test_spend_survives_a_crash_and_a_resume_in_another_process(
    durable_url: str, tmp_path: Path
) -> None:
    thread = f"crash-{uuid.uuid4().hex[:8]}"
    counter = tmp_path / "tool-calls"
    crashed = _child(
        "runaway",
        durable_url,
        thread,
        "start",
        BUDGET_CRASH_AT_TOOL_CALL="4",
        BUDGET_CRASH_COUNTER=str(counter),
    )
    assert crashed.returncode == -9, crashed.stderr  # SIGKILL inside the 4th tool call
    with open_backend(durable_url) as backend:
        spent_before, committed_before = _ledger_nanos(backend, thread)
    # The last answer's settlement may have died with the process (it rides on the task's next
    # statement): its worst case stays booked — the safe side — until the resume settles it
    # from the checkpointed answer (checked at the end: the ledger is exact again).
    assert spent_before > 0 and committed_before >= spent_before
    resumed = _child("runaway", durable_url, thread, "resume")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["status"] == "budget_exhausted"
    assert result["tool_results"] >= 5
    assert spent_before < result["spent_nanos"] <= LIMIT_NANOS
    # Resuming once more cannot spend more: the envelope is spent for good.
    with open_backend(durable_url) as backend:
        graph = guarded_loop(runaway_llm(backend)).compile(checkpointer=backend.checkpointer)
        graph.invoke(None, _config(thread), durability="sync")
        assert _ledger_nanos(backend, thread) == (result["spent_nanos"], result["spent_nanos"])


# --- failures, pricing, wiring -------------------------------------------------------------


def test_a_failed_call_releases_its_reservation(backend: Backend) -> None:
    model = ScriptedChatModel(
        script=["fine"], model_name="gpt-4o", faults={0: ConnectionError("provider down")}
    )
    llm = budgeted(model, envelope=Envelope(max_usd=0.05, max_calls=1), backend=backend)
    config: Any = {"configurable": {"thread_id": "flaky"}}
    with pytest.raises(ConnectionError, match="provider down"):
        llm.invoke("hi", config)
    assert _ledger_nanos(backend, "flaky") == (0, 0)
    status = backend.execute("SELECT state FROM harness_spend WHERE task_id = %s", ("flaky",))
    assert status == [{"state": "released"}]
    assert llm.invoke("hi", config).content == "fine"  # the call budget was given back too
    again = llm.invoke("hi", config)
    assert again.additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "calls"


def _charged_at_worst_case(rows: list[dict[str, Any]]) -> bool:
    """Every row is a settled call recorded at exactly what its reservation booked."""
    return bool(rows) and all(
        r["state"] == "settled"
        and int(r["cost_nanos"]) == int(r["reserved_nanos"]) > 0
        and int(r["input_tokens"]) + int(r["output_tokens"]) == int(r["reserved_tokens"])
        for r in rows
    )


_SPEND_ROWS = (
    "SELECT state, cost_nanos, reserved_nanos, input_tokens, output_tokens, reserved_tokens "
    "FROM harness_spend WHERE task_id = %s ORDER BY id"
)


def _provider_timeout() -> Exception:
    # What openai/anthropic raise on a read timeout: their own error, from the client's.
    error = RuntimeError("Request timed out.")
    error.__cause__ = httpx.ReadTimeout("The read operation timed out")
    return error


class _IntegrationTimeout(ModelTimeoutError):
    """langchain-openai's ``OpenAITimeoutError``: the SDK's ``APITimeoutError``, classified."""


def _integration_timeout(transport: BaseException | None) -> Exception:
    # What langchain-openai raises on a timeout with the openai 3.x SDK: its own error, from
    # openai's APITimeoutError, from httpx2's (not httpx's) error, from httpcore2's.
    sdk = RuntimeError("Request timed out.")
    sdk.__cause__ = transport
    error = _IntegrationTimeout("Request timed out.")
    error.__cause__ = sdk
    return error


class _CountsWithoutTools(GenericFakeChatModel):
    """ChatOpenAI's shape: an offline counter (tiktoken) that ignores the tools it is given,
    and a provider whose ``prompt_tokens`` include the bound tools' schemas."""

    model_name: str = "gpt-4o-mini"
    tool_tokens: int = 0
    caps: list[int] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> _CountsWithoutTools:
        return self

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Any = None) -> int:
        return sum(4 + len(str(m.content)) // 4 for m in messages)  # tools ignored

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        cap = int(kw["max_tokens"])
        self.caps.append(cap)
        prompt = self.get_num_tokens_from_messages(messages) + self.tool_tokens
        answer = AIMessage(
            "cut at the cap",
            usage_metadata={
                "input_tokens": prompt,
                "output_tokens": cap,
                "total_tokens": prompt + cap,
            },
            response_metadata={"finish_reason": "length", "model_name": "gpt-4o-mini-2024-07-18"},
        )
        return ChatResult(generations=[ChatGeneration(message=answer)])


def test_a_model_counter_that_ignores_tools_still_reserves_their_schemas(
    backend: Backend,
) -> None:
    # ChatOpenAI's own counter (tiktoken, online) counts the messages and ignores the tool
    # schemas, which OpenAI bills as prompt tokens: reserved without them, an answer cut at the
    # cap the envelope lowered cost more than the envelope ($0.00165 of $0.0015 here).
    fields = " ".join(f"f{i}: what the order's field {i} holds" for i in range(100))

    @tool(description=f"Look up an order. {fields}")
    def lookup(order: str) -> str:
        return order

    schema_bytes = len(json.dumps(convert_to_openai_tool(lookup)).encode())
    model = _CountsWithoutTools(messages=iter([]), tool_tokens=schema_bytes // 4)
    max_usd = 0.0015
    llm = budgeted(model, envelope=Envelope(max_usd=max_usd), backend=backend)
    config: Any = {"configurable": {"thread_id": "tools-counted"}}
    answer = llm.bind_tools([lookup]).invoke([HumanMessage("Where is order A1?")], config)
    assert model.caps  # the call was made, its cap lowered to what the envelope had left
    budget = answer.additional_kwargs["harness"]["budget"]
    assert budget["truncated"]["limit"] == "usd"
    assert budget["spent_usd"] <= budget["reserved_usd"]
    assert llm.spend(config)["usd"] <= max_usd


@pytest.mark.parametrize(
    ("fault", "charged"),
    [
        pytest.param(KeyboardInterrupt(), True, id="interrupted"),
        pytest.param(TimeoutError("The read operation timed out"), True, id="timeout"),
        pytest.param(httpx.ReadTimeout("timed out"), True, id="read-timeout"),
        pytest.param(_provider_timeout(), True, id="provider-timeout"),
        pytest.param(httpx.ReadError("connection reset by peer"), True, id="dropped-reading"),
        pytest.param(
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            True,
            id="server-disconnected",
        ),
        pytest.param(httpx.ConnectTimeout("timed out"), False, id="connect-timeout"),
        pytest.param(httpx.ConnectError("connection refused"), False, id="connect-error"),
        pytest.param(ConnectionError("provider down"), False, id="provider-error"),
        pytest.param(
            _integration_timeout(httpx2.ReadTimeout("timed out")), True, id="openai3-read-timeout"
        ),
        pytest.param(httpx2.ReadError("connection reset by peer"), True, id="httpx2-dropped"),
        pytest.param(
            httpx2.RemoteProtocolError("Server disconnected without sending a response."),
            True,
            id="httpx2-server-disconnected",
        ),
        pytest.param(_integration_timeout(None), True, id="model-timeout-of-unknown-client"),
        pytest.param(
            _integration_timeout(httpx2.ConnectTimeout("timed out")),
            False,
            id="openai3-connect-timeout",
        ),
        pytest.param(httpx2.ConnectError("connection refused"), False, id="httpx2-connect-error"),
    ],
)
def test_a_call_the_provider_may_have_billed_keeps_its_worst_case(
    backend: Backend, fault: BaseException, charged: bool
) -> None:
    # Interrupted or timed out once the request was sent, a call may be billed in full and
    # nothing says how much: it keeps its reserved worst case. A provider error, or a timeout
    # before the request left (connecting), is not billed: the reservation is given back.
    model = ScriptedChatModel(script=["fine"], loop=True, model_name="gpt-4o", faults={0: fault})
    llm = budgeted(model, envelope=Envelope(max_usd=0.05), backend=backend)
    config: Any = {"configurable": {"thread_id": "cut"}}
    with pytest.raises(type(fault)):
        llm.invoke("hi", config)
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("cut",))
    if charged:
        assert _charged_at_worst_case(rows), rows
        assert llm.spend(config)["usd"] == int(rows[0]["cost_nanos"]) / NANOS > 0
    else:
        assert [r["state"] for r in rows] == ["released"]
        assert llm.spend(config)["usd"] == 0


@pytest.mark.parametrize(
    ("fault", "charged"),
    [
        pytest.param(httpx.ReadTimeout("timed out"), True, id="read-timeout"),
        pytest.param(httpx.ReadError("connection reset by peer"), True, id="dropped-reading"),
        pytest.param(KeyboardInterrupt(), True, id="interrupted"),
        pytest.param(httpx.ConnectError("connection refused"), False, id="connect-error"),
        pytest.param(ConnectionError("provider down"), False, id="provider-error"),
        pytest.param(
            _integration_timeout(httpx2.ReadTimeout("timed out")), True, id="openai3-read-timeout"
        ),
        pytest.param(httpx2.ConnectError("connection refused"), False, id="httpx2-connect-error"),
    ],
)
def test_an_unwrapped_call_the_provider_may_have_billed_is_recorded_at_its_worst_case(
    backend: Backend, fault: BaseException, charged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The same call through a model the harness does not wrap, accounted by the callback:
    # it was recorded as free whatever cut it short.
    model = ScriptedChatModel(script=["fine"], loop=True, model_name="gpt-4o", faults={0: fault})
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-cut"}}
    with caplog.at_level(logging.WARNING, logger="harness_nodes.budget"):
        with pytest.raises(type(fault)):
            model.invoke("summarise " * 100, config, max_tokens=300)
    flush_pending(backend)
    rows = backend.execute(
        "SELECT model, input_tokens, output_tokens, cost_nanos FROM harness_spend "
        "WHERE task_id = %s",
        ("raw-cut",),
    )
    if charged:
        inp = bytes_bound([HumanMessage("summarise " * 100)])
        worst = Pricing().rates("gpt-4o").worst_case_nanos(inp, 300)
        assert rows == [
            {"model": "gpt-4o", "input_tokens": inp, "output_tokens": 300, "cost_nanos": worst}
        ]
        assert "may be billed" in caplog.text
    else:  # the reservation booked at the start is released: nothing charged
        assert rows == [{"model": "gpt-4o", "input_tokens": 0, "output_tokens": 0, "cost_nanos": 0}]


# --- answered with a success status, but unreadably -----------------------------------------


class _SDKError(Exception):
    """openai's and anthropic's errors that carry the HTTP response: ``APIStatusError`` (an
    error status: 400, 401, 429...) and ``APIResponseValidationError`` (a 200 whose body the
    SDK's strict validation rejects)."""

    def __init__(self, message: str, response: httpx.Response) -> None:
        super().__init__(message, response)
        self.response = response
        self.status_code = response.status_code


class _Completion(BaseModel):
    choices: list[dict[str, Any]]


_GOOD_BODY = json.dumps(
    {
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }
)


class _OpenAICompatible(GenericFakeChatModel):
    """What langchain-openai (1.7, openai 3.57) does with an answer from an OpenAI-compatible
    endpoint, checked against a loopback server: an error status raises the SDK's error; a
    200's body is decoded (``json.JSONDecodeError`` when it is malformed or cut short),
    checked against the SDK's schema in strict mode (``APIResponseValidationError``), else let
    through, and the message is built from it in ``_create_chat_result``, which raises a bare
    ``TypeError`` or ``ValueError`` on a shape it cannot read."""

    model_name: str = "gpt-4o"
    status: int = 200
    body: str = _GOOD_BODY
    strict: bool = False
    calls: int = 0

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        self.calls += 1
        response = httpx.Response(
            self.status,
            content=self.body.encode(),
            request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"),
        )
        if self.status >= 400:
            raise _SDKError(f"Error code: {self.status}", response)
        data = response.json()
        if self.strict:
            try:
                _Completion.model_validate(data)
            except ValidationError as e:
                raise _SDKError(
                    "Data returned by API invalid for expected schema.", response
                ) from e
        return self._create_chat_result(data)

    def _create_chat_result(self, response: Any) -> ChatResult:
        if not isinstance(response, dict):
            raise ValueError("Unexpected response type from OpenAI-compatible endpoint.")
        if response.get("choices") is None:
            raise TypeError("Received response with null value for 'choices'.")
        message = response["choices"][0]["message"]
        usage = response["usage"]
        answer = AIMessage(
            content=message["content"],  # not a string (nor a list): pydantic's ValidationError
            usage_metadata={
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            },
        )
        return ChatResult(generations=[ChatGeneration(message=answer)])


@dataclass(frozen=True)
class _Answer:
    """One answer of the endpoint, and what the call raises from it."""

    raises: type[BaseException]
    body: str = _GOOD_BODY
    status: int = 200
    strict: bool = False

    def model(self) -> _OpenAICompatible:
        return _OpenAICompatible(
            messages=iter([]), body=self.body, status=self.status, strict=self.strict
        )


_UNREADABLE = [
    pytest.param(_Answer(json.JSONDecodeError, body='{"choices": ['), id="malformed-json"),
    pytest.param(_Answer(json.JSONDecodeError, body=_GOOD_BODY[:40]), id="truncated-body"),
    pytest.param(_Answer(TypeError, body='{"choices": "nope"}'), id="choices-malformed"),
    pytest.param(_Answer(TypeError, body='{"usage": {}}'), id="choices-missing"),
    pytest.param(_Answer(ValueError, body="[]"), id="not-an-object"),
    pytest.param(
        _Answer(
            ValidationError,
            body=_GOOD_BODY.replace('"hi"', "42"),  # the message cannot be built from it
        ),
        id="message-invalid",
    ),
    pytest.param(_Answer(_SDKError, body='{"choices": "nope"}', strict=True), id="strict-schema"),
]
_REFUSED = [
    pytest.param(_Answer(_SDKError, status=401), id="401-auth"),
    pytest.param(_Answer(_SDKError, status=400), id="400-invalid-request"),
    pytest.param(_Answer(_SDKError, status=429), id="429-rate-limit"),
]


@pytest.mark.parametrize("answer", _UNREADABLE)
def test_a_200_answer_that_cannot_be_read_keeps_its_worst_case(
    backend: Backend, answer: _Answer
) -> None:
    # The provider answered 200 and billed the call, but its body could not be read (malformed,
    # cut short, of a shape the client rejects): the call was released as if never billed.
    events = Events()
    llm = budgeted(answer.model(), envelope=Envelope(max_usd=0.05), backend=backend)
    config: Any = {"configurable": {"thread_id": "unreadable"}, "callbacks": [events]}
    agent = RunnableLambda(llm.invoke)  # events reach the callbacks of a run (a graph node's)
    with pytest.raises(answer.raises):
        agent.invoke("hi", config)
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("unreadable",))
    assert _charged_at_worst_case(rows), rows
    assert llm.spend(config)["usd"] == int(rows[0]["cost_nanos"]) / NANOS > 0
    [settled] = events.of("budget.settle")
    assert settled["reason"].startswith("answer unreadable (")
    assert settled["usd"] == int(rows[0]["cost_nanos"]) / NANOS


@pytest.mark.parametrize("answer", _UNREADABLE)
async def test_a_200_answer_that_cannot_be_read_keeps_its_worst_case_async(
    abackend: AsyncBackend, answer: _Answer
) -> None:
    llm = budgeted(answer.model(), envelope=Envelope(max_usd=0.05), backend=abackend)
    config: Any = {"configurable": {"thread_id": "unreadable"}}
    with pytest.raises(answer.raises):
        await llm.ainvoke("hi", config)
    await aflush_pending(abackend)
    rows = await abackend.execute(_SPEND_ROWS, ("unreadable",))
    assert _charged_at_worst_case(rows), rows
    assert (await llm.aspend(config))["usd"] == int(rows[0]["cost_nanos"]) / NANOS > 0


@pytest.mark.parametrize("answer", _REFUSED)
async def test_an_error_answer_is_still_released(abackend: AsyncBackend, answer: _Answer) -> None:
    # An error status is the provider's refusal, before any generation: not billed.
    llm = budgeted(answer.model(), envelope=Envelope(max_usd=0.05), backend=abackend)
    config: Any = {"configurable": {"thread_id": "refused"}}
    with pytest.raises(_SDKError, match=str(answer.status)):
        await llm.ainvoke("hi", config)
    await aflush_pending(abackend)
    rows = await abackend.execute(_SPEND_ROWS, ("refused",))
    assert [r["state"] for r in rows] == ["released"]
    assert (await llm.aspend(config))["usd"] == 0


def test_repeated_unreadable_answers_stop_the_task_at_its_envelope(backend: Backend) -> None:
    # A provider (or a proxy in front of it) that answers 200 with a broken body every time:
    # each call is billed, and the task retried without limit at $0 (30 requests of a $0.02
    # envelope against a loopback server, ledger still $0).
    model = _Answer(json.JSONDecodeError, body='{"choices": [').model()
    envelope = Envelope(max_usd=0.02, max_output_tokens=500)
    llm = budgeted(model, envelope=envelope, backend=backend)
    config: Any = {"configurable": {"thread_id": "broken-proxy"}}
    stopped = None
    for _ in range(30):
        try:
            answer = llm.invoke("hi", config)
        except json.JSONDecodeError:
            continue
        stopped = answer.additional_kwargs["harness"]["budget"]["stopped"]
        break
    assert stopped is not None and stopped["limit"] == "usd"
    assert model.calls < 10  # about $0.0055 booked per call
    spent, committed = _ledger_nanos(backend, "broken-proxy")
    assert committed == spent <= 0.02 * NANOS
    assert spent > 0.02 * NANOS * 0.6


async def test_repeated_unreadable_answers_stop_the_task_at_its_envelope_async(
    abackend: AsyncBackend,
) -> None:
    model = _Answer(TypeError, body='{"usage": {}}').model()
    envelope = Envelope(max_usd=0.02, max_output_tokens=500)
    llm = budgeted(model, envelope=envelope, backend=abackend)
    config: Any = {"configurable": {"thread_id": "broken-proxy"}}
    stopped = None
    for _ in range(30):
        try:
            answer = await llm.ainvoke("hi", config)
        except TypeError:
            continue
        stopped = answer.additional_kwargs["harness"]["budget"]["stopped"]
        break
    assert stopped is not None and stopped["limit"] == "usd"
    assert model.calls < 10
    assert 0.02 * 0.6 < (await llm.aspend(config))["usd"] <= 0.02


@pytest.mark.parametrize(
    ("answer", "charged"),
    [
        pytest.param(_Answer(json.JSONDecodeError, body='{"choices": ['), True, id="malformed"),
        pytest.param(_Answer(TypeError, body='{"usage": {}}'), True, id="choices-missing"),
        pytest.param(_Answer(_SDKError, body="[]", strict=True), True, id="strict-schema"),
        pytest.param(_Answer(_SDKError, status=429), False, id="429-rate-limit"),
    ],
)
def test_an_unwrapped_call_answered_unreadably_is_recorded_at_its_worst_case(
    backend: Backend, answer: _Answer, charged: bool
) -> None:
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-unreadable"}}
    with pytest.raises(answer.raises):
        answer.model().invoke("summarise " * 100, config, max_tokens=300)
    flush_pending(backend)
    rows = backend.execute(
        "SELECT output_tokens, cost_nanos FROM harness_spend WHERE task_id = %s",
        ("raw-unreadable",),
    )
    if charged:
        assert len(rows) == 1 and rows[0]["output_tokens"] == 300 and rows[0]["cost_nanos"] > 0
    else:
        assert rows == [{"output_tokens": 0, "cost_nanos": 0}]


async def test_a_call_cancelled_in_flight_is_charged_its_worst_case_and_the_envelope_holds(
    abackend: AsyncBackend,
) -> None:
    # A chat UI's stop, a request timeout, a client disconnect: the task is cancelled while the
    # provider is answering. The request went out and may be billed in full; it used to be
    # released as free, so a task cancelled on every turn spent without limit at $0.
    in_flight, answer = threading.Event(), threading.Event()

    def provider(prompt: list[BaseMessage]) -> AIMessage:
        in_flight.set()
        answer.wait(10)
        return ai("too late", usage={"input_tokens": 10, "output_tokens": 5})

    model = ScriptedChatModel(script=[provider], loop=True, model_name="gpt-4o")
    # About $0.003 reserved per call: two fit, a third does not.
    envelope = Envelope(max_usd=0.007, max_output_tokens=300)
    llm = budgeted(model, envelope=envelope, backend=abackend)
    config = _config("stopped")
    try:
        call = asyncio.ensure_future(llm.ainvoke("q", config))
        assert await asyncio.to_thread(in_flight.wait, 10)
        call.cancel()  # the user pressed stop
        with pytest.raises(asyncio.CancelledError):
            await call
        in_flight.clear()
        with pytest.raises(TimeoutError):  # the request timed out
            await asyncio.wait_for(llm.ainvoke("q", config), 0.5)
        assert in_flight.is_set()
    finally:
        answer.set()
    await aflush_pending(abackend)
    rows = await abackend.execute(_SPEND_ROWS, ("stopped",))
    assert len(rows) == 2 and _charged_at_worst_case(rows), rows
    spent = sum(int(r["cost_nanos"]) for r in rows)
    assert (await llm.aspend(config))["usd"] == spent / NANOS
    assert spent <= 0.007 * NANOS
    stop = await llm.ainvoke("q", config)  # the envelope is spent: no third request goes out
    assert stop.additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "usd"
    assert model.calls == 2


@pytest.mark.parametrize("event", ["budget.reserve", "budget.degrade"])
async def test_a_task_cancelled_while_its_reservation_is_reported_gives_the_reservation_back(
    abackend: AsyncBackend, event: str
) -> None:
    # A tracer slow to take the reservation's event (an exporter over the network) and a
    # client that disconnects meanwhile: the task is cancelled inside `aemit`, before the model
    # is called. The reservation stayed booked for good, at the worst case, and the envelope
    # had that much less room for every later call of the task.
    reporting = asyncio.Event()

    class SlowTracer(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if name == "harness." + event:
                reporting.set()
                await asyncio.Event().wait()  # never answers

    big = ScriptedChatModel(script=["big"], loop=True, model_name="gpt-4o")
    small = ScriptedChatModel(script=["small"], loop=True, model_name="gpt-4o-mini")
    # About $0.003 reserved per gpt-4o call: two fit, a third does not. With the ladder's top
    # rung priced out (degrade), every call goes to gpt-4o-mini.
    envelope = Envelope(max_usd=0.007, max_output_tokens=300)
    ladder = [big, small] if event == "budget.degrade" else [big]
    pricing = (
        Pricing(overrides={"gpt-4o": ModelPrice(input_per_mtok=10**6, output_per_mtok=10**6)})
        if event == "budget.degrade"
        else Pricing()
    )
    llm = budgeted(ladder, envelope=envelope, backend=abackend, pricing=pricing)

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile(checkpointer=abackend.checkpointer)
    config = _config("disconnected", callbacks=[SlowTracer()])
    run = asyncio.ensure_future(graph.ainvoke({"messages": [HumanMessage("q")]}, config))
    await asyncio.wait_for(reporting.wait(), 10)
    run.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await run
    assert big.calls == small.calls == 0  # nothing was sent
    await aflush_pending(abackend)
    rows = await abackend.execute(_SPEND_ROWS, ("disconnected",))
    assert [(r["state"], int(r["cost_nanos"])) for r in rows] == [("released", 0)]
    assert (await llm.aspend(_config("disconnected")))["usd"] == 0
    # The envelope's room is whole again: two more calls fit.
    for _ in range(2):
        answer = await llm.ainvoke("q", _config("disconnected"))
        assert "stopped" not in answer.additional_kwargs["harness"]["budget"], answer
    assert big.calls + small.calls == 2


async def test_a_stream_its_reader_left_mid_answer_is_charged_its_worst_case(
    abackend: AsyncBackend,
) -> None:
    # graph.astream(stream_mode="messages") and the reader stops (a closed chat, a client
    # disconnect): LangGraph cancels the node while the model is still streaming its answer.
    answer = ai("word " * 2000, usage={"input_tokens": 10, "output_tokens": 2000})
    model = ScriptedChatModel(
        script=[answer], loop=True, model_name="gpt-4o-mini", disable_streaming=False
    )
    llm = budgeted(model, envelope=Envelope(max_usd=1.0), backend=abackend)

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile(checkpointer=abackend.checkpointer)
    stream = graph.astream(
        {"messages": [HumanMessage("q")]}, _config("left"), stream_mode="messages"
    )
    async for _chunk in stream:
        break  # the first words arrived; the reader is gone
    await stream.aclose()
    rows: list[dict[str, Any]] = []
    with anyio.fail_after(10):
        while not rows or rows[0]["state"] == "reserved":
            await aflush_pending(abackend)
            rows = await abackend.execute(_SPEND_ROWS, ("left",))
            await anyio.sleep(0.01)
    assert _charged_at_worst_case(rows), rows


async def test_an_unwrapped_call_cancelled_in_flight_stays_counted_at_its_worst_case(
    backend: Backend,
) -> None:
    # asyncio.wait_for around a raw model's ainvoke: BaseChatModel.agenerate awaits a gather
    # that the cancellation cuts short, so on_llm_error never runs. The handler recorded
    # nothing (the call was free) and kept the run in memory for good.
    in_flight, answer = threading.Event(), threading.Event()

    def provider(prompt: list[BaseMessage]) -> AIMessage:
        in_flight.set()
        answer.wait(10)
        return ai("too late", usage={"input_tokens": 10, "output_tokens": 5})

    model = ScriptedChatModel(script=[provider], loop=True, model_name="gpt-4o")
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-cancelled"}}
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(model.ainvoke("summarise " * 100, config, max_tokens=300), 0.5)
        assert in_flight.is_set()
    finally:
        answer.set()
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("raw-cancelled",))
    inp = bytes_bound([HumanMessage("summarise " * 100)])
    worst = Pricing().rates("gpt-4o").worst_case_nanos(inp, 300)
    assert [(r["state"], int(r["reserved_nanos"]), int(r["reserved_tokens"])) for r in rows] == [
        ("reserved", worst, inp + 300)
    ]
    # A later call through the handler settles to its usage and forgets the lost one.
    handler.forget_after = 0.0
    quick = ScriptedChatModel(
        script=[ai("ok", usage={"input_tokens": 7, "output_tokens": 2})], model_name="gpt-4o"
    )
    await quick.ainvoke("hi", config)
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("raw-cancelled",))
    assert [(r["state"], r["input_tokens"], r["output_tokens"]) for r in rows][1:] == [
        ("settled", 7, 2)
    ]
    assert handler._runs == {}


async def test_an_unwrapped_unpriced_call_cancelled_in_flight_is_still_recorded(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # An unpriced model is booked nothing when its call starts and raises UnpricedModelError
    # when it ends; cancelled in flight, it never ends (no handler runs), so the call went
    # unrecorded: no row, no error, no warning, the tokens it may have been billed for unseen.
    in_flight, answer = threading.Event(), threading.Event()

    def provider(prompt: list[BaseMessage]) -> AIMessage:
        in_flight.set()
        answer.wait(10)
        return ai("too late", usage={"input_tokens": 10, "output_tokens": 5})

    model = ScriptedChatModel(script=[provider], loop=True, model_name="acme-7b")
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-unpriced"}}
    try:
        with caplog.at_level(logging.WARNING, logger="harness_nodes.budget"):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    model.ainvoke("summarise " * 100, config, max_tokens=300), 0.5
                )
        assert in_flight.is_set()
    finally:
        answer.set()
    flush_pending(backend)
    rows = backend.execute(
        "SELECT model, state, reserved_tokens, reserved_nanos FROM harness_spend "
        "WHERE task_id = %s",
        ("raw-unpriced",),
    )
    inp = bytes_bound([HumanMessage("summarise " * 100)])
    # Its tokens and the call are booked (a token or call limit sees them); no price, no $.
    assert [
        (r["model"], r["state"], int(r["reserved_tokens"]), int(r["reserved_nanos"])) for r in rows
    ] == [("acme-7b", "reserved", inp + 300, 0)]
    assert "acme-7b" in caplog.text and "no price" in caplog.text


def test_an_unwrapped_unpriced_call_that_ends_still_raises_and_keeps_its_tokens(
    backend: Backend,
) -> None:
    model = ScriptedChatModel(
        script=[ai("ok", usage={"input_tokens": 10, "output_tokens": 5})], model_name="acme-7b"
    )
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-unpriced-end"}}
    with pytest.raises(UnpricedModelError, match=re.escape("'acme-7b'")):
        model.invoke("hi", config)
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("raw-unpriced-end",))
    assert [
        (r["state"], r["input_tokens"], r["output_tokens"], int(r["cost_nanos"])) for r in rows
    ] == [("settled", 10, 5, 0)]
    assert handler._runs == {}


def test_an_unwrapped_call_is_reserved_while_it_runs_and_settled_to_its_usage(
    backend: Backend,
) -> None:
    # The reservation is booked when the call starts: a budgeted call of the same task made
    # meanwhile sees it, and a call that never reports back stays counted.
    seen: list[list[dict[str, Any]]] = []

    def provider(prompt: list[BaseMessage]) -> AIMessage:
        seen.append(backend.execute(_SPEND_ROWS, ("raw-live",)))
        return ai("fine", usage={"input_tokens": 11, "output_tokens": 3})

    model = ScriptedChatModel(script=[provider], model_name="gpt-4o")
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-live"}}
    model.invoke("hello", config, max_tokens=200)
    inp = bytes_bound([HumanMessage("hello")])
    assert [(r["state"], int(r["reserved_tokens"])) for r in seen[0]] == [("reserved", inp + 200)]
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("raw-live",))
    assert [(r["state"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("settled", 11, 3)
    ]
    assert handler._runs == {}


def test_unknown_model_fails_fast_naming_it_and_how_to_price_it() -> None:
    with pytest.raises(UnpricedModelError, match=re.escape("'acme-7b'")) as e:
        budgeted(ScriptedChatModel(model_name="acme-7b"), envelope=Envelope(max_usd=1))
    assert e.value.model == "acme-7b"
    assert "Pricing(overrides={'acme-7b': ModelPrice(" in str(e.value)
    assert "Pricing(fallback=ModelPrice(" in str(e.value)


def test_unnamed_model_fails_at_its_first_call_unless_a_fallback_is_declared(
    backend: Backend,
) -> None:
    class Unnamed(GenericFakeChatModel):
        pass

    strict = budgeted(Unnamed(messages=iter(["a"])), envelope=Envelope(max_usd=1), backend=backend)
    with pytest.raises(UnpricedModelError, match="no model name"):
        strict.invoke("hi", {"configurable": {"thread_id": "u"}})
    assert backend.execute("SELECT COUNT(*) AS n FROM harness_spend") == [{"n": 0}]
    lenient = budgeted(
        Unnamed(messages=iter(["a"])),
        envelope=Envelope(max_usd=1),
        backend=backend,
        pricing=Pricing(fallback=ModelPrice(input_per_mtok=100, output_per_mtok=100)),
    )
    assert lenient.invoke("hi", {"configurable": {"thread_id": "u"}}).content == "a"
    # No usage reported: the worst case reserved is what is recorded, never zero.
    assert _ledger_nanos(backend, "u")[0] > 0


def test_self_hosted_model_at_a_set_price(backend: Backend) -> None:
    pricing = Pricing(overrides={"llama-local": ModelPrice(input_per_mtok=1, output_per_mtok=1)})
    model = ScriptedChatModel(
        script=[ai("ok", usage={"input_tokens": 1000, "output_tokens": 1000})],
        model_name="llama-local",
    )
    llm = budgeted(model, envelope=Envelope(max_usd=1), backend=backend, pricing=pricing)
    msg = llm.invoke("hi", {"configurable": {"thread_id": "local"}})
    assert msg.additional_kwargs["harness"]["budget"]["spent_usd"] == pytest.approx(0.002)


def test_unwrapped_calls_are_accounted_and_count_against_the_envelope(backend: Backend) -> None:
    raw = ScriptedChatModel(
        script=[ai("summary", usage={"input_tokens": 100_000, "output_tokens": 10_000})],
        loop=True,
        model_name="gpt-4o",
    )

    @tool
    def summarise(text: str) -> str:
        """Summarise with an unwrapped model."""
        return str(raw.invoke(text).content)

    script = [
        ai("Summarising.", tool_calls=[tool_call("summarise", {"text": "doc"}, id="s1")]),
        ai("Summarising.", tool_calls=[tool_call("summarise", {"text": "doc"}, id="s2")]),
        ai("Done."),
    ]
    llm = budgeted(
        ScriptedChatModel(script=script, model_name="gpt-4o-mini"),
        envelope=Envelope(max_usd=0.40),
        backend=backend,
    ).bind_tools([summarise])
    handler = BudgetCallbackHandler(backend)
    graph = guarded_loop(llm, tools=[summarise]).compile(checkpointer=backend.checkpointer)
    out = graph.invoke(
        {"messages": [HumanMessage("go")]},
        _config("tools-spend", callbacks=[handler]),
        durability="sync",
    )
    # Each unwrapped call costs $0.35 (100k in, 10k out at gpt-4o). The handler records it
    # after the fact (it cannot stop a call it does not own), so two of them overshoot the
    # $0.40 envelope; but the overshoot is on the ledger, and no budgeted call follows it.
    by_model = out["spend"]["by_model"]
    assert by_model["gpt-4o"] == {
        "input_tokens": 200_000,
        "output_tokens": 20_000,
        "usd": 0.70,
        "calls": 2,
    }
    assert by_model["gpt-4o-mini"]["calls"] == 2
    assert out["outcome"]["status"] == "budget_exhausted"
    assert not any(m.content == "Done." for m in out["messages"])


def test_envelopes_are_validated_at_construction() -> None:
    with pytest.raises(UserError, match="warn_at"):
        Envelope(warn_at=0)
    with pytest.raises(UserError, match="exit_behavior"):
        Envelope(exit_behavior="crash")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="max_usd"):
        Envelope(max_usd=-1)
    with pytest.raises(UserError, match="max_calls"):
        Envelope(max_calls=-2)
    with pytest.raises(UserError, match="seconds"):
        WindowCap(max_usd=1, seconds=0)
    with pytest.raises(UserError, match="type_cap must be a WindowCap"):  # not at the 1st call
        Envelope(max_usd=1, type_cap={"max_usd": 1})  # type: ignore[arg-type]
    with pytest.raises(UserError, match="ladder must be a sequence of model names"):
        Envelope(ladder="gpt-4o-mini")  # type: ignore[arg-type]  # not g, p, t, ...
    with pytest.raises(UserError, match="ladder names"):
        budgeted(
            ScriptedChatModel(model_name="gpt-4o"),
            envelope=Envelope(ladder=("gpt-4o", "claude-sonnet-4-5")),
        )
    with pytest.raises(UserError, match="budgeted"):
        BudgetGuard(ScriptedChatModel(model_name="gpt-4o"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(float("inf"), id="infinite"),  # window start inf*0 = NaN
        pytest.param(float("nan"), id="nan"),
        pytest.param(1e-300, id="tiny"),  # now / seconds overflows
        pytest.param(0.5, id="under-a-second"),
        pytest.param(True, id="bool"),
        pytest.param("86400", id="string"),  # was a raw TypeError
    ],
)
def test_window_caps_refuse_windows_the_ledger_cannot_key(seconds: object) -> None:
    with pytest.raises(UserError, match=re.escape("WindowCap.seconds must be")):
        WindowCap(max_usd=1, seconds=seconds)  # type: ignore[arg-type]


def test_a_one_second_window_cap_is_the_shortest_and_works(backend: Backend) -> None:
    envelope = Envelope(type_cap=WindowCap(max_usd=1, seconds=1))
    llm = budgeted(
        ScriptedChatModel(script=["ok"], model_name="gpt-4o"), envelope=envelope, backend=backend
    )
    config = {"configurable": {"thread_id": "w1", "task_type": "research"}}
    assert llm.invoke([HumanMessage("hi")], config).content == "ok"


INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("build", "field_name"),
    [
        pytest.param(lambda: Envelope(max_usd=1e10), "Envelope.max_usd", id="max_usd"),
        pytest.param(
            lambda: WindowCap(max_usd=9_223_372_037), "WindowCap.max_usd", id="window-max_usd"
        ),
        pytest.param(
            lambda: Envelope(max_tokens=INT64_MAX + 1), "Envelope.max_tokens", id="tokens"
        ),
        pytest.param(lambda: Envelope(max_calls=2**64), "Envelope.max_calls", id="calls"),
        pytest.param(
            lambda: Envelope(max_output_tokens=2**63),
            "Envelope.max_output_tokens",
            id="output-tokens",
        ),
    ],
)
def test_limits_beyond_the_ledgers_64_bit_integers_are_refused(build: Any, field_name: str) -> None:
    # Postgres keeps nano-dollars and tokens in BIGINT: $1e10 failed every call there.
    with pytest.raises(UserError, match=re.escape(f"{field_name} must be at most")) as info:
        build()
    assert ("9,223,372,036.854775807" in str(info.value)) == field_name.endswith("max_usd")


def test_the_largest_limits_work_on_every_backend(backend: Backend) -> None:
    huge = 9_223_372_036.0  # just under the 64-bit nano-dollar maximum
    envelope = Envelope(
        max_usd=huge,
        max_tokens=INT64_MAX,
        max_calls=INT64_MAX,
        type_cap=WindowCap(max_usd=huge),
    )
    llm = budgeted(
        ScriptedChatModel(script=["ok"], model_name="gpt-4o"), envelope=envelope, backend=backend
    )
    config = {"configurable": {"thread_id": "huge", "task_type": "research"}}
    assert llm.invoke([HumanMessage("hi")], config).content == "ok"
    assert llm.spend(config)["calls"] == 1


@pytest.mark.parametrize(
    ("model_cap", "envelope", "lease"),
    [
        pytest.param(10**30, Envelope(max_calls=5), 1, id="model-max_tokens"),
        pytest.param(
            None, Envelope(max_calls=5, max_output_tokens=2**62), 1, id="envelope-output-cap"
        ),
        pytest.param(10**30, Envelope(max_calls=5), 4, id="with-a-lease"),
        pytest.param(  # the lease books 3 more calls like the first: 4x a whole budget
            10**30, Envelope(max_usd=9_223_372_036.0), 4, id="largest-usd-limit-with-a-lease"
        ),
    ],
)
def test_an_absurd_output_cap_is_capped_never_a_64_bit_overflow(
    backend: Backend, model_cap: int | None, envelope: Envelope, lease: int
) -> None:
    # SQLite raised OverflowError, Postgres found no reservation function for a numeric.
    model = ScriptedChatModel(
        script=["ok"], loop=True, model_name="gpt-4o-mini", max_tokens=model_cap
    )
    llm = budgeted(model, envelope=envelope, backend=backend, lease=lease)
    config = _config("absurd-cap")
    messages: list[BaseMessage] = [HumanMessage("hi")]
    for _ in range(3):  # later calls add to the totals the first one booked
        messages.append(llm.invoke(messages, config))
    assert [m.text for m in messages[1:]] == ["ok", "ok", "ok"]
    for m in messages[1:]:
        budget = _budget(m)
        # Capped to what the ledger can hold with a million such calls in flight at once.
        assert round(budget["reserved_usd"] * NANOS) * 2**20 <= INT64_MAX
    flush_pending(backend)
    assert llm.spend(config)["calls"] == 3
    [task] = backend.execute(
        "SELECT reserved_nanos, reserved_tokens FROM harness_spend_tasks WHERE task_id = %s",
        ("absurd-cap",),
    )
    if lease == 1:
        assert task == {"reserved_nanos": 0, "reserved_tokens": 0}


async def test_an_absurd_output_cap_is_capped_async(abackend: AsyncBackend) -> None:
    model = ScriptedChatModel(script=["ok"], loop=True, model_name="gpt-4o-mini", max_tokens=2**62)
    llm = budgeted(model, envelope=Envelope(max_calls=5), backend=abackend)
    config = _config("absurd-cap-async")
    for _ in range(2):
        answer = await llm.ainvoke([HumanMessage("hi")], config)
        assert answer.text == "ok"
        assert round(_budget(answer)["reserved_usd"] * NANOS) * 2**20 <= INT64_MAX
    assert (await llm.aspend(config))["calls"] == 2


async def test_a_streamed_graph_settles_each_call_at_its_reported_usage(
    abackend: AsyncBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # stream_mode="messages" makes each model call stream: the usage is on its last chunk.
    usage = {"input_tokens": 10, "output_tokens": 20}
    model = ScriptedChatModel(
        script=[
            ai("Let me search.", tool_calls=[tool_call("search", {"query": "a"})], usage=usage),
            ai("Here is the summary.", usage=usage),
        ],
        model_name="gpt-4o-mini",
        disable_streaming=False,
    )
    llm = budgeted(model, envelope=Envelope(max_usd=1.0), backend=abackend)

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    from langgraph.prebuilt import ToolNode, tools_condition

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=abackend.checkpointer)
    tokens: list[str] = []
    with caplog.at_level(logging.WARNING, logger="harness_nodes.budget"):
        async for chunk, _ in graph.astream(
            {"messages": [HumanMessage("go")]},
            _config("streamed"),
            stream_mode="messages",
            durability="sync",
        ):
            if isinstance(chunk, AIMessageChunk):
                tokens.append(chunk.text)
    assert "".join(tokens) == "Let me search.Here is the summary."
    await aflush_pending(abackend)
    rows = await abackend.execute(
        "SELECT model, state, input_tokens, output_tokens FROM harness_spend "
        "WHERE task_id = %s ORDER BY id",
        ("streamed",),
    )
    settled = {"model": "gpt-4o-mini", "state": "settled", "input_tokens": 10, "output_tokens": 20}
    assert rows == [settled, settled]
    assert "worst case" not in caplog.text


@pytest.mark.parametrize(
    ("column", "limit"),
    [
        pytest.param("spent_nanos", "usd", id="usd"),
        pytest.param("spent_tokens", "tokens", id="tokens"),
    ],
)
def test_a_task_at_the_end_of_the_ledgers_range_is_refused_with_the_budget_error(
    backend: Backend, column: str, limit: str
) -> None:
    envelope = Envelope(max_calls=5, exit_behavior="error")  # no usd or token limit of its own
    llm = budgeted(
        ScriptedChatModel(script=["ok"], model_name="gpt-4o-mini"),
        envelope=envelope,
        backend=backend,
    )
    config = _config("at-the-end")
    assert llm.invoke([HumanMessage("hi")], config).text == "ok"
    flush_pending(backend)
    backend.execute(  # a task that has used (almost) all the 64-bit counts can hold
        f"UPDATE harness_spend_tasks SET {column} = %s WHERE task_id = %s",
        (INT64_MAX - 1000, "at-the-end"),
    )
    check = llm.check([HumanMessage("hi")], config)
    assert (check.decision, check.limit) == ("stop", limit)
    with pytest.raises(BudgetExceeded) as info:
        llm.invoke([HumanMessage("hi")], config)
    assert (info.value.limit, info.value.task_id) == (limit, "at-the-end")
    flush_pending(backend)
    [task] = backend.execute(
        f"SELECT {column} AS used, calls FROM harness_spend_tasks WHERE task_id = %s",
        ("at-the-end",),
    )
    assert task == {"used": INT64_MAX - 1000, "calls": 1}


def test_an_unwrapped_call_with_an_absurd_output_cap_is_recorded_within_the_ledgers_range(
    backend: Backend,
) -> None:
    raw = RawUsage(script=["ok"], usage=None, model_name="gpt-4o")  # no usage: its worst case
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-absurd"}}
    assert raw.invoke("hi", config, max_tokens=10**30).text == "ok"
    flush_pending(backend)
    [row] = backend.execute(
        "SELECT output_tokens, cost_nanos FROM harness_spend WHERE task_id = %s",
        ("raw-absurd",),
    )
    assert row["output_tokens"] * 2**20 <= INT64_MAX
    assert row["cost_nanos"] * 2**20 <= INT64_MAX


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("max_tokens", True, id="max_tokens"),  # was accepted as 1
        pytest.param("max_calls", False, id="max_calls"),
        pytest.param("max_output_tokens", True, id="max_output_tokens"),
        pytest.param("min_output_tokens", False, id="min_output_tokens"),
        pytest.param("warn_at", True, id="warn_at"),
        pytest.param("warn_at", "0.5", id="warn_at-string"),  # was a raw TypeError
    ],
)
def test_booleans_are_not_limits(name: str, value: object) -> None:
    with pytest.raises(UserError, match=re.escape(f"Envelope.{name} must be")):
        Envelope(**{name: value})


def test_token_and_call_limits_stop_too(backend: Backend) -> None:
    model = ScriptedChatModel(script=["a", "b", "c"], model_name="gpt-4o-mini")
    llm = budgeted(model, envelope=Envelope(max_calls=2), backend=backend)
    messages: list[BaseMessage] = [HumanMessage("hi")]
    for _ in range(3):
        messages.append(llm.invoke(messages, {"configurable": {"thread_id": "calls"}}))
    assert messages[-1].additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "calls"
    tokens = budgeted(
        ScriptedChatModel(script=["a"], model_name="gpt-4o-mini"),
        envelope=Envelope(max_tokens=100),
        backend=backend,
    )
    refused = tokens.invoke("x" * 500, {"configurable": {"thread_id": "tokens"}})
    assert refused.additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "tokens"


def test_budget_survives_a_new_wrapper_and_a_stale_cache(backend: Backend) -> None:
    """Another process (here: another wrapper) spending on the task is seen before a call."""
    envelope = Envelope(max_usd=0.05, min_output_tokens=16)
    a = budgeted(
        ScriptedChatModel(script=[LONG], loop=True, model_name="gpt-4o"),
        envelope=envelope,
        backend=backend,
    )
    b = budgeted(
        ScriptedChatModel(script=[LONG], loop=True, model_name="gpt-4o"),
        envelope=envelope,
        backend=backend,
    )
    config: Any = {"configurable": {"thread_id": "shared"}}
    a.invoke("x", config)  # a caches the task's totals
    for _ in range(3):
        b.invoke("x", config)
    a.invoke("x", config)  # a's cache is stale; the ledger refuses or re-plans, never overspends
    spent, committed = _ledger_nanos(backend, "shared")
    assert committed == spent <= 0.05 * NANOS
    assert SpendLedger(backend).totals("shared", "default", Limits()).spent_nanos == spent


def test_bound_copies_share_the_ledger_but_not_the_tools() -> None:
    seen: list[list[str]] = []

    class Recording(ScriptedChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Recording:
            seen.append([t.name for t in tools])
            return self

    llm = budgeted(
        Recording(script=["a"], loop=True, model_name="gpt-4o-mini"),
        envelope=Envelope(max_calls=2),
    )  # no backend: a private in-memory ledger, shared by the copies
    config: Any = {"configurable": {"thread_id": "t"}}
    llm.bind_tools([search]).invoke("x", config)
    llm.bind_tools([search_after_approval]).invoke("x", config)
    assert seen == [["search"], ["search_after_approval"]]
    refused = llm.invoke("x", config)
    assert refused.additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "calls"


@dataclass
class DataState:
    messages: Annotated[list[AnyMessage], add_messages] = field(default_factory=list)


def test_guard_works_in_a_dataclass_state_app(backend: Backend) -> None:
    llm = runaway_llm(backend)
    graph = guarded_loop(llm, state=DataState).compile(checkpointer=backend.checkpointer)
    out = graph.invoke({"messages": [HumanMessage("go")]}, _config("dc"), durability="sync")
    outcome = out["messages"][-1].additional_kwargs["harness"]["outcome"]
    assert outcome["status"] == "budget_exhausted"
    assert _ledger_nanos(backend, "dc")[1] <= LIMIT_NANOS


# --- the prompt estimate and the settlement ------------------------------------------------


def _budget(msg: BaseMessage) -> dict[str, Any]:
    return dict(msg.additional_kwargs["harness"]["budget"])


def test_context_added_before_the_last_answer_is_reserved_for(backend: Backend) -> None:
    # A dynamic system prompt (create_agent's dynamic_prompt, retrieved context) changes the
    # messages *before* the last answer; its reported input tokens no longer count them.
    model = ScriptedChatModel(script=["first", "second"], model_name="gpt-4o")
    envelope = Envelope(max_usd=0.05, max_output_tokens=256, min_output_tokens=16)
    llm = budgeted(model, envelope=envelope, backend=backend)
    config = _config("grown-prefix")
    history: list[BaseMessage] = [HumanMessage("question")]
    history.append(llm.invoke([SystemMessage("You are brief."), *history], config))
    history.append(HumanMessage("follow-up"))
    context = SystemMessage("context " * 50_000)  # 400 KB, ~100k tokens: ~$0.25 at gpt-4o
    second = llm.invoke([context, *history], config)
    assert _budget(second)["stopped"]["limit"] == "usd"
    assert model.calls == 1
    spent, committed = _ledger_nanos(backend, "grown-prefix")
    assert committed == spent <= 0.05 * NANOS


def test_an_unchanged_history_is_anchored_on_the_reported_input_tokens(backend: Backend) -> None:
    model = ScriptedChatModel(script=["first", "second"], model_name="gpt-4o")
    llm = budgeted(model, envelope=Envelope(max_usd=1), backend=backend)
    config = _config("anchored")
    history: list[BaseMessage] = [SystemMessage("You are brief. " * 2000), HumanMessage("q")]
    first = llm.invoke(history, config)
    history += [first, HumanMessage("follow-up")]
    second = llm.invoke(history, config)
    anchored = _budget(first)["input_tokens"] + bytes_bound(history[2:])
    assert anchored < bytes_bound(history)  # the anchor is the tighter bound
    worst = Pricing().rates("gpt-4o").worst_case_nanos(anchored, Envelope().max_output_tokens)
    assert _budget(second)["reserved_usd"] == worst / NANOS


class Snapshot(ScriptedChatModel):
    """Answers under a dated snapshot name, as OpenAI does (``gpt-4o`` → ``gpt-4o-2024-08-06``)."""

    reports_as: str = "gpt-4o-2024-08-06"

    def _finish(self, msg: AIMessage, prompt: Any, kwargs: Any) -> AIMessage:
        out = super()._finish(msg, prompt, kwargs)
        metadata = {**out.response_metadata, "model_name": self.reports_as}
        return out.model_copy(update={"response_metadata": metadata})


NEGOTIATED = Pricing(overrides={"gpt-4o": ModelPrice(input_per_mtok=0.5, output_per_mtok=2)})


def test_a_negotiated_price_holds_when_the_answer_names_a_dated_snapshot(
    backend: Backend,
) -> None:
    llm = budgeted(
        Snapshot(script=[LONG], model_name="gpt-4o"),
        envelope=Envelope(max_usd=0.01),
        backend=backend,
        pricing=NEGOTIATED,
    )
    config = _config("snapshot")
    answer = llm.invoke("write", config)
    assert answer.response_metadata["model_name"] == "gpt-4o-2024-08-06"
    budget = _budget(answer)
    price = NEGOTIATED.cost_nanos("gpt-4o", budget["input_tokens"], budget["output_tokens"])
    assert budget["spent_usd"] == price / NANOS <= budget["reserved_usd"]
    assert set(llm.spend(config)["by_model"]) == {"gpt-4o"}  # the model the ladder called
    spent, committed = _ledger_nanos(backend, "snapshot")
    assert committed == spent <= 0.01 * NANOS


def test_unwrapped_calls_keep_a_negotiated_price_under_a_dated_snapshot(
    backend: Backend,
) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 1000}
    raw = Snapshot(script=[ai("ok", usage=usage)], model_name="gpt-4o")
    handler = BudgetCallbackHandler(backend, NEGOTIATED)
    raw.invoke("hi", {"callbacks": [handler], "metadata": {"thread_id": "raw-snapshot"}})
    flush_pending(backend)
    rows = backend.execute(
        "SELECT model, cost_nanos FROM harness_spend WHERE task_id = %s", ("raw-snapshot",)
    )
    assert rows == [{"model": "gpt-4o", "cost_nanos": 2_500_000}]  # $0.0005 in + $0.002 out


class RawUsage(ScriptedChatModel):
    """Reports ``usage`` as given, unchecked: an integration that assigns ``usage_metadata``
    after building the message (pydantic checks only at construction), or reports none."""

    usage: Any = None

    def _finish(self, msg: AIMessage, prompt: Any, kwargs: Any) -> AIMessage:
        out = super()._finish(msg, prompt, kwargs)
        out.usage_metadata = self.usage
        return out


def test_a_negative_token_count_is_never_a_credit(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    malformed = ai("x", usage={"input_tokens": 10, "output_tokens": -5_000_000})
    model = ScriptedChatModel(script=[malformed, LONG], loop=True, model_name="gpt-4o")
    llm = budgeted(model, envelope=Envelope(max_usd=0.10), backend=backend)
    config = _config("negative")
    messages: list[BaseMessage] = [HumanMessage("hi")]
    with caplog.at_level(logging.WARNING, logger="harness_nodes.budget"):
        messages.append(llm.invoke(messages, config))
    first = _budget(messages[-1])
    assert first["spent_usd"] == first["reserved_usd"] > 0  # settled at its worst case
    assert "output_tokens=-5000000" in caplog.text and "worst case" in caplog.text
    for _ in range(40):
        messages.append(llm.invoke(messages, config))
        if "stopped" in _budget(messages[-1]):
            break
    assert model.calls <= 3  # each LONG answer costs ~$0.04: the credit let 40 through
    spent, committed = _ledger_nanos(backend, "negative")
    assert 0 < committed == spent <= 0.10 * NANOS


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param({"input_tokens": -10, "output_tokens": 5}, id="negative-input"),
        pytest.param({"input_tokens": math.nan, "output_tokens": 5}, id="nan"),
        pytest.param({"input_tokens": 10, "output_tokens": 2.5}, id="fraction"),
        pytest.param({"input_tokens": 10, "output_tokens": "5"}, id="text"),
        pytest.param({"input_tokens": 10}, id="no-output-count"),
        pytest.param(
            {"input_tokens": 10, "output_tokens": 5, "input_token_details": {"cache_read": -9}},
            id="negative-cache-read",
        ),
        pytest.param(
            {"input_tokens": 10, "output_tokens": 5, "input_token_details": {"cache_read": 11}},
            id="more-cached-than-input",
        ),
        pytest.param([10, 5], id="not-a-mapping"),
        # No call bills 10**30 tokens: priced as given it overflowed the ledger's 64-bit counts
        # after the provider had answered.
        pytest.param({"input_tokens": 10, "output_tokens": 10**30}, id="absurd-output"),
        pytest.param({"input_tokens": 2**70, "output_tokens": 5}, id="absurd-input"),
    ],
)
def test_malformed_usage_is_settled_at_the_worst_case(
    usage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    llm = budgeted(RawUsage(script=["ok"], usage=usage, model_name="gpt-4o"), envelope=Envelope())
    with caplog.at_level(logging.WARNING, logger="harness_nodes.budget"):
        answer = llm.invoke("hi", {"configurable": {"thread_id": "malformed"}})
    budget = _budget(answer)
    assert budget["spent_usd"] == budget["reserved_usd"] > 0
    assert (budget["output_tokens"], budget["model"]) == (Envelope().max_output_tokens, "gpt-4o")
    assert "malformed usage" in caplog.text


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(None, id="no-usage"),
        pytest.param({"input_tokens": 10, "output_tokens": -5_000_000}, id="negative"),
        pytest.param({"input_tokens": 10, "output_tokens": 10**30}, id="absurd"),
    ],
)
def test_unwrapped_calls_without_usable_usage_are_recorded_at_their_worst_case(
    backend: Backend, usage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    answer = "a long answer " * 500  # 7 KB
    raw = RawUsage(script=[answer], loop=True, usage=usage, model_name="gpt-4o")
    handler = BudgetCallbackHandler(backend)
    prompt = "summarise " * 5000
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-no-usage"}}
    with caplog.at_level(logging.WARNING, logger="harness_nodes.budget"):
        raw.invoke(prompt, config)  # no output cap: bounded by the answer's bytes
        raw.invoke(prompt, config, max_tokens=300)  # the call's own cap bounds its output
    flush_pending(backend)
    rows = backend.execute(
        "SELECT model, input_tokens, output_tokens, cost_nanos FROM harness_spend "
        "WHERE task_id = %s ORDER BY id",
        ("raw-no-usage",),
    )
    inp = bytes_bound([HumanMessage(prompt)])  # the prompt's bytes: at least its tokens
    outs = [bytes_bound([AIMessage(answer)]), 300]
    rates = Pricing().rates("gpt-4o")
    assert rows == [
        {
            "model": "gpt-4o",
            "input_tokens": inp,
            "output_tokens": out,
            "cost_nanos": rates.worst_case_nanos(inp, out),
        }
        for out in outs
    ]
    assert "gpt-4o" in caplog.text and "worst case" in caplog.text


@pytest.mark.parametrize(
    ("details", "one_hour"),
    [
        pytest.param({"cache_creation": 40_000}, 0, id="5-minute"),
        pytest.param(  # langchain-anthropic splits writes by lifetime (cache_creation is 0)
            {
                "cache_creation": 0,
                "ephemeral_5m_input_tokens": 0,
                "ephemeral_1h_input_tokens": 40_000,
            },
            40_000,
            id="1-hour",
        ),
        pytest.param(  # older langchain-anthropic: the total and the split
            {
                "cache_creation": 40_000,
                "ephemeral_5m_input_tokens": 30_000,
                "ephemeral_1h_input_tokens": 10_000,
            },
            10_000,
            id="both-lifetimes",
        ),
    ],
)
def test_cache_writes_are_priced_and_reserved_at_the_cache_write_rate(
    backend: Backend, details: dict[str, int], one_hour: int
) -> None:
    from genai_prices import Usage, calc_price

    name = "claude-3-5-sonnet-20241022"  # per M: $3 in; cache writes $3.75 (5 min), $6 (1 h)
    # The whole 40k-token prompt written to the cache and the output at its 256-token cap:
    # the most the call can cost.
    usage = {"input_tokens": 40_000, "output_tokens": 256, "input_token_details": details}
    model = RawUsage(script=["ok"], usage=usage, model_name=name)
    envelope = Envelope(max_usd=1, max_output_tokens=256, min_output_tokens=16)
    llm = budgeted(model, envelope=envelope, backend=backend)
    budget = _budget(llm.invoke("x" * 40_000, _config("cache-write")))
    written = Usage(
        input_tokens=40_000,
        cache_write_tokens=40_000,
        cache_write_1h_tokens=one_hour,
        output_tokens=256,
    )
    assert budget["spent_usd"] == float(calc_price(written, name).total_price)
    assert budget["spent_usd"] <= budget["reserved_usd"]


@pytest.mark.parametrize("tier", ["priority", "flex"])
def test_an_openai_service_tier_is_priced_at_its_prices(backend: Backend, tier: str) -> None:
    from genai_prices import Usage, calc_price

    # How langchain-openai reports a call answered at a service tier: the cached and reasoning
    # tokens under the tier's name, no `cache_read`. Read as the standard tier, the 6k cached
    # tokens were billed in full and the call at standard prices: o3 flex $0.024 for $0.0075,
    # priority $0.024 for $0.02625.
    usage = {
        "input_tokens": 10_000,
        "output_tokens": 500,
        "total_tokens": 10_500,
        "input_token_details": {f"{tier}_cache_read": 6_000, tier: 4_000},
        "output_token_details": {f"{tier}_reasoning": 300, tier: 200},
    }
    model = RawUsage(script=["ok"], usage=usage, model_name="o3")
    llm = budgeted(model, envelope=Envelope(max_usd=1), backend=backend)
    budget = _budget(llm.invoke("hi", _config(f"service-tier-{tier}")))
    billed = Usage(input_tokens=10_000, cache_read_tokens=6_000, output_tokens=500)
    expected = calc_price(billed, "o3", price_context={"service_tier": tier}).total_price
    assert budget["spent_usd"] == float(expected)


class _PriorityModel(ScriptedChatModel):
    """A model configured for OpenAI's priority tier, as ``ChatOpenAI(service_tier=...)``."""

    service_tier: str | None = "priority"


def _priority_answer(tokens: int) -> AIMessage:
    usage = {
        "input_tokens": 2,
        "output_tokens": tokens,
        "total_tokens": 2 + tokens,
        "input_token_details": {"priority": 2},
        "output_token_details": {"priority": tokens},
    }
    return ai("x" * tokens, usage=usage)


def test_a_call_that_asks_the_priority_tier_is_reserved_at_its_prices(backend: Backend) -> None:
    from genai_prices import Usage, calc_price

    # Reserved at standard prices, settled at priority ones (about 1.7x): an envelope that let
    # the call through at its standard worst case was overspent by the priority answer.
    limit = 0.012  # gpt-4o, 1,000 output tokens: $0.010 standard, $0.017 priority
    model = _PriorityModel(model_name="gpt-4o", max_tokens=1000, script=[_priority_answer(1000)])
    llm = budgeted(model, envelope=Envelope(max_usd=limit), backend=backend)
    out = llm.invoke("hi", _config("priority-tier"))
    cap = out.usage_metadata["output_tokens"]  # the scripted model stops at the cap it got
    billed = Usage(input_tokens=_budget(out)["input_tokens"], output_tokens=cap)
    worst = calc_price(billed, "gpt-4o", price_context={"service_tier": "priority"})
    assert float(worst.total_price) <= limit  # a full answer at that cap stays in the envelope
    standard = budgeted(
        ScriptedChatModel(model_name="gpt-4o", max_tokens=1000, script=["x"]),
        envelope=Envelope(max_usd=1),
        backend=backend,
    )
    asked = budgeted(
        _PriorityModel(model_name="gpt-4o", max_tokens=1000, script=["x"]),
        envelope=Envelope(max_usd=1),
        backend=backend,
    )
    reserved = [
        _budget(m.invoke("hi", _config(f"priority-reserve-{i}")))["reserved_usd"]
        for i, m in enumerate((standard, asked))
    ]
    assert reserved[1] == pytest.approx(reserved[0] * 1.7, rel=0.01)


def test_unwrapped_cache_writes_are_priced_at_the_cache_write_rate(backend: Backend) -> None:
    name = "claude-3-5-sonnet-20241022"
    usage = {
        "input_tokens": 100_000,
        "output_tokens": 100,
        "total_tokens": 100_100,
        "input_token_details": {"cache_creation": 90_000, "cache_read": 0},
    }
    raw = RawUsage(script=["ok"], usage=usage, model_name=name)
    handler = BudgetCallbackHandler(backend)
    raw.invoke("hi", {"callbacks": [handler], "metadata": {"thread_id": "raw-cache-write"}})
    flush_pending(backend)
    rows = backend.execute(
        "SELECT cost_nanos FROM harness_spend WHERE task_id = %s", ("raw-cache-write",)
    )
    assert rows == [{"cost_nanos": 369_000_000}]  # 10k x $3 + 90k x $3.75 + 100 x $15 per M


# --- streaming through the budget ----------------------------------------------------------

_STREAM_USAGE = {"input_tokens": 10, "output_tokens": 40, "total_tokens": 50}


def _streaming(*script: Any) -> ScriptedChatModel:
    return ScriptedChatModel(model_name="gpt-4o-mini", script=list(script), disable_streaming=False)


def test_a_budgeted_model_streams_and_its_chunks_add_up_to_the_annotated_answer(
    backend: Backend,
) -> None:
    # BudgetedChatModel had no stream: `.stream()` fell back to one chunk, after the call.
    answer = "A long answer, streamed word by word to the reader."
    llm = budgeted(
        _streaming(ai(answer, usage=_STREAM_USAGE)), envelope=Envelope(max_usd=1), backend=backend
    )
    chunks = list(llm.stream("hi", _config("stream")))
    assert len(chunks) > 3 and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = sum(chunks[1:], chunks[0])
    assert whole.content == answer
    budget = whole.additional_kwargs["harness"]["budget"]
    assert (budget["input_tokens"], budget["output_tokens"]) == (10, 40)
    spent, booked = _ledger_nanos(backend, "stream")
    assert spent == booked == round(budget["spent_usd"] * 1e9) > 0  # settled, nothing left open


def test_a_refused_streamed_call_is_the_stop_message_in_one_chunk(backend: Backend) -> None:
    llm = budgeted(
        _streaming(ai("first", usage=_STREAM_USAGE), ai("second", usage=_STREAM_USAGE)),
        envelope=Envelope(max_calls=1),
        backend=backend,
    )
    list(llm.stream("hi", _config("stream-refused")))
    [chunk] = list(llm.stream("again", _config("stream-refused")))
    assert chunk.additional_kwargs["harness"]["budget"]["stopped"]["limit"] == "calls"


def test_a_stream_the_reader_leaves_is_recorded_at_its_worst_case(backend: Backend) -> None:
    # The request went out and the provider bills what it generates: as a cancelled invoke.
    llm = budgeted(
        _streaming(ai("word " * 30, usage=_STREAM_USAGE)),
        envelope=Envelope(max_usd=1),
        backend=backend,
    )
    stream = llm.stream("hi", _config("stream-left"))
    next(stream)
    stream.close()
    spent, booked = _ledger_nanos(backend, "stream-left")
    cap = Envelope().max_output_tokens  # the call's output cap: its worst case's output
    assert spent == booked >= Pricing().cost_nanos("gpt-4o-mini", 0, cap)


@pytest.mark.anyio
async def test_a_budgeted_model_streams_under_astream(abackend: AsyncBackend) -> None:
    answer = "Streamed asynchronously, chunk by chunk."
    llm = budgeted(
        _streaming(ai(answer, usage=_STREAM_USAGE)), envelope=Envelope(max_usd=1), backend=abackend
    )
    chunks = [c async for c in llm.astream("hi", _config("astream"))]
    assert len(chunks) > 3
    whole = sum(chunks[1:], chunks[0])
    assert whole.content == answer
    assert whole.additional_kwargs["harness"]["budget"]["output_tokens"] == 40
