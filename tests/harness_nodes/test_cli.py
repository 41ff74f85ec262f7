"""The ``harness`` CLI: the demo runs on a SQLite file; bad input is one line, exit 2."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness_nodes.cli import main
from tests.conftest import subprocess_env


def test_demo_runs_the_three_graphs_and_narrates_the_harness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "demo.db"
    main(["demo", "--db", f"sqlite:///{db}"])
    out = capsys.readouterr().out
    # a retried tool output in each graph
    assert "refused the output of search (empty result" in out
    assert "refused the output of list_invoices (invoice amounts outside" in out
    assert "the tool returned an HTML page" in out and "is out of range [0, +inf]" in out
    # a pause for review, answered for the demo, and the refund made once
    assert "paused for review: issue_refund(invoice_id=inv_5003, amount_usd=49.0" in out
    assert "demo-reviewer decided approve on review" in out
    assert "Done: refunded $49.0 (refund re_0001)" in out
    assert out.count("completed —") == 3
    # a degraded model, and a runaway stopped by its budget
    assert out.count("degraded the model gpt-4o → gpt-4o-mini") == 2
    assert "stopped the task: budget_exhausted (usd limit reached" in out
    # Everything was checkpointed durably in that file, and the decision audited.
    with sqlite3.connect(db) as conn:
        threads = {r[0] for r in conn.execute("SELECT DISTINCT thread_id FROM checkpoints")}
        audit = conn.execute("SELECT reviewer, decision FROM harness_review_audit").fetchall()
    assert sorted(t.split("-")[1] for t in threads) == [
        "documents",
        "research",
        "research",
        "support",
    ]
    assert audit == [("demo-reviewer", "approve")]
    # `harness show` on the support task: the pause, the decision, the resumed steps.
    support_thread = next(t for t in threads if t.startswith("demo-support-"))
    main(["show", support_thread, "--db", f"sqlite:///{db}"])
    shown = capsys.readouterr().out
    assert "paused → resumed" in shown and "review approve by demo-reviewer" in shown
    after = shown.split("paused → resumed", 1)[1]
    assert "tool_result issue_refund" in after and "outcome completed" in after
    # `harness report`: the graphs' outcomes and costs.
    main(["report", "--db", f"sqlite:///{db}"])
    report = capsys.readouterr().out
    assert "outcomes: completed=3, budget_exhausted=1" in report
    for task_type in ("research", "support", "documents"):
        assert task_type in report.split("cost per task type", 1)[1]


def test_demo_uses_harness_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "env.db"
    monkeypatch.setenv("HARNESS_DATABASE_URL", f"sqlite:///{db}")
    main(["demo"])
    assert capsys.readouterr().out.count("completed —") == 3
    assert db.exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("mysql://root:hunter2@db/x", "unknown scheme 'mysql'", id="bad-scheme"),
        pytest.param("sqlite:////no/such/dir/x.db", "does not exist", id="missing-dir"),
        pytest.param("postgresql://u:hunter2@127.0.0.1:1/db", "Cannot open backend", id="down"),
    ],
)
def test_bad_db_url_prints_one_line_and_exits_2(
    url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--db", url])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "hunter2" not in captured.err


@pytest.mark.parametrize(
    "command",
    [
        ["runs"],
        ["report"],
        ["show", "t1"],
        ["review", "list"],
        ["review", "show", "r-1"],
        ["review", "approve", "r-1"],
        ["resume", "t1"],
    ],
    ids=lambda c: " ".join(c),
)
def test_reading_a_database_that_does_not_exist_is_an_error_not_a_new_file(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "harnes.db"
    with pytest.raises(SystemExit) as exc:
        main([*command, "--db", f"sqlite:///{typo}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"no database at {typo}" in " ".join(err.split())
    assert not typo.exists()  # the typo left no empty database behind


@pytest.mark.slow
def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness_nodes.cli", "demo", "--db", "redis://localhost/0"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: Cannot use backend URL 'redis://localhost/0': unknown scheme 'redis'. Expected "
        "memory://, sqlite:///path/to/file.db or postgresql://user@host:port/db"
    ]
    assert proc.stdout == ""


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--no-such-option"])
    assert exc.value.code == 2
    assert "No such option" in capsys.readouterr().err
