"""ReviewQueue on memory, SQLite and Postgres: listing, showing, deciding, races, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.types import Command

from checkpointers import AsyncBackend, Backend, open_backend
from harness_nodes import (
    AlreadyDecided,
    AsyncReviewQueue,
    AsyncTaskRunner,
    BackendUnavailable,
    InvalidDecision,
    ReviewNotFound,
    ReviewPolicy,
    ReviewQueue,
    ReviewQueueMiddleware,
    RunFailed,
    TaskNotFinished,
    TaskRunner,
    UnknownThread,
    UserError,
)
from harness_nodes.review_queue import _INSERT, pending_sql, review_id_for
from harness_nodes.testing import ScriptedChatModel, ai, tool_call
from tests.conftest import database_away, drop_connections, subprocess_env
from tests.harness_nodes.review_app import (
    EFFECTS,
    build_builder,
    refund_replying,
    refund_turns,
    refund_with_runtime,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_effects() -> None:
    EFFECTS.clear()


def _queue(backend: Backend, **kw: Any) -> ReviewQueue:
    graph = build_builder().compile(checkpointer=backend.checkpointer)
    return ReviewQueue(backend, graph, **kw)


def _pause(queue: ReviewQueue, thread_id: str | None = None, **meta: Any) -> str:
    tid = thread_id or f"t-{uuid.uuid4().hex[:8]}"
    config: dict[str, Any] = {"metadata": meta} if meta else {}
    queue.invoke({"messages": [HumanMessage("refund A1")]}, config, thread_id=tid)
    return tid


def test_irreversible_call_pauses_and_is_listed(backend: Backend) -> None:
    queue = _queue(backend)
    tid = _pause(queue, task_type="billing")
    [item] = queue.pending()
    assert (item.thread_id, item.task_type, item.reason, item.risk, item.status) == (
        tid,
        "billing",
        "argument_rule",
        "high",
        "pending",
    )
    assert item.priority == 2 and item.created_at <= time.time()
    assert item.requests[0]["action_request"]["action"] == "refund"
    state = queue.graph.get_state({"configurable": {"thread_id": tid}})
    assert item.interrupt_id == state.interrupts[0].id
    assert item.id == review_id_for(tid, item.interrupt_id)
    assert EFFECTS == {}
    # Syncing again (the node re-runs on resume; runners retry) never duplicates the row.
    queue.sync(tid)
    queue.sync(tid)
    assert [i.id for i in queue.pending()] == [item.id]


@pytest.mark.parametrize(
    ("decision", "refunds", "expected"),
    [
        pytest.param({"type": "approve"}, 1, "refunded 250 on A1", id="approve"),
        pytest.param(
            {"type": "edit", "args": {"order": "A1", "amount": 99}},
            1,
            "refunded 99 on A1",
            id="edit",
        ),
        pytest.param({"type": "reject", "message": "too much"}, 0, "too much", id="reject"),
        pytest.param(
            {"type": "respond", "message": "Ask finance."}, 0, "Ask finance.", id="respond"
        ),
    ],
)
def test_decide_resumes_the_run_and_audits_it(
    backend: Backend, decision: dict[str, Any], refunds: int, expected: str
) -> None:
    queue = _queue(backend)
    tid = _pause(queue)
    [item] = queue.pending()
    out = queue.decide(item.id, decision, reviewer="alice")
    assert expected in out["messages"][-1].content
    assert EFFECTS == ({"refund": 1, "lookup": 1} if refunds else {"lookup": 1})
    done = queue.get(item.id)
    assert (done.status, done.decided_by) == ("applied", "alice")
    assert done.decision is not None and done.decision[0]["type"] == decision["type"]
    assert queue.pending() == []
    [audit] = queue.show(item.id).audit
    assert (audit["reviewer"], audit["decision"]) == ("alice", decision["type"])
    before, after = json.loads(audit["before"]), json.loads(audit["after"])
    assert before[0]["args"] == {"order": "A1", "amount": 250}
    assert after[0]["args"] == decision.get("args", {"order": "A1", "amount": 250})
    # The resumed run carries who decided on the message metadata.
    ai_meta = out["messages"][1].additional_kwargs["harness"]["reviews"]["call_refund"]
    assert (ai_meta["review_id"], ai_meta["reviewer"]) == (item.id, "alice")
    assert queue.graph.get_state({"configurable": {"thread_id": tid}}).next == ()


MALFORMED = [
    ("yes", "expected a decision object"),
    ({"type": "maybe"}, "Input should be 'approve'"),
    ({"type": "edit", "args": {"order": "A1"}}, "amount: Field required"),
    ({"type": "approve", "extra": 1}, "Extra inputs"),
    ([{"type": "approve"}] * 3, "3 decision(s) for 1 call(s)"),
]


def test_malformed_decisions_are_refused_and_the_item_stays_pending(backend: Backend) -> None:
    queue = _queue(backend)
    tid = _pause(queue)
    [item] = queue.pending()
    for decision, reason in MALFORMED:
        with pytest.raises(InvalidDecision, match=re.escape(reason)) as exc:
            queue.decide(item.id, decision, reviewer="alice")
        assert exc.value.review_id == item.id
        assert queue.get(item.id).status == "pending"
    assert queue.show(item.id).audit == []
    assert queue.graph.get_state({"configurable": {"thread_id": tid}}).next == ("review",)
    assert EFFECTS == {}
    queue.decide(item.id, {"type": "approve"}, reviewer="bob")
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_decision_the_graph_refuses_is_audited_as_refused(backend: Backend) -> None:
    # The queue does not know the tool's schema (tools=[]): it accepts an edit the review node
    # refuses. The audit must not read as if that edit had been applied.
    queue = _queue(backend, tools=[])
    tid = _pause(queue)
    [item] = queue.pending()
    bad = {"type": "edit", "args": {"order": "A1", "amount": "lots"}}
    with pytest.raises(InvalidDecision):
        queue.decide(item.id, bad, reviewer="alice")
    assert queue.get(item.id).status == "pending"
    assert queue.graph.get_state({"configurable": {"thread_id": tid}}).next == ("review",)
    audit = queue.show(item.id).audit
    assert [(a["reviewer"], a["decision"]) for a in audit] == [
        ("alice", "edit"),
        ("alice", "refused"),
    ]
    assert json.loads(audit[1]["before"])[0]["args"]["amount"] == "lots"
    assert "amount" in json.loads(audit[1]["after"])  # the graph's reason
    queue.decide(item.id, {"type": "approve"}, reviewer="carol")
    assert [a["decision"] for a in queue.show(item.id).audit][-1] == "approve"
    assert EFFECTS == {"refund": 1, "lookup": 1}


async def test_async_decision_the_graph_refuses_is_audited_as_refused(
    abackend: AsyncBackend,
) -> None:
    graph = build_builder().compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph, tools=[])
    await queue.ainvoke({"messages": [HumanMessage("refund")]}, thread_id="a-refused")
    [item] = await queue.pending()
    bad = {"type": "edit", "args": {"order": "A1", "amount": "lots"}}
    with pytest.raises(InvalidDecision):
        await queue.decide(item.id, bad, reviewer="alice")
    assert (await queue.get(item.id)).status == "pending"
    audit = (await queue.show(item.id)).audit
    assert [(a["reviewer"], a["decision"]) for a in audit] == [
        ("alice", "edit"),
        ("alice", "refused"),
    ]
    await queue.decide(item.id, {"type": "approve"}, reviewer="carol")
    assert EFFECTS == {"refund": 1, "lookup": 1}


def _create_agent_on(backend: Backend | AsyncBackend, refund_tool: BaseTool) -> Any:
    """LangChain v1's agent, reviewed by the middleware; its tools read what LangGraph injects."""
    name = refund_tool.name
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call(name, {"order": "A1", "amount": 250})]), ai("Handled.")]
    )
    review = ReviewQueueMiddleware(ReviewPolicy(irreversible=[name]), tools=[refund_tool])
    return create_agent(
        model, [refund_tool], middleware=[review], checkpointer=backend.checkpointer
    )


def test_an_edit_of_a_tool_with_injected_arguments_is_applied(backend: Backend) -> None:
    """The queue checks an edit against the arguments a call sets (what the inbox's form
    shows), not the ones LangGraph injects when the tool runs (here a `ToolRuntime`)."""
    queue = ReviewQueue(backend, _create_agent_on(backend, refund_with_runtime))
    queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t-injected")
    [item] = queue.pending()
    forged = {"order": "A1", "amount": 90, "runtime": "forged"}
    with pytest.raises(InvalidDecision, match="set arguments the tool gets injected"):
        queue.decide(item.id, {"type": "edit", "args": forged}, reviewer="alice")
    assert queue.get(item.id).status == "pending"

    edit = {"type": "edit", "args": {"order": "A1", "amount": 90}}
    out = queue.decide(item.id, edit, reviewer="alice")

    [result] = [m.text for m in out["messages"] if isinstance(m, ToolMessage)]
    assert result.startswith("refunded 90 on A1")
    assert queue.get(item.id).status == "applied"
    [audit] = queue.show(item.id).audit
    assert json.loads(audit["after"])[0]["args"] == {"order": "A1", "amount": 90}


async def test_async_edit_of_a_tool_with_injected_arguments_is_applied(
    abackend: AsyncBackend,
) -> None:
    queue = AsyncReviewQueue(abackend, _create_agent_on(abackend, refund_replying))
    await queue.ainvoke({"messages": [HumanMessage("refund A1")]}, thread_id="a-injected")
    [item] = await queue.pending()
    edit = {"type": "edit", "args": {"order": "A1", "amount": 90}}
    out = await queue.decide(item.id, edit, reviewer="alice")
    [result] = [m.text for m in out["messages"] if isinstance(m, ToolMessage)]
    assert result.startswith("refunded 90 on A1")
    assert (await queue.get(item.id)).status == "applied"


def test_edit_of_a_non_editable_call_is_refused() -> None:
    backend = open_backend("memory://")
    graph = build_builder(
        policy=ReviewPolicy(rules={"refund": lambda a: True}, allow_edit=False)
    ).compile(checkpointer=backend.checkpointer)
    queue = ReviewQueue(backend, graph)
    _pause(queue)
    [item] = queue.pending()
    with pytest.raises(InvalidDecision, match="'edit' is not allowed for refund"):
        queue.decide(item.id, {"type": "edit", "args": {"order": "A1", "amount": 1}}, reviewer="a")
    assert queue.get(item.id).status == "pending"
    backend.close()


def test_ten_concurrent_reviewers_one_winner(backend: Backend) -> None:
    queue = _queue(backend)
    _pause(queue)
    [item] = queue.pending()
    barrier = threading.Barrier(10)
    results: list[str] = []
    lock = threading.Lock()

    def review(i: int) -> None:
        barrier.wait()
        try:
            queue.decide(item.id, {"type": "approve"}, reviewer=f"reviewer-{i}")
            outcome = f"won:{i}"
        except AlreadyDecided as e:
            outcome = f"lost:{e.decided_by}"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=review, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [r for r in results if r.startswith("won:")]
    assert len(results) == 10 and len(winners) == 1
    winner = "reviewer-" + winners[0].split(":")[1]
    assert all(r in (f"lost:{winner}", "lost:?") for r in results if r.startswith("lost"))
    assert EFFECTS == {"refund": 1, "lookup": 1}
    assert len(queue.show(item.id).audit) == 1
    with pytest.raises(AlreadyDecided, match=re.escape(f"by {winner}")):
        queue.decide(item.id, {"type": "reject"}, reviewer="late")


def test_pending_filters_by_task_type_reason_assignee_and_age(backend: Backend) -> None:
    queue = _queue(backend, assignee="alice")
    _pause(queue, task_type="billing")
    _pause(queue, task_type="support")
    billing = queue.pending(task_type="billing")
    assert [i.task_type for i in billing] == ["billing"]
    assert len(queue.pending(reason="argument_rule")) == 2
    assert queue.pending(reason="verification") == []
    assert len(queue.pending(assignee="alice")) == 2
    queue.assign(billing[0].id, "bob")
    assert [i.id for i in queue.pending(assignee="bob")] == [billing[0].id]
    assert queue.pending(older_than=3600) == []
    assert len(queue.pending(newer_than=3600)) == 2
    assert len(queue.pending(limit=1)) == 1
    assert len(queue.pending(limit=1, offset=1)) == 1


def test_show_returns_the_request_with_the_trace_so_far(backend: Backend) -> None:
    queue = _queue(backend)
    _pause(queue)
    [item] = queue.pending()
    detail = queue.show(item.id)
    assert detail.item == item
    text = "\n".join(detail.trace)
    assert "checkpoint step" in text
    assert 'model called refund(order="A1", amount=250)' in text
    assert "spend so far:" in text
    assert detail.trace[-1].startswith(f"paused for review {item.id}: refund(")
    assert detail.tree is not None and detail.tree.status == "paused"
    names = [n.name for step in detail.tree.steps for n in step.walk()]
    assert any("refund" in n for n in names)
    with pytest.raises(ReviewNotFound):
        queue.show("nope")


def test_expired_items_are_rejected(backend: Backend) -> None:
    queue = _queue(backend, deadline=60)
    _pause(queue)
    [item] = queue.pending()
    assert item.deadline is not None
    assert queue.expire() == []  # not yet
    assert queue.expire(now=item.deadline + 1) == [item.id]
    done = queue.get(item.id)
    assert (done.status, done.decided_by) == ("applied", "harness:expired")
    assert EFFECTS == {"lookup": 1}


def test_expired_items_escalate_to_another_assignee(backend: Backend) -> None:
    queue = _queue(backend, deadline=60, assignee="alice", on_expire="escalate", escalate_to="lead")
    _pause(queue)
    [item] = queue.pending()
    assert item.deadline is not None
    assert queue.expire(now=item.deadline + 1) == [item.id]
    moved = queue.get(item.id)
    assert (moved.status, moved.assignee, moved.priority) == ("pending", "lead", item.priority + 1)
    assert moved.deadline is not None and moved.deadline > item.deadline
    assert [a["decision"] for a in queue.show(item.id).audit] == ["escalate"]


def test_queue_wiring_mistakes_raise_user_error() -> None:
    with open_backend("memory://") as backend:
        graph = build_builder().compile(checkpointer=backend.checkpointer)
        with pytest.raises(UserError, match="needs escalate_to"):
            ReviewQueue(backend, graph, on_expire="escalate")
        with pytest.raises(UserError, match="positive number of seconds"):
            ReviewQueue(backend, graph, deadline=0)
        with pytest.raises(UserError, match="compiled with a checkpointer"):
            ReviewQueue(backend, build_builder().compile())
        with open_backend("memory://") as other:
            with pytest.raises(UserError, match="TaskRunner on the queue's backend"):
                ReviewQueue(backend, graph, runner=TaskRunner(other, build_builder()))


def test_a_pause_answered_outside_the_queue_is_closed(backend: Backend) -> None:
    queue = _queue(backend)
    tid = _pause(queue)
    [item] = queue.pending()
    cfg = {"configurable": {"thread_id": tid}}
    queue.graph.invoke(Command(resume={"type": "approve"}), cfg, durability="sync")
    assert queue.sync(tid) == []
    assert queue.get(item.id).status == "closed"
    with pytest.raises(AlreadyDecided):
        queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_run_that_died_after_its_decision_is_carried_on_by_recovery(backend: Backend) -> None:
    from tests.harness_nodes.review_app import CRASHED, ProcessDied

    CRASHED.clear()
    script = [ai(tool_calls=[tool_call("refund", {"order": "CRASH-ONCE", "amount": 250})]), "ok"]
    queue = ReviewQueue(
        backend, build_builder(script=script).compile(checkpointer=backend.checkpointer)
    )
    queue.invoke({"messages": [HumanMessage("refund")]}, thread_id="died")
    [item] = queue.pending()
    with pytest.raises(ProcessDied):
        queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    cfg = {"configurable": {"thread_id": "died"}}
    assert queue.graph.get_state(cfg).next == ("tools",)  # neither paused nor finished
    assert queue.sync("died") == []  # a plain sync leaves it alone (it may still be running)
    assert queue.sync("died", recover=True) == []
    state = queue.graph.get_state(cfg)
    assert not state.next and state.values["messages"][-1].content == "ok"
    assert EFFECTS["refund"] == 1 and queue.get(item.id).status == "applied"


def test_carrying_on_a_thread_that_does_not_exist_is_unknown_thread(backend: Backend) -> None:
    queue = _queue(backend)
    with pytest.raises(UnknownThread, match="no-such-thread"):
        queue.invoke(None, thread_id="no-such-thread")


def test_a_decision_on_a_pause_answered_outside_the_queue_is_refused(backend: Backend) -> None:
    # No sync in between: decide itself must notice the pause is gone, not audit a
    # "reject" of a refund that already went out.
    queue = _queue(backend)
    tid = _pause(queue)
    [item] = queue.pending()
    cfg = {"configurable": {"thread_id": tid}}
    queue.graph.invoke(Command(resume={"type": "approve"}), cfg, durability="sync")
    with pytest.raises(AlreadyDecided, match="closed.*outside the queue"):
        queue.decide(item.id, {"type": "reject", "message": "no"}, reviewer="bob")
    assert queue.get(item.id).status == "closed"
    assert backend.execute(
        "SELECT count(*) AS n FROM harness_review_audit WHERE review_id = %s", (item.id,)
    ) == [{"n": 0}]
    assert EFFECTS == {"refund": 1, "lookup": 1}


async def test_async_decision_on_a_pause_answered_outside_the_queue_is_refused(
    abackend: AsyncBackend,
) -> None:
    graph = build_builder().compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph)
    await queue.ainvoke({"messages": [HumanMessage("refund")]}, thread_id="a-out")
    [item] = await queue.pending()
    cfg = {"configurable": {"thread_id": "a-out"}}
    await graph.ainvoke(Command(resume={"type": "approve"}), cfg, durability="sync")
    with pytest.raises(AlreadyDecided, match="outside the queue"):
        await queue.decide(item.id, {"type": "reject"}, reviewer="bob")
    assert (await queue.get(item.id)).status == "closed"
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_second_pause_in_the_same_thread_is_a_new_item(backend: Backend) -> None:
    script = refund_turns()[:1] + [
        refund_turns(amount=300)[0].model_copy(
            update={
                "tool_calls": [
                    {**c, "id": c["id"] + "_2"} for c in refund_turns(amount=300)[0].tool_calls
                ]
            }
        ),
        "all done",
    ]
    graph = build_builder(script=script).compile(checkpointer=backend.checkpointer)
    queue = ReviewQueue(backend, graph)
    _pause(queue)
    [first] = queue.pending()
    queue.decide(first.id, {"type": "approve"}, reviewer="alice")
    [second] = queue.pending()
    assert second.id != first.id and second.thread_id == first.thread_id
    out = queue.decide(second.id, {"type": "reject"}, reviewer="alice")
    assert out["messages"][-1].content == "all done"
    assert EFFECTS == {"refund": 1, "lookup": 2}


def _fill(backend: Backend, n: int) -> None:
    now = time.time()
    request = json.dumps([{"action_request": {"action": "refund", "args": {}}}])
    rows = [
        (
            f"r{i:06d}",
            f"thread-{i}",
            f"intr-{i}",
            ("billing", "support", "research", "documents")[i % 4],
            ("irreversible", "argument_rule", "verification")[i % 3],
            "high",
            request,
            2,
            None,
            None,
            now - i,
        )
        for i in range(n)
    ]
    one = "(" + ", ".join(["%s"] * 12) + ")"
    head, _, tail = _INSERT.partition("VALUES")
    tail = tail.split(")", 1)[1]  # " ON CONFLICT ..."
    with backend.transaction() as tx:
        for start in range(0, n, 500):
            chunk = rows[start : start + 500]
            sql = head + "VALUES " + ", ".join([one] * len(chunk)) + tail
            tx.execute(sql, [v for r in chunk for v in (*r[:7], "pending", *r[7:])])
    if backend.dialect == "postgres":
        backend.execute("ANALYZE harness_reviews")
    else:
        backend.execute("ANALYZE")


INDEXED_FILTERS = [
    ({"task_type": "billing"}, "harness_reviews_pending"),
    ({"reason": "verification"}, "harness_reviews_reason"),
    ({"older_than": 60.0}, "harness_reviews_age"),
    ({"assignee": "nobody"}, "harness_reviews_assignee_age"),
]


def test_ten_thousand_pending_items_are_listed_through_an_index(backend: Backend) -> None:
    _fill(backend, 10_000)
    queue = ReviewQueue(backend, build_builder().compile(checkpointer=backend.checkpointer))
    assert len(queue.pending(limit=20_000)) == 10_000
    for filters, index in INDEXED_FILTERS:
        items = queue.pending(**filters, limit=50)
        assert len(items) == (0 if "assignee" in filters else 50)
        assert all(i.status == "pending" for i in items)
        if "task_type" in filters:
            assert {i.task_type for i in items} == {"billing"}
        sql, params = pending_sql(**filters, limit=50)
        if backend.dialect == "postgres":
            rows = backend.execute("EXPLAIN " + sql, params)
            plan = "\n".join(r["QUERY PLAN"] for r in rows)
            assert "Seq Scan" not in plan, plan
        else:
            rows = backend.execute("EXPLAIN QUERY PLAN " + sql, params)
            plan = "\n".join(r["detail"] for r in rows)
            assert "SCAN harness_reviews\n" not in plan + "\n", plan  # no full-table scan
        assert index in plan, plan


async def test_async_queue_pauses_lists_and_resumes(abackend: AsyncBackend) -> None:
    graph = build_builder().compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph)
    await queue.ainvoke({"messages": [HumanMessage("refund")]}, thread_id="a1")
    [item] = await queue.pending(task_type="default")
    detail = await queue.show(item.id)
    assert any("model called refund" in line for line in detail.trace)
    with pytest.raises(InvalidDecision):
        await queue.decide(item.id, {"type": "edit", "args": {"amount": "x"}}, reviewer="a")
    out = await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    assert "refunded 250" in out["messages"][-1].content
    with pytest.raises(AlreadyDecided):
        await queue.decide(item.id, {"type": "approve"}, reviewer="bob")
    assert EFFECTS == {"refund": 1, "lookup": 1}
    assert (await queue.get(item.id)).status == "applied"


_CHILD = """
import json, os, sys
from checkpointers import open_backend
from harness_nodes import ReviewQueue
from tests.harness_nodes.review_app import EFFECTS, build_builder

url, review_id = sys.argv[1], sys.argv[2]
with open_backend(url) as backend:
    queue = ReviewQueue(backend, build_builder().compile(checkpointer=backend.checkpointer))
    out = queue.decide(review_id, {"type": "edit", "args": {"order": "A1", "amount": 42}},
                       reviewer="carol")
    print(json.dumps({"last": out["messages"][-1].content, "effects": dict(EFFECTS)}))
"""


@pytest.mark.slow
def test_resume_in_a_fresh_process(durable_url: str, tmp_path: Path) -> None:
    with open_backend(durable_url) as backend:
        queue = _queue(backend)
        tid = _pause(queue)
        [item] = queue.pending()
    effects_file = tmp_path / "effects.txt"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, durable_url, item.id],
        env=subprocess_env(REVIEW_EFFECTS_FILE=str(effects_file)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["last"] == "Done: refunded 42 on A1 | order A1: paid"
    assert sorted(effects_file.read_text().split()) == ["lookup", "refund"]  # once each
    assert EFFECTS == {}  # nothing ran in this (the pausing) process
    with open_backend(durable_url) as backend:
        queue = _queue(backend)
        assert queue.get(item.id).decided_by == "carol"
        state = queue.graph.get_state({"configurable": {"thread_id": tid}})
        msgs = state.values["messages"]
        assert [m.content for m in msgs if isinstance(m, ToolMessage)][0] == "refunded 42 on A1"


def _ledger_graph(backend: Backend, fail: list[bool]) -> Any:
    """agent → tools (through the effect ledger) → review on escalation → agent."""
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from harness_nodes import EffectLedger, HumanReview, irreversible
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    @irreversible
    @tool
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        EFFECTS["refund"] += 1
        if fail[0]:
            raise RuntimeError("payment gateway timed out")
        return f"refunded {amount:g} on {order}"

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 30}, id="r1")]),
            lambda msgs: "final: " + str(msgs[-1].content),
        ]
    )
    review = HumanReview(tools=[refund])
    ledger = EffectLedger(backend)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund], wrap_tool_call=ledger.wrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_conditional_edges("tools", review.route)
    return builder.compile(checkpointer=backend.checkpointer)


@pytest.mark.parametrize(
    ("decision", "status", "expected"),
    [
        pytest.param({"type": "approve"}, "done", "confirmed the call took effect", id="happened"),
        pytest.param(
            {"type": "reject", "message": "bank shows nothing"},
            "aborted",
            "did NOT take effect",
            id="did-not",
        ),
    ],
)
def test_did_the_refund_go_out_is_answered_in_the_queue_and_the_ledger(
    backend: Backend, decision: dict[str, Any], status: str, expected: str
) -> None:
    from harness_nodes import EffectLedger

    fail = [True]
    graph = _ledger_graph(backend, fail)
    queue = ReviewQueue(backend, graph)
    with pytest.raises(RuntimeError, match="timed out"):
        queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t-eff")
    fail[0] = False
    queue.invoke(None, thread_id="t-eff")  # resumed: the ledger refuses to re-run blindly
    [item] = queue.pending(reason="effect_unknown")
    assert item.risk == "high" and item.requests[0]["kind"] == "escalation"
    assert EFFECTS["refund"] == 1
    out = queue.decide(item.id, decision, reviewer="ann")
    assert expected in out["messages"][-1].content
    record = EffectLedger(backend).get("t-eff", "r1")
    assert record is not None and (record.status, record.resolved_by) == (status, "ann")
    assert EFFECTS["refund"] == 1  # the review never re-ran the refund


def test_an_expired_did_it_happen_question_is_never_auto_rejected() -> None:
    from harness_nodes import EffectLedger

    with open_backend("memory://") as backend:
        fail = [True]
        graph = _ledger_graph(backend, fail)
        queue = ReviewQueue(backend, graph, deadline=60)
        with pytest.raises(RuntimeError):
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t-exp")
        fail[0] = False
        queue.invoke(None, thread_id="t-exp")
        [item] = queue.pending()
        assert item.deadline is not None
        # A deadline says nothing about whether the refund went out: no "it did not" answer.
        assert queue.expire(now=item.deadline + 1) == []
        assert queue.get(item.id).status == "pending"
        record = EffectLedger(backend).get("t-exp", "r1")
        assert record is not None and record.resolved_by is None
        escalating = ReviewQueue(backend, graph, on_expire="reject", escalate_to="lead")
        assert escalating.expire(now=item.deadline + 1) == [item.id]
        assert queue.get(item.id).assignee == "lead"
        assert EFFECTS["refund"] == 1


async def test_async_queue_assigns_and_expires(abackend: AsyncBackend) -> None:
    graph = build_builder().compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph, deadline=30, on_expire="escalate", escalate_to="lead")
    await queue.ainvoke({"messages": [HumanMessage("refund")]}, thread_id="a-exp")
    [item] = await queue.pending()
    assert (await queue.assign(item.id, "bob")).assignee == "bob"
    assert item.deadline is not None
    assert await queue.expire(now=item.deadline + 1) == [item.id]
    moved = await queue.get(item.id)
    assert (moved.assignee, moved.status) == ("lead", "pending")
    assert [a["decision"] for a in (await queue.show(item.id)).audit] == ["assign", "escalate"]
    assert EFFECTS == {}


# --- a TaskRunner's tasks: decisions are applied under the runner's lease --------------------

REFUND = {"messages": [HumanMessage("refund A1")]}


def _paused(runner: TaskRunner, task_key: str) -> None:
    deadline = time.monotonic() + 30
    while runner.status(task_key).status != "interrupted":
        assert time.monotonic() < deadline, runner.status(task_key)
        time.sleep(0.02)


async def _apaused(runner: AsyncTaskRunner, task_key: str) -> None:
    deadline = time.monotonic() + 30
    while (await runner.astatus(task_key)).status != "interrupted":
        assert time.monotonic() < deadline, await runner.astatus(task_key)
        await asyncio.sleep(0.02)


def _run_row(backend: Backend, thread_id: str) -> dict[str, Any]:
    [row] = backend.execute("SELECT * FROM harness_runs WHERE thread_id = %s", (thread_id,))
    return row


def _audits(backend: Backend, review_id: str) -> int:
    sql = "SELECT count(*) AS n FROM harness_review_audit WHERE review_id = %s"
    return int(backend.execute(sql, (review_id,))[0]["n"])


def test_a_runner_task_decided_in_the_queue_is_settled_by_that_run(backend: Backend) -> None:
    builder = build_builder()
    with TaskRunner(backend, builder) as runner:
        runner.submit("t-q", REFUND)
        _paused(runner, "t-q")
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        [item] = queue.sync("t-q")
        out = queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert out["messages"][-1].content == "Done: refunded 250 on A1 | order A1: paid"
        # The queue claimed the task as a runner does (a second attempt) and settled it.
        row = _run_row(backend, "t-q")
        assert (row["status"], row["attempts"], row["lease_owner"]) == ("completed", 2, None)
        assert runner.result("t-q", timeout=1)["partial_result"] == out["messages"][-1].content
    assert queue.get(item.id).status == "applied"
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_queue_decision_while_the_runner_resumes_the_pause_is_not_applied(
    backend: Backend,
) -> None:
    from tests.harness_nodes.review_app import Gate
    from tests.harness_nodes.test_runner import linear_chain

    gate = Gate()
    builder = build_builder(gate=gate)
    with TaskRunner(backend, builder, lease_seconds=5) as runner:
        runner.submit("t-race", REFUND)
        _paused(runner, "t-race")
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        [item] = queue.sync("t-race")
        with ThreadPoolExecutor(1) as pool:
            resumed = pool.submit(runner.resume, "t-race", {"type": "approve"})
            assert gate.entered.wait(10)  # it holds the lease; the pause is not saved as answered
            try:
                with pytest.raises(AlreadyDecided, match="closed.*outside the queue"):
                    queue.decide(item.id, {"type": "reject", "message": "no"}, reviewer="bob")
            finally:
                gate.release.set()
            assert resumed.result(timeout=30).status == "completed"
        assert _run_row(backend, "t-race")["attempts"] == 2  # the run and its resume: no third
    assert EFFECTS == {"refund": 1, "lookup": 1}  # the approve ran once; the reject never ran
    assert queue.sync("t-race") == [] and queue.get(item.id).status == "closed"
    assert _audits(backend, item.id) == 0  # a decision that was not applied is not audited
    linear_chain(backend, "t-race")


def test_a_decision_on_a_cancelled_runner_task_is_refused_and_its_review_closed(
    backend: Backend,
) -> None:
    builder = build_builder()
    with TaskRunner(backend, builder) as runner:
        runner.submit("t-off", REFUND)
        _paused(runner, "t-off")
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        [item] = queue.sync("t-off")
        assert runner.cancel("t-off").status == "cancelled"
        with pytest.raises(AlreadyDecided, match=r"\(cancelled\) by its task runner") as e:
            queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert e.value.decision == "cancelled"
        assert runner.status("t-off").status == "cancelled"
    assert queue.get(item.id).status == "closed" and queue.pending() == []
    assert EFFECTS == {}  # the cancelled task did not run on


def test_a_runner_task_decision_the_graph_refuses_is_audited_as_refused(backend: Backend) -> None:
    builder = build_builder()
    with TaskRunner(backend, builder) as runner:
        runner.submit("t-refused", REFUND)
        _paused(runner, "t-refused")
        graph = builder.compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph, tools=[], runner=runner)
        [item] = queue.sync("t-refused")
        bad = {"type": "edit", "args": {"order": "A1", "amount": "lots"}}
        with pytest.raises(InvalidDecision):
            queue.decide(item.id, bad, reviewer="alice")
        assert runner.status("t-refused").status == "interrupted"
        assert queue.get(item.id).status == "pending"
        assert [a["decision"] for a in queue.show(item.id).audit] == ["edit", "refused"]
        queue.decide(item.id, {"type": "approve"}, reviewer="carol")
        assert runner.status("t-refused").status == "completed"
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_resume_after_a_refused_runner_task_decision_does_not_apply_it(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner frees the task when the graph refuses the decision; a resume landing as soon
    # as it does must find the decision already undone and audited as refused, or the run's
    # queue sync marks it applied (with the refused edit) and no refused row is ever written.
    builder = build_builder()
    with TaskRunner(backend, builder) as runner:
        runner.submit("t-gap", REFUND)
        _paused(runner, "t-gap")
        graph = builder.compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph, tools=[], runner=runner)
        [item] = queue.sync("t-gap")
        settle, resumed = runner._settle, []

        def settle_then_resume(thread_id: str, owner: str, status: str, *rest: Any) -> Any:
            run = settle(thread_id, owner, status, *rest)
            if status == "interrupted" and not resumed:  # the lease is free again: answer now
                resumed.append(runner.resume("t-gap", {"type": "approve"}).status)
            return run

        monkeypatch.setattr(runner, "_settle", settle_then_resume)
        bad = {"type": "edit", "args": {"order": "A1", "amount": "lots"}}
        with pytest.raises(InvalidDecision):
            queue.decide(item.id, bad, reviewer="alice")
        assert resumed == ["completed"]
    assert [a["decision"] for a in queue.show(item.id).audit] == ["edit", "refused"]
    decided = queue.get(item.id)
    assert (decided.status, decided.decided_by) == ("closed", None)  # answered by the resume
    assert EFFECTS == {"refund": 1, "lookup": 1}


async def test_async_a_resume_after_a_refused_runner_task_decision_does_not_apply_it(
    abackend: AsyncBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = build_builder()
    async with AsyncTaskRunner(abackend, builder) as runner:
        await runner.asubmit("t-agap", REFUND)
        await _apaused(runner, "t-agap")
        graph = builder.compile(checkpointer=abackend.checkpointer)
        queue = AsyncReviewQueue(abackend, graph, tools=[], runner=runner)
        [item] = await queue.sync("t-agap")
        settle, resumed = runner._settle, []

        async def settle_then_resume(thread_id: str, owner: str, status: str, *rest: Any) -> Any:
            run = await settle(thread_id, owner, status, *rest)
            if status == "interrupted" and not resumed:  # the lease is free again: answer now
                resumed.append((await runner.aresume("t-agap", {"type": "approve"})).status)
            return run

        monkeypatch.setattr(runner, "_settle", settle_then_resume)
        bad = {"type": "edit", "args": {"order": "A1", "amount": "lots"}}
        with pytest.raises(InvalidDecision):
            await queue.decide(item.id, bad, reviewer="alice")
        assert resumed == ["completed"]
    assert [a["decision"] for a in (await queue.show(item.id)).audit] == ["edit", "refused"]
    decided = await queue.get(item.id)
    assert (decided.status, decided.decided_by) == ("closed", None)  # answered by the resume
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_runner_task_whose_decided_run_fails_raises_run_failed(backend: Backend) -> None:
    script = [ai(tool_calls=[tool_call("refund", {"order": "BANK-DOWN", "amount": 250})])]
    builder = build_builder(script=script)
    with TaskRunner(backend, builder, max_attempts=2) as runner:
        runner.submit("t-down", REFUND)
        _paused(runner, "t-down")
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        [item] = queue.sync("t-down")
        with pytest.raises(RunFailed, match="RuntimeError: the bank is down") as e:
            queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert e.value.thread_id == "t-down"
        row = _run_row(backend, "t-down")
        assert (row["status"], row["attempts"], row["lease_owner"]) == ("failed", 2, None)
    assert queue.get(item.id).status == "applied"  # the decision stands


_KILLED_IN_DECISION = """
import sys
from checkpointers import open_backend
from harness_nodes import ReviewQueue, TaskRunner
from harness_nodes.testing import ai, tool_call
from tests.harness_nodes.review_app import build_builder
script = [ai(tool_calls=[tool_call("refund", {"order": "KILL", "amount": 250})]), "ok"]
url, review_id = sys.argv[1], sys.argv[2]
with open_backend(url) as backend:
    builder = build_builder(script=script)
    runner = TaskRunner(backend, builder, lease_seconds=0.5)
    graph = builder.compile(checkpointer=backend.checkpointer)
    queue = ReviewQueue(backend, graph, runner=runner)
    queue.decide(review_id, {"type": "approve"}, reviewer="alice")  # killed inside the refund
"""


@pytest.mark.slow
def test_a_runner_task_killed_after_a_queue_decision_is_carried_on_by_recover(
    durable_url: str,
) -> None:
    from tests.harness_nodes.review_app import KILL_ENV

    script = [ai(tool_calls=[tool_call("refund", {"order": "KILL", "amount": 250})]), "ok"]
    builder = build_builder(script=script)
    cfg = {"configurable": {"thread_id": "t-qk"}}
    with open_backend(durable_url) as backend:
        with TaskRunner(backend, builder, lease_seconds=0.5) as runner:
            runner.submit("t-qk", {"messages": [HumanMessage("refund")]})
            _paused(runner, "t-qk")
            queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
            [item] = queue.sync("t-qk")
            proc = subprocess.run(
                [sys.executable, "-c", _KILLED_IN_DECISION, durable_url, item.id],
                env=subprocess_env(**{KILL_ENV: "1"}),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            state = queue.graph.get_state(cfg)
            assert (state.next, state.interrupts) == (("tools",), ())  # past its pause
            assert runner.status("t-qk").status == "running"  # on a lease nobody renews
            assert queue.sync("t-qk", recover=True) == []  # left to the runner
            assert EFFECTS["refund"] == 0 and queue.get(item.id).status == "decided"
            deadline = time.monotonic() + 30
            while not (recovered := runner.recover()):  # once the lease has expired
                assert time.monotonic() < deadline, runner.status("t-qk")
                time.sleep(0.05)
            assert recovered == ["t-qk"]
            assert runner.result("t-qk", timeout=30)["partial_result"] == "ok"
            assert runner.status("t-qk").attempts == 3  # run, the queue's resume, recovery
        assert queue.sync("t-qk") == [] and queue.get(item.id).status == "applied"
    assert EFFECTS["refund"] == 1  # the recovery's (the killed one never got that far)


async def test_async_runner_task_that_died_after_a_queue_decision_is_carried_on_by_arecover(
    abackend: AsyncBackend,
) -> None:
    from tests.harness_nodes.review_app import CRASHED, ProcessDied

    CRASHED.clear()
    script = [ai(tool_calls=[tool_call("refund", {"order": "CRASH-ONCE", "amount": 250})]), "ok"]
    builder = build_builder(script=script)
    cfg = {"configurable": {"thread_id": "t-ad"}}
    async with AsyncTaskRunner(abackend, builder, lease_seconds=0.3) as runner:
        await runner.asubmit("t-ad", REFUND)
        await _apaused(runner, "t-ad")
        graph = builder.compile(checkpointer=abackend.checkpointer)
        queue = AsyncReviewQueue(abackend, graph, runner=runner)
        [item] = await queue.sync("t-ad")
        with pytest.raises(ProcessDied):  # inside the approved refund
            await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        state = await graph.aget_state(cfg)
        assert (state.next, state.interrupts) == (("tools",), ())
        assert (await runner.astatus("t-ad")).status == "running"  # on a dead lease
        assert await queue.sync("t-ad", recover=True) == []  # left to the runner
        assert EFFECTS["refund"] == 0
        deadline = time.monotonic() + 30
        while not (recovered := await runner.arecover()):  # once the lease has expired
            assert time.monotonic() < deadline, await runner.astatus("t-ad")
            await asyncio.sleep(0.05)
        assert recovered == ["t-ad"]
        assert (await runner.aresult("t-ad", timeout=30))["partial_result"] == "ok"
        assert (await runner.astatus("t-ad")).attempts == 3
    assert await queue.sync("t-ad") == [] and (await queue.get(item.id)).status == "applied"
    assert EFFECTS["refund"] == 1


def _expire_lease(backend: Backend, thread_id: str) -> None:
    """The lease of a process that died runs out (without waiting for it)."""
    sql = "UPDATE harness_runs SET lease_expires_at = 1 WHERE thread_id = %s AND status = 'running'"
    assert backend.execute(sql + " RETURNING thread_id", (thread_id,))


def _killed_after_the_decision(*args: Any) -> Any:
    from tests.harness_nodes.review_app import ProcessDied

    raise ProcessDied("killed after the decision and the lease claim were committed")


def _decided_then_killed(
    backend: Backend,
    runner: TaskRunner,
    builder: Any,
    thread_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[ReviewQueue, Any]:
    """Submit, pause, then alice's approval is committed and its process dies before the run."""
    from tests.harness_nodes.review_app import ProcessDied

    runner.submit(thread_id, REFUND)
    _paused(runner, thread_id)
    queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer), runner=runner)
    [item] = queue.sync(thread_id)
    with monkeypatch.context() as patch:
        patch.setattr(queue, "_resume_leased", _killed_after_the_decision)
        with pytest.raises(ProcessDied):
            queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    return queue, item


def test_a_runner_task_killed_before_its_queue_decision_was_applied_is_carried_on_by_recover(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process dies between `decide`'s transaction (the decision, its audit row and the
    # task's lease) and the resumed run: the pause is still live. Recovery carried the run
    # on with no answer, which paused it again with its item decided: listed nowhere, a
    # second decision refused, the approved refund never run.
    from tests.harness_nodes.test_runner import linear_chain

    builder = build_builder()
    with (
        TaskRunner(backend, builder, lease_seconds=5) as runner,
        TaskRunner(backend, builder, lease_seconds=5) as other,
    ):
        queue, item = _decided_then_killed(backend, runner, builder, "t-strand", monkeypatch)
        assert queue.get(item.id).status == "decided" and EFFECTS == {}
        assert runner.status("t-strand").status == "running"  # on a lease nobody renews
        _expire_lease(backend, "t-strand")
        with ThreadPoolExecutor(2) as pool:  # two recoverers race: one claims the task
            recovered = list(pool.map(lambda r: r.recover(), (runner, other)))
        assert ["t-strand"] in recovered
        done = runner.result("t-strand", timeout=30)
        assert done["partial_result"] == "Done: refunded 250 on A1 | order A1: paid"
        assert runner.status("t-strand").attempts == 3  # run, the queue's claim, one recovery
        with pytest.raises(AlreadyDecided, match="alice"):
            queue.decide(item.id, {"type": "reject", "message": "no"}, reviewer="bob")
    decided = queue.get(item.id)
    assert (decided.status, decided.decided_by) == ("applied", "alice")
    assert [a["decision"] for a in queue.show(item.id).audit] == ["approve"]
    assert queue.pending() == [] and queue.sync("t-strand") == []
    assert EFFECTS == {"refund": 1, "lookup": 1}  # the approved refund, once
    linear_chain(backend, "t-strand")


def test_a_recorded_decision_the_graph_refuses_on_recovery_is_pending_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness_nodes.review_app import ProcessDied

    builder = build_builder()
    with TaskRunner(backend, builder, lease_seconds=5) as runner:
        runner.submit("t-srefused", REFUND)
        _paused(runner, "t-srefused")
        graph = builder.compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph, tools=[], runner=runner)  # the node checks edits
        [item] = queue.sync("t-srefused")
        bad = {"type": "edit", "args": {"order": "A1", "amount": "lots"}}
        with monkeypatch.context() as patch:
            patch.setattr(queue, "_resume_leased", _killed_after_the_decision)
            with pytest.raises(ProcessDied):
                queue.decide(item.id, bad, reviewer="alice")
        _expire_lease(backend, "t-srefused")
        assert runner.recover() == ["t-srefused"]
        with pytest.raises(TaskNotFinished):
            runner.result("t-srefused", timeout=2)
        assert runner.status("t-srefused").status == "interrupted"
        assert [i.id for i in queue.pending()] == [item.id]  # listed again, for a new decision
        assert [a["decision"] for a in queue.show(item.id).audit] == ["edit", "refused"]
        queue.decide(item.id, {"type": "approve"}, reviewer="carol")
        assert runner.status("t-srefused").status == "completed"
    assert queue.get(item.id).decided_by == "carol"
    assert EFFECTS == {"refund": 1, "lookup": 1}


async def _adecided_then_killed(
    abackend: AsyncBackend,
    runner: AsyncTaskRunner,
    builder: Any,
    thread_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Any, AsyncReviewQueue, Any]:
    """Submit, pause, then alice's approval is committed and its process dies before the run."""
    from tests.harness_nodes.review_app import ProcessDied

    async def killed(*args: Any) -> Any:
        _killed_after_the_decision()

    await runner.asubmit(thread_id, REFUND)
    await _apaused(runner, thread_id)
    graph = builder.compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph, runner=runner)
    [item] = await queue.sync(thread_id)
    with monkeypatch.context() as patch:
        patch.setattr(queue, "_resume_leased", killed)
        with pytest.raises(ProcessDied):
            await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
    return graph, queue, item


async def test_async_runner_task_killed_before_its_queue_decision_was_applied_is_carried_on(
    abackend: AsyncBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = build_builder()
    expire = (
        "UPDATE harness_runs SET lease_expires_at = 1 WHERE thread_id = %s "
        "AND status = 'running' RETURNING thread_id"
    )
    async with (
        AsyncTaskRunner(abackend, builder, lease_seconds=5) as runner,
        AsyncTaskRunner(abackend, builder, lease_seconds=5) as other,
    ):
        _, queue, item = await _adecided_then_killed(
            abackend, runner, builder, "t-astrand", monkeypatch
        )
        assert (await queue.get(item.id)).status == "decided"
        assert await abackend.execute(expire, ("t-astrand",))
        recovered = await asyncio.gather(runner.arecover(), other.arecover())
        assert ["t-astrand"] in recovered
        done = await runner.aresult("t-astrand", timeout=30)
        assert done["partial_result"] == "Done: refunded 250 on A1 | order A1: paid"
        await other.aclose()  # the recoverer that lost the claim has returned
        assert (await runner.astatus("t-astrand")).attempts == 3
        with pytest.raises(AlreadyDecided, match="alice"):
            await queue.decide(item.id, {"type": "reject", "message": "no"}, reviewer="bob")
    decided = await queue.get(item.id)
    assert (decided.status, decided.decided_by) == ("applied", "alice")
    assert [a["decision"] for a in (await queue.show(item.id)).audit] == ["approve"]
    assert await queue.pending() == []
    assert EFFECTS == {"refund": 1, "lookup": 1}


def _strand(
    backend: Backend, runner: TaskRunner, queue: ReviewQueue, item: Any, thread_id: str
) -> None:
    """A decision stranded by the old recovery: the task paused again, its item decided.

    The process died between `decide`'s transaction and the resumed run (*item* decided);
    recovery then carried the run on with no answer, which paused it again at the same spot.
    """
    _expire_lease(backend, thread_id)
    backend.execute(
        "UPDATE harness_runs SET status = 'interrupted', lease_owner = NULL, "
        "lease_expires_at = NULL WHERE thread_id = %s",
        (thread_id,),
    )
    state = queue.graph.get_state({"configurable": {"thread_id": thread_id}})
    assert [i.id for i in state.interrupts] == [item.interrupt_id]  # still paused there
    assert queue.get(item.id).status == "decided" and queue.sync(thread_id) == []
    assert runner.status(thread_id).status == "interrupted"


def test_a_decision_an_old_recovery_left_stranded_is_carried_on_by_recover(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before recovery applied recorded decisions it left the task paused again, its run
    # `interrupted` and its item `decided`: listed nowhere, a second decision refused, and
    # recover() never looked at it again (only `sync(thread, recover=True)` got it out).
    from tests.harness_nodes.test_runner import linear_chain

    builder = build_builder()
    with (
        TaskRunner(backend, builder, lease_seconds=5) as runner,
        TaskRunner(backend, builder, lease_seconds=5) as other,
    ):
        queue, item = _decided_then_killed(backend, runner, builder, "t-old", monkeypatch)
        _strand(backend, runner, queue, item, "t-old")
        assert EFFECTS == {}
        with ThreadPoolExecutor(2) as pool:  # two recoverers race: one claims the task
            recovered = list(pool.map(lambda r: r.recover(), (runner, other)))
        assert ["t-old"] in recovered
        done = runner.result("t-old", timeout=30)
        assert done["partial_result"] == "Done: refunded 250 on A1 | order A1: paid"
        assert runner.status("t-old").attempts == 3  # run, the queue's claim, one recovery
        assert runner.recover() == []  # nothing left to carry on
    decided = queue.get(item.id)
    assert (decided.status, decided.decided_by) == ("applied", "alice")
    assert [a["decision"] for a in queue.show(item.id).audit] == ["approve"]
    assert queue.pending() == [] and queue.sync("t-old") == []
    assert EFFECTS == {"refund": 1, "lookup": 1}  # the approved refund, once
    linear_chain(backend, "t-old")


def test_a_decided_item_off_the_live_pause_is_settled_by_recover_without_running(
    backend: Backend,
) -> None:
    # A paused task whose decided item is not on the pause it is stopped at (its decision
    # was applied, the item not yet settled): recovery runs nothing, settles the item and
    # leaves the task paused for its reviewer, and does not pick it up again.
    builder = build_builder()
    with TaskRunner(backend, builder, lease_seconds=5) as runner:
        runner.submit("t-off", REFUND)
        _paused(runner, "t-off")
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        [item] = queue.sync("t-off")
        cfg = {"configurable": {"thread_id": "t-off"}}
        checkpoints = len(list(queue.graph.get_state_history(cfg)))
        backend.execute(
            "UPDATE harness_reviews SET id = 'gone', interrupt_id = 'gone', "
            "status = 'decided', decision = %s, decided_by = 'alice' WHERE id = %s",
            (json.dumps([{"type": "approve"}]), item.id),
        )
        assert runner.recover() == ["t-off"]
        deadline = time.monotonic() + 30
        while queue.get("gone").status == "decided":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _paused(runner, "t-off")
        assert queue.get("gone").status == "applied"
        assert runner.recover() == []
        [again] = queue.pending()  # the live pause, listed for a reviewer again
        assert again.id == item.id
        assert runner.status("t-off").status == "interrupted"
        assert len(list(queue.graph.get_state_history(cfg))) == checkpoints  # nothing ran
    assert EFFECTS == {}


async def test_async_a_decision_an_old_recovery_left_stranded_is_carried_on_by_arecover(
    abackend: AsyncBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = build_builder()
    strand = (
        "UPDATE harness_runs SET status = 'interrupted', lease_owner = NULL, "
        "lease_expires_at = NULL WHERE thread_id = %s AND status = 'running' RETURNING thread_id"
    )
    async with (
        AsyncTaskRunner(abackend, builder, lease_seconds=5) as runner,
        AsyncTaskRunner(abackend, builder, lease_seconds=5) as other,
    ):
        graph, queue, item = await _adecided_then_killed(
            abackend, runner, builder, "t-aold", monkeypatch
        )
        assert await abackend.execute(strand, ("t-aold",))  # what the old recovery left
        state = await graph.aget_state({"configurable": {"thread_id": "t-aold"}})
        assert [i.id for i in state.interrupts] == [item.interrupt_id]
        assert (await queue.get(item.id)).status == "decided" and await queue.pending() == []
        recovered = await asyncio.gather(runner.arecover(), other.arecover())
        assert ["t-aold"] in recovered
        done = await runner.aresult("t-aold", timeout=30)
        assert done["partial_result"] == "Done: refunded 250 on A1 | order A1: paid"
        await other.aclose()  # the recoverer that lost the claim has returned
        assert (await runner.astatus("t-aold")).attempts == 3
        assert await runner.arecover() == []
    decided = await queue.get(item.id)
    assert (decided.status, decided.decided_by) == ("applied", "alice")
    assert [a["decision"] for a in (await queue.show(item.id)).audit] == ["approve"]
    assert await queue.pending() == []
    assert EFFECTS == {"refund": 1, "lookup": 1}


async def test_async_queue_decision_while_the_runner_resumes_the_pause_is_not_applied(
    abackend: AsyncBackend,
) -> None:
    from tests.harness_nodes.review_app import Gate

    gate = Gate()
    builder = build_builder(gate=gate)
    async with AsyncTaskRunner(abackend, builder, lease_seconds=5) as runner:
        await runner.asubmit("t-arace", REFUND)
        await _apaused(runner, "t-arace")
        queue = AsyncReviewQueue(abackend, builder.compile(checkpointer=abackend.checkpointer))
        [item] = await queue.sync("t-arace")
        resumed = asyncio.create_task(runner.aresume("t-arace", {"type": "approve"}))
        assert await asyncio.to_thread(gate.entered.wait, 10)  # it holds the lease
        try:
            with pytest.raises(AlreadyDecided, match="closed.*outside the queue"):
                await queue.decide(item.id, {"type": "reject", "message": "no"}, reviewer="bob")
        finally:
            gate.release.set()
        done = await resumed
        assert (done.status, done.attempts) == ("completed", 2)
    assert EFFECTS == {"refund": 1, "lookup": 1}
    assert await queue.sync("t-arace") == [] and (await queue.get(item.id)).status == "closed"


def test_a_runner_task_that_pauses_is_listed_in_the_queue_without_a_sync(
    backend: Backend,
) -> None:
    # The worker that ran it records the pause: the inbox and `harness review list` read
    # the queue's rows, and nobody else knows the thread paused.
    builder = build_builder()
    graph = builder.compile(checkpointer=backend.checkpointer)
    reviews = ReviewQueue(backend, graph, deadline=600, assignee="billing")
    with TaskRunner(backend, builder, reviews=reviews) as runner:
        runner.submit("t-listed", REFUND)
        _paused(runner, "t-listed")
        [item] = ReviewQueue(backend, graph).pending()
        assert (item.thread_id, item.assignee) == ("t-listed", "billing")
        assert item.deadline is not None and item.deadline > time.time() + 500
        ReviewQueue(backend, graph).decide(item.id, {"type": "approve"}, reviewer="alice")
        assert runner.status("t-listed").status == "completed"
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_a_runner_without_a_queue_lists_its_pauses_with_the_default_policies(
    backend: Backend,
) -> None:
    with TaskRunner(backend, build_builder()) as runner:
        runner.submit("t-default", REFUND)
        _paused(runner, "t-default")
        graph = build_builder().compile(checkpointer=backend.checkpointer)
        [item] = ReviewQueue(backend, graph).pending()
    assert (item.thread_id, item.status, item.deadline) == ("t-default", "pending", None)


async def test_an_async_runner_task_that_pauses_is_listed_in_the_queue_without_a_sync(
    abackend: AsyncBackend,
) -> None:
    builder = build_builder()
    graph = builder.compile(checkpointer=abackend.checkpointer)
    async with AsyncTaskRunner(abackend, builder) as runner:
        await runner.asubmit("t-alisted", REFUND)
        await _apaused(runner, "t-alisted")
        queue = AsyncReviewQueue(abackend, graph)
        [item] = await queue.pending()
        assert item.thread_id == "t-alisted"
        await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert (await runner.astatus("t-alisted")).status == "completed"
    assert EFFECTS == {"refund": 1, "lookup": 1}


# --- a pause a runner answers itself (TaskRunner.resume) leaves the queue ---------------------

TWO_REFUNDS = [
    ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]),
    ai(tool_calls=[tool_call("refund", {"order": "B2", "amount": 300})]),
    "ok",
]


def _orders(items: list[Any]) -> list[str]:
    return [i.requests[0]["action_request"]["args"]["order"] for i in items]


def test_a_pause_answered_by_task_runner_resume_is_closed_when_its_run_moves_on(
    backend: Backend,
) -> None:
    # resume() answers outside the queue (no reviewer): once the run is past the pause its
    # item is closed, not left pending for a reviewer whose decision could never apply.
    builder = build_builder(script=TWO_REFUNDS)
    queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
    with TaskRunner(backend, builder) as runner:
        runner.submit("t-rr", REFUND)
        _paused(runner, "t-rr")
        [first] = queue.pending()
        assert runner.resume("t-rr", {"type": "approve"}).status == "interrupted"
        [second] = queue.pending()  # paused again, on the second refund
        assert _orders([first, second]) == ["A1", "B2"]
        assert queue.get(first.id).status == "closed"
        done = runner.resume("t-rr", {"type": "reject", "message": "not this one"})
        assert done.status == "completed"
        assert queue.pending() == []  # nothing left for `harness review list`
        assert queue.get(second.id).status == "closed"
    # Nobody decided in the queue: no reviewer is invented, nothing is audited.
    assert _audits(backend, first.id) == _audits(backend, second.id) == 0
    with pytest.raises(AlreadyDecided, match="closed.*outside the queue"):
        queue.decide(second.id, {"type": "approve"}, reviewer="bob")
    assert EFFECTS == {"refund": 1}


def test_a_pause_answered_by_task_runner_resume_is_closed_when_its_run_fails(
    backend: Backend,
) -> None:
    down = [ai(tool_calls=[tool_call("refund", {"order": "BANK-DOWN", "amount": 250})])]
    builder = build_builder(script=down)
    queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
    with TaskRunner(backend, builder, max_attempts=1) as runner:
        runner.submit("t-rf", REFUND)
        _paused(runner, "t-rf")
        [item] = queue.pending()
        assert runner.resume("t-rf", {"type": "approve"}).status == "failed"
    assert queue.pending() == [] and queue.get(item.id).status == "closed"
    assert _audits(backend, item.id) == 0


def test_a_pause_answered_by_task_runner_resume_is_closed_by_the_run_recovery_carries_on(
    backend: Backend,
) -> None:
    from tests.harness_nodes.review_app import CRASHED, ProcessDied

    CRASHED.clear()
    crash = [ai(tool_calls=[tool_call("refund", {"order": "CRASH-ONCE", "amount": 250})]), "ok"]
    builder = build_builder(script=crash)
    queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
    with TaskRunner(backend, builder, lease_seconds=0.3) as runner:
        runner.submit("t-rd", REFUND)
        _paused(runner, "t-rd")
        [item] = queue.pending()
        with pytest.raises(ProcessDied):  # inside the approved refund
            runner.resume("t-rd", {"type": "approve"})
        deadline = time.monotonic() + 30
        while not runner.recover():  # once the lease has expired
            assert time.monotonic() < deadline, runner.status("t-rd")
            time.sleep(0.05)
        assert runner.result("t-rd", timeout=30)["partial_result"] == "ok"
    assert queue.pending() == [] and queue.get(item.id).status == "closed"
    assert _audits(backend, item.id) == 0
    assert EFFECTS == {"refund": 1}


async def test_async_a_pause_answered_by_aresume_is_closed_when_its_run_moves_on(
    abackend: AsyncBackend,
) -> None:
    builder = build_builder(script=TWO_REFUNDS)
    queue = AsyncReviewQueue(abackend, builder.compile(checkpointer=abackend.checkpointer))
    async with AsyncTaskRunner(abackend, builder) as runner:
        await runner.asubmit("t-arr", REFUND)
        await _apaused(runner, "t-arr")
        [first] = await queue.pending()
        assert (await runner.aresume("t-arr", {"type": "approve"})).status == "interrupted"
        [second] = await queue.pending()
        assert _orders([first, second]) == ["A1", "B2"]
        assert (await queue.get(first.id)).status == "closed"
        done = await runner.aresume("t-arr", {"type": "reject", "message": "not this one"})
        assert done.status == "completed"
        assert await queue.pending() == []
        assert (await queue.get(second.id)).status == "closed"
    for item in (first, second):
        sql = "SELECT count(*) AS n FROM harness_review_audit WHERE review_id = %s"
        assert await abackend.execute(sql, (item.id,)) == [{"n": 0}]
    with pytest.raises(AlreadyDecided, match="closed.*outside the queue"):
        await queue.decide(second.id, {"type": "approve"}, reviewer="bob")
    assert EFFECTS == {"refund": 1}


async def test_async_a_pause_answered_by_aresume_is_closed_when_its_run_fails(
    abackend: AsyncBackend,
) -> None:
    down = [ai(tool_calls=[tool_call("refund", {"order": "BANK-DOWN", "amount": 250})])]
    builder = build_builder(script=down)
    queue = AsyncReviewQueue(abackend, builder.compile(checkpointer=abackend.checkpointer))
    async with AsyncTaskRunner(abackend, builder, max_attempts=1) as runner:
        await runner.asubmit("t-arf", REFUND)
        await _apaused(runner, "t-arf")
        [item] = await queue.pending()
        assert (await runner.aresume("t-arf", {"type": "approve"})).status == "failed"
    assert await queue.pending() == []
    assert (await queue.get(item.id)).status == "closed"


async def test_async_a_pause_answered_by_aresume_is_closed_by_the_run_arecover_carries_on(
    abackend: AsyncBackend,
) -> None:
    from tests.harness_nodes.review_app import CRASHED, ProcessDied

    CRASHED.clear()
    crash = [ai(tool_calls=[tool_call("refund", {"order": "CRASH-ONCE", "amount": 250})]), "ok"]
    builder = build_builder(script=crash)
    queue = AsyncReviewQueue(abackend, builder.compile(checkpointer=abackend.checkpointer))
    async with AsyncTaskRunner(abackend, builder, lease_seconds=0.3) as runner:
        await runner.asubmit("t-ard", REFUND)
        await _apaused(runner, "t-ard")
        [item] = await queue.pending()
        with pytest.raises(ProcessDied):  # inside the approved refund
            await runner.aresume("t-ard", {"type": "approve"})
        deadline = time.monotonic() + 30
        while not await runner.arecover():  # once the lease has expired
            assert time.monotonic() < deadline, await runner.astatus("t-ard")
            await asyncio.sleep(0.05)
        assert (await runner.aresult("t-ard", timeout=30))["partial_result"] == "ok"
    assert await queue.pending() == []
    assert (await queue.get(item.id)).status == "closed"
    assert EFFECTS == {"refund": 1}


def test_a_runner_refuses_a_review_queue_on_another_backend(backend: Backend) -> None:
    with open_backend("memory://") as other:
        reviews = ReviewQueue(other, build_builder().compile(checkpointer=other.checkpointer))
        with pytest.raises(UserError, match="on the runner's backend"):
            TaskRunner(backend, build_builder(), reviews=reviews)


def test_show_reads_the_history_a_page_at_a_time(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `get_state_history` reads every checkpoint (each one the whole state) before it yields
    # the first: read whole, a task of 1,000 steps took 1.8 GB to show its review.
    import harness_nodes.review_queue as review_queue

    queue = _queue(backend)
    tid = _pause(queue)
    [item] = queue.pending()
    whole = queue.show(item.id).trace
    checkpoints = len(list(queue.graph.get_state_history({"configurable": {"thread_id": tid}})))
    limits: list[object] = []
    original = queue.graph.get_state_history

    def history(*a: Any, **k: Any) -> Any:
        limits.append(k.get("limit"))
        return original(*a, **k)

    monkeypatch.setattr(queue.graph, "get_state_history", history)
    monkeypatch.setattr(review_queue, "_PAGE", 2, raising=False)
    assert queue.show(item.id).trace == whole  # the same lines, one per checkpoint
    assert sum(line.startswith("checkpoint step") for line in whole) == checkpoints > 2
    assert limits and set(limits) == {2}


def _review_rows(url: str, review_id: str) -> tuple[Any, ...]:
    with psycopg.connect(url) as conn:
        item = conn.execute(
            "SELECT status, decided_by FROM harness_reviews WHERE id = %s", (review_id,)
        ).fetchone()
        audit = conn.execute(
            "SELECT count(*) FROM harness_review_audit WHERE review_id = %s", (review_id,)
        ).fetchone()
    assert item is not None and audit is not None
    return (*item, audit[0])


def _queue_unavailable(backend: Backend | AsyncBackend) -> str:
    return re.escape(f"Cannot open backend {backend.url!r}: review queue: ")


def _store_unavailable(backend: Backend | AsyncBackend) -> str:
    """The runner's run found its checkpointer's database away."""
    return re.escape(f"Cannot open backend {backend.url!r}: checkpointer: ")


@pytest.mark.postgres
def test_a_decision_with_the_database_away_raises_backend_unavailable(postgres_url: str) -> None:
    with open_backend(postgres_url) as backend:
        queue = _queue(backend)
        _pause(queue)
        [item] = queue.pending()
        with database_away(backend, postgres_url):
            with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
                queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
        assert exc.value.url == backend.url
    # Nothing recorded: still pending, no audit row, the refund never ran.
    assert _review_rows(postgres_url, item.id) == ("pending", None, 0)
    assert "refund" not in EFFECTS


@pytest.mark.postgres
def test_a_decision_whose_connection_drops_mid_claim_is_not_recorded(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness_nodes import review_queue

    with open_backend(postgres_url) as backend:
        queue = _queue(backend)
        _pause(queue)
        [item] = queue.pending()
        audit_row = review_queue._decision_audit

        def dropped_mid_claim(*args: Any) -> Any:
            # The item is claimed in the open transaction; the server drops the connection
            # before the audit row is written.
            drop_connections(postgres_url)
            return audit_row(*args)

        monkeypatch.setattr(review_queue, "_decision_audit", dropped_mid_claim)
        with database_away(backend, postgres_url, drop=False):
            with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
                queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
    # The claim was rolled back with the transaction: pending, no audit row, nothing ran.
    assert _review_rows(postgres_url, item.id) == ("pending", None, 0)
    assert "refund" not in EFFECTS


@pytest.mark.postgres
async def test_async_decision_with_the_database_away_raises_backend_unavailable(
    postgres_url: str,
) -> None:
    async with AsyncBackend.from_conn_string(postgres_url) as backend:
        queue = AsyncReviewQueue(
            backend, build_builder().compile(checkpointer=backend.checkpointer)
        )
        await queue.ainvoke({"messages": [HumanMessage("refund A1")]}, thread_id="a1")
        [item] = await queue.pending()
        with database_away(backend, postgres_url):
            with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
                await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
    assert _review_rows(postgres_url, item.id) == ("pending", None, 0)
    assert "refund" not in EFFECTS


class _AwayOnResume:
    """A review node's gate: the database goes away once the resumed run has its answer.

    The run is then past the decision's transaction and before its next checkpoint: the
    outage cuts the resume short, the decision already recorded.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend: Backend | AsyncBackend | None = None
        self._away: contextlib.ExitStack | None = None

    def __call__(self) -> None:
        if self.backend is not None and self._away is None:
            self._away = contextlib.ExitStack()
            self._away.enter_context(database_away(self.backend, self.url))

    def back(self) -> None:
        """The database is back (the pool reconnects)."""
        assert self._away is not None, "the resumed run never reached the review node"
        self._away.close()


@pytest.mark.postgres
def test_a_resume_cut_short_by_an_outage_raises_backend_unavailable_and_keeps_the_decision(
    postgres_url: str,
) -> None:
    away = _AwayOnResume(postgres_url)
    with open_backend(postgres_url) as backend:
        queue = ReviewQueue(
            backend, build_builder(gate=away).compile(checkpointer=backend.checkpointer)
        )
        tid = _pause(queue)
        [item] = queue.pending()
        away.backend = backend
        with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
            queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
        away.back()
        # The decision stands, not applied; nothing ran. Recovery applies it, once.
        assert _review_rows(postgres_url, item.id) == ("decided", "alice", 1)
        assert "refund" not in EFFECTS
        assert queue.sync(tid, recover=True) == []
        assert queue.get(item.id).status == "applied"
        assert EFFECTS == {"refund": 1, "lookup": 1}


@pytest.mark.postgres
def test_a_runner_task_resume_cut_short_by_an_outage_is_carried_on_by_recovery(
    postgres_url: str,
) -> None:
    away = _AwayOnResume(postgres_url)
    builder = build_builder(gate=away)
    with open_backend(postgres_url) as backend:
        # The outage outlasts what the runner waits for its database (here: not at all).
        with TaskRunner(backend, builder, lease_seconds=0.5, outage_seconds=0) as runner:
            runner.submit("t-out", REFUND)
            _paused(runner, "t-out")
            queue = ReviewQueue(backend, runner.graph, runner=runner)
            [item] = queue.sync("t-out")
            away.backend = backend
            with pytest.raises(BackendUnavailable, match=_store_unavailable(backend)) as exc:
                queue.decide(item.id, {"type": "approve"}, reviewer="alice")
            assert isinstance(exc.value.__cause__, psycopg.OperationalError)
            away.back()
            # Decided under a lease nobody renews: the task is a dead run, not a failed one.
            assert _review_rows(postgres_url, item.id) == ("decided", "alice", 1)
            assert _run_row(backend, "t-out")["status"] == "running"
            assert "refund" not in EFFECTS
            time.sleep(0.6)  # the lease expires
            assert runner.execute("t-out").status == "completed"  # what recover() dispatches
        assert queue.get(item.id).status == "applied"
        assert EFFECTS == {"refund": 1, "lookup": 1}


class _AwayForAWhile:
    """A review node's gate: the database goes away once the resumed run has its answer, and
    comes back *seconds* later (a failover), on its own."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.seconds = url, seconds
        self.backend: Backend | AsyncBackend | None = None
        self._away: contextlib.ExitStack | None = None
        self._timer: threading.Timer | None = None

    def __call__(self) -> None:
        if self.backend is not None and self._away is None:
            self._away = contextlib.ExitStack()
            self._away.enter_context(database_away(self.backend, self.url))
            self._timer = threading.Timer(self.seconds, self._away.close)
            self._timer.start()

    def join(self) -> None:
        assert self._timer is not None, "the resumed run never reached the review node"
        self._timer.join()


@pytest.mark.postgres
def test_a_queue_decision_whose_run_meets_an_outage_is_applied_once_the_database_is_back(
    postgres_url: str,
) -> None:
    # The outage outlasts every attempt the runner makes: it spends none of them on it.
    away = _AwayForAWhile(postgres_url, seconds=1.5)
    builder = build_builder(gate=away)
    with open_backend(postgres_url) as backend:
        with TaskRunner(backend, builder, max_attempts=2, outage_seconds=30) as runner:
            runner.submit("t-fo", REFUND)
            _paused(runner, "t-fo")
            queue = ReviewQueue(backend, runner.graph, runner=runner)
            [item] = queue.sync("t-fo")
            away.backend = backend
            state = queue.decide(item.id, {"type": "approve"}, reviewer="alice")
            away.join()
            assert "Done: refunded 250 on A1" in state["messages"][-1].content
            row = _run_row(backend, "t-fo")
            # Two claims: the first run and the decision's. No failure recorded.
            assert (row["status"], row["attempts"], row["error"]) == ("completed", 2, None)
    assert _review_rows(postgres_url, item.id) == ("applied", "alice", 1)
    assert EFFECTS == {"refund": 1, "lookup": 1}


class _ReviewStepFails:
    """A review node's gate that fails every resumed run before its step is saved."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self) -> None:
        if self.armed:
            raise RuntimeError("the review step broke")


@pytest.mark.postgres
def test_a_decision_whose_run_failed_before_taking_it_is_not_marked_applied(
    postgres_url: str,
) -> None:
    gate = _ReviewStepFails()
    builder = build_builder(gate=gate)
    with open_backend(postgres_url) as backend:
        with TaskRunner(backend, builder, max_attempts=2) as runner:
            runner.submit("t-rf", REFUND)
            _paused(runner, "t-rf")
            queue = ReviewQueue(backend, runner.graph, runner=runner)
            [item] = queue.sync("t-rf")
            gate.armed = True
            with pytest.raises(RunFailed, match="the review step broke"):
                queue.decide(item.id, {"type": "approve"}, reviewer="alice")
            state = runner.graph.get_state({"configurable": {"thread_id": "t-rf"}})
            assert [i.id for i in state.interrupts] == [item.interrupt_id]  # never taken
            assert _run_row(backend, "t-rf")["status"] == "failed"
    # Recorded (audited), not applied: the checkpoint never went past its pause.
    assert _review_rows(postgres_url, item.id) == ("decided", "alice", 1)
    assert "refund" not in EFFECTS


@pytest.mark.postgres
async def test_async_resume_cut_short_by_an_outage_raises_backend_unavailable(
    postgres_url: str,
) -> None:
    away = _AwayOnResume(postgres_url)
    async with AsyncBackend.from_conn_string(postgres_url) as backend:
        queue = AsyncReviewQueue(
            backend, build_builder(gate=away).compile(checkpointer=backend.checkpointer)
        )
        await queue.ainvoke({"messages": [HumanMessage("refund A1")]}, thread_id="a-out")
        [item] = await queue.pending()
        away.backend = backend
        with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
            await queue.decide(item.id, {"type": "approve"}, reviewer="alice")
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
        away.back()
        assert _review_rows(postgres_url, item.id) == ("decided", "alice", 1)
        assert "refund" not in EFFECTS
        assert await queue.sync("a-out", recover=True) == []
        assert (await queue.get(item.id)).status == "applied"
        assert EFFECTS == {"refund": 1, "lookup": 1}


_READS = ["pending", "get", "show", "sync", "assign", "expire"]


def _read(queue: Any, name: str, item: Any) -> Any:
    return {
        "pending": lambda: queue.pending(),
        "get": lambda: queue.get(item.id),
        "show": lambda: queue.show(item.id),
        "sync": lambda: queue.sync(item.thread_id),
        "assign": lambda: queue.assign(item.id, "bob"),
        "expire": lambda: queue.expire(),
    }[name]()


@pytest.mark.postgres
@pytest.mark.parametrize("call", _READS)
def test_queue_reads_with_the_database_away_raise_backend_unavailable(
    postgres_url: str, call: str
) -> None:
    with open_backend(postgres_url) as backend:
        queue = _queue(backend)
        _pause(queue)
        [item] = queue.pending()
        with database_away(backend, postgres_url):
            with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
                _read(queue, call, item)
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
        assert queue.get(item.id).assignee is None  # nothing half-written


@pytest.mark.postgres
@pytest.mark.parametrize("call", _READS)
async def test_async_queue_reads_with_the_database_away_raise_backend_unavailable(
    postgres_url: str, call: str
) -> None:
    async with AsyncBackend.from_conn_string(postgres_url) as backend:
        queue = AsyncReviewQueue(
            backend, build_builder().compile(checkpointer=backend.checkpointer)
        )
        await queue.ainvoke({"messages": [HumanMessage("refund A1")]}, thread_id="a-read")
        [item] = await queue.pending()
        with database_away(backend, postgres_url):
            with pytest.raises(BackendUnavailable, match=_queue_unavailable(backend)) as exc:
                await _read(queue, call, item)
        assert isinstance(exc.value.__cause__, psycopg.OperationalError)
        assert (await queue.get(item.id)).assignee is None


def test_show_masks_api_keys_but_get_keeps_the_call_as_stored(backend: Backend) -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    args = {"to": "ann@example.com", "body": f"your new key: {secret}"}
    script = [ai(tool_calls=[tool_call("send_email", args)]), ai("sent")]
    queue = ReviewQueue(backend, build_builder(script).compile(checkpointer=backend.checkpointer))
    queue.invoke({"messages": [HumanMessage("mail Ann her key")]}, thread_id="t-key")
    [item] = queue.pending()
    assert item.requests[0]["action_request"]["args"] == args  # decided against the real call
    detail = queue.show(item.id)
    shown = json.dumps([detail.item.requests, detail.trace, detail.audit], default=str)
    assert "ann@example.com" in shown and "your new key: ***" in shown
    assert secret not in shown
    assert detail.tree is not None and secret not in detail.tree.to_json()
    queue.decide(item.id, {"type": "approve"}, reviewer="ann")
    assert EFFECTS == {"send_email": 1}


def test_show_masks_the_fields_the_run_marked_sensitive(backend: Backend) -> None:
    from harness_nodes import langfuse_callbacks

    args = {"to": "ann@example.com", "body": "your PIN is 8812"}
    script = [ai(tool_calls=[tool_call("send_email", args)]), ai("sent")]
    queue = ReviewQueue(backend, build_builder(script).compile(checkpointer=backend.checkpointer))
    config = langfuse_callbacks("t-pin", sensitive_fields=["body"])  # no Langfuse: a no-op
    queue.invoke({"messages": [HumanMessage("mail Ann her PIN")]}, config, thread_id="t-pin")
    [item] = queue.pending()
    detail = queue.show(item.id)
    shown = json.dumps([detail.item.requests, detail.trace], default=str)
    assert "ann@example.com" in shown and "8812" not in shown
    assert detail.tree is not None and "8812" not in detail.tree.to_json()


def _twice(card: str) -> list[Any]:
    """A script that asks to mail *card* twice: two pauses, one after the other."""
    return [
        ai(tool_calls=[tool_call("send_email", {"to": "a", "body": "x", "card": card})]),
        ai(tool_calls=[tool_call("send_email", {"to": "b", "body": "y", "card": card})]),
        ai("done"),
    ]


def test_a_decision_keeps_the_runs_marked_fields_for_its_next_pause(backend: Backend) -> None:
    from harness_nodes import langfuse_callbacks
    from harness_nodes.review_queue import masked_items

    card = "4929123456789012"
    graph = build_builder(_twice(card)).compile(checkpointer=backend.checkpointer)
    queue = ReviewQueue(backend, graph)
    config = langfuse_callbacks("t-card", sensitive_fields=["card"])  # no Langfuse: a no-op
    queue.invoke({"messages": [HumanMessage("mail twice")]}, config, thread_id="t-card")
    [first] = queue.pending()
    queue.decide(first.id, {"type": "approve"}, reviewer="ann")
    listed = masked_items(queue.pending(), backend.checkpointer)  # the newest checkpoint only
    assert [i.requests[0]["action_request"]["args"]["card"] for i in listed] == ["***"]


async def test_an_async_decision_keeps_the_runs_marked_fields_for_its_next_pause(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import langfuse_callbacks
    from harness_nodes._trace_langfuse import marked_fields

    graph = build_builder(_twice("4929123456789012")).compile(checkpointer=abackend.checkpointer)
    queue = AsyncReviewQueue(abackend, graph)
    config = langfuse_callbacks("t-card", sensitive_fields=["card"])  # no Langfuse: a no-op
    await queue.ainvoke({"messages": [HumanMessage("mail twice")]}, config, thread_id="t-card")
    [first] = await queue.pending()
    await queue.decide(first.id, {"type": "approve"}, reviewer="ann")
    assert len(await queue.pending()) == 1  # paused again
    snapshot = await graph.aget_state({"configurable": {"thread_id": "t-card"}})
    assert marked_fields([snapshot.metadata]) == ["card"]
