"""``harness worker`` started before its database is up waits for it, for a bounded time.

docker compose starts the worker beside Postgres: its first connections are refused (the
server is not listening yet), then refused with "the database system is starting up". The
worker used to exit with code 2 on the first one. Here the database "comes up" when a proxy
to the shared Postgres starts listening on a port that refused connections until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from harness_nodes import BackendUnavailable
from harness_nodes.background import WorkerOptions, run_worker
from tests.conftest import subprocess_env

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))


@contextlib.asynccontextmanager
async def _comes_up_after(delay: float, url: str, port: int) -> AsyncIterator[None]:
    """After *delay* seconds, 127.0.0.1:*port* forwards to the database of *url*."""
    target = urlsplit(url)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    servers: list[asyncio.Server] = []

    async def start() -> None:
        await asyncio.sleep(delay)
        servers.append(await asyncio.start_server(forward, "127.0.0.1", port))

    starting = asyncio.create_task(start())
    try:
        yield
    finally:
        starting.cancel()
        for server in servers:
            server.close()


async def test_a_worker_started_before_its_database_waits_for_it(postgres_url: str) -> None:
    port = _free_port()
    stop = asyncio.Event()
    async with _comes_up_after(1.0, postgres_url, port):
        worker = asyncio.create_task(
            run_worker(_on_port(postgres_url, port), WorkerOptions(poll_interval=0.1), stop=stop)
        )
        await asyncio.sleep(2.5)  # refused for 1 s, then up
        assert not worker.done(), worker.exception()
        stop.set()
        await asyncio.wait_for(worker, 30)


async def test_a_worker_whose_database_never_comes_up_stops_after_its_wait(
    postgres_url: str,
) -> None:
    url = _on_port(postgres_url, _free_port())
    started = asyncio.get_running_loop().time()
    with pytest.raises(BackendUnavailable, match=r"not up after 0\.5 s: .*refused") as exc:
        await run_worker(url, WorkerOptions(startup_wait=0.5))
    assert asyncio.get_running_loop().time() - started < 5
    assert exc.value.url == _on_port(postgres_url, urlsplit(url).port or 0)


async def test_a_worker_refused_by_a_running_server_fails_at_once(postgres_url: str) -> None:
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_database_here"
    started = asyncio.get_running_loop().time()
    with pytest.raises(BackendUnavailable, match="no_such_database_here"):
        await run_worker(url, WorkerOptions(startup_wait=30))
    assert asyncio.get_running_loop().time() - started < 5  # no waiting: it would not help


def test_the_worker_command_says_how_long_it_waited(postgres_url: str) -> None:
    url = _on_port(postgres_url, _free_port())
    done = subprocess.run(
        [sys.executable, "-m", "harness_nodes.cli", "worker", "--db", url, "--wait-for-db", "1"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert done.returncode == 2
    assert "waiting for the database" in done.stderr
    assert "not up after 1 s" in done.stderr
