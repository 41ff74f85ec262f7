"""``harness review``: list, show, approve/edit/reject/respond, on a SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from checkpointers import open_backend
from harness_nodes import ReviewQueue
from harness_nodes.cli import main
from harness_nodes.testing import ai, tool_call
from tests.conftest import subprocess_env
from tests.harness_nodes.review_app import EFFECTS, build_builder

SPEC = "tests.harness_nodes.review_app:builder"


@pytest.fixture(autouse=True)
def _reset_effects() -> None:
    EFFECTS.clear()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'harness.db'}"


def _pause(db: str, *threads: str) -> list[str]:
    with open_backend(db) as backend:
        queue = ReviewQueue(backend, build_builder().compile(checkpointer=backend.checkpointer))
        for tid in threads:
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id=tid)
        return [i.id for i in queue.pending()]


def _status(db: str, review_id: str) -> tuple[str, str | None]:
    with open_backend(db) as backend:
        [row] = backend.execute(
            "SELECT status, decided_by FROM harness_reviews WHERE id = %s", (review_id,)
        )
    return row["status"], row["decided_by"]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_and_show(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = _pause(db, "t-1", "t-2")
    code, out, _ = _cli(capsys, "review", "list", "--db", db, "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {r["reason"] for r in rows} == {"argument_rule"}
    code, out, _ = _cli(capsys, "review", "list", "--db", db, "--reason", "verification")
    assert (code, out.strip()) == (0, "no pending reviews")
    code, out, _ = _cli(capsys, "review", "show", ids[0], "--db", db, "--graph", SPEC)
    assert code == 0
    assert "refund of $250 > $100" in out
    assert "checkpoint step" in out and "model called refund" in out
    assert "status=paused" in out  # the build_trace decision tree
    # Without a graph the request's own excerpt and the checkpoint tree still show.
    code, out, _ = _cli(capsys, "review", "show", ids[0], "--db", db)
    assert code == 0 and "model called refund" in out and "status=paused" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["approve"], "refunded 250 on A1", id="approve"),
        pytest.param(["edit", "--args", '{"order": "A1", "amount": 7}'], "refunded 7", id="edit"),
        pytest.param(["reject", "--message", "not allowed"], "not allowed", id="reject"),
        pytest.param(["respond", "--message", "Done by phone."], "Done by phone.", id="respond"),
    ],
)
def test_decisions_resume_the_run(
    db: str, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    [rid] = _pause(db, "t-1")
    command, *rest = argv
    code, out, err = _cli(
        capsys, "review", command, rid, *rest, "--db", db, "--graph", SPEC, "--reviewer", "dana"
    )
    assert code == 0, err
    assert f"review {rid}: {command} by dana" in out
    assert expected in out
    assert _status(db, rid) == ("applied", "dana")
    assert EFFECTS["lookup"] == 1 and EFFECTS["refund"] == (command in ("approve", "edit"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["edit", "--args", "{amount: 7"], "--args is not valid JSON", id="bad-json"),
        pytest.param(["edit", "--args", "[1, 2]"], "--args must be a JSON object", id="not-object"),
        pytest.param(["edit", "--args", '{"order": "A1"}'], "amount: Field required", id="schema"),
    ],
)
def test_bad_edit_args_are_one_line_exit_2_and_the_item_stays_pending(
    db: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    [rid] = _pause(db, "t-1")
    code, out, err = _cli(capsys, "review", argv[0], rid, *argv[1:], "--db", db, "--graph", SPEC)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert _status(db, rid) == ("pending", None)
    assert EFFECTS == {}


def test_unknown_review_and_unusable_graph_are_one_line(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    [rid] = _pause(db, "t-1")
    code, _, err = _cli(capsys, "review", "approve", "nope", "--db", db, "--graph", SPEC)
    assert (code, err.strip()) == (2, "error: No review item 'nope'")
    code, _, err = _cli(capsys, "review", "approve", rid, "--db", db)
    assert code == 2 and "was not started by `harness run`" in err
    code, _, err = _cli(capsys, "review", "approve", rid, "--db", db, "--graph", "json:dumps")
    assert code == 2 and "--graph" in err
    assert _status(db, rid) == ("pending", None)
    # show with a graph that cannot be loaded says so too (it fell back without one, exit 0)
    code, out, err = _cli(capsys, "review", "show", rid, "--db", db, "--graph", "nosuch.mod:x")
    assert code == 2 and "nosuch" in err and len(err.strip().splitlines()) == 1, err


def test_review_list_needs_a_positive_limit(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _pause(db, "t-1")
    for limit in ("0", "-1"):  # 0 said "no pending reviews"; -1 broke Postgres's LIMIT
        code, out, err = _cli(capsys, "review", "list", "--db", db, "--limit", limit)
        assert code == 2 and "--limit" in err and not out, (limit, err)
    code, out, _ = _cli(capsys, "review", "list", "--db", db, "--limit", "1", "--json")
    assert code == 0 and len(out.splitlines()) == 1


def _column(table: str, index: int) -> str:
    """The text of one column of a one-row rich table, its folded lines joined."""
    rows = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    return "".join(cells[index].strip() for cells in rows)


def test_ids_in_the_tables_are_never_cut(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commands that take an id take it whole: an 80-column table showed "7c2c1c2e…".
    monkeypatch.setenv("COLUMNS", "80")
    thread = "support-a-rather-long-thread-id-0123456789"
    [rid] = _pause(db, thread)
    code, out, _ = _cli(capsys, "review", "list", "--db", db)
    assert code == 0
    assert _column(out, 0) == rid and _column(out, 1) == thread
    code, out, _ = _cli(capsys, "runs", "--db", db)
    assert code == 0 and _column(out, 0) == thread
    # --json gives every call whole, as key=value
    code, out, _ = _cli(capsys, "review", "list", "--db", db, "--json")
    assert json.loads(out)["calls"] == 'refund(order="A1", amount=250)'


def test_graph_factories_get_the_backend_by_keyword(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A factory like graphs.support:build_graph(model=None, *, backend=...): the backend must
    # not land in its first positional parameter.
    [rid] = _pause(db, "t-1")
    spec = "tests.harness_nodes.review_app:compiled_on"
    code, out, err = _cli(capsys, "review", "approve", rid, "--db", db, "--graph", spec)
    assert code == 0, err
    assert "refunded 250 on A1" in out
    assert _status(db, rid)[0] == "applied"


def test_a_resumed_run_that_fails_is_one_line(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open_backend(db) as backend:
        script = [ai(tool_calls=[tool_call("refund", {"order": "BANK-DOWN", "amount": 250})])]
        graph = build_builder(script).compile(checkpointer=backend.checkpointer)
        ReviewQueue(backend, graph).invoke({"messages": [HumanMessage("refund")]}, thread_id="t-f")
        [item] = ReviewQueue(backend, graph).pending()
    code, _, err = _cli(capsys, "review", "approve", item.id, "--db", db, "--graph", SPEC)
    assert code == 2
    assert err.strip() == (
        "error: Run of thread 't-f' stopped: RuntimeError: the bank is down "
        "(its checkpoints are kept: harness resume t-f)"
    ), err


MARKUP = "[/]A1 [bold red]FAKE APPROVE[/bold red]"


def test_agent_text_that_looks_like_rich_markup_is_printed_as_text(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_backend(db) as backend:
        script = [
            ai(tool_calls=[tool_call("refund", {"order": MARKUP, "amount": 250}, id="c1")]),
            ai("Done."),
        ]
        graph = build_builder(script).compile(checkpointer=backend.checkpointer)
        ReviewQueue(backend, graph).invoke({"messages": [HumanMessage(MARKUP)]}, thread_id="t[/]")
        [item] = ReviewQueue(backend, graph).pending()
    for argv in (
        ["show", "t[/]"],
        ["runs"],
        ["review", "list"],
        ["review", "show", item.id, "--graph", SPEC],
    ):
        code, out, err = _cli(capsys, *argv, "--db", db)
        assert code == 0 and not err, (argv, err)  # was a MarkupError traceback
        if "show" in argv:  # tables may cut it; these print it whole
            assert "[bold red]FAKE APPROVE" in out, (argv, out)
    code, _, err = _cli(capsys, "show", "[/]nope", "--db", db)
    assert (code, err.strip()) == (2, "error: No task found for thread '[/]nope'")


def _run_cli(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness_nodes.cli", *argv],
        env=subprocess_env(COLUMNS="200", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_approve_from_another_process(db: str, tmp_path: Path) -> None:
    [rid] = _pause(db, "t-1")
    effects = tmp_path / "effects.txt"
    proc = _run_cli(
        "review", "approve", rid, "--db", db, "--graph", SPEC, REVIEW_EFFECTS_FILE=str(effects)
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(effects.read_text().split()) == ["lookup", "refund"]
    assert _status(db, rid)[0] == "applied"
    bad = _run_cli("review", "edit", rid, "--db", db, "--graph", SPEC, "--args", "{")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"


def test_list_and_show_mask_api_keys_in_the_paused_call(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    body = f"your new key: {SECRET}"
    script = [ai(tool_calls=[tool_call("send_email", {"to": "ann@example.com", "body": body})])]
    with open_backend(db) as backend:
        graph = build_builder(script).compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph)
        queue.invoke({"messages": [HumanMessage("mail Ann her key")]}, thread_id="t-key")
        [item] = queue.pending()
    outputs = [
        _cli(capsys, "review", "list", "--db", db, "--json")[1],
        _cli(capsys, "review", "list", "--db", db)[1],
        _cli(capsys, "review", "show", item.id, "--db", db, "--graph", SPEC)[1],
        _cli(capsys, "review", "show", item.id, "--db", db)[1],
    ]
    for out in outputs:
        assert "new key" in out  # what the reviewer decides on is shown...
        assert SECRET not in out  # ...but not the key inside it
    assert all("ann@example.com" in out for out in outputs[::2])  # (the table folds it)


leaky_builder = build_builder(
    [
        ai(tool_calls=[tool_call("send_email", {"to": "ann@example.com", "body": "hi"})]),
        ai(f"Sent. Your key is {SECRET}"),
    ]
)
"""A task whose last answer repeats an API key (``--graph ...test_cli_review:leaky_builder``)."""


def test_a_decision_masks_an_api_key_in_the_last_message_it_prints(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_backend(db) as backend:
        queue = ReviewQueue(backend, leaky_builder.compile(checkpointer=backend.checkpointer))
        queue.invoke({"messages": [HumanMessage("mail Ann")]}, thread_id="t-leak")
        [item] = queue.pending()
    spec = "tests.harness_nodes.test_cli_review:leaky_builder"
    code, out, _ = _cli(capsys, "review", "approve", item.id, "--db", db, "--graph", spec)
    assert code == 0 and "last message: Sent. Your key is ***" in out
    assert SECRET not in out


def test_list_masks_the_fields_the_run_marked_sensitive(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes import langfuse_callbacks

    card = "4929123456789012"
    args = {"card": card, "to": "ann@example.com", "body": "your card"}
    script = [ai(tool_calls=[tool_call("send_email", args)])]
    with open_backend(db) as backend:
        queue = ReviewQueue(
            backend, build_builder(script).compile(checkpointer=backend.checkpointer)
        )
        config = langfuse_callbacks("t-card", sensitive_fields=["card"])  # no Langfuse: a no-op
        queue.invoke({"messages": [HumanMessage("mail Ann her card")]}, config, thread_id="t-card")
        _pause(db, "t-plain")  # a run that marked nothing: its calls are shown as they are
    _, as_json, _ = _cli(capsys, "review", "list", "--db", db, "--json")
    _, table, _ = _cli(capsys, "review", "list", "--db", db)
    calls = {row["thread_id"]: row["calls"] for row in map(json.loads, as_json.splitlines())}
    assert calls["t-card"].startswith('send_email(card="***", to="ann@example.com"')
    assert calls["t-plain"] == 'refund(order="A1", amount=250)', calls
    for out in (as_json, table):
        assert card[:6] not in out


def test_list_masks_marked_fields_at_a_second_pause_after_a_decision(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes import langfuse_callbacks

    card = "4929123456789012"
    script = [
        ai(tool_calls=[tool_call("send_email", {"to": "a", "body": "x", "card": card})]),
        ai(tool_calls=[tool_call("send_email", {"to": "b", "body": "y", "card": card})]),
        ai("done"),
    ]
    with open_backend(db) as backend:
        graph = build_builder(script).compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph)
        config = langfuse_callbacks("t-card", sensitive_fields=["card"])  # no Langfuse: a no-op
        queue.invoke({"messages": [HumanMessage("mail twice")]}, config, thread_id="t-card")
        [first] = queue.pending()
        queue.decide(first.id, {"type": "approve"}, reviewer="ann")
        [second] = queue.pending()
        assert card not in json.dumps(queue.show(second.id).item.requests)
    _, out, _ = _cli(capsys, "review", "list", "--db", db, "--json")
    assert 'to=\\"b\\"' in out and card[:6] not in out
