"""Durable state for harnessed graphs: one URL → checkpointer + the harness's ledgers.

`open_backend` (sync) and `aopen_backend` (async) accept ``memory://``, ``sqlite:///path.db``
(the embedded default) and ``postgresql://...``. Importing this package does not import
psycopg or aiosqlite; they load when a URL needs them.

Example:
    ```python
    from checkpointers import open_backend

    with open_backend("memory://") as backend:
        print(backend.kind)
    ```
"""

from checkpointers._url import mask_url
from checkpointers.aio import AsyncBackend, aopen_backend
from checkpointers.backend import DEFAULT_URL, Backend, Transaction, default_url, open_backend

__all__ = [
    "DEFAULT_URL",
    "AsyncBackend",
    "Backend",
    "Transaction",
    "aopen_backend",
    "default_url",
    "mask_url",
    "open_backend",
]
