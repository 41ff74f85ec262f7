"""`harness run` / `harness resume`: durable runs by graph name, and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from checkpointers import open_backend
from harness_nodes.cli import main
from tests.conftest import subprocess_env


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([*argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'harness.db'}"


# --- runs ----------------------------------------------------------------------------------


def test_run_pauses_for_review_and_resume_applies_the_decision(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    code, out, _ = _cli(capsys, "run", "support", "--db", db, "--thread", "s1")
    assert code == 0
    assert "issue_refund(invoice_id=inv_5003" in out
    assert "harness paused for review: issue_refund(" in out
    assert "paused for review: decide with `harness review`" in out
    assert "completed" not in out
    code, out, _ = _cli(
        capsys,
        "resume",
        "s1",
        "--db",
        db,
        "--decision",
        '{"type": "approve"}',
        "--reviewer",
        "alice",
    )
    assert code == 0
    assert "alice decided approve on review" in out
    assert "resumed: issue_refund →" in out
    assert "completed — Done: refunded $49.0" in out
    # The decision is in the queue's audit, so the trace shows who decided what.
    code, out, _ = _cli(capsys, "show", "s1", "--db", db)
    assert code == 0
    assert "paused → resumed" in out
    assert "review approve by alice" in out


def test_a_thread_decided_through_its_review_is_still_found_by_resume_and_review(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    # The reviewer's resume writes checkpoints without `harness run`'s metadata; the CLI
    # still finds the thread's graph in its history.
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "s3")[0] == 0
    code, out, _ = _cli(capsys, "resume", "s3", "--db", db, "--decision", '{"type": "approve"}')
    assert code == 0 and "completed" in out
    code, out, err = _cli(capsys, "resume", "s3", "--db", db)
    assert code == 0, err
    assert "thread s3 has already finished" in out
    with open_backend(db) as backend:
        [row] = backend.execute("SELECT id FROM harness_reviews WHERE thread_id = %s", ("s3",))
    code, _, err = _cli(capsys, "review", "approve", row["id"], "--db", db, "--reviewer", "bob")
    assert code == 2
    assert f"Review '{row['id']}' was already decided (approve)" in _one_line_error(err)


def test_review_decide_takes_one_decision_per_call(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    # The support graph pauses on a refund and an email at once: edit one, reject the other.
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "s4")[0] == 0
    with open_backend(db) as backend:
        [row] = backend.execute("SELECT id FROM harness_reviews WHERE thread_id = %s", ("s4",))
    code, _, err = _cli(capsys, "review", "edit", row["id"], "--db", db, "--args", "{}")
    assert code == 2 and "give one decision per call" in _one_line_error(err)
    refund = {"invoice_id": "inv_5003", "amount_usd": 20.0, "reason": "duplicate charge"}
    decisions = json.dumps([{"type": "edit", "args": refund}, {"type": "reject"}])
    code, out, err = _cli(
        capsys, "review", "decide", row["id"], "--db", db, "--decision", decisions
    )
    assert code == 0, err
    assert "edit+reject by" in out
    said = " ".join(out.split())  # the console wraps long lines
    assert "Done: refunded $20.0 (refund re_0001); the customer was not emailed." in said
    code, out, _ = _cli(capsys, "show", "s4", "--db", db)
    assert "review edit+reject by" in out


def test_resume_of_a_paused_thread_without_a_decision_is_refused(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "s2")[0] == 0
    code, _, err = _cli(capsys, "resume", "s2", "--db", db)
    assert code == 2
    assert "Thread 's2' is paused for review" in _one_line_error(err)
    code, out, err = _cli(capsys, "resume", "s2", "--db", db, "--decision", '{"type": "maybe"}')
    assert code == 2
    assert "Invalid decision" in _one_line_error(err)
    assert "decided" not in out  # nothing was decided
    code, out, _ = _cli(capsys, "resume", "s2", "--db", db, "--decision", '{"type": "reject"}')
    assert code == 0
    assert "completed — The refund was not approved" in out


def test_run_takes_the_task_text(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, _ = _cli(
        capsys, "run", "research", "--db", db, "--task", "Tell me about hydrogen salt caverns"
    )
    assert code == 0
    assert "Summary for: Tell me about hydrogen salt caverns" in out
    assert "read(doc_id=hydrogen)" in out


def test_a_crashed_run_resumes_from_its_checkpoint_in_a_new_process(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'harness.db'}"
    base = [sys.executable, "-m", "harness_nodes.cli"]
    faults = json.dumps({"faults": {"crash_at_turn": 2}})
    first = subprocess.run(
        [*base, "run", "documents", "--db", db, "--thread", "d1", "--args", faults],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert first.returncode == 2
    assert _one_line_error(first.stderr).startswith(
        "error: Run of thread 'd1' stopped: SimulatedCrash: simulated crash in model turn 2"
    )
    assert "extract_fields(doc_id=doc-006)" in first.stdout  # turn 1 done before the crash
    second = subprocess.run(
        [*base, "resume", "d1", "--db", db],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    assert "resuming thread d1 (documents)" in second.stdout
    assert "extract_fields(" not in second.stdout  # finished steps are not run again
    assert 'completed — [{"doc_id": "doc-001"' in second.stdout


def test_resume_of_a_finished_thread_says_so(capsys: pytest.CaptureFixture[str], db: str) -> None:
    assert _cli(capsys, "run", "documents", "--db", db, "--thread", "d2")[0] == 0
    code, out, _ = _cli(capsys, "resume", "d2", "--db", db)
    assert code == 0
    assert "thread d2 has already finished" in out and "completed" in out
    # a decision for a thread with nothing to decide is refused, not dropped
    code, out, err = _cli(capsys, "resume", "d2", "--db", db, "--decision", '{"type": "approve"}')
    assert code == 2
    assert "Thread 'd2' has already finished: there is no pause to decide" in _one_line_error(err)


def test_a_decision_for_a_thread_that_stopped_mid_run_is_refused(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    args = '{"faults": {"crash_at_turn": 1}}'
    code, _, _ = _cli(capsys, "run", "research", "--db", db, "--thread", "c1", "--args", args)
    assert code == 2  # the simulated crash: its checkpoints are kept
    code, _, err = _cli(capsys, "resume", "c1", "--db", db, "--decision", '{"type": "approve"}')
    assert code == 2
    assert "Thread 'c1' is not paused for review (it stopped mid-run)" in _one_line_error(err)
    code, out, _ = _cli(capsys, "resume", "c1", "--db", db)
    assert code == 0 and "completed" in out


def test_run_on_a_thread_that_holds_a_task_is_refused(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    # A run on an existing thread ran the other graph on its conversation (the support
    # ticket became a research query) or dropped its pending pause.
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "t1")[0] == 0  # paused
    code, out, err = _cli(capsys, "run", "research", "--db", db, "--thread", "t1")
    assert code == 2
    line = _one_line_error(err)
    assert "Thread 't1' already holds a support task, which is paused for review" in line
    assert "research" not in out
    assert _cli(capsys, "run", "documents", "--db", db, "--thread", "t2")[0] == 0  # finished
    code, _, err = _cli(capsys, "run", "documents", "--db", db, "--thread", "t2")
    assert code == 2
    assert "which has finished: start a new task on a new --thread" in _one_line_error(err)
    with open_backend(db) as backend:
        state = backend.checkpointer.get_tuple({"configurable": {"thread_id": "t1"}})
        pending = backend.execute(
            "SELECT id FROM harness_reviews WHERE thread_id = 't1' AND status = 'pending'"
        )
    assert state is not None
    assert state.checkpoint["channel_values"]["task"]["task_type"] == "support"  # untouched
    assert len(pending) == 1


def test_resume_takes_the_reviewer_from_the_environment(
    capsys: pytest.CaptureFixture[str], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_REVIEWER", "carol")
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "r1")[0] == 0
    code, out, _ = _cli(capsys, "resume", "r1", "--db", db, "--decision", '{"type": "approve"}')
    assert code == 0 and "carol decided approve on review" in out


def test_runaway_loop_is_stopped_by_the_budget(capsys: pytest.CaptureFixture[str], db: str) -> None:
    args = json.dumps({"faults": {"runaway": True}})
    code, out, _ = _cli(capsys, "run", "research", "--db", db, "--args", args, "--budget", "0.01")
    assert code == 0
    assert "budget_exhausted" in out and "usd limit reached" in out


def test_budget_degrades_the_model(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, _ = _cli(capsys, "run", "research", "--db", db, "--budget", "0.006")
    assert code == 0
    assert "degraded the model gpt-4o → gpt-4o-mini" in out
    assert "completed — Summary for:" in out


def test_runaway_loop_without_a_budget_is_stopped_by_the_step_limit(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    args = json.dumps({"faults": {"runaway": True}, "budget_usd": None})
    code, _, err = _cli(capsys, "run", "research", "--db", db, "--thread", "r1", "--args", args)
    assert code == 2
    assert "GraphRecursionError: no end after 100 steps" in _one_line_error(err)


def test_default_db_is_a_sqlite_file_in_the_working_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _cli(capsys, "run", "documents", "--thread", "d3")[0] == 0
    assert (tmp_path / "harness.db").is_file()
    monkeypatch.setenv("HARNESS_DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    assert _cli(capsys, "run", "documents", "--thread", "d4")[0] == 0
    assert (tmp_path / "other.db").is_file()


# --- errors: one clear line, exit code 2 ---------------------------------------------------

ERROR_CASES = [
    pytest.param(
        ["run", "graphs.quickstart"],  # a module whose build_graph takes no backend
        "error: graphs.quickstart.build_graph must take (model, *, backend, **args) to run "
        "with `harness run`: got an unexpected keyword argument 'backend'",
        id="module-without-the-builder-contract",
    ),
    pytest.param(
        ["run", "research", "--args", '{"faults": {"crash_at_turn": "two"}}'],
        "error: Fault flag crash_at_turn takes a turn number, got 'two'",
        id="fault-flag-type",
    ),
    pytest.param(
        ["run", "research", "--args", '{"faults": {"runaway": "no"}}'],
        "error: Fault flag runaway takes true or false, got 'no'",
        id="fault-flag-not-a-bool",  # "no" would have switched it on
    ),
    pytest.param(
        ["run", "support", "--db", "mysql://localhost/x"],
        "error: Cannot use backend URL 'mysql://localhost/x'",
        id="bad-db-url",
    ),
    pytest.param(
        ["run", "reserch"],
        "error: Unknown graph 'reserch': expected one of research, support, documents",
        id="unknown-graph",
    ),
    pytest.param(
        ["resume", "no-such-thread", "--db", "memory://"],
        "error: No task found for thread 'no-such-thread'",
        id="unknown-thread",
    ),
    pytest.param(  # nothing ever ran here: no database to carry a task on from
        ["resume", "no-such-thread"],
        "error: Cannot use backend URL 'sqlite:///harness.db': no database at harness.db",
        id="no-database",
    ),
    pytest.param(
        ["run", "support", "--args", "{faults: yes}"],
        "error: --args is not valid JSON",
        id="malformed-args-json",
    ),
    pytest.param(
        ["run", "support", "--args", '{"faults": "yes"}'],
        "error: faults must be an object of flag → value",
        id="faults-not-an-object",  # was read letter by letter: "Unknown fault flag(s) e, s, y"
    ),
    pytest.param(
        ["run", "support", "--args", "[1, 2]"],
        "error: --args must be a JSON object",
        id="args-not-an-object",
    ),
    pytest.param(
        ["run", "support", "--args", '{"faults": {"emtpy_results": true}}'],
        "error: Unknown fault flag(s) emtpy_results",
        id="unknown-fault-flag",
    ),
    pytest.param(
        ["run", "support", "--args", '{"colour": "red"}'],
        "error: Bad --args for graph graphs.support",
        id="unknown-builder-argument",
    ),
    pytest.param(
        ["run", "support", "--model", "openai:gpt-4o-mini"],
        "error: Cannot use model 'openai:gpt-4o-mini': OPENAI_API_KEY is not set",
        id="missing-credentials",
    ),
    pytest.param(
        ["run", "support", "--model", "gpt-4o-mini"],
        "error: Cannot use model 'gpt-4o-mini': expected provider:model",
        id="model-without-provider",
    ),
    pytest.param(
        ["run", "research", "--budget", "-1"],
        "error: --budget must be a positive number of dollars",
        id="negative-budget",
    ),
    pytest.param(
        ["run", "research", "--args", '{"budget_usd": 0.05, "model": 1}'],
        "error: Bad --args for graph graphs.research",
        id="args-clash",
    ),
    pytest.param(
        ["resume", "x", "--decision", "approve"],
        "error: --decision is not valid JSON",
        id="malformed-decision-json",
    ),
    *(
        pytest.param(
            [*command, "--db", ""],  # as `run` refuses it; these opened ./harness.db instead
            "error: Cannot use backend URL ''",
            id=f"empty-db-{command[0]}",
        )
        for command in (["show", "x"], ["runs"], ["report"])
    ),
    pytest.param(
        ["worker"],
        "error: harness worker needs a Postgres database: pass --db postgresql://... or set "
        "$HARNESS_DATABASE_URL",
        id="worker-without-a-database",
    ),
]


@pytest.mark.parametrize(("argv", "message"), ERROR_CASES)
def test_cli_errors_are_one_clear_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARNESS_DATABASE_URL", raising=False)
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert _one_line_error(err).startswith(message)
    if "" in argv:  # a refused URL opens nothing, the default file included
        assert not (tmp_path / "harness.db").exists()


def test_missing_integration_package_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("langchain")
    try:
        import langchain_openai  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("langchain-openai is installed here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    code, _, err = _cli(capsys, "run", "support", "--model", "openai:gpt-4o-mini")
    assert code == 2
    line = _one_line_error(err)
    assert re.search(r"requires the langchain-openai package", line), line


def test_errors_show_a_traceback_with_debug(capsys: pytest.CaptureFixture[str]) -> None:
    from harness_nodes import UnknownGraph

    with pytest.raises(UnknownGraph):
        main(["--debug", "run", "reserch"])


def test_report_needs_a_positive_top(capsys: pytest.CaptureFixture[str], db: str) -> None:
    assert _cli(capsys, "run", "documents", "--db", db, "--thread", "d9")[0] == 0
    for top in ("0", "-1"):  # hid the failure tables without a word
        code, out, err = _cli(capsys, "report", "--db", db, "--top", top)
        assert code == 2 and "--top" in err and not out, (top, err)


def test_a_decision_is_named_as_its_audit_row_names_it(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    # Reject the refund, edit the email: the audit row says edit+reject (its decision types,
    # sorted); `review decide` and `show` said reject+edit, in the calls' order.
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "s6")[0] == 0
    with open_backend(db) as backend:
        [row] = backend.execute("SELECT id FROM harness_reviews WHERE thread_id = %s", ("s6",))
    email = {"to": "dana@example.com", "subject": "Your refund", "body": "We are on it."}
    decisions = json.dumps([{"type": "reject"}, {"type": "edit", "args": email}])
    code, out, err = _cli(
        capsys, "review", "decide", row["id"], "--db", db, "--decision", decisions
    )
    assert code == 0, err
    with open_backend(db) as backend:
        [audit] = backend.execute(
            "SELECT decision FROM harness_review_audit WHERE review_id = %s", (row["id"],)
        )
    assert audit["decision"] == "edit+reject"
    assert "review " + row["id"] + ": edit+reject by" in " ".join(out.split())
    code, out, _ = _cli(capsys, "show", "s6", "--db", db)
    assert "review edit+reject by" in out


def test_resume_with_an_invalid_decision_says_nothing_of_resuming(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    assert _cli(capsys, "run", "support", "--db", db, "--thread", "s9")[0] == 0
    code, out, err = _cli(capsys, "resume", "s9", "--db", db, "--decision", '{"type": "nope"}')
    assert code == 2
    assert "Invalid decision" in _one_line_error(err)
    assert "resuming" not in out + err, out


def test_run_with_args_the_builder_refuses_leaves_no_new_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # support.build_graph takes **compile_kwargs, so a wrong name is refused only inside the
    # builder, after the database was opened: the file that opening created is removed.
    path = tmp_path / "harness.db"
    code, _, err = _cli(
        capsys, "run", "support", "--db", f"sqlite:///{path}", "--args", '{"no_such_arg": 1}'
    )
    assert code == 2
    assert "no_such_arg" in _one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nor its -wal/-shm files


def test_run_with_refused_args_keeps_an_existing_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "harness.db"
    url = f"sqlite:///{path}"
    assert _cli(capsys, "demo", "--db", url)[0] == 0
    size = path.stat().st_size
    code, _, _ = _cli(capsys, "run", "support", "--db", url, "--args", '{"no_such_arg": 1}')
    assert code == 2
    assert path.exists() and path.stat().st_size >= size  # what ran before is kept
    assert _cli(capsys, "runs", "--db", url)[0] == 0


# --- secrets -------------------------------------------------------------------------------

SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"


def test_run_narration_masks_api_keys_in_the_task_and_tool_calls(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    task = f"Tell me about caverns; my key is {SECRET}"
    code, out, _ = _cli(capsys, "run", "research", "--db", db, "--task", task)
    assert code == 0
    assert "research thread" in out and "read(doc_id=" in out
    assert SECRET not in out and "***" in out


def test_the_one_line_error_masks_a_secret_the_failure_quotes(
    capsys: pytest.CaptureFixture[str], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BANK_API_KEY", "bank-password-1234")
    code, _, err = _cli(
        capsys, "review", "edit", "r-1", "--db", db, "--args", "{bank-password-1234"
    )
    assert code == 2
    line = _one_line_error(err)
    assert "--args is not valid JSON" in line and "bank-password-1234" not in line


def test_run_of_a_drop_in_app_that_answers_says_completed(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    # The app's own model node writes no `outcome`; the task completed all the same, as
    # `harness runs` and `harness report` count it.
    app = "tests.harness_nodes.cli.drop_in_app"
    code, out, _ = _cli(capsys, "run", app, "--db", db, "--task", "notes?", "--thread", "d1")
    assert code == 0
    assert "completed — Found note-1." in out
    assert "unknown" not in out
    code, out, _ = _cli(capsys, "resume", "d1", "--db", db)
    assert "completed — Found note-1." in out


def test_run_of_a_drop_in_app_that_stops_says_why(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    # A MessagesState app keeps no `outcome`: the stop note in its messages reports it.
    app = "tests.harness_nodes.cli.drop_in_app"
    code, out, _ = _cli(
        capsys, "run", app, "--db", db, "--task", "notes?", "--args", '{"typo": true}'
    )
    assert code == 0
    assert "verification_failed" in out
    assert "unknown" not in out
