"""The ``harness`` CLI: the demo runs on a SQLite file; bad input is one line, exit 2."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from checkpointers._schema import MIGRATIONS, MIGRATIONS_TABLE, Dialect
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
    # The summary table shows each thread id and outcome whole (folded, not cut with "…"),
    # on an 80-column terminal: the ids are what `harness show` takes.
    rows: list[list[str]] = []
    for line in out.split("what the harness did", 1)[1].splitlines():
        parts = [p.strip() for p in line.split("│")]  # body rows only: the header uses ┃
        if len(parts) < 7:
            continue
        if parts[1]:
            rows.append(parts[1:5])
        else:  # cells folded onto this line: ids and outcomes are cut anywhere, text at spaces
            graph, thread, outcome, did = rows[-1]
            rows[-1] = [graph, thread + parts[2], outcome + parts[3], f"{did} {parts[4]}"]
    assert {row[1] for row in rows} == threads
    assert sorted(row[2] for row in rows) == [
        "budget_exhausted",
        "completed",
        "completed",
        "completed",
    ]
    # the support task's one pause held its two calls (refund, email): "2 held for review"
    # (it said "3 review", counting the decision that released them too)
    [support_row] = [row for row in rows if row[0] == "support"]
    assert " ".join(support_row[3].split()) == "1 refused, 2 held for review"
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
    err = " ".join(err.split())
    assert err.startswith("error: ") and f"no database at {typo}" in err
    # a new user's first `harness show` is told what creates the database, not URL syntax
    assert "`harness demo` or `harness run GRAPH` creates it" in err
    assert "Expected memory://" not in err
    assert not typo.exists()  # the typo left no empty database behind


def _select(url: str, sql: str) -> list[tuple[object, ...]]:
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(url) as pg:
        return pg.execute(sql.encode()).fetchall()


def _tables(url: str) -> set[str]:
    if url.startswith("sqlite:///"):
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    return {r[0] for r in _select(url, sql)}


def _run_sql(url: str, *statements: str) -> None:
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            for statement in statements:
                conn.executescript(statement)
        return
    with psycopg.connect(url, autocommit=True) as pg:
        for statement in statements:
            pg.execute(statement.encode())  # several statements, no parameters


@pytest.mark.parametrize(
    "command", [["runs"], ["report"], ["show", "t1"], ["review", "list"]], ids=" ".join
)
def test_reading_a_database_nothing_ran_against_is_an_error_and_creates_nothing(
    command: list[str], durable_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_sql(durable_url, "CREATE TABLE unrelated (x INTEGER)")  # an existing, foreign database
    with pytest.raises(SystemExit) as exc:
        main([*command, "--db", durable_url])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    where = durable_url.removeprefix("sqlite:///") if "sqlite" in durable_url else "that database"
    assert err.startswith("error: ") and f"no harness data in {where}: nothing has run" in err
    # the URL is well formed: no list of URL forms, and the URL is named once
    assert "Expected memory://" not in err and err.count(durable_url) == 1
    assert _tables(durable_url) == {"unrelated"}  # no harness schema left behind


def _older_harness_schema(url: str) -> None:
    dialect: Dialect = "sqlite" if url.startswith("sqlite:") else "postgres"
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    _run_sql(
        url,
        MIGRATIONS_TABLE.format(float=real),
        MIGRATIONS[0].sql(dialect),
        f"INSERT INTO harness_migrations VALUES ('{MIGRATIONS[0].name}', 0)",
    )


def _langgraph_checkpoints_only(url: str) -> None:
    if url.startswith("sqlite:///"):
        from langgraph.checkpoint.sqlite import SqliteSaver

        with SqliteSaver.from_conn_string(url.removeprefix("sqlite:///")) as saver:
            saver.setup()
        return
    from langgraph.checkpoint.postgres import PostgresSaver

    with PostgresSaver.from_conn_string(url) as pg_saver:
        pg_saver.setup()


@pytest.mark.parametrize(
    "prepare",
    [
        pytest.param(_older_harness_schema, id="older-harness-schema"),
        pytest.param(_langgraph_checkpoints_only, id="langgraph-checkpoints"),
    ],
)
def test_reading_an_older_harness_or_a_langgraph_database_opens_and_migrates_it(
    prepare: Callable[[str], None], durable_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare(durable_url)
    main(["runs", "--db", durable_url])
    assert "recent runs" in capsys.readouterr().out
    applied = {r[0] for r in _select(durable_url, "SELECT name FROM harness_migrations")}
    assert applied == {m.name for m in MIGRATIONS}


def test_reading_a_database_that_does_not_answer_is_backend_unavailable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["runs", "--db", "postgresql://u:hunter2@127.0.0.1:1/db"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot open backend 'postgresql://u:***@127.0.0.1:1/db'")
    assert len(err.strip().splitlines()) == 1 and "hunter2" not in err


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
