"""Review inbox list page: latency with 10,000 pending items as a ratio to 100 pending.

The page asks the queue for one page (LIMIT/OFFSET over the indexed pending query), so the
ratio should stay near 1x however long the queue grows. Run: ``python bench/inbox.py``
(SQLite file + Postgres when ``HARNESS_TEST_POSTGRES_URI``/local server answers).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from langchain_core.messages import HumanMessage
from starlette.testclient import TestClient

from checkpointers import open_backend
from harness_nodes.inbox import InboxAuth, create_app
from harness_nodes.review_queue import ReviewQueue
from tests.harness_nodes.inbox.shop_graph import builder

PG = os.environ.get("HARNESS_TEST_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
TOKEN = "bench-token-123"
ROUNDS = 40


def fill(backend: Any, queue: ReviewQueue, n: int) -> None:
    queue.invoke(
        {"messages": [HumanMessage(json.dumps({"order": "A1", "amount": 5.0}))]}, thread_id="seed"
    )
    [row] = backend.execute("SELECT * FROM harness_reviews WHERE thread_id = 'seed'")
    now = time.time()
    with backend.transaction() as tx:
        for i in range(n):
            tx.execute(
                "INSERT INTO harness_reviews (id, thread_id, interrupt_id, task_type, reason, "
                "risk, request, status, priority, assignee, deadline, created_at) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s)",
                (
                    f"b{i}", f"bt{i}", f"i{i}", ("billing", "support", "research", "ops")[i % 4],
                    row["reason"], row["risk"], row["request"], i % 3, None,
                    now + i if i % 2 else None, now - i,
                ),
            )  # fmt: skip


def page_ms(url: str, n: int) -> dict[str, float]:
    with open_backend(url) as backend:
        graph = builder().compile(checkpointer=backend.checkpointer)
        queue = ReviewQueue(backend, graph)
        fill(backend, queue, n)
        app = create_app(queue, InboxAuth(reviewers={"bench": TOKEN}))
        client = TestClient(app, base_url="http://127.0.0.1")
        headers = {"authorization": f"Bearer {TOKEN}"}
        out = {}
        for name, path in [
            ("all, page 1", "/reviews"),
            ("task_type filter, page 1", "/reviews?task_type=billing"),
        ]:
            client.get(path, headers=headers)  # warm
            times = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                assert client.get(path, headers=headers).status_code == 200
                times.append((time.perf_counter() - t0) * 1000)
            out[name] = min(times)  # best of ROUNDS: other work on the machine only adds noise
        return out


def main() -> None:
    urls: list[tuple[str, str]] = []
    tmp = tempfile.mkdtemp()
    urls.append(("sqlite", f"sqlite:///{tmp}/small.db"))
    try:
        with psycopg.connect(PG, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        urls.append(("postgres", PG))
    except psycopg.Error:
        print("postgres: not reachable, skipped")
    lines = []
    for kind, base_url in urls:
        results = {}
        for n in (100, 10_000):
            if kind == "sqlite":
                url = f"sqlite:///{tmp}/{n}.db"
                results[n] = page_ms(url, n)
            else:
                name = f"harness_bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(base_url, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                try:
                    results[n] = page_ms(base_url.rsplit("/", 1)[0] + f"/{name}", n)
                finally:
                    with psycopg.connect(base_url, autocommit=True) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for page in results[100]:
            small, big = results[100][page], results[10_000][page]
            lines.append(
                f"{kind:8} {page:26} best of {ROUNDS}: 100 pending {small:5.1f} ms | "
                f"10,000 pending {big:5.1f} ms"
                f" | ratio {big / small:4.2f}x"
            )
    report = "\n".join(lines)
    print(report)
    out = Path(__file__).resolve().parent / "results" / "inbox.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report + "\n")


if __name__ == "__main__":
    main()
