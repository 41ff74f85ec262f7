"""Reviewer credentials and request guards of the review inbox (no server needed)."""

from __future__ import annotations

import base64
import re

import pytest

from harness_nodes import UserError
from harness_nodes.inbox import ANONYMOUS, InboxAuth, is_loopback, parse_reviewers
from harness_nodes.inbox._security import host_name, same_origin
from harness_nodes.inbox._serve import build_auth


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH = InboxAuth(reviewers={"alice": "alice-token", "bob": "bob-token-2"})


@pytest.mark.parametrize(
    ("header", "who"),
    [
        pytest.param(basic("alice", "alice-token"), "alice", id="basic-ok"),
        pytest.param("Bearer bob-token-2", "bob", id="bearer-ok"),
        pytest.param(basic("alice", "bob-token-2"), None, id="basic-other-users-token"),
        pytest.param(basic("mallory", "alice-token"), None, id="basic-unknown-user"),
        pytest.param("Bearer alice-token-x", None, id="bearer-wrong"),
        pytest.param("Basic !!!notbase64", None, id="basic-garbage"),
        pytest.param("Digest abc", None, id="unknown-scheme"),
        pytest.param(None, None, id="no-header"),
    ],
)
def test_only_configured_reviewers_are_recognised(header: str | None, who: str | None) -> None:
    assert AUTH.reviewer_for(header) == who


def test_anonymous_only_when_enabled_and_only_without_credentials() -> None:
    anon = InboxAuth(allow_anonymous=True)
    assert anon.reviewer_for(None) == ANONYMOUS
    assert anon.reviewer_for("Bearer whatever") is None  # wrong credentials are not anonymous


def test_inbox_without_reviewers_refuses_to_start() -> None:
    with pytest.raises(UserError, match=re.escape("The review inbox needs reviewers")):
        InboxAuth()


def test_short_tokens_are_refused() -> None:
    with pytest.raises(UserError, match="too short"):
        InboxAuth(reviewers={"alice": "abc"})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            "alice:tok-aaaa, bob:tok:with:colons",
            {"alice": "tok-aaaa", "bob": "tok:with:colons"},
            id="env",
        ),
        pytest.param(["alice:tok-aaaa"], {"alice": "tok-aaaa"}, id="list"),
        pytest.param("", {}, id="empty"),
    ],
)
def test_reviewer_specs_parse(spec: str | list[str], expected: dict[str, str]) -> None:
    assert parse_reviewers(spec) == expected


@pytest.mark.parametrize("spec", ["alice", "alice:", ":tok", "alice:tok-aaaa,alice:tok-bbbb"])
def test_bad_reviewer_specs_are_refused(spec: str) -> None:
    with pytest.raises(UserError):
        parse_reviewers(spec)


def test_csrf_token_is_bound_to_session_and_reviewer() -> None:
    tok = AUTH.csrf_token("session-1", "alice")
    assert AUTH.csrf_ok("session-1", "alice", tok)
    assert not AUTH.csrf_ok("session-2", "alice", tok)
    assert not AUTH.csrf_ok("session-1", "bob", tok)
    assert not AUTH.csrf_ok("session-1", "alice", None)
    assert not AUTH.csrf_ok(None, "alice", tok)
    other_key = InboxAuth(reviewers={"alice": "alice-token"}, secret_key="another key")
    assert not other_key.csrf_ok("session-1", "alice", tok)


@pytest.mark.parametrize(
    ("origin", "fetch_site", "ok"),
    [
        pytest.param("http://127.0.0.1:8765", "same-origin", True, id="same-origin"),
        pytest.param("http://evil.example", "cross-site", False, id="cross-site-origin"),
        pytest.param("http://127.0.0.1:9999", None, False, id="other-port"),
        pytest.param("null", None, False, id="opaque-origin"),
        pytest.param(None, "cross-site", False, id="fetch-site-only-cross"),
        pytest.param(None, "same-site", False, id="fetch-site-same-site-not-enough"),
        pytest.param(None, None, True, id="non-browser-client"),
    ],
)
def test_origin_check(origin: str | None, fetch_site: str | None, ok: bool) -> None:
    assert same_origin(origin, fetch_site, "http", "127.0.0.1:8765") is ok


def test_host_allowlist_blocks_dns_rebinding() -> None:
    auth = build_auth(
        host="127.0.0.1", reviewers=["alice:alice-token"], allow_anonymous=False, allowed_hosts=None
    )
    assert (
        auth.host_ok("127.0.0.1:8765") and auth.host_ok("localhost:1") and auth.host_ok("[::1]:80")
    )
    assert not auth.host_ok("attacker.example:8765")
    assert not auth.host_ok(None)
    assert host_name("[::1]:8080") == "::1" and host_name("Example.COM") == "example.com"


def test_anonymous_inbox_answers_loopback_names_only_unless_told() -> None:
    anon = InboxAuth(allow_anonymous=True)
    assert anon.host_ok("127.0.0.1:8765") and anon.host_ok("localhost") and anon.host_ok("[::1]")
    assert not anon.host_ok("rebind.attacker.example:8765")
    lan = InboxAuth(allow_anonymous=True, allowed_hosts=frozenset({"inbox.lan"}))
    assert lan.host_ok("inbox.lan:8765") and not lan.host_ok("localhost")
    assert InboxAuth(reviewers={"alice": "alice-token"}).host_ok("inbox.example.com")


def test_anonymous_is_refused_off_loopback() -> None:
    with pytest.raises(UserError, match="local use only"):
        build_auth(host="0.0.0.0", reviewers=None, allow_anonymous=True, allowed_hosts=None)
    assert build_auth(host="127.0.0.1", reviewers=None, allow_anonymous=True, allowed_hosts=None)


def test_reviewers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_INBOX_REVIEWERS", "carol:carol-token")
    monkeypatch.setenv("HARNESS_INBOX_SECRET", "shared-secret")
    auth = build_auth(
        host="localhost", reviewers=["dave:dave-token"], allow_anonymous=False, allowed_hosts=None
    )
    assert auth.reviewer_for("Bearer carol-token") == "carol"
    assert auth.reviewer_for("Bearer dave-token") == "dave"
    assert auth.csrf_token("s", "carol") == InboxAuth(
        reviewers={"x": "xxxxxxxx"}, secret_key="shared-secret"
    ).csrf_token("s", "carol")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.slow
def test_inbox_exports_and_lazy_web_imports() -> None:
    import inspect
    import subprocess
    import sys

    import harness_nodes.inbox as inbox
    from tests.conftest import subprocess_env

    public = {
        n for n, o in vars(inbox).items() if not n.startswith("_") and not inspect.ismodule(o)
    }
    assert set(inbox.__all__) == public - {"TYPE_CHECKING", "Any", "annotations"}
    code = "import sys, harness_nodes.inbox; assert 'starlette' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())
