"""The typer application and the error boundary shared by every sub-command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from harness_nodes.errors import HarnessError

if TYPE_CHECKING:
    from checkpointers import Backend

app = typer.Typer(
    name="harness",
    help="The production harness for LangGraph agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """The production harness for LangGraph agents."""
    _state["debug"] = debug


def open_existing(db: str | None) -> Backend:
    """Open the backend of a command that reads what earlier runs wrote.

    A SQLite file that does not exist is an error, not a new empty database: a mistyped
    ``--db`` must not answer "no runs" (and leave a stray file behind).
    """
    from checkpointers import default_url, open_backend
    from checkpointers._url import parse_url
    from harness_nodes.errors import BackendURLError

    url = default_url() if db is None else db
    parsed = parse_url(url)
    if parsed.kind == "sqlite" and parsed.target != ":memory:":
        if not Path(parsed.target).is_file():
            raise BackendURLError(
                parsed.masked,
                f"no database at {parsed.target}: nothing has run against it "
                "(check --db or HARNESS_DATABASE_URL)",
            )
    return open_backend(url)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``harness`` console script."""
    try:
        app(args=argv, standalone_mode=False)
    except HarnessError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except _usage_errors() as e:  # unknown option, bad value: click's one-paragraph message
        e.show()
        sys.exit(e.exit_code)


def _usage_errors() -> tuple[type[Any], ...]:
    # typer >= 0.2x vendors click (its errors derive from `typer.TyperException`, not
    # `click.ClickException`); older typer raises click's own. Catch whichever is in use.
    kinds: list[type[Any]] = []
    vendored = getattr(typer, "TyperException", None)
    if isinstance(vendored, type):
        kinds.append(vendored)
    try:
        import click
    except ImportError:  # pragma: no cover - typer without click
        pass
    else:
        kinds.append(click.ClickException)
    return tuple(kinds)
