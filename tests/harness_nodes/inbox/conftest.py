"""A real paused graph (scripted model → irreversible refund) and a real inbox server."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from langchain_core.messages import HumanMessage

from checkpointers import Backend
from harness_nodes.inbox import InboxAuth, create_app
from harness_nodes.review_queue import ReviewQueue
from tests.conftest import IN_CI
from tests.harness_nodes.inbox.shop_graph import builder

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


def basic(name: str) -> dict[str, str]:
    raw = f"{name}:{TOKENS[name]}".encode()
    return {"authorization": "Basic " + base64.b64encode(raw).decode()}


@dataclass
class Shop:
    """A support agent whose `refund` tool is irreversible, with a counter of real refunds."""

    backend: Backend
    refunds: list[dict[str, Any]] = field(default_factory=list)
    tool_delay: float = 0.0
    queue: ReviewQueue = field(init=False)
    graph: Any = field(init=False)

    def __post_init__(self) -> None:
        graph = builder(on_refund=self.refunds.append, delay=lambda: self.tool_delay)
        self.graph = graph.compile(checkpointer=self.backend.checkpointer)
        self.queue = ReviewQueue(self.backend, self.graph)

    def pause(self, thread_id: str, args: dict[str, Any]) -> str:
        """Run a task until it pauses before the refund; returns the review id."""
        [item] = self.pause_many([thread_id], args)
        return item

    def pause_many(self, thread_ids: list[str], args: dict[str, Any]) -> list[str]:
        ids = []
        for tid in thread_ids:
            self.queue.invoke({"messages": [HumanMessage(json.dumps(args))]}, thread_id=tid)
            [item] = self.queue.sync(tid)
            ids.append(item.id)
        return ids

    def messages(self, thread_id: str) -> list[Any]:
        snap = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        return list(snap.values["messages"])


@pytest.fixture
def shop(tmp_path: Any) -> Iterator[Shop]:
    from checkpointers import open_backend

    # A file database: the server's threads and the test share it, like two processes would.
    with open_backend(f"sqlite:///{tmp_path / 'inbox.db'}") as backend:
        yield Shop(backend)


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve *app* with uvicorn on 127.0.0.1 at a free port, in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("inbox server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_app(queue: Any, **kwargs: Any) -> Any:
    auth = InboxAuth(
        reviewers=TOKENS, allowed_hosts=frozenset({"127.0.0.1", "localhost", "testserver"})
    )
    return create_app(queue, auth, **kwargs)


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Module scope: playwright's sync API keeps an event loop on this thread while it runs,
# which would break asyncio.run() in tests collected after the browser tests.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium driven by playwright (no browser download); fails under CI if absent."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        msg = "chromium is not installed (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"{msg} — CI=true requires the browser tests to run", pytrace=False)
        pytest.skip(f"!!! BROWSER TESTS SKIPPED: {msg}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
