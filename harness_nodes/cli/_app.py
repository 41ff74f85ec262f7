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


_FIRST_RUN = "`harness demo` or `harness run GRAPH` creates it"


def open_existing(db: str | None) -> Backend:
    """Open the backend of a command that reads what earlier runs wrote.

    A database nothing has run against is an error, not a new empty harness database: a
    mistyped ``--db`` must not answer "no runs", nor leave a stray file or the harness's
    tables behind. So a SQLite file must exist, and the database must hold the harness's
    tables or LangGraph checkpoints (looked for without creating anything); one with an
    older harness schema opens, and is migrated, as usual.
    """
    from checkpointers import default_url, open_backend
    from checkpointers._url import parse_url
    from checkpointers.backend import has_harness_data
    from harness_nodes.errors import BackendURLError

    url = default_url() if db is None else db
    parsed = parse_url(url)
    if parsed.kind == "memory" or parsed.target == ":memory:":
        return open_backend(url)
    # The URL is well formed: the message says what is missing, not which URL forms exist.
    if parsed.kind == "sqlite" and not Path(parsed.target).is_file():
        raise BackendURLError(
            parsed.masked,
            f"no database at {parsed.target}: nothing has run against it yet "
            f"({_FIRST_RUN}; or check --db or HARNESS_DATABASE_URL)",
            False,
        )
    if not has_harness_data(parsed):
        where = parsed.target if parsed.kind == "sqlite" else "that database"
        raise BackendURLError(
            parsed.masked,
            f"no harness data in {where}: nothing has run against it yet "
            f"({_FIRST_RUN}; or check --db or HARNESS_DATABASE_URL)",
            False,
        )
    return open_backend(url)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``harness`` console script."""
    try:
        app(args=argv, standalone_mode=False)
    except HarnessError as e:
        if _state["debug"]:
            raise
        from harness_nodes._trace_langfuse import Masker

        # An error may quote a tool's output or the user's input: secrets masked, as in a trace.
        message = escape(Masker().text(str(e)))
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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
