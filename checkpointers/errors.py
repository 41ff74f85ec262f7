"""Classifying database errors, and raising an outage as `BackendUnavailable`.

Imports nothing from the rest of the project at import time (`harness_nodes.errors` is
imported when an outage is raised).

Example:
    ```python
    from checkpointers.errors import is_transient

    assert not is_transient(KeyError("x"))
    ```
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["is_transient", "outage", "unavailable"]


def is_transient(error: BaseException) -> bool:
    """Whether *error* is a passing database fault worth retrying, not a real failure.

    Passing faults: a dropped connection, a server shutting a session down, a locked SQLite
    file.

    Example:
        ```python
        import sqlite3

        from checkpointers.errors import is_transient

        assert is_transient(sqlite3.OperationalError("database is locked"))
        assert not is_transient(ValueError("bad input"))
        ```
    """
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(error, psycopg.OperationalError):
        return True
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


def unavailable(backend: Any, what: str, error: BaseException) -> Exception:
    """The `BackendUnavailable` for *error*, raised by *what* on *backend*: raise it ``from``.

    It names the backend's URL (password masked) and the error's type and first line.

    Example:
        ```python
        from checkpointers.errors import unavailable

        class Backend:
            url = "postgresql://app:***@db:5432/app"

        err = unavailable(Backend(), "spend ledger", OSError("connection refused"))
        assert str(err) == (
            "Cannot open backend 'postgresql://app:***@db:5432/app': "
            "spend ledger: OSError: connection refused"
        )
        ```
    """
    from harness_nodes.errors import BackendUnavailable

    url = str(getattr(backend, "url", "") or "the backend")
    first = (str(error).splitlines() or [""])[0]
    return BackendUnavailable(url, f"{what}: {type(error).__name__}: {first}")


@contextmanager
def outage(backend: Any, what: str) -> Iterator[None]:
    """Raise a passing database fault (`is_transient`) inside the block as `BackendUnavailable`.

    Chained from the driver's error; nothing is retried. Other errors pass through unchanged.
    Usable around ``await`` too.

    Example:
        ```python
        import sqlite3

        from checkpointers.errors import outage
        from harness_nodes import BackendUnavailable

        class Backend:
            url = "sqlite:///harness.db"

        try:
            with outage(Backend(), "review queue"):
                raise sqlite3.OperationalError("database is locked")
        except BackendUnavailable as exc:
            assert isinstance(exc.__cause__, sqlite3.OperationalError)
        else:
            raise AssertionError("expected BackendUnavailable")
        ```
    """
    try:
        yield
    except Exception as e:
        if not is_transient(e):
            raise
        raise unavailable(backend, what, e) from e
