"""The harness's own tables, created beside LangGraph's checkpoint tables.

Migrations are named (not numbered) so that independent features can each add theirs
without colliding; they are applied in list order, once, recorded in
``harness_migrations``. Every statement is idempotent (``IF NOT EXISTS``), and on Postgres
the whole set-up runs under an advisory lock (see ``backend.py``), so several processes can
start at once.

Conventions shared by every table:
- times are epoch seconds (``DOUBLE PRECISION`` / ``REAL``), comparable in both dialects;
- JSON is stored as text;
- money is an integer count of nano-dollars (1e-9 USD), exact in both dialects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["sqlite", "postgres"]


@dataclass(frozen=True)
class Migration:
    """One named schema change, in both dialects."""

    name: str
    postgres: str
    sqlite: str

    def sql(self, dialect: Dialect) -> str:
        """The statement(s) for *dialect*."""
        return self.postgres if dialect == "postgres" else self.sqlite


_BASE_COMMON = """
CREATE TABLE IF NOT EXISTS harness_runs (
    thread_id TEXT PRIMARY KEY,
    task_key TEXT UNIQUE,
    task_type TEXT NOT NULL DEFAULT 'default',
    graph TEXT,
    status TEXT NOT NULL,
    input TEXT,
    outcome TEXT,
    lease_owner TEXT,
    lease_expires_at {float},
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at {float} NOT NULL,
    updated_at {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS harness_runs_type_created ON harness_runs (task_type, created_at);
CREATE INDEX IF NOT EXISTS harness_runs_status ON harness_runs (status, updated_at);

CREATE TABLE IF NOT EXISTS harness_spend (
    id {serial},
    task_id TEXT NOT NULL,
    task_type TEXT NOT NULL DEFAULT 'default',
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cost_nanos BIGINT NOT NULL DEFAULT 0,
    created_at {float} NOT NULL,
    settled_at {float}
);
CREATE INDEX IF NOT EXISTS harness_spend_task ON harness_spend (task_id, state);
CREATE INDEX IF NOT EXISTS harness_spend_type_created ON harness_spend (task_type, created_at);

CREATE TABLE IF NOT EXISTS harness_effects (
    thread_id TEXT NOT NULL,
    tool_call_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    args TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    started_at {float} NOT NULL,
    finished_at {float},
    PRIMARY KEY (thread_id, tool_call_id)
);

CREATE TABLE IF NOT EXISTS harness_reviews (
    id TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL,
    interrupt_id TEXT NOT NULL,
    task_type TEXT NOT NULL DEFAULT 'default',
    reason TEXT NOT NULL,
    risk TEXT NOT NULL DEFAULT 'medium',
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    assignee TEXT,
    deadline {float},
    created_at {float} NOT NULL,
    decision TEXT,
    decided_by TEXT,
    decided_at {float},
    UNIQUE (thread_id, interrupt_id)
);
CREATE INDEX IF NOT EXISTS harness_reviews_pending
    ON harness_reviews (status, task_type, created_at);
CREATE INDEX IF NOT EXISTS harness_reviews_assignee ON harness_reviews (status, assignee);

CREATE TABLE IF NOT EXISTS harness_review_audit (
    id {serial},
    review_id TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    decision TEXT NOT NULL,
    before TEXT,
    after TEXT,
    at {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS harness_review_audit_review ON harness_review_audit (review_id);
"""

MIGRATIONS: list[Migration] = [
    Migration(
        name="0001_base",
        postgres=_BASE_COMMON.format(float="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY"),
        sqlite=_BASE_COMMON.format(float="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT"),
    ),
]
"""Every harness migration, in the order they apply. Append; never edit an applied one."""

MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS harness_migrations (
    name TEXT PRIMARY KEY,
    applied_at {float} NOT NULL
)"""
