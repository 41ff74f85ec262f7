"""Review queue listing: 10,000 pending items across threads, filtered, vs 100 items.

Prints, for each backend, the time of a filtered ``ReviewQueue.pending`` (oldest 20 of one
task type) on 10,000 pending rows, as a ratio to the same call on 100 rows measured in the same
run, and as a ratio to the same query forced to scan the table. An index keeps the first ratio
near 1 (the listing does not grow with the queue) and the second well below 1.

Run: ``python bench/review.py`` (Postgres from $HARNESS_TEST_POSTGRES_URI when reachable).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langgraph.graph import START, MessagesState, StateGraph

from checkpointers import Backend, open_backend
from harness_nodes import ReviewQueue
from harness_nodes.review_queue import _INSERT

PG = os.environ.get("HARNESS_TEST_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
TYPES = ("billing", "support", "research", "documents")


def fill(backend: Backend, n: int) -> None:
    now = time.time()
    request = json.dumps([{"action_request": {"action": "refund", "args": {"amount": 1}}}])
    head, _, tail = _INSERT.partition("VALUES")
    tail = tail.split(")", 1)[1]
    one = "(" + ", ".join(["%s"] * 12) + ")"
    with backend.transaction() as tx:
        for start in range(0, n, 500):
            chunk = range(start, min(n, start + 500))
            values: list[Any] = []
            for i in chunk:
                values += [f"r{i:07d}", f"thread-{i}", f"i{i}", TYPES[i % 4], "irreversible"]
                values += ["high", request, "pending", 2, None, None, now - i]
            tx.execute(head + "VALUES " + ", ".join([one] * len(chunk)) + tail, values)
    backend.execute("ANALYZE harness_reviews" if backend.dialect == "postgres" else "ANALYZE")


def timed(fn: Any, repeat: int = 30) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def scan_query(backend: Backend) -> float:
    # The same filter with the index defeated (an expression on the column): a full scan.
    sql = (
        "SELECT id FROM harness_reviews WHERE status || '' = 'pending' AND task_type || '' = %s "
        "ORDER BY created_at LIMIT 20"
    )
    return timed(lambda: backend.execute(sql, ("billing",)))


def measure(url: str, n: int) -> tuple[float, float]:
    builder = StateGraph(MessagesState)
    builder.add_node("noop", lambda s: {})
    builder.add_edge(START, "noop")
    with open_backend(url) as backend:
        fill(backend, n)
        queue = ReviewQueue(backend, builder.compile(checkpointer=backend.checkpointer))
        listed = timed(lambda: queue.pending(task_type="billing", limit=20))
        return listed, scan_query(backend)


def pg_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG, connect_timeout=3, autocommit=True) as conn:
            name = f"harness_bench_{uuid.uuid4().hex[:8]}"
            conn.execute(f'CREATE DATABASE "{name}"')
        return PG.rsplit("/", 1)[0] + "/" + name
    except Exception:
        return None


def drop(url: str) -> None:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        urls = {"sqlite": lambda n: f"sqlite:///{Path(d) / f'q{n}.db'}"}
        results: dict[str, dict[int, tuple[float, float]]] = {}
        for kind, make in urls.items():
            results[kind] = {n: measure(make(n), n) for n in (100, 10_000)}
        if (small := pg_url()) and (big := pg_url()):
            try:
                results["postgres"] = {100: measure(small, 100), 10_000: measure(big, 10_000)}
            finally:
                drop(small)
                drop(big)
        else:
            print("postgres: not reachable, skipped")
    for kind, r in results.items():
        (base, _), (listed, scan) = r[100], r[10_000]
        print(
            f"{kind}: pending(task_type=..., limit=20) on 10,000 rows = {listed * 1e3:.2f} ms; "
            f"ratio vs 100 rows: {listed / base:.2f}x; "
            f"ratio vs forced table scan: {listed / scan:.2f}x"
        )


if __name__ == "__main__":
    main()
