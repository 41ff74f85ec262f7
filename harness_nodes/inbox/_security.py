"""Who may use the inbox, and the guards around every request.

Everything an agent produced is untrusted input (tool arguments, tool outputs, model text can
all be prompt-injected), and a reviewer's browser holds ambient credentials. So:

- every route needs a reviewer (HTTP Basic ``name:token`` or ``Authorization: Bearer token``);
  anonymous use is possible only when explicitly enabled, and only on a loopback address;
- every unsafe request passes an Origin / ``Sec-Fetch-Site`` check, and — unless it carries a
  bearer token, which a browser never attaches on its own — a per-session CSRF token
  (HMAC of a random ``HttpOnly; SameSite=Strict`` cookie and the reviewer's name);
- the ``Host`` header must be one we serve, so DNS rebinding cannot turn a page on another
  site into a same-origin caller of a loopback inbox;
- every response carries a strict Content-Security-Policy (no inline script, no inline style)
  and the usual hardening headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from harness_nodes.errors import UserError

ANONYMOUS = "anonymous"
"""The reviewer name recorded for decisions made with ``allow_anonymous=True``."""

SESSION_COOKIE = "harness_inbox_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not "no-referrer": with it Chromium sends `Origin: null` on same-origin form posts.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-store",
}

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether *host* (a bind address or host name) only reaches this machine.

    Example:
        ```python
        from harness_nodes.inbox import is_loopback

        assert is_loopback("127.0.0.1") and is_loopback("localhost")
        assert not is_loopback("0.0.0.0")
        ```
    """
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_reviewers(specs: str | list[str] | None) -> dict[str, str]:
    """Parse ``"alice:token1,bob:token2"`` (or a list of ``name:token``) into a mapping.

    Raises:
        UserError: an entry without a name or a token, or a name given twice.

    Example:
        ```python
        from harness_nodes.inbox import parse_reviewers

        assert parse_reviewers("alice:tok-1234,bob:tok-5678") == {
            "alice": "tok-1234",
            "bob": "tok-5678",
        }
        ```
    """
    if not specs:
        return {}
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    reviewers: dict[str, str] = {}
    for raw in items:
        raw = raw.strip()
        if not raw:
            continue
        name, sep, token = raw.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            raise UserError(
                f"Reviewer entry {name or raw[:1] + '…'!r} must look like NAME:TOKEN "
                "(e.g. HARNESS_INBOX_REVIEWERS='alice:s3cret,bob:t0ken')"
            )
        if name in reviewers:
            raise UserError(f"Reviewer {name!r} is configured twice")
        reviewers[name] = token
    return reviewers


@dataclass(frozen=True)
class InboxAuth:
    """Reviewer credentials and request guards for the review inbox.

    Example:
        ```python
        from harness_nodes.inbox import InboxAuth

        auth = InboxAuth(reviewers={"alice": "a-long-random-token"})
        print(auth.reviewer_for("Bearer a-long-random-token"))  # alice
        ```
    """

    reviewers: Mapping[str, str] = field(default_factory=dict)
    """Reviewer name → secret token (HTTP Basic password, or bearer token)."""
    allow_anonymous: bool = False
    """Let unauthenticated requests in as ``"anonymous"``: for local, single-user use only."""
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """Key for CSRF tokens; set the same value on every process serving one inbox."""
    allowed_hosts: frozenset[str] | None = None
    """``Host`` names accepted (without port); ``None`` accepts any — except with
    ``allow_anonymous``, where it means the loopback names only."""

    def __post_init__(self) -> None:
        if not self.reviewers and not self.allow_anonymous:
            raise UserError(
                "The review inbox needs reviewers: set HARNESS_INBOX_REVIEWERS='alice:TOKEN' "
                "(or pass --reviewer alice:TOKEN); --allow-anonymous is for local use only"
            )
        if self.allow_anonymous and self.allowed_hosts is None:
            # Anonymous means local. Accepting any Host would let a DNS-rebinding page
            # (attacker.example re-pointed at 127.0.0.1) be same-origin with the inbox: no
            # credentials to lack, so it could read the CSRF token and decide.
            object.__setattr__(self, "allowed_hosts", _LOOPBACK_NAMES)
        for name, token in self.reviewers.items():
            if len(token) < 8:
                raise UserError(f"Token of reviewer {name!r} is too short (8 characters minimum)")

    def reviewer_for(self, authorization: str | None) -> str | None:
        """The reviewer an ``Authorization`` header proves, or ``None``."""
        if not authorization:
            return ANONYMOUS if self.allow_anonymous else None
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer":
            for name, token in self.reviewers.items():
                if hmac.compare_digest(token.encode(), value.encode()):
                    return name
            return None
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            name, _, token = decoded.partition(":")
            expected = self.reviewers.get(name)
            # Compare even for unknown names so timing does not reveal which names exist.
            ok = hmac.compare_digest((expected or "\0" * len(token)).encode(), token.encode())
            return name if ok and expected is not None else None
        return None

    def csrf_token(self, session: str, reviewer: str) -> str:
        """The CSRF token for one browser session of one reviewer."""
        msg = f"{session}\0{reviewer}".encode()
        return hmac.new(self.secret_key.encode(), msg, hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str | None, reviewer: str, token: str | None) -> bool:
        """Whether *token* is this session's CSRF token."""
        if not session or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session, reviewer), token)

    def host_ok(self, host_header: str | None) -> bool:
        """Whether the ``Host`` header names a host this inbox serves."""
        if self.allowed_hosts is None:
            return True
        if not host_header:
            return False
        return host_name(host_header) in self.allowed_hosts


def host_name(host_header: str) -> str:
    """The host part of a ``Host`` header, lower-cased, without port or IPv6 brackets."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.index("]")] if "]" in h else h[1:]
    return h.rsplit(":", 1)[0] if ":" in h else h


def same_origin(origin: str | None, sec_fetch_site: str | None, scheme: str, host: str) -> bool:
    """Whether an unsafe request comes from the inbox's own pages (or from no browser page).

    A browser sends ``Origin`` on every cross-site POST and ``Sec-Fetch-Site`` on every
    request; a non-browser client (curl, a script) sends neither and is judged by its
    credentials alone.
    """
    if origin is not None:
        return origin != "null" and origin.lower() == f"{scheme}://{host}".lower()
    if sec_fetch_site is not None:
        return sec_fetch_site in {"same-origin", "none"}
    return True


def new_session() -> str:
    """A fresh random session id for the CSRF cookie."""
    return secrets.token_urlsafe(32)
