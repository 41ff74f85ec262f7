"""``harness show THREAD``, ``harness runs``, ``harness report``: traces from the database."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from harness_nodes._trace_local import Trace, TraceNode
from harness_nodes._trace_report import list_runs, reliability_report
from harness_nodes.cli._app import app, console, open_existing
from harness_nodes.tracing import build_trace

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Backend URL (default: $HARNESS_DATABASE_URL or sqlite:///harness.db)."
    ),
]

_STYLE = {
    "step": "bold",
    "subgraph": "bold",
    "llm": "cyan",
    "tool_call": "magenta",
    "tool_result": "green",
    "verdict": "yellow",
    "budget": "yellow",
    "interrupt": "bold red",
    "review": "red",
    "effect": "blue",
    "outcome": "bold green",
    "error": "bold red",
    "prompt": "dim",
}


def _usd(x: float) -> str:
    return f"${x:.6f}" if x else "$0"


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f}ms" if x < 1 else f"{x:.2f}s"


def _short(value: object, limit: int = 100) -> str:
    """One line of at most *limit* characters, escaped for rich markup (agent text is data)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


def _label(node: TraceNode) -> str:
    style = _STYLE.get(node.kind, "")
    kind, name = escape(node.kind), escape(node.name)
    head = f"[{style}]{kind}[/] {name}" if style else f"{kind} {name}"
    bits: list[str] = []
    if node.duration_s is not None:
        bits.append(_secs(node.duration_s))
    if node.input_tokens or node.output_tokens:
        bits.append(f"{node.input_tokens}+{node.output_tokens} tok")
    if node.cost_usd:
        bits.append(_usd(node.cost_usd))
    d = node.data
    if node.kind == "tool_call":
        bits.append(_short(d.get("args", {}), 200))
    elif node.kind == "tool_result":
        bits.append(_short(d.get("content", "")))
    elif node.kind == "verdict" and d.get("reasons"):
        bits.append(_short("; ".join(map(str, d["reasons"]))))
    elif node.kind == "llm" and d.get("content"):
        bits.append(_short(d["content"]))
    elif node.kind == "prompt":
        bits.append(_short(d.get("content", "")))
    elif node.kind == "outcome" and d.get("reason"):
        bits.append(_short(d["reason"]))
    elif node.kind == "interrupt" and d.get("reason"):
        bits.append(_short(d["reason"]))
    elif node.kind == "review" and (detail := _review_detail(d)):
        bits.append(_short(detail, 200))
    tail = "  ".join(bits)
    return f"{head}  [dim]{tail}[/]" if tail else head


def _review_detail(d: Mapping[str, Any]) -> str:
    """What a decision did to each call: the arguments an edit gave, a reviewer's message."""
    calls = d.get("calls")
    parts: list[str] = []
    for item in calls if isinstance(calls, list) else [d]:
        if not isinstance(item, Mapping):
            continue
        tool = str(item.get("tool") or "")
        if "args_after" in item:
            args = json.dumps(item["args_after"], default=str)
            parts.append(f"{tool} → {args}" if tool else f"→ {args}")
        if item.get("message"):
            parts.append(f"{tool}: {item['message']}" if tool else str(item["message"]))
    return "; ".join(parts)


def _add(tree: Tree, node: TraceNode) -> None:
    branch = tree.add(_label(node), highlight=False)
    for child in node.children:
        _add(branch, child)


def render(trace: Trace) -> Tree:
    """The trace as a rich tree."""
    head = (
        f"[bold]{escape(trace.thread_id)}[/]  type={escape(trace.task_type)}  "
        f"status=[bold]{escape(trace.status)}[/]  "
        f"{_secs(trace.duration_s)}  {trace.input_tokens}+{trace.output_tokens} tok  "
        f"{_usd(trace.cost_usd)}"
    )
    if trace.reason:
        head += f"  reason={_short(trace.reason)}"
    tree = Tree(head, highlight=False)
    for step in trace.steps:
        _add(tree, step)
    return tree


@app.command()
def show(
    thread: Annotated[str, typer.Argument(help="The task's thread id.")],
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the trace as JSON.")] = False,
) -> None:
    """Show a task's decision tree, rebuilt from its checkpoints and the ledgers."""
    with open_existing(db) as backend:
        trace = build_trace(backend, thread)
    if as_json:
        print(trace.to_json())
    else:
        console.print(render(trace))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command()
def runs(
    db: DbOption = None,
    limit: Annotated[int, typer.Option(min=1, help="How many recent runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List recent runs: status, task type, cost, duration."""
    with open_existing(db) as backend:
        rows = list_runs(backend, limit=limit)
    if as_json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    table = Table(title="recent runs")
    for col in ("thread", "task type", "status", "cost", "duration", "started (UTC)"):
        # a thread id is what `harness show` takes: folded onto more lines, never cut
        table.add_column(col, overflow="fold" if col == "thread" else "ellipsis")
    for r in rows:
        table.add_row(
            escape(r.thread_id),
            escape(r.task_type),
            escape(r.status),
            _usd(r.cost_usd),
            _secs(r.duration_s),
            _when(r.started_at),
        )
    console.print(table)


@app.command()
def report(
    db: DbOption = None,
    top: Annotated[int, typer.Option(min=1, help="How many failure reasons / tools to list.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Reliability across runs: completion, outcomes, failures, escalations, cost per type."""
    with open_existing(db) as backend:
        rep = reliability_report(backend, top=top)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
        return
    console.print(
        f"[bold]{rep.tasks}[/] tasks, {rep.finished} finished, completion rate "
        f"[bold]{rep.completion_rate:.0%}[/], escalation rate [bold]{rep.escalation_rate:.0%}[/]"
    )
    console.print("outcomes: " + ", ".join(f"{escape(k)}={v}" for k, v in rep.outcomes.items()))
    if rep.review_latency_s:
        lat = rep.review_latency_s
        console.print(
            f"review latency: mean {_secs(lat['mean'])}, p95 {_secs(lat['p95'])}, "
            f"max {_secs(lat['max'])}"
        )
    if rep.failure_reasons:
        table = Table(title="top failure reasons")
        table.add_column("reason")
        table.add_column("count", justify="right")
        for reason, n in rep.failure_reasons:
            table.add_row(_short(reason), str(n))
        console.print(table)
    if rep.failing_tools:
        table = Table(title="tools failing verification")
        table.add_column("tool")
        table.add_column("failures", justify="right")
        for tool, n in rep.failing_tools:
            table.add_row(escape(tool), str(n))
        console.print(table)
    table = Table(title="cost per task type (USD)")
    for col in ("task type", "n", "mean", "p95", "max"):
        table.add_column(col, justify="right")
    for task_type, c in rep.cost_by_task_type.items():
        cells = (_usd(c["mean"]), _usd(c["p95"]), _usd(c["max"]))
        table.add_row(escape(task_type), str(int(c["n"])), *cells)
    console.print(table)
