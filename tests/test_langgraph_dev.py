"""`langgraph.json` serves the reference graphs with LangGraph's own dev server (offline)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


def test_langgraph_json_names_the_three_reference_graphs() -> None:
    spec = json.loads((REPO_ROOT / "langgraph.json").read_text())
    assert set(spec["graphs"]) == {"research", "support", "documents"}
    for target in spec["graphs"].values():
        path, _, attr = target.partition(":")
        assert (REPO_ROOT / path).is_file() and attr == "graph"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cli = Path(sys.executable).with_name("langgraph")
    if not cli.exists() and shutil.which("langgraph") is None:
        pytest.skip('langgraph CLI not installed (pip install "langgraph-cli[inmem]")')
    # Run from a copy of the config in a temp dir so the server's state files stay out of
    # the checkout; the graph paths point back into it.
    work = tmp_path_factory.mktemp("lgdev")
    spec = json.loads((REPO_ROOT / "langgraph.json").read_text())
    spec["dependencies"] = [str(REPO_ROOT)]
    spec["graphs"] = {k: str(REPO_ROOT / v.removeprefix("./")) for k, v in spec["graphs"].items()}
    (work / "langgraph.json").write_text(json.dumps(spec))
    port = _free_port()
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [str(cli), "dev", "--no-reload", "--no-browser", "--port", str(port)],
        cwd=work,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail((work / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.parametrize("graph_id", ["research", "documents"])
async def test_a_run_completes_through_langgraph_sdk(dev_server: str, graph_id: str) -> None:
    from langgraph_sdk import get_client

    import graphs

    module = __import__(f"graphs.{graph_id}", fromlist=["DEFAULT_TASK"])
    assert graph_id in graphs.GRAPHS
    client = get_client(url=dev_server)
    thread = await client.threads.create()
    state = await client.runs.wait(
        thread["thread_id"],
        graph_id,
        input={"messages": [{"role": "human", "content": module.DEFAULT_TASK}]},
    )
    assert isinstance(state, dict)
    assert state["outcome"]["status"] == "completed"


async def test_a_support_review_shows_on_the_thread_and_resumes_with_a_command(
    dev_server: str,
) -> None:
    from langgraph_sdk import get_client

    from graphs import support

    client = get_client(url=dev_server)
    thread = await client.threads.create()
    await client.runs.wait(
        thread["thread_id"],
        "support",
        input={"messages": [{"role": "human", "content": support.DEFAULT_TASK}]},
    )
    paused = await client.threads.get(thread["thread_id"])
    assert paused["status"] == "interrupted"
    state = await client.threads.get_state(thread["thread_id"])
    requests = [r for intr in state["interrupts"] for r in intr["value"]]
    # Agent Inbox's shape: action_request + config.allow_* + description
    assert [r["action_request"]["action"] for r in requests] == ["issue_refund", "send_email"]
    assert all(r["config"]["allow_accept"] and r["description"] for r in requests)
    done = await client.runs.wait(
        thread["thread_id"], "support", command={"resume": {"type": "accept"}}
    )
    assert isinstance(done, dict)
    assert done["outcome"]["status"] == "completed"
    assert "refunded $49.0" in done["outcome"]["partial_result"]
