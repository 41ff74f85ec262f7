"""``harness review serve`` as a real process over a database another process paused in."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import subprocess_env
from tests.harness_nodes.inbox.conftest import TOKENS, Shop

ARGS = {"order": "A9", "amount": 42.0, "note": ""}
GRAPH = "tests.harness_nodes.inbox.shop_graph:builder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def harness(*args: str, **kw: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "harness_nodes.cli", *args]
    return subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_serve_resumes_a_task_paused_by_another_process(shop: Shop) -> None:
    rid = shop.pause("t-cli", ARGS)
    port = free_port()
    proc = harness(
        "review", "serve", "--db", shop.backend.url, "--graph", GRAPH, "--port", str(port),
        "--reviewer", f"alice:{TOKENS['alice']}",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{base}/reviews")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        assert r.status_code == 401
        api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
        assert [i["id"] for i in httpx.get(f"{base}/reviews", headers=api).json()["items"]] == [rid]
        r = httpx.post(f"{base}/reviews/{rid}/decision", headers=api, json={"type": "approve"})
        assert r.status_code == 200, r.text
        assert r.json()["outcome"]["result"] == "Refund handled."
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    # The ready line names the database by its (masked) URL, not the Backend object's repr.
    assert f"over {shop.backend.url}\n" in out, out  # whole, on one line
    assert "Backend(" not in out
    tool_msg = [m for m in shop.messages("t-cli") if m.type == "tool"][-1]
    assert tool_msg.content == "refunded 42.0 on A9"  # ran in the server process, once
    [audit] = shop.backend.execute("SELECT reviewer FROM harness_review_audit")
    assert audit["reviewer"] == "alice"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param([], "The review inbox needs reviewers", id="no-reviewers"),
        pytest.param(
            ["--allow-anonymous", "--host", "0.0.0.0"], "for local use only", id="anonymous-public"
        ),
        pytest.param(["--reviewer", "alice"], "must look like NAME:TOKEN", id="bad-reviewer"),
    ],
)
def test_serve_refuses_unsafe_configuration(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main

    argv = ["review", "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--graph", GRAPH]
    with pytest.raises(SystemExit) as info:
        main([*argv, *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("existing", "message"),
    [
        pytest.param(False, "no database at", id="missing-file"),
        pytest.param(True, "no harness data in", id="unrelated-file"),
    ],
)
def test_serve_refuses_a_database_nothing_ran_against(
    existing: bool,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sqlite3
    from contextlib import closing

    import uvicorn

    from harness_nodes.cli import main

    def served(*args: object, **kwargs: object) -> None:
        raise AssertionError("served an empty inbox")

    monkeypatch.setattr(uvicorn.Server, "run", served)
    typo = tmp_path / "typo.db"
    if existing:
        with closing(sqlite3.connect(typo)) as conn:
            conn.execute("CREATE TABLE unrelated (x INTEGER)")
    argv = ["review", "serve", "--db", f"sqlite:///{typo}", "--graph", GRAPH, "--allow-anonymous"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: ") and f"{message} {typo}: nothing has run against it" in err
    assert typo.exists() is existing  # no new file; no harness tables in the unrelated one
    if existing:
        with closing(sqlite3.connect(typo)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert tables == {"unrelated"}


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1"])
def test_serve_refuses_a_port_out_of_range_as_a_usage_error(
    port: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main

    argv = ["review", "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--graph", GRAPH]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--allow-anonymous", "--port", port])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("Usage: ") and "Invalid value for '--port'" in err  # click's words


def test_serve_on_a_port_in_use_is_a_one_line_error(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["review", "serve", "--db", shop.backend.url, "--graph", GRAPH, "--port", str(port)]
        with pytest.raises(SystemExit) as info:
            main([*argv, "--allow-anonymous"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: port {port} on 127.0.0.1 is in use\n"


def test_the_inbox_sockets_listen_at_once_so_a_second_server_is_refused() -> None:
    # Bound but not listening, a second bind of the port succeeded (SO_REUSEADDR) and the
    # second server failed later, in uvicorn (exit 3), the race the check was meant to close.
    from harness_nodes.errors import UserError
    from harness_nodes.inbox._serve import bind

    first = bind("127.0.0.1", 0)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            bind("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()


def test_an_inbox_on_the_ipv6_wildcard_takes_ipv4_clients_too() -> None:
    # `--host ::` was IPv6-only (IPV6_V6ONLY): 127.0.0.1 was refused, as uvicorn never did.
    from harness_nodes.errors import UserError
    from harness_nodes.inbox._serve import bind

    try:
        sockets = bind("::", 0)
    except UserError as e:
        pytest.skip(f"no IPv6 on this host: {e}")
    try:
        port = sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        for sock in sockets:
            sock.close()


def test_graph_option_accepts_builders_graphs_and_factories(shop: Shop) -> None:
    from harness_nodes import UserError
    from harness_nodes.inbox._serve import load_object, resolve_graph
    from tests.harness_nodes.inbox import shop_graph

    backend = shop.backend
    seen: list[object] = []

    def factory(backend: object) -> object:
        seen.append(backend)
        return shop_graph.builder()

    for obj in (
        shop_graph.builder(),  # a StateGraph
        shop_graph.builder().compile(),  # compiled without a checkpointer
        shop_graph.builder,  # a zero-argument factory
        factory,  # a factory that takes the backend
    ):
        graph = resolve_graph(obj, backend)
        assert graph.checkpointer is backend.checkpointer
    assert seen == [backend]
    assert load_object(GRAPH) is shop_graph.builder
    with pytest.raises(UserError, match="module:attribute"):
        load_object("no-colon")
    with pytest.raises(UserError, match="has no attribute"):
        load_object("tests.harness_nodes.inbox.shop_graph:nope")
    with pytest.raises(UserError, match="must name a StateGraph"):
        resolve_graph(42, backend)
