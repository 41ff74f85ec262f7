"""Cost envelopes: what a reservation costs per LLM call, and what a call limit lets through.

1. Overhead of `budgeted()` per LLM call on Postgres (the reservation before the call and the
   settlement after it, which rides on the task's next statement), as a ratio to a bare
   ``SELECT 1`` round trip through the same backend (its connection pool), measured in the
   same run. Target: <= 3. Three ways: the default (each call's reservation durable on its
   own), ``lease=8`` (one durable reservation books room for up to 8 calls, granted from
   memory) and ``sync_commit=False``. A ``SELECT 1`` on a raw connection, without the pool,
   and one durable 1-row INSERT are reported beside them.
2. The runaway scenario (a model that never stops calling a tool) against a $0.50 envelope,
   next to LangChain's ``ModelCallLimitMiddleware`` (``create_agent``): calls made, tokens and
   dollars spent before stopping, with small and large tool results, and across five
   invocations of the same thread (a resumed task).

Run: ``python bench/budget.py`` (PostgreSQL at ``$HARNESS_TEST_POSTGRES_URI`` or
``postgresql://postgres@127.0.0.1:5432/postgres``; a scratch database is created and dropped).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointers import Backend, open_backend
from checkpointers._spend import SETTLE_DELAY, Limits, SpendLedger, flush_pending
from harness_nodes import BudgetGuard, Envelope, HarnessState, Pricing, budgeted
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

ADMIN = os.environ.get("HARNESS_TEST_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
MAX_USD = 0.50
PRICING = Pricing()
LEASE = 8


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"harness_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(ADMIN)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _per_call(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def overhead(backend: Backend, backend_url: str, n: int = 600) -> None:
    prompt = [HumanMessage("What is the capital of France?")]
    raw = ScriptedChatModel(script=["Paris."], loop=True, model_name="gpt-4o")
    envelope = Envelope(max_usd=1_000_000)
    durable = budgeted(raw, envelope=envelope, backend=backend)
    leased = budgeted(raw, envelope=envelope, backend=backend, lease=LEASE)
    fast = budgeted(raw, envelope=envelope, backend=backend, sync_commit=False)
    durable_cfg: Any = {"configurable": {"thread_id": "bench-durable"}}
    leased_cfg: Any = {"configurable": {"thread_id": "bench-leased"}}
    fast_cfg: Any = {"configurable": {"thread_id": "bench-fast"}}
    backend.execute("CREATE TABLE IF NOT EXISTS bench_commit (id BIGSERIAL PRIMARY KEY, v INT)")

    def insert() -> None:
        backend.execute("INSERT INTO bench_commit (v) VALUES (1)")

    raw_conn = psycopg.connect(backend_url, autocommit=True, prepare_threshold=0)
    ledger = SpendLedger(backend, sync_commit=False)
    limits = Limits(max_nanos=10**18)

    def statement_only() -> None:  # the ledger's work alone: reserve, then defer the settle
        r = ledger.reserve("bench-ledger", "default", "gpt-4o", 10, 100, 1_000, limits)
        assert r.id is not None
        ledger.defer_settle("bench-ledger", r.id, 10, 5, 500, model="gpt-4o")

    cases = {
        "rtt": lambda: backend.execute("SELECT 1"),
        "raw_rtt": lambda: raw_conn.execute("SELECT 1").fetchall(),
        "insert": insert,
        "bare": lambda: raw.invoke(prompt),
        "durable": lambda: durable.invoke(prompt, durable_cfg),
        # LEASE calls per sample, reported per call: every run of LEASE consecutive calls
        # holds exactly one lease statement, so each sample pays its share of it.
        "leased": lambda: [leased.invoke(prompt, leased_cfg) for _ in range(LEASE)],
        "fast": lambda: fast.invoke(prompt, fast_cfg),
        "statement": statement_only,
    }
    for fn in cases.values():  # warm up pool, plans, caches
        _per_call(fn, 50)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3 * n):  # round-robin, call by call: load drift hits every case alike
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t) / (LEASE if k == "leased" else 1))
    m = {k: statistics.median(v) for k, v in samples.items()}
    rtt = m["rtt"]
    print(f"## 1. Overhead per LLM call (Postgres, medians of {3 * n} round-robin calls)")
    print()
    print("| measure | time | in `SELECT 1` round trips |")
    print("| --- | ---: | ---: |")
    rows = [
        ("bare `SELECT 1` round trip through the backend's pool (baseline)", rtt),
        ("`SELECT 1` on a raw connection, no pool (for reference)", m["raw_rtt"]),
        ("one durable write: autocommitted 1-row INSERT (waits for WAL flush)", m["insert"]),
        ("scripted model call, unwrapped", m["bare"]),
        ("same call through `budgeted()` (default: durable reservation)", m["durable"]),
        (
            f"same call through `budgeted(lease={LEASE})` (durable, booked {LEASE} at a time)",
            m["leased"],
        ),
        ("same call through `budgeted(sync_commit=False)`", m["fast"]),
        (
            "of which: the ledger statement alone (reserve + carried settle, no WAL wait)",
            m["statement"],
        ),
        ("of which: the wrapper's own Python (the rest)", m["fast"] - m["bare"] - m["statement"]),
    ]
    for name, t in rows:
        print(f"| {name} | {t * 1e6:,.0f} µs | {t / rtt:.2f} |")
    added_durable = m["durable"] - m["bare"]
    added_leased = m["leased"] - m["bare"]
    added_fast = m["fast"] - m["bare"]
    print(
        f"| **added per call, default** | {added_durable * 1e6:,.0f} µs | "
        f"**{added_durable / rtt:.2f}** ({added_durable / m['insert']:.2f} durable writes; "
        f"{added_durable / m['raw_rtt']:.2f} raw round trips) |"
    )
    print(
        f"| **added per call, `lease={LEASE}`** (a lease statement every {LEASE} calls) | "
        f"{added_leased * 1e6:,.0f} µs | **{added_leased / rtt:.2f}** "
        f"({added_leased / m['raw_rtt']:.2f} raw round trips) |"
    )
    print(
        f"| **added per call, `sync_commit=False`** | {added_fast * 1e6:,.0f} µs | "
        f"**{added_fast / rtt:.2f}** ({added_fast / m['raw_rtt']:.2f} raw round trips) |"
    )
    print()
    # The structural figure, immune to machine load: statements sent per budgeted call, on
    # the caller's thread and by the background flusher (which writes settlements no next
    # statement carried within `SETTLE_DELAY`).
    sent: list[tuple[bool, str]] = []
    execute = backend.execute
    caller = threading.get_ident()

    def counting(sql: str, params: Any = ()) -> Any:
        sent.append((threading.get_ident() == caller, sql.split("(")[0]))
        return execute(sql, params)

    backend.execute = counting  # type: ignore[method-assign]
    for label, model, cfg in (
        ("default", durable, durable_cfg),
        (f"lease={LEASE}", leased, leased_cfg),
    ):
        sent.clear()
        for _ in range(100):
            model.invoke(prompt, cfg)
        time.sleep(SETTLE_DELAY * 4)  # let the flusher write the last settlements
        inline = [sql for on_caller, sql in sent if on_caller]
        flushed = [sql for on_caller, sql in sent if not on_caller]
        print(
            f"Statements per budgeted call, {label}: {len(sent) / 100:.2f} — on the caller's "
            f"path {len(inline) / 100:.2f} ({', '.join(sorted(set(inline)))}), by the flusher "
            f"{len(flushed) / 100:.2f} ({', '.join(sorted(set(flushed))) or 'none'}); "
            "each one round trip."
        )
    backend.execute = execute  # type: ignore[method-assign]
    print()
    raw_conn.close()
    for label, added in (
        ("default", added_durable),
        (f"lease={LEASE}", added_leased),
        ("sync_commit=False", added_fast),
    ):
        verdict = "meets" if added / rtt <= 3 else "MISSES"
        print(f"Target <= 3 round trips per call, {label}: {verdict} ({added / rtt:.2f}).")
    print()
    backend.execute("DROP TABLE bench_commit")


# --- the runaway scenario ------------------------------------------------------------------


def _search_tool(result_kb: int) -> Any:
    text = ("lorem ipsum " * 86)[:1024] * result_kb

    @tool
    def search(query: str) -> str:
        """Search the web."""
        return text

    return search


def _runaway() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[
            ai("Searching once more.", tool_calls=[tool_call("search", {"query": "x"}, id="c")])
        ],
        loop=True,
        model_name="gpt-4o",
    )


def _usage(messages: list[BaseMessage]) -> tuple[int, int, float]:
    calls = tokens = 0
    nanos = 0
    for m in messages:
        if isinstance(m, AIMessage) and m.usage_metadata:
            calls += 1
            inp, out = m.usage_metadata["input_tokens"], m.usage_metadata["output_tokens"]
            tokens += inp + out
            nanos += PRICING.cost_nanos("gpt-4o", inp, out)
    return calls, tokens, nanos / 1e9


def run_middleware(result_kb: int, invocations: int, **limits: Any) -> tuple[int, int, float]:
    agent = create_agent(
        _runaway(),
        [_search_tool(result_kb)],
        middleware=[ModelCallLimitMiddleware(exit_behavior="end", **limits)],
        checkpointer=InMemorySaver(),
    )
    config: Any = {"configurable": {"thread_id": "t"}, "recursion_limit": 10_000}
    out: Any = None
    for i in range(invocations):
        out = agent.invoke({"messages": [HumanMessage(f"research this forever ({i})")]}, config)
    return _usage(out["messages"])


def run_harness(backend: Backend, result_kb: int, invocations: int) -> tuple[int, int, float]:
    search = _search_tool(result_kb)
    llm = budgeted(_runaway(), envelope=Envelope(max_usd=MAX_USD), backend=backend).bind_tools(
        [search]
    )
    guard = BudgetGuard(llm)
    builder = StateGraph(HarnessState)
    builder.add_node("agent", lambda s: {"messages": [llm.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([search]))
    builder.add_node("budget_exhausted", guard.finish)
    routes = {"ok": "agent", "degrade": "agent", "stop": "budget_exhausted"}
    builder.add_conditional_edges(START, guard.route, routes)
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_conditional_edges("tools", guard.route, routes)
    builder.add_edge("budget_exhausted", END)
    graph = builder.compile(checkpointer=backend.checkpointer)
    thread = f"runaway-{uuid.uuid4().hex[:8]}"
    config: Any = {"configurable": {"thread_id": thread}, "recursion_limit": 10_000}
    out: Any = None
    for i in range(invocations):
        msg = HumanMessage(f"research this forever ({i})")
        out = graph.invoke({"messages": [msg]}, config, durability="sync")
    calls, tokens, _ = _usage(out["messages"])
    flush_pending(backend)
    ledger = backend.execute(
        "SELECT COALESCE(SUM(cost_nanos), 0) AS n FROM harness_spend WHERE task_id = %s",
        (thread,),
    )
    return calls, tokens, int(ledger[0]["n"]) / 1e9


def comparison(backend: Backend) -> None:
    print("## 2. Runaway loop: a model that never stops calling `search` (priced as gpt-4o)")
    print()
    print("| stopper | tool result | invocations of the thread | calls | tokens | dollars |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows: list[tuple[str, int, int, tuple[int, int, float]]] = []
    for kb in (18, 90):
        rows.append((f"harness `Envelope(max_usd={MAX_USD})`", kb, 1, run_harness(backend, kb, 1)))
        rows.append(
            ("`ModelCallLimitMiddleware(run_limit=10)`", kb, 1, run_middleware(kb, 1, run_limit=10))
        )
        rows.append(
            (
                "`ModelCallLimitMiddleware(thread_limit=10)`",
                kb,
                1,
                run_middleware(kb, 1, thread_limit=10),
            )
        )
    rows.append((f"harness `Envelope(max_usd={MAX_USD})`", 18, 5, run_harness(backend, 18, 5)))
    rows.append(
        ("`ModelCallLimitMiddleware(run_limit=2)`", 18, 5, run_middleware(18, 5, run_limit=2))
    )
    rows.append(
        ("`ModelCallLimitMiddleware(thread_limit=2)`", 18, 5, run_middleware(18, 5, thread_limit=2))
    )
    for name, kb, inv, (calls, tokens, usd) in rows:
        flag = " ⚠ over $0.50" if usd > MAX_USD else ""
        print(f"| {name} | {kb} KB | {inv} | {calls} | {tokens:,} | ${usd:.3f}{flag} |")
    print()
    print(
        "A call limit bounds calls, not dollars: the same limit spends ~5x more when tool "
        "results are 5x larger, and its run counter starts again at every invocation of a "
        "thread (a resume), so five resumed runs with run_limit=2 make ten calls. The "
        "envelope is a dollar bound kept in the ledger per task: it holds for any prompt "
        "size and across resumes (later invocations stop before calling the model)."
    )


def main() -> None:
    with scratch_database() as url, open_backend(url) as backend:
        overhead(backend, url)
        comparison(backend)


if __name__ == "__main__":
    main()
