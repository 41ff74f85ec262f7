"""``harness review ...``: the review queue's command group.

Sub-commands register themselves on `review_app` from their own modules
(``harness review serve`` lives in ``_inbox.py``).
"""

from __future__ import annotations

import typer

from harness_nodes.cli._app import app

review_app = typer.Typer(
    name="review",
    help="The human review queue: list, show and decide paused tool calls; serve the inbox.",
    no_args_is_help=True,
)
app.add_typer(review_app)
