"""Classifying database errors. Imports nothing from the rest of the project.

Example:
    ```python
    from checkpointers.errors import is_transient

    assert not is_transient(KeyError("x"))
    ```
"""

from __future__ import annotations

import sqlite3
import sys

__all__ = ["is_transient"]


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
