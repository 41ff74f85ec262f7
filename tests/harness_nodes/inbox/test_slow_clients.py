"""Slow and abusive clients against ``serve()`` in a real process, over real sockets.

A pen test found the inbox could be held by clients that send their request a byte at a time
(uvicorn has no header-read timeout), or never send one. Each test here checks that a reviewer
is still answered and that the server hangs up on such clients within its limits.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from checkpointers import open_backend
from tests.conftest import subprocess_env
from tests.harness_nodes.inbox.conftest import TOKENS, Shop
from tests.harness_nodes.inbox.test_cli import ARGS, GRAPH, free_port

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
KEEP_ALIVE = 1
MARGIN = 3.0  # generous: the server is told 1.5 s, the test waits 4.5 s
API = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}

SERVER = f"""
import sys
from harness_nodes.inbox._serve import ServerLimits, serve

serve(
    db=sys.argv[1], graph={GRAPH!r}, host="127.0.0.1", port=int(sys.argv[2]),
    reviewers=["alice:{TOKENS["alice"]}"], allow_anonymous=False, allowed_hosts=None,
    page_size=50,
    limits=ServerLimits(
        header_timeout={HEADER_TIMEOUT}, body_timeout={BODY_TIMEOUT}, keep_alive={KEEP_ALIVE}
    ),
)
"""


@dataclass
class Inbox:
    port: int
    review_id: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def head(self, method: str, path: str, **headers: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"Authorization: Bearer {TOKENS['alice']}"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbox]:
    url = f"sqlite:///{tmp_path_factory.mktemp('slow') / 'inbox.db'}"
    with open_backend(url) as backend:
        review_id = Shop(backend).pause("t-slow", ARGS)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, url, str(port)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/reviews", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        yield Inbox(port, review_id)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def answered_promptly(inbox: Inbox) -> None:
    """A reviewer's request gets its answer within seconds while the slow clients hang."""
    started = time.monotonic()
    r = httpx.get(f"{inbox.base}/reviews", headers=API, timeout=10)
    assert r.status_code == 200
    assert [i["id"] for i in r.json()["items"]] == [inbox.review_id]
    assert time.monotonic() - started < 5


def drip_until_closed(socks: list[socket.socket], drip: bytes, within: float) -> dict[int, bytes]:
    """Send *drip* one byte every 0.2 s on each socket until the server hangs up on all of them.

    Returns what each socket received (by index) for those the server closed within *within*
    seconds; a socket still open then is missing from the result.
    """
    got: dict[int, bytes] = {i: b"" for i in range(len(socks))}
    closed: set[int] = set()
    deadline = time.monotonic() + within
    step = 0
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            try:
                if drip:
                    sock.send(drip[step % len(drip) : step % len(drip) + 1])
                while select.select([sock], [], [], 0)[0]:
                    data = sock.recv(65536)
                    if not data:
                        closed.add(i)
                        break
                    got[i] += data
            except OSError:  # reset or broken pipe: the server closed it
                closed.add(i)
        step += 1
        time.sleep(0.2)
    return {i: got[i] for i in closed}


def test_slow_headers_do_not_starve_reviewers_and_are_cut_off(inbox: Inbox) -> None:
    slow = [inbox.connect() for _ in range(50)]
    try:
        for sock in slow:
            sock.sendall(b"GET /reviews HTTP/1.1\r\nHo")
        answered_promptly(inbox)
        # Headers that never end, a byte every 0.2 s: held open for ever before.
        closed = drip_until_closed(slow, b"X-Slow: aaaa\r\n", HEADER_TIMEOUT + MARGIN)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow clients still held"
        answered_promptly(inbox)
    finally:
        for sock in slow:
            sock.close()


def test_a_slow_body_is_answered_408_and_the_decision_not_taken(inbox: Inbox) -> None:
    slow = [inbox.connect() for _ in range(10)]
    try:
        path = f"/reviews/{inbox.review_id}/decision"
        for sock in slow:
            sock.sendall(
                inbox.head("POST", path, content_type="application/json", content_length="200")
                + b'{"type":'
            )
        answered_promptly(inbox)
        closed = drip_until_closed(slow, b" ", BODY_TIMEOUT + MARGIN)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow bodies still held"
        assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in closed.values()), closed
    finally:
        for sock in slow:
            sock.close()
    r = httpx.get(f"{inbox.base}/reviews/{inbox.review_id}", headers=API, timeout=10)
    assert r.json()["status"] == "pending"


def send_until_answered(sock: socket.socket, head: bytes, chunk: bytes, most: int) -> bytes:
    """Send *head*, then *chunk* after chunk (at most *most* bytes) until the server answers."""
    sock.sendall(head)
    sent = 0
    reply = b""
    while sent < most:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(chunk)
        except OSError:
            break
        sent += len(chunk)
    sock.settimeout(5)
    try:
        while data := sock.recv(65536):
            reply += data
    except OSError:
        pass
    assert sent < most, f"the server took {sent} bytes without answering"
    return reply


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("application/json", id="json"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("multipart/form-data; boundary=xyz", id="multipart"),
    ],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_body_is_refused_413_before_it_is_read(
    inbox: Inbox, content_type: str, framing: str
) -> None:
    size = 50 * 1024 * 1024
    path = f"/reviews/{inbox.review_id}/decision"
    # A well-formed start, so that only the size is wrong: one huge multipart field, say.
    start = b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
    if framing == "chunked":
        head = inbox.head("POST", path, content_type=content_type, transfer_encoding="chunked")
        head += b"%x\r\n%s\r\n" % (len(start), start)
        chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
    else:
        head = inbox.head("POST", path, content_type=content_type, content_length=str(size))
        head += start
        chunk = b"a" * 0x10000
    with inbox.connect() as sock:
        reply = send_until_answered(sock, head, chunk, most=8 * 1024 * 1024)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    answered_promptly(inbox)


def test_oversized_headers_are_refused(inbox: Inbox) -> None:
    with inbox.connect() as sock:
        reply = send_until_answered(
            sock, b"GET /reviews HTTP/1.1\r\nX-Big: ", b"a" * 0x10000, most=8 * 1024 * 1024
        )
    assert reply.startswith(b"HTTP/1.1 4"), reply[:200]
    answered_promptly(inbox)


def test_idle_connections_are_closed(inbox: Inbox) -> None:
    idle = [inbox.connect() for _ in range(50)]  # connect, then say nothing
    keep_alive = inbox.connect()
    try:
        keep_alive.sendall(inbox.head("GET", "/reviews", accept="application/json"))
        answered_promptly(inbox)
        closed = drip_until_closed([*idle, keep_alive], b"", HEADER_TIMEOUT + MARGIN)
        assert len(closed) == len(idle) + 1, f"{len(idle) + 1 - len(closed)} idle clients held"
        assert closed[len(idle)].startswith(b"HTTP/1.1 200 ")  # answered, then let go
    finally:
        for sock in [*idle, keep_alive]:
            sock.close()
