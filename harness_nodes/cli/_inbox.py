"""``harness review serve``: the browser review inbox over the review queue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from harness_nodes.cli._app import console
from harness_nodes.cli._review import review_app

if TYPE_CHECKING:
    from checkpointers import Backend


@review_app.command("serve")
def serve(
    graph: Annotated[
        str,
        typer.Option(
            envvar="HARNESS_GRAPH",
            help="The graph whose tasks are reviewed, as module:attribute (a StateGraph, a "
            "compiled graph or a factory), e.g. myapp.agent:build_graph.",
        ),
    ],
    db: Annotated[
        str | None,
        typer.Option(help="Backend URL (default: $HARNESS_DATABASE_URL or sqlite:///harness.db)"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    reviewer: Annotated[
        list[str] | None,
        typer.Option(
            help="A reviewer as NAME:TOKEN (repeatable; also $HARNESS_INBOX_REVIEWERS). "
            "Reviewers sign in with HTTP Basic NAME/TOKEN or send 'Bearer TOKEN'."
        ),
    ] = None,
    allow_anonymous: Annotated[
        bool,
        typer.Option(help="Let anyone on this machine decide, as 'anonymous' (loopback only)."),
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Host names the inbox answers to (default: loopback names)."),
    ] = None,
    page_size: Annotated[int, typer.Option(help="Items per page.")] = 50,
) -> None:
    """Serve the review inbox: pending items, their traces, and one click to decide."""
    from harness_nodes.inbox._serve import serve as run

    def ready(backend: Backend) -> None:
        # Not folded at the terminal's width: the address and the URL are copied from it.
        console.print(
            f"review inbox on [bold]http://{host}:{port}/[/] over {backend.url}", soft_wrap=True
        )

    run(
        db=db,
        graph=graph,
        host=host,
        port=port,
        reviewers=reviewer,
        allow_anonymous=allow_anonymous,
        allowed_hosts=allowed_host,
        page_size=page_size,
        on_ready=ready,
    )
