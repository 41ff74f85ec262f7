"""``harness review serve``: open the backend, load the graph, run the inbox with uvicorn."""

from __future__ import annotations

import asyncio
import errno
import importlib
import inspect
import os
import socket
from dataclasses import dataclass
from typing import Any

from harness_nodes.errors import UserError
from harness_nodes.inbox._security import InboxAuth, is_loopback, parse_reviewers

DEFAULT_PORT = 8765


@dataclass(frozen=True)
class ServerLimits:
    """How long and how much the inbox's server waits for a client before it hangs up.

    uvicorn has no timeout for reading a request's headers: a client sending them one byte at
    a time, or connecting and sending nothing, held its connection for ever. The inbox serves
    with h11 (whose header size limit uvicorn exposes) and closes a connection whose next
    request has not finished its headers in `header_timeout`; the app bounds the body (see
    `create_app`). Public deployments still belong behind a reverse proxy, as uvicorn advises:
    these bound each connection, not how many a client may open.
    """

    header_timeout: float = 10.0
    """Seconds a connection may take to send a request's headers, counted from when it
    connected or from the previous response; then it is closed."""
    body_timeout: float = 30.0
    """Seconds a request may take to send its body once its headers are in; then 408."""
    max_body_size: int = 1 << 20
    """Bytes a request body may have (a decision is a small JSON object or form); more: 413."""
    max_header_size: int = 64 * 1024
    """Bytes the request line and headers may have together; more: the request is refused."""
    keep_alive: int = 5
    """Seconds an idle keep-alive connection stays open after a response."""
    graceful_shutdown: int = 10
    """Seconds a stop waits for requests in flight before closing their connections."""


def _header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """The h11 protocol of uvicorn, closing a connection whose request headers come too slowly.

    Armed when the connection is made and again after each response; a request whose headers
    arrived in time is being served (``cycle`` in progress) and is left alone, so a slow
    *handler* is never cut off here.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # its headers came in time: a request is being served
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def server_config(app: Any, *, host: str, port: int, limits: ServerLimits) -> Any:
    """The `uvicorn.Config` the inbox is served with, bounded by *limits*.

    ``limit_concurrency`` is left unset on purpose: uvicorn counts open connections against it,
    so a few slow clients holding connections would have every reviewer answered 503.
    """
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        http=_header_timeout_protocol(limits.header_timeout),
        h11_max_incomplete_event_size=limits.max_header_size,
        timeout_keep_alive=limits.keep_alive,
        timeout_graceful_shutdown=limits.graceful_shutdown,
    )


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
    limits: ServerLimits | None = None,
) -> None:
    """Open the backend, build the queue over the graph and serve the inbox until stopped."""
    limits = limits or ServerLimits()
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
        app = create_app(
            queue,
            auth,
            page_size=page_size,
            max_body_size=limits.max_body_size,
            body_timeout=limits.body_timeout,
        )
        config = server_config(app, host=host, port=port, limits=limits)
        server = uvicorn.Server(config)
        sockets = bind(host, port, config.backlog)
        try:
            if on_ready is not None:
                on_ready(backend)
            server.run(sockets=sockets)
        finally:
            for sock in sockets:
                sock.close()
