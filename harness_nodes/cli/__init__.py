"""The ``harness`` command line.

Each sub-command lives in its own private module and registers itself on `app`. Errors from
the harness print as one line on stderr with exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

from harness_nodes.cli import (
    _demo,  # noqa: F401  (registers `harness demo`)
    _inbox,  # noqa: F401  (registers `harness review serve`)
    _review,  # noqa: F401  (registers `harness review ...`)
    _run,  # noqa: F401  (registers `harness run`, `harness resume`)
    _trace,  # noqa: F401  (registers `harness show|runs|report`)
    _worker,  # noqa: F401  (registers `harness worker`)
)
from harness_nodes.cli._app import app, main

__all__ = ["app", "main"]
