"""``harness demo``: run the quickstart agent on the embedded default backend."""

from __future__ import annotations

import importlib
import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from harness_nodes.cli._app import app, console


@app.command()
def demo(
    db: Annotated[
        str | None,
        typer.Option(help="Backend URL (default: $HARNESS_DATABASE_URL or sqlite:///harness.db)"),
    ] = None,
) -> None:
    """Run a short harnessed demo graph (scripted model, no API key) and print its outcome."""
    from checkpointers import open_backend

    # graphs/ is looked up by name, like langgraph.json does: harness_nodes never imports it.
    quickstart: Any = importlib.import_module("graphs.quickstart")
    with open_backend(db) as backend:
        thread_id = f"demo-{uuid.uuid4().hex[:8]}"
        console.print(f"backend: [bold]{backend.url}[/]   thread: [bold]{thread_id}[/]")
        state = quickstart.run(quickstart.build_graph(), backend, thread_id=thread_id)
    outcome = state["outcome"]
    console.print(f"outcome: [bold green]{outcome['status']}[/] — {outcome.get('partial_result')}")
    table = Table(title="spend")
    for col in ("model", "calls", "input tokens", "output tokens"):
        table.add_column(col)
    for model, agg in quickstart.spend_of(state).items():
        table.add_row(model, str(agg["calls"]), str(agg["input_tokens"]), str(agg["output_tokens"]))
    console.print(table)
