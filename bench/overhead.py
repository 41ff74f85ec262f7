"""Overhead: a harnessed agent vs the same bare LangGraph agent vs ``create_agent`` + middleware.

One task = a 10-turn tool loop of the scripted model (8 read-only ``lookup`` calls, one
irreversible ``notify`` call, one final answer), on the same checkpointer, ``durability="sync"``:

- ``bare``: ``StateGraph(MessagesState)``: model node → ``ToolNode`` → model (no harness);
- ``harnessed``: `build_harnessed_agent` with a cost envelope (budgeted model + BudgetGuard:
  reserve + settle per call), verification, the effect ledger for ``notify``, review routing;
- ``create_agent``: LangChain's agent with ``ModelCallLimitMiddleware``,
  ``ToolCallLimitMiddleware``, ``ToolRetryMiddleware`` and ``HumanInTheLoopMiddleware``
  (``interrupt_on`` lists both tools as allowed through, like the harness's review policy
  here, so neither agent pauses).

Measured alternately in the same process, pinned to one CPU, reported as medians and as
ratios to ``bare``: per agent step (model call) on memory, SQLite and Postgres, plus the floor
(a bare Postgres ``INSERT`` + ``COMMIT`` per superstep). On Postgres, also commits per task
(``pg_stat_database.xact_commit`` deltas of a scratch database), checkpoint bytes of one
50-turn task (table sizes before/after) and, in a child process each, the peak RSS of one
worker running 200 tasks.

Run: ``python -m bench.overhead`` (``--quick`` for fewer rounds; Postgres at
``$HARNESS_TEST_POSTGRES_URI`` or ``postgresql://postgres@127.0.0.1:5432/postgres``; a scratch
database is created and dropped). Writes ``bench/results/overhead.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from langchain.agents import create_agent
from langchain.agents.middleware import (
    HumanInTheLoopMiddleware,
    ModelCallLimitMiddleware,
    ToolCallLimitMiddleware,
    ToolRetryMiddleware,
)
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointers import Backend, open_backend
from harness_nodes import (
    Envelope,
    ToolContract,
    build_harnessed_agent,
    current_effect,
    irreversible,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

ADMIN = os.environ.get("HARNESS_TEST_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("bare", "harnessed", "create_agent")
TURNS = 10
RSS_TASKS = 200


def _script(turns: int) -> list[AIMessage]:
    """*turns* model turns: lookups, one irreversible notify in the middle, an answer."""
    out = []
    for t in range(turns - 1):
        if t == (turns - 1) // 2:
            out.append(ai(tool_calls=[tool_call("notify", {"text": f"step {t}"}, id=f"n{t}")]))
        else:
            out.append(ai(tool_calls=[tool_call("lookup", {"key": f"k{t}"}, id=f"l{t}")]))
    out.append(ai("All done."))
    return out


def _tools(guarded: bool) -> list[BaseTool]:
    @tool
    def lookup(key: str) -> dict[str, Any]:
        """Look a key up (read-only)."""
        return {"key": key, "value": len(key)}

    @tool
    def notify(text: str) -> dict[str, Any]:
        """Send a notification (irreversible)."""
        key = current_effect().idempotency_key if guarded else None
        return {"status": "sent", "key": key}

    return [lookup, irreversible(notify) if guarded else notify]


def build(mode: str, backend: Backend, turns: int = TURNS) -> Any:
    """The agent of *mode* on *backend*'s checkpointer."""
    model = ScriptedChatModel(script=_script(turns), model_name="gpt-4o-mini")
    if mode in ("harnessed", "harnessed-no-budget"):
        envelope = Envelope(max_usd=1000.0) if mode == "harnessed" else None
        return build_harnessed_agent(
            model,
            _tools(True),
            envelope=envelope,
            contracts={"lookup": ToolContract(required=("value",))},
            backend=backend,
        )
    tools = _tools(False)
    if mode == "create_agent":
        return create_agent(
            model,
            tools,
            middleware=[
                ModelCallLimitMiddleware(run_limit=4 * turns, exit_behavior="end"),
                ToolCallLimitMiddleware(run_limit=4 * turns, exit_behavior="end"),
                ToolRetryMiddleware(max_retries=2),
                HumanInTheLoopMiddleware(interrupt_on={"notify": False, "lookup": False}),
            ],
            checkpointer=backend.checkpointer,
        )
    bound = model.bind_tools(tools)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=backend.checkpointer)


def run_task(graph: Any, turns: int = TURNS) -> None:
    """One task on a fresh thread; checks it ran to the end."""
    cfg = {"configurable": {"thread_id": f"t-{uuid.uuid4().hex}"}, "recursion_limit": 500}
    out = graph.invoke({"messages": [HumanMessage("go")]}, cfg, durability="sync")
    last = out["messages"][-1]
    assert last.text == "All done.", last
    assert sum(1 for m in out["messages"] if isinstance(m, AIMessage)) == turns


@contextmanager
def scratch_database() -> Iterator[tuple[str, str]]:
    name = f"harness_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(ADMIN)._replace(path=f"/{name}")), name
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def timed(fn: Callable[[], None], n: int) -> float:
    """Median seconds of *n* calls."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def latency(backend: Backend, rounds: int, per_round: int) -> dict[str, float]:
    """Median seconds per agent step (model call) of each mode, interleaved rounds."""
    graphs = {m: build(m, backend) for m in MODES}
    for g in graphs.values():  # warm up: pools, prepared statements, imports
        for _ in range(3):
            run_task(g)
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
        for m in order:
            samples[m].append(timed(lambda g=graphs[m]: run_task(g), per_round) / TURNS)
    return {m: statistics.median(v) for m, v in samples.items()}


def floor(url: str, n: int = 300) -> float:
    """Median seconds of one autocommitted 1-row INSERT on Postgres (a durable commit)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (id BIGSERIAL PRIMARY KEY, v INT)")
        for _ in range(30):
            conn.execute("INSERT INTO bench_floor (v) VALUES (1)")
        return timed(lambda: conn.execute("INSERT INTO bench_floor (v) VALUES (1)"), n)


def _stats(dbname: str) -> tuple[int, int]:
    """(transactions committed, rows written) in *dbname* so far."""
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted "
            "FROM pg_stat_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)


STATS_IDLE_FLUSH = 11.0
"""Seconds for every server process to flush its statistics (PostgreSQL: 10 s once idle)."""


def commits_per_task(
    backend: Backend, dbname: str, tasks: int = 10
) -> dict[str, tuple[float, float]]:
    """Per task: transactions committed (reads included) and rows written, in the scratch
    database (``pg_stat_database`` deltas). A server process flushes its counts at most once a
    second while busy and within `STATS_IDLE_FLUSH` seconds of going idle, so each reading
    waits that long: a shorter wait books one mode's counts to the next."""
    out = {}
    for m in (*MODES, "harnessed-no-budget"):
        g = build(m, backend)
        run_task(g)
        time.sleep(STATS_IDLE_FLUSH)
        c0, w0 = _stats(dbname)
        for _ in range(tasks):
            run_task(g)
        time.sleep(STATS_IDLE_FLUSH)
        c1, w1 = _stats(dbname)
        out[m] = ((c1 - c0 - 1) / tasks, (w1 - w0) / tasks)  # - 1: the reading query itself
    return out


def _table_bytes(url: str) -> tuple[int, int]:
    """(bytes of LangGraph's checkpoint tables, bytes of every other table) in *url*."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM")
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r'"
        ).fetchall()
    ckpt = sum(int(b) for name, b in rows if str(name).startswith("checkpoint"))
    return ckpt, sum(int(b) for _, b in rows) - ckpt


def checkpoint_bytes(url: str, turns: int = 50) -> dict[str, tuple[int, int]]:
    """Bytes the (checkpoint, other) tables grow by for one *turns*-turn task of each mode."""
    out = {}
    for m in MODES:
        with open_backend(url) as backend:
            g = build(m, backend, turns)
            c0, o0 = _table_bytes(url)
            run_task(g, turns)
            c1, o1 = _table_bytes(url)
            out[m] = (c1 - c0, o1 - o0)
    return out


def rss_worker(mode: str, url: str, tasks: int) -> None:
    """Child process: run *tasks* tasks of *mode*, print the peak RSS in KiB."""
    with open_backend(url) as backend:
        g = build(mode, backend)
        for _ in range(tasks):
            run_task(g)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss(url: str) -> dict[str, int]:
    """Peak RSS (KiB) of a child process running `RSS_TASKS` tasks of each mode."""
    out = {}
    for m in MODES:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.overhead", "--rss-worker", m, "--db", url],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=1800,
            cwd=Path(__file__).resolve().parent.parent,
        )
        out[m] = int(proc.stdout.strip().splitlines()[-1])
    return out


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.node()} · {platform.platform()} · Python {platform.python_version()} · "
        f"{os.cpu_count()} CPUs (pinned to CPU {sorted(os.sched_getaffinity(0))}) · "
        f"load average {load:.1f} at start"
    )


def main(argv: list[str] | None = None) -> str:
    """Entry point of ``python -m bench.overhead``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rss-worker", choices=MODES, default=None)
    parser.add_argument("--db", default=None)
    args = parser.parse_args(argv)
    if args.rss_worker:
        rss_worker(args.rss_worker, args.db, RSS_TASKS)
        return ""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rounds, per_round = (2, 3) if args.quick else (args.rounds, args.per_round)
    header = machine()
    lines = [
        "# Overhead benchmark",
        "",
        f"Command: `{' '.join(['python -m bench.overhead', *(argv or sys.argv[1:])])}`  ",
        f"Machine: {header}  ",
        f"Task: {TURNS} model turns (8 lookups, 1 irreversible notify, 1 answer); "
        f'medians of {rounds} interleaved rounds x {per_round} tasks; `durability="sync"`.',
        "",
        "## Per agent step (one model call and its tool call)",
        "",
        "| checkpointer | bare | harnessed | create_agent + middleware "
        "| harnessed / bare | create_agent / bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    with scratch_database() as (pg_url, dbname):
        with tempfile.TemporaryDirectory() as tmp:
            for label, url in (
                ("memory", "memory://"),
                ("SQLite", f"sqlite:///{tmp}/overhead.db"),
                ("Postgres", pg_url),
            ):
                with open_backend(url) as backend:
                    m = latency(backend, rounds, per_round)
                print(label, m, flush=True)
                lines.append(
                    f"| {label} | {m['bare'] * 1e3:.2f} ms | {m['harnessed'] * 1e3:.2f} ms | "
                    f"{m['create_agent'] * 1e3:.2f} ms | **{m['harnessed'] / m['bare']:.2f}** | "
                    f"{m['create_agent'] / m['bare']:.2f} |"
                )
        fl = floor(pg_url)
        lines += [
            "",
            f"Floor: one bare Postgres `INSERT` + `COMMIT` = {fl * 1e3:.2f} ms (the bare agent "
            "writes one checkpoint per superstep, two supersteps per agent step).",
            "",
        ]
        with open_backend(pg_url) as backend:
            c = commits_per_task(backend, dbname)
        llm_or_irreversible = TURNS + 1
        extra = (c["harnessed"][0] - c["bare"][0]) / llm_or_irreversible
        lines += [
            "## Commits per task (Postgres, `pg_stat_database` deltas of a scratch database)",
            "",
            "Transactions include read-only ones (each autocommitted `SELECT` counts).",
            "",
            "| | bare | harnessed | create_agent | harnessed - bare "
            "| extra per LLM call or irreversible call |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| transactions | {c['bare'][0]:.1f} | {c['harnessed'][0]:.1f} | "
            f"{c['create_agent'][0]:.1f} | {c['harnessed'][0] - c['bare'][0]:.1f} | "
            f"**{extra:.2f}** ({llm_or_irreversible} per task) |",
            f"| rows written | {c['bare'][1]:.1f} | {c['harnessed'][1]:.1f} | "
            f"{c['create_agent'][1]:.1f} | {c['harnessed'][1] - c['bare'][1]:.1f} | "
            f"{(c['harnessed'][1] - c['bare'][1]) / llm_or_irreversible:.2f} |",
            "",
            "Where the harness's extra transactions come from: the same harnessed agent without "
            f"a cost envelope makes {c['harnessed-no-budget'][0]:.1f} transactions and writes "
            f"{c['harnessed-no-budget'][1]:.1f} rows per task; the cost envelope (one "
            "reservation per LLM call, each settlement riding on the next statement, the edge "
            "check reading the ledger at a task's first edge and its stop) accounts for the "
            "rest: "
            f"{(c['harnessed'][0] - c['harnessed-no-budget'][0]) / TURNS:.1f} transactions per "
            "LLM call.",
            "",
        ]
        print(c, flush=True)
        b = checkpoint_bytes(pg_url)
        total = {m: sum(v) for m, v in b.items()}
        lines += [
            "## Checkpoint bytes per 50-turn task (Postgres, table sizes before/after)",
            "",
            "| tables | bare | harnessed | create_agent | harnessed / bare |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| LangGraph checkpoint tables | {b['bare'][0]:,} | {b['harnessed'][0]:,} | "
            f"{b['create_agent'][0]:,} | {b['harnessed'][0] / max(1, b['bare'][0]):.2f} |",
            f"| harness tables (ledgers) | {b['bare'][1]:,} | {b['harnessed'][1]:,} | "
            f"{b['create_agent'][1]:,} | |",
            f"| all | {total['bare']:,} | {total['harnessed']:,} | {total['create_agent']:,} | "
            f"**{total['harnessed'] / max(1, total['bare']):.2f}** |",
            "",
        ]
        print(b, flush=True)
        if not args.quick:
            r = peak_rss(pg_url)
            lines += [
                f"## Peak RSS of one worker running {RSS_TASKS} tasks (Postgres)",
                "",
                "| bare | harnessed | create_agent |",
                "| ---: | ---: | ---: |",
                f"| {r['bare'] / 1024:.0f} MiB | {r['harnessed'] / 1024:.0f} MiB | "
                f"{r['create_agent'] / 1024:.0f} MiB |",
                "",
            ]
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "overhead.md").write_text(md, encoding="utf-8")
    return md


if __name__ == "__main__":
    main()
