"""``harness review``: list, show and decide the pending human reviews of every thread.

Deciding resumes the paused run, so the CLI needs the graph. It is found, in order:

- ``--graph module:attr``: a ``StateGraph`` builder, a factory returning a builder or a
  compiled graph (called with ``backend=`` when it takes it, so its ledgers use this database),
  or a compiled graph (re-bound to this backend's checkpointer only: ledgers its nodes hold
  stay where it was built — prefer a factory);
- ``--graph NAME``: a graph as ``harness run`` finds it (a reference graph such as
  ``support``, or a module defining ``build_graph(model, *, backend, ...)``);
- nothing: the graph ``harness run`` recorded in the thread's checkpoint metadata.

``harness_nodes`` never imports ``graphs``: names are looked up with ``importlib``. Other
sub-commands register themselves on `review_app` from their own modules (``harness review
serve`` lives in ``_inbox.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from harness_nodes._trace_langfuse import Masker
from harness_nodes.cli._app import app, console, open_existing
from harness_nodes.errors import HarnessError, ReviewNotFound, UserError
from harness_nodes.review import _allowed
from harness_nodes.review_queue import (
    ReviewItem,
    ReviewQueue,
    _item,
    masked_item,
    masked_items,
    pending_sql,
)

review_app = typer.Typer(
    name="review",
    help="The human review queue: list, show and decide paused tool calls; serve the inbox.",
    no_args_is_help=True,
)
app.add_typer(review_app)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Backend URL (default: $HARNESS_DATABASE_URL or sqlite:///harness.db)"
    ),
]
GraphOption = Annotated[
    str | None,
    typer.Option(
        "--graph",
        help="The graph to resume: module:attr (builder, factory taking backend=, or compiled "
        "graph: only its checkpointer moves to --db) or a graph name as for `harness run` "
        "(default: the one recorded on the thread)",
    ),
]
ReviewerOption = Annotated[
    str | None,
    typer.Option("--reviewer", help="Who decides (default: $HARNESS_REVIEWER or your login)"),
]


def _reviewer(name: str | None) -> str:
    from harness_nodes.cli._run import reviewer_name

    return reviewer_name(name)


def _graph(backend: Any, spec: str | None, thread_id: str | None) -> Any:
    from harness_nodes.cli import _run

    if spec and ":" in spec:
        from harness_nodes.inbox._serve import load_object, resolve_graph

        return resolve_graph(load_object(spec), backend)
    args: dict[str, Any] = {}
    model_spec: str | None = None
    name = spec
    if name is None:
        if thread_id is None:
            raise UserError("Name the graph to resume with --graph module:attr")
        meta = _run.run_metadata(backend, thread_id)
        name = str(meta.get(_run.META_GRAPH) or "")
        if not name:
            raise UserError(
                f"Thread {thread_id!r} was not started by `harness run`: "
                "name its graph with --graph module:attr"
            )
        args = json.loads(str(meta.get(_run.META_ARGS) or "{}"))
        model_spec = str(meta.get(_run.META_MODEL) or "") or None
    module = _run.load_graph_module(name)
    return _run.build_graph(module, args, _run.load_model(model_spec), backend)


def _row(backend: Any, review_id: str) -> ReviewItem:
    rows = backend.execute(
        "SELECT id, thread_id, interrupt_id, task_type, reason, risk, request, status, "
        "priority, assignee, deadline, created_at, decision, decided_by, decided_at "
        "FROM harness_reviews WHERE id = %s",
        (review_id,),
    )
    if not rows:
        raise ReviewNotFound(review_id)
    return _item(rows[0])


@contextmanager
def _queue(db: str | None, graph: str | None, review_id: str) -> Iterator[ReviewQueue]:
    with open_existing(db) as backend:
        item = _row(backend, review_id)
        yield ReviewQueue(backend, _graph(backend, graph, item.thread_id))


def _summary(item: ReviewItem, width: int | None = 70) -> str:
    """The calls waiting, ``action(key=value, ...)`` each; cut at *width* (None: whole)."""
    calls = [
        f"{r['action_request']['action']}("
        + ", ".join(f"{k}={json.dumps(v)}" for k, v in r["action_request"]["args"].items())
        + ")"
        for r in item.requests
    ]
    text = ", ".join(calls)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


@review_app.command("list")
def list_reviews(
    db: DbOption = None,
    task_type: Annotated[str | None, typer.Option("--task-type")] = None,
    reason: Annotated[str | None, typer.Option("--reason")] = None,
    assignee: Annotated[str | None, typer.Option("--assignee")] = None,
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="Only items waiting this many seconds")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many items.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
) -> None:
    """List pending reviews across all threads, oldest first."""
    sql, params = pending_sql(
        task_type=task_type, reason=reason, assignee=assignee, older_than=older_than, limit=limit
    )
    with open_existing(db) as backend:
        # A terminal is shown and shared: secrets masked, as in a trace, and the fields each
        # run marked sensitive.
        items = masked_items([_item(r) for r in backend.execute(sql, params)], backend.checkpointer)
    if as_json:
        for it in items:
            print(
                json.dumps(
                    {
                        "id": it.id,
                        "thread_id": it.thread_id,
                        "task_type": it.task_type,
                        "reason": it.reason,
                        "risk": it.risk,
                        "assignee": it.assignee,
                        "age_s": round(it.age, 1),
                        "calls": _summary(it, None),
                    }
                )
            )
        return
    if not items:
        console.print("no pending reviews")
        return
    table = Table(title=f"{len(items)} pending review(s)")
    for col in ("id", "thread", "task type", "reason", "risk", "assignee", "age", "calls"):
        # ids are what the other commands take: folded onto more lines, never cut
        table.add_column(col, overflow="fold" if col in ("id", "thread") else "ellipsis")
    for it in items:
        table.add_row(
            *(escape(v) for v in (it.id, it.thread_id, it.task_type, it.reason, it.risk)),
            escape(it.assignee or ""),
            f"{it.age:.0f}s",
            escape(_summary(it)),
        )
    console.print(table)


@review_app.command("show")
def show(
    review_id: Annotated[str, typer.Argument(help="The review id (from `harness review list`)")],
    db: DbOption = None,
    graph: GraphOption = None,
) -> None:
    """Show one review: what is asked, why, and the task's trace so far."""
    from harness_nodes.cli._trace import render
    from harness_nodes.tracing import build_trace

    tree: Any = None
    with open_existing(db) as backend:
        item = masked_item(_row(backend, review_id), Masker())  # masked as `show` masks it
        try:
            detail = ReviewQueue(backend, _graph(backend, graph, item.thread_id)).show(review_id)
            item, trace, tree = detail.item, detail.trace, detail.tree
        except UserError:
            if graph is not None:
                raise  # the graph asked for could not be loaded: say so
            # No graph given or recorded: the excerpt the request carries, and the decision
            # tree rebuilt from the checkpoints alone.
            trace = item.requests[0]["trace"]["steps"]
            try:
                tree = build_trace(backend, item.thread_id)
            except HarnessError:
                tree = None
    console.print(
        f"[bold]review {escape(item.id)}[/]  thread {escape(item.thread_id)}  "
        f"task type {escape(item.task_type)}  status {escape(item.status)}",
        highlight=False,
    )
    for req in item.requests:
        text = (
            f"- {req['description']}\n  risk {req['risk']}, reason {req['trigger']}: "
            f"{req['reason']}\n  args {json.dumps(req['action_request']['args'])}\n"
            f"  allowed: {', '.join(_allowed(req))}"
        )
        console.print(escape(text), highlight=False)
    if item.decided_by:
        decided = f"decided by {item.decided_by}: {json.dumps(item.decision)}"
        console.print(escape(decided), highlight=False)
    console.print("[bold]trace[/]")
    for line in trace:
        console.print(f"  {escape(str(line))}", highlight=False)
    if tree is not None:
        console.print(render(tree))


def _decide(
    review_id: str, decision: Any, db: str | None, graph: str | None, reviewer: str
) -> None:
    from harness_nodes.cli._run import run_errors

    with _queue(db, graph, review_id) as queue:
        item = queue.get(review_id)
        with run_errors(item.thread_id):  # the resumed run's own failure: one line
            state = queue.decide(review_id, decision, reviewer=reviewer)
        snapshot = queue.graph.get_state({"configurable": {"thread_id": item.thread_id}})
    messages = state.get("messages") or []
    console.print(
        escape(f"review {review_id}: {_words(decision)} by {reviewer} — run resumed"),
        highlight=False,
    )
    if snapshot.interrupts:
        console.print("the run paused again for review: see `harness review list`")
    elif messages:
        last = Masker().text(str(messages[-1].content))  # masked before it is cut short
        console.print(escape(f"last message: {last[:200]}"), highlight=False)


def _words(decision: Any) -> str:
    """A decision's types as its audit row names them: sorted, each once (edit+reject)."""
    decisions = decision if isinstance(decision, list) else [decision]
    return "+".join(sorted({str(d.get("type")) if isinstance(d, dict) else "?" for d in decisions}))


@review_app.command("decide")
def decide(
    review_id: Annotated[str, typer.Argument()],
    decision: Annotated[
        str,
        typer.Option(
            "--decision",
            help="One decision for every call, or a list with one per call in order (or by "
            '"tool_call_id"), e.g. \'[{"type": "edit", "args": {...}}, {"type": "reject"}]\'',
        ),
    ],
    db: DbOption = None,
    graph: GraphOption = None,
    reviewer: ReviewerOption = None,
) -> None:
    """Decide each paused call on its own (a pause can hold several calls)."""
    try:
        parsed = json.loads(decision)
    except ValueError as e:
        raise UserError(f"--decision is not valid JSON ({e}): {decision!r}") from None
    _decide(review_id, parsed, db, graph, _reviewer(reviewer))


@review_app.command("approve")
def approve(
    review_id: Annotated[str, typer.Argument()],
    db: DbOption = None,
    graph: GraphOption = None,
    reviewer: ReviewerOption = None,
) -> None:
    """Approve: the paused calls run (or an escalated result is accepted)."""
    _decide(review_id, {"type": "approve"}, db, graph, _reviewer(reviewer))


@review_app.command("edit")
def edit(
    review_id: Annotated[str, typer.Argument()],
    args: Annotated[
        str,
        typer.Option("--args", help="The call's new arguments, all of them, as a JSON object"),
    ],
    db: DbOption = None,
    graph: GraphOption = None,
    reviewer: ReviewerOption = None,
) -> None:
    """Edit the call's arguments, then run it (a pause of several calls: `review decide`)."""
    try:
        new_args = json.loads(args)
    except ValueError as e:
        raise UserError(f"--args is not valid JSON ({e}): {args!r}") from None
    if not isinstance(new_args, dict):
        raise UserError(f"--args must be a JSON object, got {type(new_args).__name__}: {args!r}")
    _decide(review_id, {"type": "edit", "args": new_args}, db, graph, _reviewer(reviewer))


@review_app.command("reject")
def reject(
    review_id: Annotated[str, typer.Argument()],
    message: Annotated[
        str | None, typer.Option("--message", help="Why (the model gets it as the tool result)")
    ] = None,
    db: DbOption = None,
    graph: GraphOption = None,
    reviewer: ReviewerOption = None,
) -> None:
    """Reject: nothing runs; the model is told why."""
    decision: dict[str, Any] = {"type": "reject"}
    if message:
        decision["message"] = message
    _decide(review_id, decision, db, graph, _reviewer(reviewer))


@review_app.command("respond")
def respond(
    review_id: Annotated[str, typer.Argument()],
    message: Annotated[str, typer.Option("--message", help="The answer the model gets")],
    db: DbOption = None,
    graph: GraphOption = None,
    reviewer: ReviewerOption = None,
) -> None:
    """Respond in the tool's place: nothing runs; the model gets your message as the result."""
    _decide(review_id, {"type": "respond", "message": message}, db, graph, _reviewer(reviewer))
