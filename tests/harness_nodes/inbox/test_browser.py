"""The inbox in headless Chromium, driving a real server on 127.0.0.1 over a real paused graph.

Screenshots of the list and item pages are saved by every run under
``bench/results/tmp/screenshots/`` (git-ignored); with ``HARNESS_UPDATE_SCREENSHOTS=1`` they
also replace the committed set in ``docs/screenshots/`` that reviewers look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.harness_nodes.inbox.conftest import TOKENS, Shop, live_server, make_app

pytestmark = pytest.mark.slow

ARGS = {"order": "A-1042", "amount": 129.9, "note": "parcel arrived damaged"}
SHOTS = REPO_ROOT / "bench" / "results" / "tmp" / "screenshots"
COMMITTED_SHOTS = REPO_ROOT / "docs" / "screenshots"


@pytest.fixture
def page_for(chromium: Any) -> Iterator[Any]:
    """A fresh browser context per reviewer (own cookies, own basic-auth credentials)."""
    contexts: list[Any] = []

    def make(who: str) -> Any:
        ctx = chromium.new_context(
            http_credentials={"username": who, "password": TOKENS[who]},
            viewport={"width": 1200, "height": 900},
        )
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(10_000)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.dialogs = dialogs  # type: ignore[attr-defined]
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / name)
    if os.environ.get("HARNESS_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(path, COMMITTED_SHOTS / name)


def test_list_open_edit_approve_shows_outcome(shop: Shop, page_for: Any, tmp_path: Path) -> None:
    rid = shop.pause("t-browser-edit", ARGS)
    shop.pause_many(["t-browser-2", "t-browser-3"], {"order": "B-7", "amount": 15.0})
    shop.tool_delay = 0.6  # slower than the request waits: the outcome arrives by polling
    with live_server(make_app(shop.queue, decide_wait=0.1)) as base:
        page = page_for("alice")
        page.goto(f"{base}/")
        assert page.locator("tr.item").count() == 3
        shot(page, tmp_path, "inbox-list.png")
        page.click(f'tr[data-review-id="{rid}"] a.open')
        page.wait_for_url(f"**/reviews/{rid}")
        assert "irreversible" in page.inner_text("#reason")
        assert '"amount": 129.9' in page.inner_text("#args-0")
        assert page.locator("ul.tree li").count() > 3  # the decision tree from build_trace
        page.click("#edit-toggle")
        shot(page, tmp_path, "inbox-item.png")
        page.fill("#f-amount", "99.5")
        page.fill("#f-note", "partial refund agreed")
        page.click("#approve-edited")
        page.wait_for_url(lambda u: u.endswith(f"/reviews/{rid}?decided=1"))
        page.locator(".outcome-status").wait_for()  # polled in by the page's script
        assert page.inner_text(".outcome-status") == "completed"
        assert "Refund handled." in page.inner_text("#outcome")
        assert "by alice" in page.inner_text("#decided")
        assert '"amount": 99.5' in page.inner_text("#edited-args")
        shot(page, tmp_path, "inbox-decided.png")
        assert page.dialogs == []
    assert shop.refunds == [{"order": "A-1042", "amount": 99.5, "note": "partial refund agreed"}]
    [audit] = shop.backend.execute(
        "SELECT reviewer, decision FROM harness_review_audit WHERE review_id = %s", (rid,)
    )
    assert audit == {"reviewer": "alice", "decision": "edit"}


def test_reject_with_message(shop: Shop, page_for: Any) -> None:
    rid = shop.pause("t-browser-reject", ARGS)
    with live_server(make_app(shop.queue)) as base:
        page = page_for("bob")
        page.goto(f"{base}/reviews/{rid}")
        page.fill("#message", "Do not refund: the order was never shipped.")
        page.click("#reject")
        page.wait_for_url(lambda u: u.endswith(f"/reviews/{rid}?decided=1"))
        assert "reject" in page.inner_text("#decided") and "by bob" in page.inner_text("#decided")
        assert "never shipped" in page.inner_text("#status")
        assert page.inner_text(".outcome-status") == "completed"
    assert shop.refunds == []
    tool_msgs = [m for m in shop.messages("t-browser-reject") if m.type == "tool"]
    assert "never shipped" in str(tool_msgs[-1].content)


def test_stale_page_gets_already_decided(shop: Shop, page_for: Any) -> None:
    rid = shop.pause("t-browser-race", ARGS)
    with live_server(make_app(shop.queue)) as base:
        alice, bob = page_for("alice"), page_for("bob")
        alice.goto(f"{base}/reviews/{rid}")
        bob.goto(f"{base}/reviews/{rid}")  # both see it pending
        alice.click("#approve")
        alice.wait_for_url(lambda u: u.endswith(f"/reviews/{rid}?decided=1"))
        bob.fill("#message", "no")
        bob.click("#reject")  # from a stale page
        notice = bob.locator("#notice")
        notice.wait_for()
        text = notice.inner_text()
        assert text.startswith("Already decided by alice at ") and "(approve)" in text
        assert "by alice" in bob.inner_text("#decided")
        assert bob.locator("#reject").count() == 0  # no buttons on a decided item
    assert len(shop.refunds) == 1


def test_injected_markup_renders_as_text(shop: Shop, page_for: Any, tmp_path: Path) -> None:
    evil = {
        "order": '<script>alert(1)</script><a id="pwn" href="javascript:alert(2)">Approve</a>',
        "amount": 1.0,
        "note": '<img id="pwn-img" src=x onerror="alert(3)"><button id="fake-approve">Approve'
        "</button>",
    }
    rid = shop.pause("t-browser-xss", evil)
    with live_server(make_app(shop.queue)) as base:
        page = page_for("alice")
        for url in (f"{base}/reviews", f"{base}/reviews/{rid}"):
            page.goto(url)
            page.wait_for_load_state("load")
            for sel in ("#pwn", "#pwn-img", "#fake-approve", 'a[href^="javascript:"]'):
                assert page.locator(sel).count() == 0, sel
            # Only the inbox's own script is on the page.
            srcs = page.eval_on_selector_all("script", "els => els.map(e => e.src)")
            assert len(srcs) == 1 and srcs[0].endswith("/static/inbox.js")
        args_text = page.inner_text("#args-0")
        assert (
            "<script>alert(1)</script>" in args_text
            and 'href=\\"javascript:alert(2)\\"' in args_text
        )
        # The edit form shows the raw text as a value, not as markup.
        page.click("#edit-toggle")
        assert page.input_value("#f-order") == evil["order"]
        shot(page, tmp_path, "inbox-item-injection.png")
        page.wait_for_timeout(300)  # give any injected handler time to fire
        assert page.dialogs == []
