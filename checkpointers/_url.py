"""Parsing and masking of backend URLs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from harness_nodes.errors import BackendURLError

Kind = Literal["memory", "sqlite", "postgres"]

_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg3"}
_SECRET_PARAMS = {"password", "sslpassword"}


def mask_url(url: str) -> str:
    """Return *url* with any password replaced by ``***`` (safe for logs and errors).

    Example:
        ```python
        from checkpointers import mask_url

        assert mask_url("postgresql://app:s3cret@db:5432/prod") == "postgresql://app:***@db:5432/prod"
        assert mask_url("postgresql://db/prod?password=s3cret") == "postgresql://db/prod?password=***"
        ```
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
        masked = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
        query = urlencode(masked, safe="*")
    if parts.password is None:
        return urlunsplit(parts._replace(query=query)) if query != parts.query else url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if _safe_port(url) else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}", query=query))


def _secrets(url: str) -> tuple[str, ...]:
    """The password(s) a URL carries, as written and decoded (to scrub driver messages)."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return ()
    found += [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_PARAMS]
    out = {s for raw in found for s in (raw, unquote(raw)) if len(s) >= 3}
    return tuple(sorted(out, key=len, reverse=True))


def _safe_port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None


@dataclass(frozen=True)
class ParsedURL:
    """A validated backend URL."""

    kind: Kind
    masked: str
    """The URL with its password masked."""
    target: str
    """What the driver gets: the file path for sqlite, the libpq URL for postgres."""
    secrets: tuple[str, ...] = field(default=(), repr=False)
    """Passwords the URL carries, to scrub from driver messages."""

    def redact(self, text: str) -> str:
        """*text* (a driver's message) without the URL's passwords."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def parse_url(url: str) -> ParsedURL:
    """Validate a backend URL and say which backend it names.

    Raises:
        BackendURLError: the scheme is unknown or the URL is malformed.
    """
    if not isinstance(url, str):
        raise BackendURLError(repr(url), f"expected a URL string, got {type(url).__name__}")
    if not url.strip():
        raise BackendURLError(url, "the URL is empty")
    masked = mask_url(url)
    if "://" not in url:
        raise BackendURLError(masked, "no scheme")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        return ParsedURL("memory", masked, "")
    if scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////absolute/path.db, sqlite:///:memory:
        if not rest.startswith("/") or rest == "/":
            raise BackendURLError(masked, "a sqlite URL needs a path: sqlite:///file.db")
        path = rest[1:]
        if path == ":memory:":
            return ParsedURL("sqlite", masked, ":memory:")
        parent = Path(path).expanduser().resolve().parent
        if not parent.is_dir():
            raise BackendURLError(masked, f"directory {str(parent)!r} does not exist")
        return ParsedURL("sqlite", masked, str(Path(path).expanduser()))
    if scheme in _POSTGRES_SCHEMES:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - validates the port
        except ValueError as e:
            raise BackendURLError(masked, str(e)) from None
        if not parts.hostname and "host=" not in (parts.query or ""):
            raise BackendURLError(masked, "no host")
        target = urlunsplit(parts._replace(scheme="postgresql"))
        return ParsedURL("postgres", masked, target, _secrets(url))
    raise BackendURLError(masked, f"unknown scheme {scheme!r}")
