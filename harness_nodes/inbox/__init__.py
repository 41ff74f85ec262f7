"""The review inbox: a small web app over `ReviewQueue` for the people who decide.

Server-rendered pages (no front-end build, one small script), a JSON API on the same routes
(``Accept: application/json``), reviewer authentication, CSRF protection and a strict CSP.
Needs the ``inbox`` extra: ``pip install "langgraph-harness[inbox]"``. Run it with
``harness review serve``, or mount `create_app` in your own ASGI server.

Example:
    ```python
    from harness_nodes.inbox import InboxAuth

    auth = InboxAuth(reviewers={"alice": "a-long-random-token"})
    print(auth.reviewer_for("Bearer a-long-random-token"))  # alice
    ```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness_nodes.inbox._security import ANONYMOUS, InboxAuth, is_loopback, parse_reviewers

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["ANONYMOUS", "InboxAuth", "create_app", "is_loopback", "parse_reviewers"]


def create_app(
    queue: Any,
    auth: InboxAuth,
    *,
    page_size: int = 50,
    decide_wait: float = 5.0,
    max_body_size: int = 1 << 20,
    body_timeout: float = 30.0,
) -> Starlette:
    """Build the inbox as an ASGI app over a `ReviewQueue`.

    Args:
        queue: The `ReviewQueue` whose items are listed and decided.
        auth: Who may use the inbox (see `InboxAuth`).
        page_size: Items per list page.
        decide_wait: Seconds a decision request waits for the resumed task; after that the
            page shows "resuming" and picks the outcome up when it arrives.
        max_body_size: Bytes a request body may have; a larger one is refused with 413
            before it is read whole (a decision is a small JSON object or form).
        body_timeout: Seconds a request may take to send its body; a slower one gets 408.
            Headers are the server's to bound: ``harness review serve`` does (see
            `harness_nodes.inbox._serve.ServerLimits`); behind your own ASGI server, set its
            limits or put a reverse proxy in front.

    Routes: ``GET /reviews`` (pending list; ``task_type``, ``reason``, ``assignee``,
    ``page`` query parameters), ``GET /reviews/{id}`` (item, trace, outcome),
    ``POST /reviews/{id}/decision`` (form or JSON decision). Each answers JSON to
    ``Accept: application/json``.

    Example:
        ```python
        from harness_nodes.inbox import InboxAuth, create_app

        def serve(queue):  # a ReviewQueue
            return create_app(queue, InboxAuth(reviewers={"alice": "a-long-random-token"}))
        ```
    """
    from harness_nodes.inbox._app import create_app as _create_app

    return _create_app(
        queue,
        auth,
        page_size=page_size,
        decide_wait=decide_wait,
        max_body_size=max_body_size,
        body_timeout=body_timeout,
    )
