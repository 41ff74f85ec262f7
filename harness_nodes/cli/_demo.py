"""``harness demo``: the three reference graphs, faults switched on, narrated.

Runs ``research``, ``support`` and ``documents`` on the embedded default backend with the
scripted model (no API key, no server) and prints what the harness did about each injected
fault: the refused tool outputs and their retries, the pause for review (answered by a demo
reviewer) and the outcome and spend of each task. Everything is checkpointed and audited in
the backend, so ``harness show THREAD`` and ``harness report`` can look at it afterwards.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from langchain_core.messages import AIMessage
from rich.table import Table

from harness_nodes.cli._app import app, console
from harness_nodes.cli._narrate import Narrator
from harness_nodes.cli._run import resume_thread, run_graph

DEMO_REVIEWER = "demo-reviewer"


@dataclass(frozen=True)
class _Scene:
    graph: str
    title: str
    args: dict[str, Any]


SCENES = (
    _Scene(
        "research",
        "research — the first search silently returns nothing; a tight $0.006 budget",
        {"faults": {"empty_results": True}, "budget_usd": 0.006},
    ),
    _Scene(
        "support",
        "support — invoice amounts come back in cents; refunds and emails need a person",
        {"faults": {"out_of_range": True}},
    ),
    _Scene(
        "documents",
        "documents — an empty record, a 502 page and a negative total in one batch",
        {"faults": {"empty_results": True, "embedded_error": True, "out_of_range": True}},
    ),
    _Scene(
        "research",
        "research — a runaway agent that never stops searching, on a $0.01 budget",
        {"faults": {"runaway": True}, "budget_usd": 0.01},
    ),
)


def _tokens(state: dict[str, Any]) -> tuple[int, dict[str, int]]:
    total = 0
    by_model: dict[str, int] = {}
    for m in state.get("messages", []):
        if isinstance(m, AIMessage) and m.usage_metadata:
            n = m.usage_metadata["total_tokens"]
            total += n
            name = str(m.response_metadata.get("model_name", "?"))
            by_model[name] = by_model.get(name, 0) + n
    return total, by_model


@app.command()
def demo(
    db: Annotated[
        str | None,
        typer.Option(help="Backend URL (default: $HARNESS_DATABASE_URL or sqlite:///harness.db)"),
    ] = None,
) -> None:
    """Run the three reference graphs with faults on and narrate what the harness did."""
    from checkpointers import open_backend

    with open_backend(db) as backend:  # a bad URL is one line, before anything is printed
        console.print(f"backend: [bold]{backend.url}[/] (scripted models: no API key)")
    narrator = Narrator(console, quiet=True)
    run_id = uuid.uuid4().hex[:6]
    rows: list[tuple[str, str, str, str, str]] = []
    for scene in SCENES:
        console.rule(scene.title, style="dim")
        thread = f"demo-{scene.graph}-{run_id}"
        if any(s.graph == scene.graph for s in SCENES[: SCENES.index(scene)]):
            thread += "-runaway"
        first_event = len(narrator.events)
        state = run_graph(
            scene.graph,
            None,
            db=db,
            args=scene.args,
            thread_id=thread,
            narrator=narrator,
        )
        while state.get("__interrupts__"):
            narrator.note(f"{DEMO_REVIEWER} approves (a person would, in `harness review`)")
            state = resume_thread(
                thread,
                db=db,
                resume={"type": "approve"},
                reviewer=DEMO_REVIEWER,
                narrator=narrator,
            )
        events = narrator.events[first_event:]
        # a review is counted by the calls it held, not also by the decision that released them
        kinds = [
            "held" if text.startswith("paused for review") else k
            for k, text in events
            if k != "review" or text.startswith("paused for review")
        ]
        did = ", ".join(
            f"{kinds.count(k)} {label}"
            for k, label in (
                ("verdict", "refused"),
                ("held", "held for review"),
                ("budget", "degraded"),
                ("outcome", "stopped"),
            )
            if kinds.count(k)
        )
        outcome = (state.get("outcome") or {}).get("status", "?")
        tokens, by_model = _tokens(state)
        models = ", ".join(sorted(by_model))
        rows.append((scene.graph, thread, outcome, did or "-", f"{tokens} ({models})"))
    table = Table(title="what the harness did")
    for col in ("graph", "thread", "outcome", "harness decisions", "tokens (models)"):
        # a thread id is what `harness show` takes, an outcome what `harness report` counts:
        # folded onto more lines, never cut (as in `harness runs`)
        table.add_column(col, overflow="fold" if col in ("thread", "outcome") else "ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    support_thread = next(row[1] for row in rows if row[0] == "support")
    console.print(
        f"Next: [bold]harness show {support_thread}[/] (the review pause and decision), "
        "[bold]harness report[/] (outcomes and cost per graph)."
    )
