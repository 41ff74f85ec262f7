"""Reading a long task's local trace: `build_trace` time by task length, per backend.

A harnessed agent (scripted model looping one tool call, budget envelope, checkpointed with
``durability="sync"``) runs *n* model calls on a thread; then `build_trace` reads it back,
timed. The task is built once per size and database and kept (``--keep DIR``), so the code
before and after a change reads the same checkpoints (the Postgres databases,
``<prefix>_<n>``, are kept too: drop them when done). Target: time grows ~linearly with n.

    python bench/trace_read.py [--sizes 250,500,1000,2000] [--db sqlite,postgres]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres] [--keep DIR]
    python bench/trace_read.py --report 40x50 [--db ...]   # reliability_report over 40 tasks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

from checkpointers import open_backend  # noqa: E402
from harness_nodes import (  # noqa: E402
    Envelope,
    build_harnessed_agent,
    build_trace,
    reliability_report,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call  # noqa: E402


@tool
def look(q: str) -> str:
    """Look."""
    return f"seen {q}"


def _build(url: str, n: int, threads: int = 1) -> None:
    with open_backend(url) as backend:
        for t in range(threads):
            call = ai(tool_calls=[tool_call("look", {"q": "x"})])
            model = ScriptedChatModel(script=[call], loop=True, model_name="gpt-4o-mini")
            agent = build_harnessed_agent(
                model, [look], envelope=Envelope(max_calls=n), backend=backend
            )
            agent.invoke(
                {"messages": [HumanMessage("go")]},
                {
                    "configurable": {"thread_id": "long" if threads == 1 else f"run-{t}"},
                    "recursion_limit": 10 * n + 50,
                },
                durability="sync",
            )


def _pg_url(base: str, name: str) -> str:
    return base.rsplit("/", 1)[0] + "/" + name


def _ensure_pg(base: str, name: str) -> bool:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found:
            return False
        conn.execute(f'CREATE DATABASE "{name}"')
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250,500,1000,2000")
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keep", default="/tmp/harness-trace-read")
    parser.add_argument("--prefix", default="harness_trace_read", help="Postgres db names")
    parser.add_argument(
        "--report",
        default="",
        metavar="RUNSxSTEPS",
        help="instead: time reliability_report over RUNS tasks of STEPS model calls (40x50)",
    )
    parser.add_argument("--build-only", action="store_true", help="build the tasks, read none")
    args = parser.parse_args()
    keep = Path(args.keep)
    keep.mkdir(parents=True, exist_ok=True)
    if args.report:
        _report(args, keep)
        return
    print("| db | steps (model calls) | checkpoints | build_trace s | per call ms |")
    print("| --- | --- | --- | --- | --- |")
    for kind in args.db.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            if kind == "sqlite":
                path = keep / f"long-{n}.db"
                url = f"sqlite:///{path}"
                fresh = not path.exists()
            else:
                url = _pg_url(args.postgres, f"{args.prefix}_{n}")
                fresh = _ensure_pg(args.postgres, f"{args.prefix}_{n}")
            if fresh:
                _build(url, n)
            if args.build_only:
                continue
            with open_backend(url) as backend:
                t0 = time.perf_counter()
                trace = build_trace(backend, "long")
                took = time.perf_counter() - t0
                calls = sum(1 for x in trace.walk() if x.kind == "llm")
                line = f"| {kind} | {n} | {len(trace.steps)} | {took:.2f} | {took / n * 1e3:.1f} |"
                print(line, f"({calls} llm)" if calls != n else "", flush=True)


def _report(args: argparse.Namespace, keep: Path) -> None:
    runs, steps = (int(x) for x in args.report.split("x"))
    print("| db | tasks x model calls | reliability_report s |")
    print("| --- | --- | --- |")
    for kind in args.db.split(","):
        if kind == "sqlite":
            path = keep / f"report-{runs}x{steps}.db"
            url, fresh = f"sqlite:///{path}", not path.exists()
        else:
            name = f"{args.prefix}_report_{runs}x{steps}"
            url, fresh = _pg_url(args.postgres, name), _ensure_pg(args.postgres, name)
        if fresh:
            _build(url, steps, threads=runs)
        if args.build_only:
            continue
        with open_backend(url) as backend:
            t0 = time.perf_counter()
            report = reliability_report(backend)
            took = time.perf_counter() - t0
        assert report.tasks == runs, report.tasks
        print(f"| {kind} | {runs} x {steps} | {took:.2f} |", flush=True)


if __name__ == "__main__":
    main()
