"""TaskRunner: idempotent submission, one process per thread, recovery, cancellation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import Command, interrupt

from checkpointers import Backend, open_backend
from harness_nodes import (
    InvalidDecision,
    RunFailed,
    TaskNotFinished,
    TaskNotPaused,
    TaskRunner,
    UnknownTask,
    UserError,
)
from tests.conftest import subprocess_env
from tests.harness_nodes import _chaos_graph as chaos

GRAPH = "tests.harness_nodes._chaos_graph:build"


@pytest.fixture
def memory_backend() -> Iterator[Backend]:
    with open_backend("memory://") as backend:
        yield backend


INPUT = {"messages": [HumanMessage("refund my order")]}


def linear_chain(backend: Backend, thread_id: str) -> list[str]:
    """The thread's checkpoints (root namespace), asserting they form one linear chain."""
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    items = list(backend.checkpointer.list(config))  # type: ignore[arg-type]
    ids = {t.config["configurable"]["checkpoint_id"] for t in items}
    parents = [
        t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None for t in items
    ]
    assert parents.count(None) == 1, "more than one root checkpoint"
    children = Counter(p for p in parents if p is not None)
    assert all(n == 1 for n in children.values()), f"forked chain: {children}"
    assert all(p in ids for p in parents if p is not None), "dangling parent"
    return sorted(ids)


def node_runs(backend: Backend, thread_id: str) -> Counter[tuple[str, int]]:
    return Counter((r["node"], r["step"]) for r in chaos.steps(backend, thread_id))


def test_concurrent_and_repeated_submissions_make_one_run(backend: Backend) -> None:
    with TaskRunner(backend, chaos.build, max_workers=4) as runner:
        outcomes: list[dict[str, Any]] = []
        barrier = threading.Barrier(20)

        def client() -> None:
            barrier.wait()
            runner.submit("order-17", INPUT, task_type="support")
            outcomes.append(runner.result("order-17", timeout=60))

        clients = [threading.Thread(target=client) for _ in range(20)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        for _ in range(5):  # retries after completion
            again = runner.submit("order-17", INPUT, task_type="support")
            assert again.status == "completed"
            outcomes.append(runner.result("order-17", timeout=5))

    assert len(outcomes) == 25
    assert all(o == {"status": "completed", "partial_result": "all done"} for o in outcomes)
    run = runner.status("order-17")
    assert (run.attempts, run.task_type, run.thread_id) == (1, "support", "order-17")
    assert chaos.world(backend, "order-17") == ["refund", "email"]
    assert all(n == 1 for n in node_runs(backend, "order-17").values())
    assert sum(node == "agent" for node, _ in node_runs(backend, "order-17")) == 4
    linear_chain(backend, "order-17")


def test_unknown_key_and_bad_arguments_are_typed(memory_backend: Backend) -> None:
    backend = memory_backend
    with TaskRunner(backend, chaos.build) as runner:
        with pytest.raises(UnknownTask, match="order-404") as e:
            runner.status("order-404")
        assert e.value.task_key == "order-404"
        with pytest.raises(UnknownTask):
            runner.result("order-404", timeout=0)
        with pytest.raises(UserError, match="task_key"):
            runner.submit("", INPUT)
    with pytest.raises(UserError, match="import path"):
        TaskRunner(backend, chaos.build, queue=object())  # type: ignore[arg-type]
    with pytest.raises(UserError, match="graph path looks like"):
        TaskRunner(backend, "no_colon_here")
    with pytest.raises(UserError, match="needs a StateGraph"):
        TaskRunner(backend, 42)


def _flaky_graph(failures: int) -> StateGraph[MessagesState]:
    calls = {"n": 0}

    def flaky(state: MessagesState) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise ConnectionError(f"database went away (call {calls['n']})")
        return {"messages": [AIMessage(f"ok after {calls['n']} calls")]}

    builder = StateGraph(MessagesState)
    builder.add_node("flaky", flaky)
    builder.add_edge(START, "flaky")
    builder.add_edge("flaky", END)
    return builder


def test_a_failing_attempt_is_retried_then_the_task_completes(backend: Backend) -> None:
    with TaskRunner(backend, _flaky_graph(failures=2), max_attempts=3) as runner:
        runner.submit("t-flaky", INPUT)
        assert runner.result("t-flaky", timeout=30)["partial_result"] == "ok after 3 calls"
        assert runner.status("t-flaky").error is None


def _router_failing_once(failures: int = 1) -> StateGraph[MessagesState]:
    """A graph whose router out of START fails on its first attempts (its input not taken)."""
    failed: list[bool] = []

    def route(state: MessagesState) -> str:
        if len(failed) < failures:
            failed.append(True)
            raise ConnectionError("the routing service went away")
        return "agent"

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(f"answered {len(state['messages'])} message(s)")]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_conditional_edges(START, route, ["agent"])
    builder.add_edge("agent", END)
    return builder


def test_an_attempt_that_failed_on_its_input_is_retried_with_it(backend: Backend) -> None:
    # LangGraph keeps the failed input step's writes; carried on with None they are applied
    # but never routed, and the task "completed" with the user's own message as its result.
    with TaskRunner(backend, _router_failing_once(failures=2), max_attempts=3) as runner:
        runner.submit("t-start", INPUT)
        assert runner.result("t-start", timeout=30)["partial_result"] == "answered 1 message(s)"
        state = runner.graph.get_state({"configurable": {"thread_id": "t-start"}})
        assert [m.type for m in state.values["messages"]] == ["human", "ai"]  # input once
    # Failing on every attempt, it fails; it never "completes" on the user's message.
    with TaskRunner(backend, _router_failing_once(failures=9), max_attempts=3) as runner:
        runner.submit("t-start-down", INPUT)
        with pytest.raises(RunFailed, match="routing service went away"):
            runner.result("t-start-down", timeout=30)


def test_a_task_failing_every_attempt_is_failed_with_its_reason(backend: Backend) -> None:
    with TaskRunner(backend, _flaky_graph(failures=5), max_attempts=2) as runner:
        runner.submit("t-broken", INPUT)
        with pytest.raises(RunFailed, match="database went away") as e:
            runner.result("t-broken", timeout=30)
        assert e.value.thread_id == "t-broken"
        run = runner.status("t-broken")
        assert run.status == "failed" and run.finished_at is not None
        assert run.error == "ConnectionError: database went away (call 2)"


def _review_graph() -> StateGraph[MessagesState]:
    def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": "approve?"})
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder


def test_a_paused_task_waits_for_its_reviewer_not_for_recover(backend: Backend) -> None:
    with TaskRunner(backend, _review_graph(), lease_seconds=0.2) as runner:
        runner.submit("t-review", INPUT)
        with pytest.raises(TaskNotFinished, match="interrupted") as e:
            runner.result("t-review", timeout=0.5)
        assert (e.value.task_key, e.value.status) == ("t-review", "interrupted")
        time.sleep(0.3)
        assert runner.recover() == []
        resumed = runner.resume("t-review", "yes")
        assert resumed.status == "completed"
        assert runner.result("t-review", timeout=1)["partial_result"] == "reviewer said yes"

        # Resumed outside the runner (as ReviewQueue.decide does): result() still sees it.
        runner.submit("t-review-2", INPUT)
        with pytest.raises(TaskNotFinished):
            runner.result("t-review-2", timeout=0.3)
        config = {"configurable": {"thread_id": "t-review-2"}}
        runner.graph.invoke(Command(resume="ok"), config, durability="sync")
        assert runner.result("t-review-2", timeout=1)["partial_result"] == "reviewer said ok"


def _two_pause_graph() -> StateGraph[MessagesState]:
    def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": f"approve step {len(state['messages'])}?"})
        return {"messages": [AIMessage(f"reviewer said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("first", ask)
    builder.add_node("second", ask)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder


def _wait_paused(runner: TaskRunner, task_key: str) -> None:
    deadline = time.monotonic() + 30
    while runner.status(task_key).status != "interrupted":
        assert time.monotonic() < deadline, runner.status(task_key)
        time.sleep(0.02)


def test_a_task_resumed_by_a_runner_without_its_marks_keeps_them_at_its_next_pause(
    backend: Backend,
) -> None:
    # A worker or `harness resume` rebuilds the runner without the config that marked the
    # task's fields sensitive; the review lists and the inbox item page read the newest
    # checkpoint's metadata only, so the resume must write the marks there too.
    from harness_nodes._trace_langfuse import SENSITIVE_FIELDS_KEY, marked_fields

    marks: Any = {"metadata": {SENSITIVE_FIELDS_KEY: "card"}}
    config: Any = {"configurable": {"thread_id": "t-marks"}}
    with TaskRunner(backend, _two_pause_graph(), config=marks) as runner:
        runner.submit("t-marks", INPUT)
        _wait_paused(runner, "t-marks")
        assert marked_fields([runner.graph.get_state(config).metadata]) == ["card"]
    with TaskRunner(backend, _two_pause_graph()) as unmarked:
        assert unmarked.resume("t-marks", "yes").status == "interrupted"
        assert marked_fields([unmarked.graph.get_state(config).metadata]) == ["card"]


def _hold_lease(backend: Backend, thread_id: str) -> None:
    """Another runner claims the paused task's lease (it is answering the pause)."""
    from harness_nodes._lease import claim

    assert backend.execute(*claim(thread_id, "elsewhere:1:held", 30, resuming=True))


def test_resuming_a_task_that_is_not_paused_is_refused_not_reported_as_resumed(
    backend: Backend,
) -> None:
    with TaskRunner(backend, _review_graph()) as runner:
        runner.submit("t-held", INPUT)
        with pytest.raises(TaskNotFinished, match="interrupted"):
            runner.result("t-held", timeout=2)
        _hold_lease(backend, "t-held")
        with pytest.raises(TaskNotPaused, match=re.escape("another runner holds it")) as e:
            runner.resume("t-held", "yes")
        assert (e.value.task_key, e.value.status) == ("t-held", "running")
        state = runner.graph.get_state({"configurable": {"thread_id": "t-held"}})
        assert [i.value for i in state.interrupts] == [{"question": "approve?"}]  # unanswered
        assert runner.status("t-held").attempts == 2  # its run and the other claim; not ours

        runner.submit("t-done", INPUT)
        with pytest.raises(TaskNotFinished, match="interrupted"):
            runner.result("t-done", timeout=2)
        assert runner.resume("t-done", "yes").status == "completed"
        with pytest.raises(TaskNotPaused, match=re.escape("(completed: it has finished)")) as e:
            runner.resume("t-done", "no")  # a second answer: the first one stands
        assert (e.value.task_key, e.value.status) == ("t-done", "completed")
        assert runner.result("t-done", timeout=1)["partial_result"] == "reviewer said yes"
        assert runner.status("t-done").attempts == 2
        with pytest.raises(UnknownTask, match="t-nope"):
            runner.resume("t-nope", "yes")


def test_a_malformed_review_decision_leaves_the_task_paused_for_a_corrected_one(
    backend: Backend,
) -> None:
    from tests.harness_nodes.review_app import EFFECTS, build_builder

    EFFECTS.clear()
    with TaskRunner(backend, build_builder()) as runner:
        runner.submit("t-typo", {"messages": [HumanMessage("refund A1")]})
        with pytest.raises(TaskNotFinished, match="interrupted"):
            runner.result("t-typo", timeout=2)
        with pytest.raises(InvalidDecision, match="Input should be .approve."):
            runner.resume("t-typo", {"type": "approved"})  # a typo: nothing runs
        assert runner.status("t-typo").status == "interrupted"
        assert "refund" not in EFFECTS
        done = runner.resume("t-typo", {"type": "approve"})
        assert done.status == "completed", done.error
        assert EFFECTS["refund"] == 1
        assert "refunded 250 on A1" in runner.result("t-typo", timeout=1)["partial_result"]


KILLED_IN_RESUME = """
import sys
from checkpointers import open_backend
from harness_nodes import TaskRunner
from harness_nodes.testing import ai, tool_call
from tests.harness_nodes.review_app import build_builder
script = [ai(tool_calls=[tool_call("refund", {"order": "KILL", "amount": 250})]), "ok"]
with open_backend(sys.argv[1]) as backend:
    runner = TaskRunner(backend, build_builder(script=script), lease_seconds=0.5)
    runner.resume("t-killed", {"type": "approve"})  # killed inside the approved refund
"""


@pytest.mark.slow
def test_a_run_killed_after_its_review_decision_is_carried_on_by_recover(
    durable_url: str,
) -> None:
    import signal

    from harness_nodes.testing import ai, tool_call
    from tests.harness_nodes.review_app import EFFECTS, KILL_ENV, build_builder

    EFFECTS.clear()
    script = [ai(tool_calls=[tool_call("refund", {"order": "KILL", "amount": 250})]), "ok"]
    with open_backend(durable_url) as backend:
        with TaskRunner(backend, build_builder(script=script), lease_seconds=0.5) as runner:
            runner.submit("t-killed", {"messages": [HumanMessage("refund")]})
            deadline = time.monotonic() + 30
            while runner.status("t-killed").status != "interrupted":  # paused for review
                assert time.monotonic() < deadline, runner.status("t-killed")
                time.sleep(0.02)
            proc = subprocess.run(
                [sys.executable, "-c", KILLED_IN_RESUME, durable_url],
                env=subprocess_env(**{KILL_ENV: "1"}),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            # The decision was applied (the run is past its pause) and its process is gone:
            # the task is running on a lease nobody renews, not paused.
            config = {"configurable": {"thread_id": "t-killed"}}
            state = runner.graph.get_state(config)
            assert (state.next, state.interrupts) == (("tools",), ())
            assert runner.status("t-killed").status == "running"
            deadline = time.monotonic() + 30
            while not (recovered := runner.recover()):  # once the lease has expired
                assert time.monotonic() < deadline, runner.status("t-killed")
                time.sleep(0.05)
            assert recovered == ["t-killed"]
            assert runner.result("t-killed", timeout=30)["partial_result"] == "ok"
            assert runner.status("t-killed").attempts == 3  # run, resume, recovery
    assert EFFECTS["refund"] == 1  # the recovery's (the killed one never got that far)


def test_a_compiled_graph_is_rebound_to_the_runners_checkpointer(memory_backend: Backend) -> None:
    builder = StateGraph(MessagesState)
    builder.add_node("answer", lambda state: {"messages": [AIMessage("42")]})
    builder.add_edge(START, "answer")
    builder.add_edge("answer", END)
    with TaskRunner(memory_backend, builder.compile()) as runner:
        runner.submit("q", INPUT)
        assert runner.result("q", timeout=10)["partial_result"] == "42"
    assert memory_backend.checkpointer.get_tuple({"configurable": {"thread_id": "q"}})


def test_recover_resumes_runs_whose_process_died(durable_url: str) -> None:
    with open_backend(durable_url) as backend:
        # The dead run's lease expired long ago, whatever the lease length: a lease long
        # enough that the recovered run keeps its own on a loaded machine (heartbeats late).
        with TaskRunner(backend, GRAPH, lease_seconds=5) as runner:
            # A run that died: its row says running, its lease expired long ago. And one
            # whose lease is still live (another process is on it): left alone.
            for key, expires in (("t-dead", 1.0), ("t-alive", time.time() + 60)):
                backend.execute(
                    "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, "
                    "input, lease_owner, lease_expires_at, attempts, created_at, updated_at) "
                    "VALUES (%s, %s, 'support', %s, 'running', %s, 'gone:1:x', %s, 1, 1, 1)",
                    (key, key, GRAPH, json.dumps({"json": {"messages": []}}), expires),
                )
            assert runner.recover() == ["t-dead"]
            assert runner.result("t-dead", timeout=30)["status"] == "completed"
            assert runner.status("t-dead").attempts == 2
            assert runner.status("t-alive").status == "running"
            assert chaos.world(backend, "t-dead") == ["refund", "email"]


def _slow_graph(started: threading.Event) -> StateGraph[MessagesState]:
    def step(state: MessagesState) -> dict[str, Any]:
        started.set()
        time.sleep(0.4)
        return {"messages": [AIMessage(f"step {len(state['messages'])}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", lambda s: END if len(s["messages"]) > 6 else "step")
    return builder


def test_cancel_stops_a_running_task_at_its_next_step(backend: Backend) -> None:
    started = threading.Event()
    with TaskRunner(backend, _slow_graph(started), lease_seconds=0.3) as runner:
        runner.submit("t-cancel", INPUT)
        assert started.wait(10)
        cancelled = runner.cancel("t-cancel")
        assert cancelled.status == "cancelled"
        assert runner.result("t-cancel", timeout=1) == {"status": "cancelled"}
    # The running attempt stopped writing: far fewer than the 6 steps it had to go.
    config = {"configurable": {"thread_id": "t-cancel", "checkpoint_ns": ""}}
    checkpoints = list(backend.checkpointer.list(config))  # type: ignore[arg-type]
    assert len(checkpoints) <= 4
    assert runner.cancel("t-cancel").status == "cancelled"  # idempotent


CONTENDER = """
import sys, time
from pathlib import Path
from checkpointers import open_backend
from harness_nodes import TaskRunner
url, barrier, index = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
with open_backend(url) as backend:
    runner = TaskRunner(backend, "tests.harness_nodes._chaos_graph:build", lease_seconds=5)
    (barrier / f"ready-{index}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.005)
    run = runner.execute("t-shared")
    print(run.status)
"""


@pytest.mark.slow
def test_two_workers_on_one_thread_never_interleave(durable_url: str, tmp_path: Path) -> None:
    with open_backend(durable_url) as backend:
        chaos.create_tables(backend)
        backend.execute(
            "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, input, "
            "attempts, created_at, updated_at) VALUES ('t-shared', 't-shared', 'support', %s, "
            "'pending', %s, 0, 1, 1)",
            (GRAPH, json.dumps({"json": {"messages": []}})),
        )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, durable_url, str(tmp_path), str(i)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(out.strip())
    # One ran it to the end; the other found it claimed (running) or already completed.
    assert "completed" in results
    with open_backend(durable_url) as backend:
        run = backend.execute("SELECT * FROM harness_runs WHERE thread_id = 't-shared'")[0]
        assert (run["status"], run["attempts"]) == ("completed", 1)
        assert chaos.world(backend, "t-shared") == ["refund", "email"]
        assert all(n == 1 for n in node_runs(backend, "t-shared").values())
        assert len(linear_chain(backend, "t-shared")) == 9


@pytest.mark.postgres
def test_connection_loss_mid_run_retries_and_loses_nothing(postgres_url: str) -> None:
    admin = psycopg.connect(postgres_url, autocommit=True)
    dbname = postgres_url.rsplit("/", 1)[-1]
    killed = {"n": 0}

    def terminate_all_connections() -> None:
        killed["n"] += 1
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )

    def outage_after_refund(state: MessagesState) -> None:
        if len(state["messages"]) == 3 and killed["n"] == 0:
            # After the refund, mid-step: the connections are cut while a statement of this
            # run is in flight, so the step fails (an idle pooled connection would simply be
            # replaced by the pool's check).
            threading.Timer(0.1, terminate_all_connections).start()
            with psycopg.connect(postgres_url) as conn:
                conn.execute("SELECT pg_sleep(5)")

    def sabotaged(backend: Backend) -> StateGraph[MessagesState]:
        return chaos.build(backend, on_agent=outage_after_refund)

    try:
        with open_backend(postgres_url) as backend:
            with TaskRunner(backend, sabotaged, max_attempts=4) as runner:
                runner.submit("t-outage", INPUT)
                outcome = runner.result("t-outage", timeout=60)
            assert killed["n"] == 1
            assert outcome == {"status": "completed", "partial_result": "all done"}
            assert chaos.world(backend, "t-outage") == ["refund", "email"]
            runs = node_runs(backend, "t-outage")
            # Only the step in flight at the outage ran twice.
            assert sorted(k for k, n in runs.items() if n > 1) == [("agent", 3)]
            linear_chain(backend, "t-outage")
    finally:
        admin.close()


def test_harness_resume_carries_a_runner_task_on_under_its_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main

    url = f"sqlite:///{tmp_path / 'harness.db'}"
    with open_backend(url) as backend:
        chaos.create_tables(backend)
        backend.execute(
            "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, input, "
            "lease_owner, lease_expires_at, attempts, created_at, updated_at) "
            "VALUES ('t-cli', 't-cli', 'support', %s, 'running', %s, 'gone:1:x', 1, 1, 1, 1)",
            (GRAPH, json.dumps({"json": {"messages": [["human", "refund"]]}})),
        )
    main(["resume", "t-cli", "--db", url])
    assert "task t-cli: completed" in capsys.readouterr().out
    with open_backend(url) as backend:
        assert chaos.world(backend, "t-cli") == ["refund", "email"]
        assert TaskRunner(backend, GRAPH).status("t-cli").attempts == 2


def test_harness_resume_of_a_runner_task_that_is_not_paused_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main

    url = f"sqlite:///{tmp_path / 'harness.db'}"
    with open_backend(url) as backend:
        chaos.create_tables(backend)
        with TaskRunner(backend, GRAPH) as runner:
            outcome = runner.run("t-cli-done", INPUT, timeout=60)
    with pytest.raises(SystemExit) as e:
        main(["resume", "t-cli-done", "--db", url, "--decision", '{"type": "approve"}'])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "completed" not in out  # not reported as if the decision had been applied
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line == (
        "error: Task 't-cli-done' is not paused for review (completed: it has finished); "
        "nothing was resumed"
    )
    with open_backend(url) as backend:
        assert TaskRunner(backend, GRAPH).result("t-cli-done", timeout=1) == outcome


REVIEW_GRAPH = "tests.harness_nodes.review_app:builder"


def test_harness_resume_of_a_runner_task_whose_run_then_fails_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The approved refund fails on every attempt: the resume did not carry the task to an
    # end, so the command fails (exit 2, the one-line error), as `harness review approve`
    # does — not a "failed" status line that exits 0.
    from harness_nodes.cli import main

    graph = "tests.harness_nodes.review_app:bank_down_builder"
    url = f"sqlite:///{tmp_path / 'harness.db'}"
    with open_backend(url) as backend, TaskRunner(backend, graph) as runner:
        runner.submit("t-bank-down", INPUT)
        deadline = time.monotonic() + 30
        while runner.status("t-bank-down").status != "interrupted":
            assert time.monotonic() < deadline, runner.status("t-bank-down")
            time.sleep(0.02)
    argv = ["resume", "t-bank-down", "--db", url, "--reviewer", "ana"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--decision", '{"type": "approve"}'])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "task t-bank-down: failed" in captured.out
    assert "the bank is down" in captured.err
    with open_backend(url) as backend:
        assert TaskRunner(backend, graph).status("t-bank-down").status == "failed"
    # Carrying on a task that had already failed is not a new failure: its status, exit 0.
    main(argv)
    assert "task t-bank-down: failed" in capsys.readouterr().out


def test_harness_resume_decides_a_runner_tasks_review_in_the_queue_with_its_reviewer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `harness resume THREAD --decision` for a runner's task: the answer to a review pause
    # is validated, audited with --reviewer and applied under the lease, as for a thread
    # without a runner (`ReviewQueue.decide` with the runner), not resumed around the queue.
    from harness_nodes import ReviewQueue
    from harness_nodes.cli import main
    from tests.harness_nodes.review_app import EFFECTS

    EFFECTS.clear()
    url = f"sqlite:///{tmp_path / 'harness.db'}"
    with open_backend(url) as backend, TaskRunner(backend, REVIEW_GRAPH) as runner:
        runner.submit("t-cli-review", INPUT)
        deadline = time.monotonic() + 30
        while runner.status("t-cli-review").status != "interrupted":
            assert time.monotonic() < deadline, runner.status("t-cli-review")
            time.sleep(0.02)
        [item] = ReviewQueue(backend, runner.graph).pending()
    argv = ["resume", "t-cli-review", "--db", url, "--reviewer", "ana", "--decision"]
    with pytest.raises(SystemExit) as e:
        main([*argv, '{"type": "approved"}'])  # a typo: refused, nothing claimed or audited
    assert e.value.code == 2
    assert "Input should be 'approve'" in capsys.readouterr().err
    main([*argv, '{"type": "approve"}'])
    out = capsys.readouterr().out
    with open_backend(url) as backend:
        runner = TaskRunner(backend, REVIEW_GRAPH)
        queue = ReviewQueue(backend, runner.graph)
        assert queue.pending() == []  # `harness review list` has nothing left
        done = queue.get(item.id)
        assert (done.status, done.decided_by) == ("applied", "ana")
        audit = [(a["reviewer"], a["decision"]) for a in queue.show(item.id).audit]
        assert audit == [("ana", "approve")]
        assert runner.status("t-cli-review").attempts == 2  # its run, then the decision's
    assert EFFECTS == {"refund": 1, "lookup": 1}
    assert f"review {item.id}: approve by ana" in out
    assert "task t-cli-review: completed" in out
    main(["show", "t-cli-review", "--db", url])
    assert "review approve by ana" in capsys.readouterr().out  # not "reviewer not recorded"


def test_harness_resume_of_a_runner_task_keeps_its_marked_fields_masked_at_the_next_pause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `harness resume` builds the task's runner without its config (the marks): the second
    # pause's newest checkpoint must still carry them, or `harness review list` shows them.
    from harness_nodes._trace_langfuse import SENSITIVE_FIELDS_KEY
    from harness_nodes.cli import main
    from tests.harness_nodes.review_app import CARD, EFFECTS

    EFFECTS.clear()
    graph = "tests.harness_nodes.review_app:mail_twice_builder"
    marks: Any = {"metadata": {SENSITIVE_FIELDS_KEY: "card"}}
    url = f"sqlite:///{tmp_path / 'harness.db'}"
    with open_backend(url) as backend, TaskRunner(backend, graph, config=marks) as runner:
        runner.submit("t-cli-marks", INPUT)
        _wait_paused(runner, "t-cli-marks")
    argv = ["resume", "t-cli-marks", "--db", url, "--reviewer", "ana"]
    main([*argv, "--decision", '{"type": "approve"}'])
    assert "task t-cli-marks: interrupted" in capsys.readouterr().out
    main(["review", "list", "--db", url, "--json"])
    out = capsys.readouterr().out
    assert 'to=\\"b\\"' in out and CARD[:6] not in out


def test_background_queue_needs_postgres() -> None:
    from harness_nodes import JobQueue

    with pytest.raises(UserError, match="Background runs need Postgres"):
        JobQueue("sqlite:///x.db")
    assert "***" in repr(JobQueue("postgresql://u:secret@127.0.0.1:5432/app"))


def test_harness_worker_refuses_a_database_it_cannot_queue_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main

    with pytest.raises(SystemExit) as e:
        main(["worker", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert e.value.code == 2
    assert "Background runs need Postgres" in capsys.readouterr().err


@pytest.mark.parametrize("database", ["dead-port", "no-such-database"])
def test_harness_worker_on_a_database_that_does_not_answer_is_a_one_line_error(
    database: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness_nodes.cli import main
    from tests.conftest import _with_db

    if database == "dead-port":
        url, masked = "postgresql://u:hunter2@127.0.0.1:1/db", "postgresql://u:***@127.0.0.1:1/db"
    else:
        url = masked = _with_db(request.getfixturevalue("postgres_server"), "dbopen_no_such_db")
    with pytest.raises(SystemExit) as e:
        # No start-up wait: waiting for a database still starting is test_worker_startup's.
        main(["worker", "--db", url, "--wait-for-db", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err  # the worker's banner, then the error on one line
    assert err.strip().splitlines()[-1].startswith(f"error: Cannot open backend {masked!r}: ")
    assert "Traceback" not in err and "hunter2" not in err


def test_job_queue_on_a_database_that_does_not_answer_raises_backend_unavailable() -> None:
    from harness_nodes import BackendUnavailable, JobQueue

    queue = JobQueue("postgresql://u:hunter2@127.0.0.1:1/db")
    with pytest.raises(BackendUnavailable, match=re.escape("'postgresql://u:***@127.0.0.1:1/db'")):
        queue.setup()
    with pytest.raises(BackendUnavailable) as exc:
        queue.defer("t1", GRAPH)  # sets the queue up first
    assert exc.value.url == "postgresql://u:***@127.0.0.1:1/db" and exc.value.reason


FROZEN = """
import sys
from checkpointers import open_backend
from harness_nodes import TaskRunner
with open_backend(sys.argv[1]) as backend:
    run = TaskRunner(backend, "tests.harness_nodes._chaos_graph:build", lease_seconds=1.0)
    print(run.execute("t-frozen").status)
"""


@pytest.mark.slow
@pytest.mark.postgres
def test_a_frozen_worker_cannot_write_after_another_took_over(postgres_url: str) -> None:
    import os
    import signal

    with open_backend(postgres_url) as backend:
        chaos.create_tables(backend)
        backend.execute(
            "INSERT INTO harness_runs (thread_id, task_key, task_type, graph, status, input, "
            "attempts, created_at, updated_at) VALUES ('t-frozen', 't-frozen', 'support', %s, "
            "'pending', %s, 0, 1, 1)",
            (GRAPH, json.dumps({"json": {"messages": [["human", "refund"]]}})),
        )
        env = subprocess_env(CHAOS_STEP_SLEEP="0.6", CHAOS_EFFECT_SLEEP="0")
        frozen = subprocess.Popen(
            [sys.executable, "-c", FROZEN, postgres_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            # Freeze it (a VM pause, a stop-the-world GC) inside its second agent step.
            while sum(s["node"] == "agent" for s in chaos.steps(backend, "t-frozen")) < 2:
                assert time.monotonic() < deadline and frozen.poll() is None, frozen.stderr
                time.sleep(0.01)
            os.kill(frozen.pid, signal.SIGSTOP)
            time.sleep(1.5)  # its lease expires
            with TaskRunner(backend, GRAPH, lease_seconds=1.0) as runner:
                assert runner.recover() == ["t-frozen"]
                assert runner.result("t-frozen", timeout=60)["status"] == "completed"
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        out, err = frozen.communicate(timeout=60)
        # It woke up mid-step, tried to write, found the lease gone and stopped.
        assert frozen.returncode == 0, err
        assert out.strip() == "completed"  # the task as the other worker left it
        run = runner.status("t-frozen")
        assert (run.status, run.attempts) == ("completed", 2)
        assert chaos.world(backend, "t-frozen") == ["refund", "email"]
        assert len(linear_chain(backend, "t-frozen")) == 9


def test_result_polling_rides_out_a_dropped_connection(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passing database fault while waiting is not the task's failure."""
    import sqlite3

    with TaskRunner(backend, GRAPH) as runner:
        runner.submit("t-flaky-poll", INPUT)
        real_execute = backend.execute
        faults = {"left": 2}

        def flaky_execute(sql: str, params: Any = ()) -> list[dict[str, Any]]:
            if "task_key" in sql and faults["left"] > 0 and sql.lstrip().startswith("SELECT"):
                faults["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return real_execute(sql, params)

        monkeypatch.setattr(backend, "execute", flaky_execute)
        outcome = runner.result("t-flaky-poll", timeout=30)
    assert faults["left"] == 0
    assert outcome == {"status": "completed", "partial_result": "all done"}


def test_result_polling_does_not_hide_real_errors(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TaskRunner(backend, GRAPH) as runner:
        runner.submit("t-broken-poll", INPUT)
        runner.result("t-broken-poll", timeout=30)

        def broken(sql: str, params: Any = ()) -> list[dict[str, Any]]:
            raise ValueError("not a connection problem")

        monkeypatch.setattr(backend, "execute", broken)
        with pytest.raises(ValueError, match="not a connection problem"):
            runner.result("t-broken-poll", timeout=5)
