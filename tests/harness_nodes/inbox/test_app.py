"""The inbox over HTTP (in-process client), against a real `ReviewQueue` and paused graph."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, ToolRuntime
from starlette.testclient import TestClient

from checkpointers import open_backend
from harness_nodes import HumanReview, ReviewPolicy
from harness_nodes.review_queue import ReviewQueue, pending_sql
from harness_nodes.testing import ScriptedChatModel, ai, tool_call
from tests.harness_nodes.inbox.conftest import TOKENS, Shop, basic, make_app

ARGS = {"order": "A1", "amount": 120.0, "note": "customer called"}
ORIGIN = "http://testserver"


def client(shop: Shop, **kwargs: Any) -> TestClient:
    return TestClient(make_app(shop.queue, **kwargs), base_url=ORIGIN)


def csrf_of(c: TestClient, review_id: str, who: str = "alice") -> str:
    page = c.get(f"/reviews/{review_id}", headers=basic(who))
    assert page.status_code == 200
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, "the item page carries a CSRF token"
    return m.group(1)


def status_of(shop: Shop, review_id: str) -> str:
    return str(shop.queue.get(review_id).status)


def test_every_route_refuses_unauthenticated_requests(shop: Shop) -> None:
    rid = shop.pause("t-auth", ARGS)
    c = client(shop)
    wrong = {
        "authorization": "Basic " + "bWFsbG9yeTpub3BlLW5vcGUtbm9wZQ=="
    }  # mallory:nope-nope-nope
    for headers in ({}, wrong, {"authorization": "Bearer not-a-token"}):
        for method, path, kw in [
            ("GET", "/reviews", {}),
            ("GET", f"/reviews/{rid}", {}),
            ("POST", f"/reviews/{rid}/decision", {"data": {"decision": "approve"}}),
            ("POST", f"/reviews/{rid}/decision", {"json": {"type": "approve"}}),
        ]:
            r = c.request(method, path, headers={**headers, "origin": ORIGIN}, **kw)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Basic")
    assert status_of(shop, rid) == "pending" and shop.refunds == []


@pytest.mark.parametrize(
    ("headers", "with_token"),
    [
        pytest.param({"origin": "http://evil.example"}, True, id="foreign-origin"),
        pytest.param({"origin": "null"}, True, id="opaque-origin"),
        pytest.param({"sec-fetch-site": "cross-site"}, True, id="cross-site-fetch"),
        pytest.param({"origin": ORIGIN}, False, id="no-csrf-token"),
        pytest.param({"origin": ORIGIN, "x-csrf-token": "forged"}, False, id="forged-csrf-token"),
    ],
)
def test_forged_cross_site_post_is_refused(
    shop: Shop, headers: dict[str, str], with_token: bool
) -> None:
    rid = shop.pause("t-csrf", ARGS)
    c = client(shop)
    data = {"decision": "approve"}
    if with_token:
        data["csrf_token"] = csrf_of(c, rid)
    r = c.post(f"/reviews/{rid}/decision", headers={**basic("alice"), **headers}, data=data)
    assert r.status_code == 403
    assert status_of(shop, rid) == "pending" and shop.refunds == []


def test_csrf_token_of_another_reviewer_or_session_is_refused(shop: Shop) -> None:
    rid = shop.pause("t-csrf2", ARGS)
    bobs = csrf_of(client(shop), rid, "bob")
    c = client(shop)
    csrf_of(c, rid)  # alice's own session cookie
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={**basic("alice"), "origin": ORIGIN},
        data={"decision": "approve", "csrf_token": bobs},
    )
    assert r.status_code == 403 and status_of(shop, rid) == "pending"


def test_form_approve_resumes_and_audits_the_reviewer(shop: Shop) -> None:
    rid = shop.pause("t-form", ARGS)
    c = client(shop)
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={**basic("bob"), "origin": ORIGIN},
        data={"decision": "approve", "csrf_token": csrf_of(c, rid, "bob")},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == f"/reviews/{rid}?decided=1"
    assert shop.refunds == [ARGS]
    page = c.get(r.headers["location"], headers=basic("bob")).text
    assert "Decided <strong>approve</strong> by <strong>bob</strong>" in page
    assert "Refund handled." in page
    [audit] = shop.backend.execute(
        "SELECT reviewer, decision FROM harness_review_audit WHERE review_id = %s", (rid,)
    )
    assert audit == {"reviewer": "bob", "decision": "approve"}


def test_json_api_decides_with_bearer_and_reports_conflicts(backend_url: str) -> None:
    with open_backend(backend_url) as backend:
        shop = Shop(backend)
        rid = shop.pause("t-api", ARGS)
        c = client(shop)
        alice = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
        listed = c.get("/reviews", headers=alice).json()
        assert [i["id"] for i in listed["items"]] == [rid]
        assert listed["items"][0]["actions"] == [{"name": "refund", "args": ARGS}]
        item = c.get(f"/reviews/{rid}", headers=alice).json()
        assert item["status"] == "pending" and item["reason"] == "irreversible"
        assert item["actions"][0]["args_schema"]["properties"]["amount"]["type"] == "number"
        assert [s["name"] for s in item["trace"]["steps"]][:2] == ["input", "agent"]

        edited = {**ARGS, "amount": 80.0}
        r = c.post(f"/reviews/{rid}/decision", headers=alice, json={"type": "edit", "args": edited})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "applied" and body["decided_by"] == "alice"
        assert body["decision"] == "edit" and body["edited_args"] == edited
        assert body["outcome"] == {"status": "completed", "reason": "", "result": "Refund handled."}
        assert shop.refunds == [edited]

        bob = {"authorization": f"Bearer {TOKENS['bob']}", "accept": "application/json"}
        r = c.post(f"/reviews/{rid}/decision", headers=bob, json={"type": "reject"})
        assert r.status_code == 409
        conflict = r.json()
        assert conflict["error"] == "already_decided" and conflict["decided_by"] == "alice"
        assert "Already decided by alice at" in conflict["message"]
        assert shop.refunds == [edited]  # nothing applied twice


@pytest.mark.parametrize(
    ("content_type", "body", "status", "error"),
    [
        pytest.param("application/json", "{not json", 400, "bad_json", id="not-json"),
        pytest.param("application/json", "null", 400, "bad_json", id="null"),
        pytest.param("application/json", '["approve"]', 400, "bad_json", id="array"),
        # Nested past the JSON parser's depth: a RecursionError, which was a 500.
        pytest.param("application/json", "[" * 100_000 + "]" * 100_000, 400, "bad_json", id="deep"),
        pytest.param("application/json", '{"type": null}', 422, "invalid_decision", id="no-type"),
        pytest.param("text/plain", '{"type": "approve"}', 415, "unsupported_media_type", id="text"),
        pytest.param("", '{"type": "approve"}', 415, "unsupported_media_type", id="no-type-header"),
    ],
)
def test_malformed_json_decisions_get_a_json_error_and_change_nothing(
    shop: Shop, content_type: str, body: str, status: int, error: str
) -> None:
    rid = shop.pause("t-bad-json", ARGS)
    c = client(shop)
    headers = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    if content_type:
        headers["content-type"] = content_type
    r = c.post(f"/reviews/{rid}/decision", headers=headers, content=body)
    assert (r.status_code, r.headers["content-type"]) == (status, "application/json")
    assert r.json()["error"] == error
    assert shop.queue.get(rid).status == "pending" and shop.refunds == []


def test_edits_are_validated_by_the_queue_and_the_item_stays_pending(shop: Shop) -> None:
    rid = shop.pause("t-invalid", ARGS)
    c = client(shop)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    r = c.post(
        f"/reviews/{rid}/decision", headers=api, json={"type": "edit", "args": {"amount": "lots"}}
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_decision"
    assert "fail its schema" in r.json()["message"]
    # The form path: an unreadable number is reported on its field, nothing is decided.
    token = csrf_of(c, rid)
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={**basic("alice"), "origin": ORIGIN},
        data={"decision": "edit", "csrf_token": token, "arg.order": "A1", "arg.amount": "ten"},
    )
    assert r.status_code == 422 and "amount: not a valid number" in r.text
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={**basic("alice"), "origin": ORIGIN},
        data={"decision": "respond", "csrf_token": token, "message": "  "},
    )
    assert r.status_code == 422 and "non-empty" in r.text
    assert status_of(shop, rid) == "pending" and shop.refunds == []


def test_the_edit_form_of_a_tool_with_injected_arguments_is_applied(tmp_path: Any) -> None:
    """The form shows the arguments a call sets (no `runtime`, which LangGraph injects when
    the tool runs), and submitting it edits the call: the queue does not ask for `runtime`."""
    refunds: list[str] = []

    @tool
    def refund(order: str, amount: float, runtime: ToolRuntime) -> str:
        """Refund an order (irreversible: money leaves)."""
        refunds.append(f"{amount:g} on {order}")
        return f"refunded {amount:g} on {order}"

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 120.0})]), ai("Ok.")]
    )
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=[refund])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    with open_backend(f"sqlite:///{tmp_path / 'inbox.db'}") as backend:
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t-injected")
        [item] = queue.pending()
        c = TestClient(make_app(queue), base_url=ORIGIN)
        page = c.get(f"/reviews/{item.id}", headers=basic("alice")).text
        assert 'name="arg.amount"' in page and 'name="arg.runtime"' not in page
        r = c.post(
            f"/reviews/{item.id}/decision",
            headers={**basic("alice"), "origin": ORIGIN},
            data={
                "decision": "edit",
                "csrf_token": csrf_of(c, item.id),
                "arg.order": "A1",
                "arg.amount": "90",
            },
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        assert queue.get(item.id).status == "applied"
    assert refunds == ["90 on A1"]


def test_agent_text_is_escaped_and_pages_carry_security_headers(shop: Shop) -> None:
    evil = {
        "order": '<script>alert(1)</script><a href="javascript:alert(2)">Approve</a>',
        "amount": 1.0,
        "note": "</pre><button id=approve>Approve</button>{{ 7*7 }}",
    }
    rid = shop.pause("t-xss", evil)
    c = client(shop)
    for path in ("/reviews", f"/reviews/{rid}"):
        r = c.get(path, headers=basic("alice"))
        assert "<script>alert" not in r.text and 'href="javascript:' not in r.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
        assert "<button id=approve>" not in r.text
        if path != "/reviews":  # the item page shows the full arguments, as text
            assert "&lt;button id=approve&gt;" in r.text and "{{ 7*7 }}" in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"


def test_requests_for_foreign_host_names_are_refused(shop: Shop) -> None:
    c = client(shop)
    r = c.get("/reviews", headers={**basic("alice"), "host": "attacker.example"})
    assert r.status_code == 421


def test_a_page_number_past_any_database_integer_is_an_empty_page(shop: Shop) -> None:
    # Its offset overflowed the database's integers: a 500.
    shop.pause("t-page", ARGS)
    r = client(shop).get("/reviews?page=4611686018427387904", headers=basic("alice"))
    assert r.status_code == 200 and "t-page" not in r.text


def test_missing_item_is_404(shop: Shop) -> None:
    r = client(shop).get("/reviews/nope", headers=basic("alice"))
    assert r.status_code == 404 and "No review item" in r.text


def test_outcome_arrives_after_the_page_returns(shop: Shop) -> None:
    """A slow resume: the decision returns at once, the page polls until the outcome."""
    rid = shop.pause("t-slow", ARGS)
    shop.tool_delay = 1.0
    c = client(shop, decide_wait=0.05)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    with c:  # lifespan: the resumer threads finish before the app shuts down
        r = c.post(f"/reviews/{rid}/decision", headers=api, json={"type": "approve"})
        assert r.status_code == 200 and r.json()["outcome"] is None and r.json()["poll"]
        page = c.get(f"/reviews/{rid}", headers=basic("alice")).text
        assert "the task is resuming" in page and "data-poll=" in page
        deadline = time.monotonic() + 10
        while (body := c.get(f"/reviews/{rid}", headers=api).json())["outcome"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert body["outcome"]["result"] == "Refund handled." and len(shop.refunds) == 1


def _fill(shop: Shop, n: int) -> None:
    """*n* pending rows shaped like a real pause (copied from one), across task types."""
    rid = shop.pause("t-seed", ARGS)
    [row] = shop.backend.execute("SELECT * FROM harness_reviews WHERE id = %s", (rid,))
    now = time.time()
    with shop.backend.transaction() as tx:
        for i in range(n):
            tx.execute(
                "INSERT INTO harness_reviews (id, thread_id, interrupt_id, task_type, reason, "
                "risk, request, status, priority, assignee, deadline, created_at) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s)",
                (
                    f"bulk-{i:05d}",
                    f"bulk-thread-{i}",
                    f"intr-{i}",
                    ("billing", "support", "research", "ops")[i % 4],
                    row["reason"],
                    row["risk"],
                    row["request"],
                    i % 3,
                    "carol" if i % 10 == 0 else None,
                    now + i if i % 2 else None,
                    now - i,
                ),
            )


def test_list_of_10000_pending_is_paginated_and_filtered_by_the_index(shop: Shop) -> None:
    _fill(shop, 10_000)
    c = client(shop, page_size=50)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    first = c.get("/reviews?task_type=billing", headers=api).json()
    assert len(first["items"]) == 50 and first["next"] == "/reviews?task_type=billing&page=2"
    assert {i["task_type"] for i in first["items"]} == {"billing"}
    prios = [(-i["priority"], i["deadline"] is None) for i in first["items"]]
    assert prios == sorted(prios), "most urgent first: priority, then items with a deadline"
    second = c.get(first["next"], headers=api).json()
    assert not {i["id"] for i in first["items"]} & {i["id"] for i in second["items"]}
    last = c.get("/reviews?task_type=billing&page=50", headers=api).json()
    assert len(last["items"]) == 50 and last["next"] is None  # 2,500 billing items
    html = c.get("/reviews?assignee=carol&page=2", headers=basic("alice")).text
    assert html.count('class="item"') == 50 and 'rel="prev"' in html and 'rel="next"' in html
    # Filter and order are answered from an index: no table scan, no sort of the queue.
    for filters, index in [
        ({"task_type": "billing"}, "harness_reviews_type_urgency"),
        ({}, "harness_reviews_urgency"),
    ]:
        sql, params = pending_sql(**filters, limit=51, offset=50, order="urgency")
        plan = shop.backend.execute("EXPLAIN QUERY PLAN " + sql.replace("%s", "?"), params)
        details = " | ".join(str(r["detail"]) for r in plan)
        assert f"USING INDEX {index}" in details and "TEMP B-TREE" not in details, details


def test_json_posts_with_ambient_basic_credentials_still_need_the_csrf_token(shop: Shop) -> None:
    rid = shop.pause("t-json-basic", ARGS)
    c = client(shop)
    headers = {**basic("alice"), "origin": ORIGIN, "accept": "application/json"}
    r = c.post(f"/reviews/{rid}/decision", headers=headers, json={"type": "approve"})
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    token = csrf_of(c, rid)
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={**headers, "x-csrf-token": token},
        json={"type": "approve"},
    )
    assert r.status_code == 200 and shop.refunds == [ARGS]


def test_anonymous_decisions_only_when_enabled(shop: Shop) -> None:
    from harness_nodes.inbox import InboxAuth, create_app

    rid = shop.pause("t-anon", ARGS)
    assert client(shop).get("/reviews").status_code == 401
    auth = InboxAuth(allow_anonymous=True, allowed_hosts=frozenset({"testserver"}))
    c = TestClient(create_app(shop.queue, auth), base_url=ORIGIN)
    page = c.get(f"/reviews/{rid}")
    assert page.status_code == 200 and "signed in as <strong>anonymous</strong>" in page.text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={"origin": ORIGIN},
        data={"decision": "approve", "csrf_token": token.group(1)},
    )
    assert r.status_code == 200  # followed the redirect to the item page
    assert shop.queue.get(rid).decided_by == "anonymous"


def test_invisible_and_bidi_characters_in_arguments_are_shown_to_the_reviewer(
    shop: Shop,
) -> None:
    """U+202E makes "\u202eA1-resu" read "user-1A"; zero-width spaces hide in anything.

    The pages show such characters as escapes; the edit form keeps the value itself, so an
    argument the reviewer leaves alone is sent back as the agent wrote it.
    """
    note = "for \u202eresu-ffats\u202c\u200b"
    rid = shop.pause("t-bidi", {**ARGS, "note": note})
    c = client(shop)
    hidden = re.compile("[\u202a-\u202e\u200b]")
    listing = c.get("/reviews", headers=basic("alice")).text
    assert "\\u202e" in listing and not hidden.search(listing)
    page = c.get(f"/reviews/{rid}", headers=basic("alice")).text
    shown, form = page.split('id="edit-form"')
    assert not hidden.search(shown)
    args = re.search(r'<pre class="args" id="args-0">(.*?)</pre>', shown, re.S)
    assert args and "\\u202eresu-ffats\\u202c\\u200b" in args[1]
    assert f'value="{note}"' in form
    r = c.post(
        f"/reviews/{rid}/decision",
        headers=basic("alice"),
        data={
            "csrf_token": csrf_of(c, rid),
            "decision": "edit",
            "arg.order": "A1",
            "arg.amount": "120.0",
            "arg.note": note,
        },
    )
    assert r.status_code == 200 and shop.refunds == [{**ARGS, "note": note}]


def test_anonymous_inbox_refuses_a_dns_rebinding_page(shop: Shop) -> None:
    """`create_app` with `allow_anonymous` and no `allowed_hosts` still answers loopback only.

    A page on attacker.example whose name is re-pointed at 127.0.0.1 is same-origin with the
    inbox; anonymous, it needs no credentials, so only the Host check stops it reading the
    CSRF token and approving the refund.
    """
    from harness_nodes.inbox import InboxAuth, create_app

    rid = shop.pause("t-rebind", ARGS)
    app = create_app(shop.queue, InboxAuth(allow_anonymous=True))
    evil = "http://rebind.attacker.example:8765"
    attacker = TestClient(app, base_url=evil)
    assert attacker.get(f"/reviews/{rid}").status_code == 421
    r = attacker.post(
        f"/reviews/{rid}/decision", headers={"origin": evil}, data={"decision": "approve"}
    )
    assert r.status_code == 421
    assert status_of(shop, rid) == "pending" and shop.refunds == []
    local = TestClient(app, base_url="http://127.0.0.1:8765")
    assert local.get(f"/reviews/{rid}").status_code == 200


@pytest.mark.slow
def test_concurrent_decisions_through_the_server_apply_once(shop: Shop) -> None:
    """Six reviewers click at once on a real server: one wins, five get 409, one refund."""
    import threading

    import httpx

    from tests.harness_nodes.inbox.conftest import live_server

    rid = shop.pause("t-race", ARGS)
    statuses: list[int] = []
    with live_server(make_app(shop.queue)) as base:
        barrier = threading.Barrier(6)

        def click(i: int) -> None:
            who = ("alice", "bob")[i % 2]
            headers = {"authorization": f"Bearer {TOKENS[who]}", "accept": "application/json"}
            body = {"type": "approve"} if i % 3 else {"type": "reject", "message": f"no {i}"}
            barrier.wait()
            r = httpx.post(f"{base}/reviews/{rid}/decision", headers=headers, json=body, timeout=30)
            statuses.append(r.status_code)

        threads = [threading.Thread(target=click, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(statuses) == [200, 409, 409, 409, 409, 409]
    winner = shop.queue.get(rid).decision or []
    assert len(shop.refunds) == (1 if winner[0]["type"] == "approve" else 0)  # never twice
    audit = shop.backend.execute(
        "SELECT reviewer FROM harness_review_audit WHERE review_id = %s", (rid,)
    )
    assert len(audit) == 1


def test_api_keys_are_masked_on_every_page_and_an_untouched_field_keeps_its_value(
    shop: Shop,
) -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    args = {**ARGS, "note": f"customer key {secret}"}
    rid = shop.pause("t-secret", args)
    c = client(shop)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    pages = [
        c.get("/reviews", headers=basic("alice")).text,
        c.get(f"/reviews/{rid}", headers=basic("alice")).text,
        c.get("/reviews", headers=api).text,
        c.get(f"/reviews/{rid}", headers=api).text,
    ]
    for page in pages:
        assert "customer key ***" in page and secret not in page
    # The reviewer lowers the amount and leaves the note as shown: the refund gets the real note.
    r = c.post(
        f"/reviews/{rid}/decision",
        headers={**basic("alice"), "origin": ORIGIN},
        data={
            "decision": "edit",
            "csrf_token": csrf_of(c, rid),
            "arg.order": "A1",
            "arg.amount": "99",
            "arg.note": "customer key ***",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert shop.refunds == [{**args, "amount": 99}]
    page = c.get(r.headers["location"], headers=basic("alice")).text
    assert "Decided <strong>edit</strong>" in page and secret not in page


def test_a_json_edit_of_the_masked_arguments_it_was_shown_keeps_the_real_values(
    shop: Shop,
) -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    args = {**ARGS, "note": f"customer key {secret}"}
    rid = shop.pause("t-secret-json", args)
    c = client(shop)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    [action] = c.get(f"/reviews/{rid}", headers=api).json()["actions"]
    assert action["args"]["note"] == "customer key ***"
    edit = {"type": "edit", "args": {**action["args"], "amount": 99}}
    r = c.post(f"/reviews/{rid}/decision", headers=api, json=edit)
    assert r.status_code == 200, r.text
    assert secret not in r.text
    assert shop.refunds == [{**args, "amount": 99}]


def test_the_item_page_masks_the_fields_the_run_marked_sensitive(shop: Shop) -> None:
    from harness_nodes import langfuse_callbacks

    config = langfuse_callbacks("t-marked", sensitive_fields=["note"])  # no Langfuse: a no-op
    shop.queue.invoke({"messages": [HumanMessage(json.dumps(ARGS))]}, config, thread_id="t-marked")
    [item] = shop.queue.sync("t-marked")
    c = client(shop)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    for page in (
        c.get(f"/reviews/{item.id}", headers=basic("alice")).text,
        c.get(f"/reviews/{item.id}", headers=api).text,
    ):
        assert "A1" in page and "customer called" not in page


def test_the_list_page_masks_the_fields_the_run_marked_sensitive(shop: Shop) -> None:
    from harness_nodes import langfuse_callbacks

    card = "4929123456789012"
    config = langfuse_callbacks("t-card", sensitive_fields=["card"])  # no Langfuse: a no-op
    args = {"card": card, **ARGS}
    shop.queue.invoke({"messages": [HumanMessage(json.dumps(args))]}, config, thread_id="t-card")
    shop.queue.sync("t-card")
    shop.pause("t-plain", ARGS)  # a run that marked nothing: its call is shown as it is
    c = client(shop)
    api = {"authorization": f"Bearer {TOKENS['alice']}", "accept": "application/json"}
    page = c.get("/reviews", headers=basic("alice")).text
    listed = c.get("/reviews", headers=api).json()["items"]
    assert "customer called" in page and card[:6] not in page
    shown = {i["thread_id"]: i["actions"][0]["args"] for i in listed}
    assert shown == {"t-card": {**args, "card": "***"}, "t-plain": ARGS}
