"""``harness review serve``: open the backend, load the graph, run the inbox with uvicorn."""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import socket
from typing import Any

from harness_nodes.errors import UserError
from harness_nodes.inbox._security import InboxAuth, is_loopback, parse_reviewers

DEFAULT_PORT = 8765


def load_object(spec: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--graph must look like module:attribute, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"Cannot import {module_name!r} for --graph: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{module_name!r} has no attribute {attr!r} (--graph)") from None
    return obj


def build_auth(
    *,
    host: str,
    reviewers: list[str] | None,
    allow_anonymous: bool,
    allowed_hosts: list[str] | None,
) -> InboxAuth:
    """The inbox's `InboxAuth` from CLI options and ``HARNESS_INBOX_*`` environment variables.

    ``HARNESS_INBOX_REVIEWERS`` (``name:token,...``) adds reviewers; ``HARNESS_INBOX_SECRET``
    fixes the CSRF key (needed when several processes serve one inbox).
    """
    people = parse_reviewers(os.environ.get("HARNESS_INBOX_REVIEWERS"))
    for name, token in parse_reviewers(reviewers).items():
        people[name] = token
    if allow_anonymous and not is_loopback(host):
        raise UserError(
            f"--allow-anonymous is for local use only; refusing to serve anonymously on {host}"
        )
    if allowed_hosts:
        hosts: frozenset[str] | None = frozenset(h.lower().strip("[]") for h in allowed_hosts)
    elif is_loopback(host):
        hosts = frozenset({"localhost", "127.0.0.1", "::1"})
    elif host in ("0.0.0.0", "::"):
        hosts = None
    else:
        hosts = frozenset({host.lower().strip("[]")})
    extra: dict[str, Any] = {}
    secret = os.environ.get("HARNESS_INBOX_SECRET")
    if secret:
        extra["secret_key"] = secret
    return InboxAuth(
        reviewers=people, allow_anonymous=allow_anonymous, allowed_hosts=hosts, **extra
    )


def resolve_graph(obj: Any, backend: Any) -> Any:
    """A compiled graph on *backend*'s checkpointer from a ``--graph`` object.

    Accepts a `StateGraph` builder (compiled here), a compiled graph (re-bound to the
    backend's checkpointer, so it resumes the tasks stored there — but ledgers its nodes
    were built with, effects and spend, stay where they were), or a factory returning
    either — called with ``backend=`` when it takes that argument, so its ledgers use the
    same database (e.g. ``graphs.support:build_graph``: prefer a factory).
    """
    if callable(obj) and not hasattr(obj, "invoke") and not hasattr(obj, "compile"):
        try:
            signature: inspect.Signature | None = inspect.signature(obj)
        except (TypeError, ValueError):
            signature = None
        kwargs = {"backend": backend} if signature and "backend" in signature.parameters else {}
        if signature is not None:
            try:
                signature.bind(**kwargs)
            except TypeError as e:
                given = "backend=" if kwargs else "no arguments"
                raise UserError(
                    f"--graph names a function that cannot be called with {given}: {e}"
                ) from None
        obj = obj(**kwargs)
    checkpointer = backend.checkpointer
    if hasattr(obj, "compile") and not hasattr(obj, "invoke"):
        return obj.compile(checkpointer=checkpointer)
    if hasattr(obj, "invoke") and hasattr(obj, "copy"):
        return obj.copy(update={"checkpointer": checkpointer})
    raise UserError(
        f"--graph must name a StateGraph, a compiled graph or a factory of one, "
        f"not {type(obj).__name__}"
    )


def bind(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening sockets on *port* at every address *host* names, as uvicorn would open them.

    Opened here, before uvicorn starts, so that a port in use is a one-line error (exit 2)
    rather than uvicorn's log line and exit 3; uvicorn then serves on these very sockets.
    They listen at once: with ``SO_REUSEADDR`` a second process could bind the same port
    until the first listens. An IPv6 socket is dual-stack (as uvicorn's, so ``::`` takes IPv4
    clients too) unless *host* also names an IPv4 address, which gets its own socket.

    Raises:
        UserError: the port is in use, or *host* cannot be listened on.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}: {e.strerror}") from None
    sockets: list[socket.socket] = []
    both = {info[0] for info in infos} >= {socket.AF_INET, socket.AF_INET6}
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and both:  # its IPv4 twin has a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError as e:
        for sock in sockets:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use") from None
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sockets


def serve(
    *,
    db: str | None,
    graph: str,
    host: str,
    port: int,
    reviewers: list[str] | None,
    allow_anonymous: bool,
    allowed_hosts: list[str] | None,
    page_size: int,
    on_ready: Any = None,
) -> None:
    """Open the backend, build the queue over the graph and serve the inbox until stopped."""
    auth = build_auth(
        host=host, reviewers=reviewers, allow_anonymous=allow_anonymous, allowed_hosts=allowed_hosts
    )
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'harness review serve needs the inbox extra: pip install "langgraph-harness[inbox]"'
        ) from e

    from harness_nodes.cli._app import open_existing
    from harness_nodes.inbox import create_app
    from harness_nodes.review_queue import ReviewQueue

    obj = load_object(graph)
    with open_existing(db) as backend:  # the inbox reads what runs wrote: never a new database
        queue = ReviewQueue(backend, resolve_graph(obj, backend))
        app = create_app(queue, auth, page_size=page_size)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        sockets = bind(host, port, config.backlog)
        try:
            if on_ready is not None:
                on_ready(backend)
            server.run(sockets=sockets)
        finally:
            for sock in sockets:
                sock.close()
