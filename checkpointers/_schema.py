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

_SPEND_TOTALS_COMMON = """
CREATE TABLE IF NOT EXISTS harness_spend_tasks (
    task_id TEXT PRIMARY KEY,
    task_type TEXT NOT NULL DEFAULT 'default',
    reserved_nanos BIGINT NOT NULL DEFAULT 0,
    spent_nanos BIGINT NOT NULL DEFAULT 0,
    reserved_tokens BIGINT NOT NULL DEFAULT 0,
    spent_tokens BIGINT NOT NULL DEFAULT 0,
    calls BIGINT NOT NULL DEFAULT 0,
    updated_at {float} NOT NULL
);
CREATE TABLE IF NOT EXISTS harness_spend_windows (
    task_type TEXT NOT NULL,
    window_seconds {float} NOT NULL,
    starts_at {float} NOT NULL,
    reserved_nanos BIGINT NOT NULL DEFAULT 0,
    spent_nanos BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (task_type, window_seconds, starts_at)
);
ALTER TABLE harness_spend ADD COLUMN reserved_nanos BIGINT NOT NULL DEFAULT 0;
ALTER TABLE harness_spend ADD COLUMN reserved_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE harness_spend ADD COLUMN window_seconds {float};
ALTER TABLE harness_spend ADD COLUMN window_starts_at {float}
"""

# One round trip per reservation and per settlement on Postgres: the check-and-reserve runs
# server-side under row locks (task row, then window row: one order everywhere, so no
# deadlocks). SQLite runs the same steps from Python inside BEGIN IMMEDIATE
# (checkpointers/_spend.py); the two are tested against each other.
_SPEND_FUNCTIONS_PG = """
CREATE OR REPLACE FUNCTION harness_spend_totals(p_task_id TEXT, p_window_seconds DOUBLE PRECISION,
    p_window_starts_at DOUBLE PRECISION, p_task_type TEXT) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    t harness_spend_tasks%ROWTYPE;
    w harness_spend_windows%ROWTYPE;
BEGIN
    SELECT * INTO t FROM harness_spend_tasks WHERE task_id = p_task_id;
    IF p_window_seconds IS NOT NULL THEN
        SELECT * INTO w FROM harness_spend_windows WHERE task_type = p_task_type
            AND window_seconds = p_window_seconds AND starts_at = p_window_starts_at;
    END IF;
    RETURN jsonb_build_object(
        'reserved_nanos', COALESCE(t.reserved_nanos, 0),
        'spent_nanos', COALESCE(t.spent_nanos, 0),
        'reserved_tokens', COALESCE(t.reserved_tokens, 0),
        'spent_tokens', COALESCE(t.spent_tokens, 0),
        'calls', COALESCE(t.calls, 0),
        'window_nanos', COALESCE(w.reserved_nanos, 0) + COALESCE(w.spent_nanos, 0));
END $$;

CREATE OR REPLACE FUNCTION harness_spend_reserve(
    p_task_id TEXT, p_task_type TEXT, p_model TEXT,
    p_input_tokens BIGINT, p_output_tokens BIGINT, p_nanos BIGINT,
    p_max_nanos BIGINT, p_max_tokens BIGINT, p_max_calls BIGINT,
    p_window_seconds DOUBLE PRECISION, p_window_starts_at DOUBLE PRECISION,
    p_window_max_nanos BIGINT, p_now DOUBLE PRECISION) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    t harness_spend_tasks%ROWTYPE;
    w harness_spend_windows%ROWTYPE;
    tokens BIGINT := p_input_tokens + p_output_tokens;
    w_used BIGINT := 0;
    refused TEXT := NULL;
    new_id BIGINT := NULL;
BEGIN
    INSERT INTO harness_spend_tasks (task_id, task_type, updated_at)
        VALUES (p_task_id, p_task_type, p_now) ON CONFLICT (task_id) DO NOTHING;
    SELECT * INTO t FROM harness_spend_tasks WHERE task_id = p_task_id FOR UPDATE;
    IF p_window_seconds IS NOT NULL THEN
        INSERT INTO harness_spend_windows (task_type, window_seconds, starts_at)
            VALUES (p_task_type, p_window_seconds, p_window_starts_at) ON CONFLICT DO NOTHING;
        SELECT * INTO w FROM harness_spend_windows WHERE task_type = p_task_type
            AND window_seconds = p_window_seconds AND starts_at = p_window_starts_at FOR UPDATE;
        w_used := w.reserved_nanos + w.spent_nanos;
    END IF;
    IF p_max_calls IS NOT NULL AND t.calls + 1 > p_max_calls THEN
        refused := 'calls';
    ELSIF p_max_nanos IS NOT NULL AND t.reserved_nanos + t.spent_nanos + p_nanos > p_max_nanos THEN
        refused := 'usd';
    ELSIF p_max_tokens IS NOT NULL
            AND t.reserved_tokens + t.spent_tokens + tokens > p_max_tokens THEN
        refused := 'tokens';
    ELSIF p_window_max_nanos IS NOT NULL AND w_used + p_nanos > p_window_max_nanos THEN
        refused := 'window_usd';
    END IF;
    IF refused IS NULL THEN
        UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos + p_nanos,
            reserved_tokens = reserved_tokens + tokens, calls = calls + 1, updated_at = p_now
            WHERE task_id = p_task_id
            RETURNING * INTO t;
        IF p_window_seconds IS NOT NULL THEN
            UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos + p_nanos
                WHERE task_type = p_task_type AND window_seconds = p_window_seconds
                AND starts_at = p_window_starts_at;
            w_used := w_used + p_nanos;
        END IF;
        INSERT INTO harness_spend (task_id, task_type, model, state, input_tokens, output_tokens,
                cost_nanos, created_at, reserved_nanos, reserved_tokens, window_seconds,
                window_starts_at)
            VALUES (p_task_id, p_task_type, p_model, 'reserved', p_input_tokens, p_output_tokens,
                0, p_now, p_nanos, tokens, p_window_seconds, p_window_starts_at)
            RETURNING id INTO new_id;
    END IF;
    RETURN jsonb_build_object('id', new_id, 'refused', refused,
        'reserved_nanos', t.reserved_nanos, 'spent_nanos', t.spent_nanos,
        'reserved_tokens', t.reserved_tokens, 'spent_tokens', t.spent_tokens,
        'calls', t.calls, 'window_nanos', w_used);
END $$;

CREATE OR REPLACE FUNCTION harness_spend_settle(
    p_id BIGINT, p_state TEXT, p_model TEXT, p_input_tokens BIGINT, p_output_tokens BIGINT,
    p_nanos BIGINT, p_now DOUBLE PRECISION) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    s harness_spend%ROWTYPE;
    t harness_spend_tasks%ROWTYPE;
    w_used BIGINT := 0;
    settled BOOLEAN := FALSE;
BEGIN
    UPDATE harness_spend SET state = p_state, model = COALESCE(p_model, model),
            input_tokens = p_input_tokens, output_tokens = p_output_tokens,
            cost_nanos = p_nanos, settled_at = p_now
        WHERE id = p_id AND state = 'reserved'
        RETURNING * INTO s;
    IF FOUND THEN
        settled := TRUE;
        UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos - s.reserved_nanos,
                spent_nanos = spent_nanos + p_nanos,
                reserved_tokens = reserved_tokens - s.reserved_tokens,
                spent_tokens = spent_tokens + p_input_tokens + p_output_tokens,
                calls = calls - (CASE WHEN p_state = 'released' THEN 1 ELSE 0 END),
                updated_at = p_now
            WHERE task_id = s.task_id
            RETURNING * INTO t;
        IF s.window_seconds IS NOT NULL THEN
            UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos - s.reserved_nanos,
                    spent_nanos = spent_nanos + p_nanos
                WHERE task_type = s.task_type AND window_seconds = s.window_seconds
                    AND starts_at = s.window_starts_at
                RETURNING reserved_nanos + spent_nanos INTO w_used;
        END IF;
    ELSE
        SELECT * INTO s FROM harness_spend WHERE id = p_id;
        SELECT * INTO t FROM harness_spend_tasks WHERE task_id = s.task_id;
    END IF;
    RETURN jsonb_build_object('settled', settled,
        'reserved_nanos', t.reserved_nanos, 'spent_nanos', t.spent_nanos,
        'reserved_tokens', t.reserved_tokens, 'spent_tokens', t.spent_tokens,
        'calls', t.calls, 'window_nanos', w_used);
END $$
"""

_REVIEW_QUEUE_INDEXES = """
CREATE INDEX IF NOT EXISTS harness_reviews_reason
    ON harness_reviews (status, reason, created_at);
CREATE INDEX IF NOT EXISTS harness_reviews_age ON harness_reviews (status, created_at);
CREATE INDEX IF NOT EXISTS harness_reviews_assignee_age
    ON harness_reviews (status, assignee, created_at);
CREATE INDEX IF NOT EXISTS harness_reviews_deadline ON harness_reviews (status, deadline)
"""

_EFFECTS_0201 = """
ALTER TABLE harness_effects ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE harness_effects ADD COLUMN resolved_by TEXT;
CREATE INDEX IF NOT EXISTS harness_effects_status ON harness_effects (status, started_at)
"""
# attempts: how many times the call was started (an idempotent effect may re-run);
# resolved_by: who settled an unknown outcome (a reviewer), for the audit trail.

_RUNS_0202 = """
ALTER TABLE harness_runs ADD COLUMN error TEXT;
ALTER TABLE harness_runs ADD COLUMN finished_at DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS harness_runs_lease ON harness_runs (status, lease_expires_at)
"""
# error: why the last attempt failed; finished_at: when the run reached a final status.
# The lease index serves recover(): running rows whose lease expired.

_RUNS_0203 = """
ALTER TABLE harness_runs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE harness_runs ADD COLUMN crashed_owner TEXT
"""
# crashes: runs in a row whose process died holding the lease (counted by the claim that
# finds the row still ``running``); crashed_owner: the lease owner of the last of them.
# Recovery fails a task past its runner's ``max_recoveries`` instead of running it again.

# The review inbox lists pending items most urgent first (`ReviewQueue.pending(order=
# "urgency")`: priority, then deadline — none last —, then age), a page at a time. These
# indexes repeat that ORDER BY expression for expression, so the page is read off an index,
# with or without a task-type filter, instead of sorting the whole queue.
_REVIEW_INBOX_INDEXES = """
CREATE INDEX IF NOT EXISTS harness_reviews_urgency ON harness_reviews
    (status, priority DESC, (CASE WHEN deadline IS NULL THEN 1 ELSE 0 END), deadline,
     created_at, id);
CREATE INDEX IF NOT EXISTS harness_reviews_type_urgency ON harness_reviews
    (status, task_type, priority DESC, (CASE WHEN deadline IS NULL THEN 1 ELSE 0 END), deadline,
     created_at, id)
"""

# Every ledger write used to wait for its WAL flush (~1-3 ms of fsync, 10-60 round trips).
# A settlement only ever lowers a reservation to the actual cost, so losing one in a server
# crash leaves the worst case booked — conservative — and it need not wait: settle commits
# asynchronously (the next synchronous commit, e.g. the step's checkpoint, flushes it too).
# A reservation waits by default; ``p_sync => false`` opts out (see `budgeted(sync_commit=)`).
_SPEND_ASYNC_COMMIT_PG = """
CREATE OR REPLACE FUNCTION harness_spend_reserve_v2(
    p_task_id TEXT, p_task_type TEXT, p_model TEXT,
    p_input_tokens BIGINT, p_output_tokens BIGINT, p_nanos BIGINT,
    p_max_nanos BIGINT, p_max_tokens BIGINT, p_max_calls BIGINT,
    p_window_seconds DOUBLE PRECISION, p_window_starts_at DOUBLE PRECISION,
    p_window_max_nanos BIGINT, p_now DOUBLE PRECISION, p_sync BOOLEAN) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT p_sync THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN harness_spend_reserve(p_task_id, p_task_type, p_model, p_input_tokens,
        p_output_tokens, p_nanos, p_max_nanos, p_max_tokens, p_max_calls, p_window_seconds,
        p_window_starts_at, p_window_max_nanos, p_now);
END $$;

CREATE OR REPLACE FUNCTION harness_spend_settle_v2(
    p_id BIGINT, p_state TEXT, p_model TEXT, p_input_tokens BIGINT, p_output_tokens BIGINT,
    p_nanos BIGINT, p_now DOUBLE PRECISION) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN harness_spend_settle(p_id, p_state, p_model, p_input_tokens, p_output_tokens,
        p_nanos, p_now);
END $$
"""


# A settlement need not be a statement of its own: the wrapper keeps it pending and the
# task's next ledger statement applies it first, in the same transaction (a reservation or
# a read of the totals); a flusher writes what is still pending shortly after. So a model
# call costs one round trip. ``p_settles`` is a JSON array of
# ``{"id", "state", "model", "input_tokens", "output_tokens", "nanos", "at"}``, applied in id
# order (spend rows, then the task row, then window rows: the one lock order everywhere).
_SPEND_FOLDED_SETTLES_PG = """
CREATE OR REPLACE FUNCTION harness_spend_apply_settles(p_settles jsonb, p_task_id TEXT,
    OUT d_reserved_nanos BIGINT, OUT d_spent_nanos BIGINT, OUT d_reserved_tokens BIGINT,
    OUT d_spent_tokens BIGINT, OUT d_calls BIGINT, OUT windows jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    s RECORD;
    r RECORD;
BEGIN
    d_reserved_nanos := 0; d_spent_nanos := 0; d_reserved_tokens := 0; d_spent_tokens := 0;
    d_calls := 0; windows := '[]'::jsonb;
    IF p_settles IS NULL OR jsonb_array_length(p_settles) = 0 THEN
        RETURN;
    END IF;
    FOR s IN SELECT * FROM jsonb_to_recordset(p_settles) AS x(id BIGINT, state TEXT,
            model TEXT, input_tokens BIGINT, output_tokens BIGINT, nanos BIGINT,
            at DOUBLE PRECISION) ORDER BY id
    LOOP
        UPDATE harness_spend SET state = s.state, model = COALESCE(s.model, model),
                input_tokens = s.input_tokens, output_tokens = s.output_tokens,
                cost_nanos = s.nanos, settled_at = s.at
            -- By primary key: the `|| ''` keeps the planner off the (task_id, state) index,
            -- whose 'reserved' run can be long.
            WHERE id = s.id AND state || '' = 'reserved' AND task_id || '' = p_task_id
            RETURNING reserved_nanos AS rn, reserved_tokens AS rt, task_type AS tt,
                window_seconds AS ws, window_starts_at AS wst INTO r;
        CONTINUE WHEN NOT FOUND;  -- settled already (or not this task's): nothing to move
        d_reserved_nanos := d_reserved_nanos + r.rn;
        d_spent_nanos := d_spent_nanos + s.nanos;
        d_reserved_tokens := d_reserved_tokens + r.rt;
        d_spent_tokens := d_spent_tokens + s.input_tokens + s.output_tokens;
        IF s.state = 'released' THEN
            d_calls := d_calls + 1;
        END IF;
        IF r.ws IS NOT NULL THEN
            windows := windows || jsonb_build_array(jsonb_build_object('tt', r.tt, 'ws', r.ws,
                'wst', r.wst, 'rn', r.rn, 'n', s.nanos));
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION harness_spend_apply_window_settles(p_windows jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w RECORD;
BEGIN
    IF p_windows IS NULL OR jsonb_array_length(p_windows) = 0 THEN
        RETURN;
    END IF;
    FOR w IN SELECT x.tt, x.ws, x.wst, sum(x.rn) AS rn, sum(x.n) AS n
            FROM jsonb_to_recordset(p_windows) AS x(tt TEXT, ws DOUBLE PRECISION,
                wst DOUBLE PRECISION, rn BIGINT, n BIGINT)
            GROUP BY x.tt, x.ws, x.wst ORDER BY x.wst, x.tt, x.ws
    LOOP
        UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos - w.rn,
                spent_nanos = spent_nanos + w.n
            WHERE task_type = w.tt AND window_seconds = w.ws AND starts_at = w.wst;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION harness_spend_flush(p_settles jsonb, p_task_id TEXT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d RECORD;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT * INTO d FROM harness_spend_apply_settles(p_settles, p_task_id);
    UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos - d.d_reserved_nanos,
            spent_nanos = spent_nanos + d.d_spent_nanos,
            reserved_tokens = reserved_tokens - d.d_reserved_tokens,
            spent_tokens = spent_tokens + d.d_spent_tokens, calls = calls - d.d_calls
        WHERE task_id = p_task_id;
    PERFORM harness_spend_apply_window_settles(d.windows);
END $$;

CREATE OR REPLACE FUNCTION harness_spend_totals_v2(p_settles jsonb, p_task_id TEXT,
    p_window_seconds DOUBLE PRECISION, p_window_starts_at DOUBLE PRECISION, p_task_type TEXT)
    RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    IF p_settles IS NOT NULL AND jsonb_array_length(p_settles) > 0 THEN
        PERFORM harness_spend_flush(p_settles, p_task_id);
    END IF;
    RETURN harness_spend_totals(p_task_id, p_window_seconds, p_window_starts_at, p_task_type);
END $$;

CREATE OR REPLACE FUNCTION harness_spend_reserve_v3(p_settles jsonb,
    p_task_id TEXT, p_task_type TEXT, p_model TEXT,
    p_input_tokens BIGINT, p_output_tokens BIGINT, p_nanos BIGINT,
    p_max_nanos BIGINT, p_max_tokens BIGINT, p_max_calls BIGINT,
    p_window_seconds DOUBLE PRECISION, p_window_starts_at DOUBLE PRECISION,
    p_window_max_nanos BIGINT, p_now DOUBLE PRECISION, p_sync BOOLEAN) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    d RECORD;
    t harness_spend_tasks%ROWTYPE;
    tokens BIGINT := p_input_tokens + p_output_tokens;
    w_used BIGINT := 0;
    refused TEXT := NULL;
    new_id BIGINT := NULL;
BEGIN
    IF NOT p_sync THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- 1. This task's pending settlements: their spend rows (locks: spend rows first).
    IF p_settles IS NULL THEN
        SELECT 0::BIGINT AS d_reserved_nanos, 0::BIGINT AS d_spent_nanos,
            0::BIGINT AS d_reserved_tokens, 0::BIGINT AS d_spent_tokens, 0::BIGINT AS d_calls,
            NULL::jsonb AS windows INTO d;
    ELSE
        SELECT * INTO d FROM harness_spend_apply_settles(p_settles, p_task_id);
    END IF;
    -- 2. The task row: settle and check-and-reserve in one UPDATE (its WHERE is re-checked
    --    on the newest row version if another transaction got there first).
    UPDATE harness_spend_tasks SET
            reserved_nanos = reserved_nanos - d.d_reserved_nanos + p_nanos,
            spent_nanos = spent_nanos + d.d_spent_nanos,
            reserved_tokens = reserved_tokens - d.d_reserved_tokens + tokens,
            spent_tokens = spent_tokens + d.d_spent_tokens,
            calls = calls - d.d_calls + 1, updated_at = p_now
        WHERE task_id = p_task_id
            AND (p_max_calls IS NULL OR calls - d.d_calls + 1 <= p_max_calls)
            AND (p_max_nanos IS NULL OR reserved_nanos - d.d_reserved_nanos + spent_nanos
                + d.d_spent_nanos + p_nanos <= p_max_nanos)
            AND (p_max_tokens IS NULL OR reserved_tokens - d.d_reserved_tokens + spent_tokens
                + d.d_spent_tokens + tokens <= p_max_tokens)
        RETURNING * INTO t;
    IF NOT FOUND THEN
        -- A new task, or a limit refuses: settle, then decide on the locked row.
        INSERT INTO harness_spend_tasks (task_id, task_type, updated_at)
            VALUES (p_task_id, p_task_type, p_now) ON CONFLICT (task_id) DO NOTHING;
        UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos - d.d_reserved_nanos,
                spent_nanos = spent_nanos + d.d_spent_nanos,
                reserved_tokens = reserved_tokens - d.d_reserved_tokens,
                spent_tokens = spent_tokens + d.d_spent_tokens, calls = calls - d.d_calls,
                updated_at = p_now
            WHERE task_id = p_task_id
            RETURNING * INTO t;
        IF p_max_calls IS NOT NULL AND t.calls + 1 > p_max_calls THEN
            refused := 'calls';
        ELSIF p_max_nanos IS NOT NULL
                AND t.reserved_nanos + t.spent_nanos + p_nanos > p_max_nanos THEN
            refused := 'usd';
        ELSIF p_max_tokens IS NOT NULL
                AND t.reserved_tokens + t.spent_tokens + tokens > p_max_tokens THEN
            refused := 'tokens';
        ELSE
            UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos + p_nanos,
                    reserved_tokens = reserved_tokens + tokens, calls = calls + 1
                WHERE task_id = p_task_id
                RETURNING * INTO t;
        END IF;
    END IF;
    -- 3. Window rows, oldest first: the settled calls' windows, then this call's.
    IF d.windows IS NOT NULL AND d.windows <> '[]'::jsonb THEN
        PERFORM harness_spend_apply_window_settles(d.windows);
    END IF;
    IF p_window_seconds IS NOT NULL THEN
        IF refused IS NULL THEN
            INSERT INTO harness_spend_windows (task_type, window_seconds, starts_at)
                VALUES (p_task_type, p_window_seconds, p_window_starts_at)
                ON CONFLICT DO NOTHING;
            UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos + p_nanos
                WHERE task_type = p_task_type AND window_seconds = p_window_seconds
                    AND starts_at = p_window_starts_at
                    AND (p_window_max_nanos IS NULL
                         OR reserved_nanos + spent_nanos + p_nanos <= p_window_max_nanos)
                RETURNING reserved_nanos + spent_nanos INTO w_used;
            IF NOT FOUND THEN  -- the window refuses: give the task row its reservation back
                refused := 'window_usd';
                UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos - p_nanos,
                        reserved_tokens = reserved_tokens - tokens, calls = calls - 1
                    WHERE task_id = p_task_id
                    RETURNING * INTO t;
            END IF;
        END IF;
        IF refused IS NOT NULL THEN
            SELECT COALESCE(max(reserved_nanos + spent_nanos), 0) INTO w_used
                FROM harness_spend_windows WHERE task_type = p_task_type
                    AND window_seconds = p_window_seconds AND starts_at = p_window_starts_at;
        END IF;
    END IF;
    -- 4. The call's own row.
    IF refused IS NULL THEN
        INSERT INTO harness_spend (task_id, task_type, model, state, input_tokens, output_tokens,
                cost_nanos, created_at, reserved_nanos, reserved_tokens, window_seconds,
                window_starts_at)
            VALUES (p_task_id, p_task_type, p_model, 'reserved', p_input_tokens, p_output_tokens,
                0, p_now, p_nanos, tokens, p_window_seconds, p_window_starts_at)
            RETURNING id INTO new_id;
    END IF;
    RETURN jsonb_build_object('id', new_id, 'refused', refused,
        'reserved_nanos', t.reserved_nanos, 'spent_nanos', t.spent_nanos,
        'reserved_tokens', t.reserved_tokens, 'spent_tokens', t.spent_tokens,
        'calls', t.calls, 'window_nanos', w_used);
END $$
"""


# Budget leases (``budgeted(lease=k)``): a reservation on Postgres may also book room for
# k - 1 more calls like it, held by the process in a ``state = 'lease'`` row. The process then
# grants those calls from memory, with no round trip (the room is booked, durably, so the cap
# holds whatever happens); each such call's row is written once, at its settlement, and the
# unused rest goes back when the lease is released. A lease takes at most half of the room a
# limit has left, so near a limit every call is reserved on its own. Settlements gain two
# kinds: a call granted from a lease (``lease_id``: insert its row, once, and take it off the
# lease) and a lease's release (``state = 'lease_release'``: give back its unused rest, once).
_SPEND_LEASES_COMMON = """
ALTER TABLE harness_spend ADD COLUMN lease_id BIGINT;
ALTER TABLE harness_spend ADD COLUMN reserved_calls BIGINT NOT NULL DEFAULT 0
"""

_SPEND_LEASES_PG = (
    _SPEND_LEASES_COMMON
    + """;
CREATE OR REPLACE FUNCTION harness_spend_apply_settles(p_settles jsonb, p_task_id TEXT,
    OUT d_reserved_nanos BIGINT, OUT d_spent_nanos BIGINT, OUT d_reserved_tokens BIGINT,
    OUT d_spent_tokens BIGINT, OUT d_calls BIGINT, OUT windows jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    s RECORD;
    r RECORD;
BEGIN
    d_reserved_nanos := 0; d_spent_nanos := 0; d_reserved_tokens := 0; d_spent_tokens := 0;
    d_calls := 0; windows := '[]'::jsonb;
    IF p_settles IS NULL OR jsonb_array_length(p_settles) = 0 THEN
        RETURN;
    END IF;
    FOR s IN SELECT * FROM jsonb_to_recordset(p_settles) AS x(id BIGINT, state TEXT,
            model TEXT, input_tokens BIGINT, output_tokens BIGINT, nanos BIGINT,
            at DOUBLE PRECISION, lease_id BIGINT, reserved_nanos BIGINT,
            reserved_tokens BIGINT, calls BIGINT, granted_at DOUBLE PRECISION) ORDER BY id
    LOOP
        IF s.state = 'lease_release' THEN
            -- A lease gives back its unused rest, once (a closed lease is not released again);
            -- what its calls in flight hold stays booked until they settle.
            UPDATE harness_spend SET state = 'lease_closed', settled_at = s.at,
                    reserved_nanos = reserved_nanos - s.nanos,
                    reserved_tokens = reserved_tokens - s.reserved_tokens,
                    reserved_calls = reserved_calls - s.calls
                WHERE id = s.id AND state || '' = 'lease' AND task_id || '' = p_task_id
                RETURNING task_type AS tt, window_seconds AS ws, window_starts_at AS wst INTO r;
            CONTINUE WHEN NOT FOUND;
            d_reserved_nanos := d_reserved_nanos + s.nanos;
            d_reserved_tokens := d_reserved_tokens + s.reserved_tokens;
            d_calls := d_calls + s.calls;
            IF r.ws IS NOT NULL THEN
                windows := windows || jsonb_build_array(jsonb_build_object('tt', r.tt,
                    'ws', r.ws, 'wst', r.wst, 'rn', s.nanos, 'n', 0));
            END IF;
            CONTINUE;
        END IF;
        IF s.lease_id IS NOT NULL THEN
            -- A call granted from a lease: its row is written now, once (the id is its own).
            INSERT INTO harness_spend (id, task_id, task_type, model, state, input_tokens,
                    output_tokens, cost_nanos, created_at, settled_at, reserved_nanos,
                    reserved_tokens, window_seconds, window_starts_at, lease_id)
                SELECT s.id, l.task_id, l.task_type, COALESCE(s.model, l.model), s.state,
                    s.input_tokens, s.output_tokens, s.nanos, COALESCE(s.granted_at, s.at),
                    s.at, s.reserved_nanos, s.reserved_tokens, l.window_seconds,
                    l.window_starts_at, l.id
                FROM harness_spend l WHERE l.id = s.lease_id AND l.task_id = p_task_id
                ON CONFLICT (id) DO NOTHING
                RETURNING reserved_nanos AS rn, reserved_tokens AS rt, task_type AS tt,
                    window_seconds AS ws, window_starts_at AS wst INTO r;
            CONTINUE WHEN NOT FOUND;  -- written already (or not this task's lease)
            UPDATE harness_spend SET reserved_nanos = reserved_nanos - s.reserved_nanos,
                    reserved_tokens = reserved_tokens - s.reserved_tokens,
                    reserved_calls = reserved_calls - 1
                WHERE id = s.lease_id;
        ELSE
            UPDATE harness_spend SET state = s.state, model = COALESCE(s.model, model),
                    input_tokens = s.input_tokens, output_tokens = s.output_tokens,
                    cost_nanos = s.nanos, settled_at = s.at
                -- By primary key: the `|| ''` keeps the planner off the (task_id, state)
                -- index, whose 'reserved' run can be long.
                WHERE id = s.id AND state || '' = 'reserved' AND task_id || '' = p_task_id
                RETURNING reserved_nanos AS rn, reserved_tokens AS rt, task_type AS tt,
                    window_seconds AS ws, window_starts_at AS wst INTO r;
            CONTINUE WHEN NOT FOUND;  -- settled already (or not this task's): nothing to move
        END IF;
        d_reserved_nanos := d_reserved_nanos + r.rn;
        d_spent_nanos := d_spent_nanos + s.nanos;
        d_reserved_tokens := d_reserved_tokens + r.rt;
        d_spent_tokens := d_spent_tokens + s.input_tokens + s.output_tokens;
        IF s.state = 'released' THEN
            d_calls := d_calls + 1;
        END IF;
        IF r.ws IS NOT NULL THEN
            windows := windows || jsonb_build_array(jsonb_build_object('tt', r.tt, 'ws', r.ws,
                'wst', r.wst, 'rn', r.rn, 'n', s.nanos));
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION harness_spend_reserve_v4(p_settles jsonb,
    p_task_id TEXT, p_task_type TEXT, p_model TEXT,
    p_input_tokens BIGINT, p_output_tokens BIGINT, p_nanos BIGINT,
    p_max_nanos BIGINT, p_max_tokens BIGINT, p_max_calls BIGINT,
    p_window_seconds DOUBLE PRECISION, p_window_starts_at DOUBLE PRECISION,
    p_window_max_nanos BIGINT, p_now DOUBLE PRECISION, p_sync BOOLEAN,
    p_lease_calls BIGINT) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
    t harness_spend_tasks%ROWTYPE;
    en BIGINT;
    et BIGINT;
    w_used BIGINT := NULL;
    new_lease BIGINT;
    ids BIGINT[];
BEGIN
    r := harness_spend_reserve_v3(p_settles, p_task_id, p_task_type, p_model, p_input_tokens,
        p_output_tokens, p_nanos, p_max_nanos, p_max_tokens, p_max_calls, p_window_seconds,
        p_window_starts_at, p_window_max_nanos, p_now, p_sync);
    IF p_lease_calls IS NULL OR p_lease_calls <= 0 OR r->>'id' IS NULL THEN
        RETURN r;
    END IF;
    en := p_lease_calls * p_nanos;
    et := p_lease_calls * (p_input_tokens + p_output_tokens);
    -- The lease: room for p_lease_calls more calls like this one, if that leaves at least as
    -- much again under every limit (the task row is locked already: no new lock order).
    UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos + en,
            reserved_tokens = reserved_tokens + et, calls = calls + p_lease_calls
        WHERE task_id = p_task_id
            AND (p_max_calls IS NULL OR calls + 2 * p_lease_calls <= p_max_calls)
            AND (p_max_nanos IS NULL OR reserved_nanos + spent_nanos + 2 * en <= p_max_nanos)
            AND (p_max_tokens IS NULL
                 OR reserved_tokens + spent_tokens + 2 * et <= p_max_tokens)
        RETURNING * INTO t;
    IF NOT FOUND THEN
        RETURN r;
    END IF;
    IF p_window_seconds IS NOT NULL THEN
        UPDATE harness_spend_windows SET reserved_nanos = reserved_nanos + en
            WHERE task_type = p_task_type AND window_seconds = p_window_seconds
                AND starts_at = p_window_starts_at
                AND (p_window_max_nanos IS NULL
                     OR reserved_nanos + spent_nanos + 2 * en <= p_window_max_nanos)
            RETURNING reserved_nanos + spent_nanos INTO w_used;
        IF NOT FOUND THEN
            UPDATE harness_spend_tasks SET reserved_nanos = reserved_nanos - en,
                    reserved_tokens = reserved_tokens - et, calls = calls - p_lease_calls
                WHERE task_id = p_task_id;
            RETURN r;
        END IF;
    END IF;
    INSERT INTO harness_spend (task_id, task_type, model, state, created_at, reserved_nanos,
            reserved_tokens, reserved_calls, window_seconds, window_starts_at)
        VALUES (p_task_id, p_task_type, p_model, 'lease', p_now, en, et, p_lease_calls,
            p_window_seconds, p_window_starts_at)
        RETURNING id INTO new_lease;
    SELECT array_agg(nextval(pg_get_serial_sequence('harness_spend', 'id')))
        INTO ids FROM generate_series(1, p_lease_calls);
    RETURN r || jsonb_build_object('reserved_nanos', t.reserved_nanos,
        'spent_nanos', t.spent_nanos, 'reserved_tokens', t.reserved_tokens,
        'spent_tokens', t.spent_tokens, 'calls', t.calls,
        'window_nanos', COALESCE(w_used, (r->>'window_nanos')::BIGINT),
        'lease', jsonb_build_object('id', new_lease, 'ids', to_jsonb(ids), 'nanos', en,
            'tokens', et));
END $$
"""
)

MIGRATIONS: list[Migration] = [
    Migration(
        name="0001_base",
        postgres=_BASE_COMMON.format(float="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY"),
        sqlite=_BASE_COMMON.format(float="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT"),
    ),
    Migration(
        name="0301_spend_totals",
        postgres=_SPEND_TOTALS_COMMON.format(float="DOUBLE PRECISION") + ";" + _SPEND_FUNCTIONS_PG,
        sqlite=_SPEND_TOTALS_COMMON.format(float="REAL"),
    ),
    Migration(
        name="0302_spend_async_settle",
        postgres=_SPEND_ASYNC_COMMIT_PG,
        sqlite="SELECT 1",
    ),
    Migration(
        name="0303_spend_folded_settles",
        postgres=_SPEND_FOLDED_SETTLES_PG,
        sqlite="SELECT 1",
    ),
    Migration(
        name="0304_spend_leases",
        postgres=_SPEND_LEASES_PG,
        sqlite=_SPEND_LEASES_COMMON,
    ),
    # 02xx: effects and runs.
    Migration(
        name="0201_effects_attempts_resolution",
        postgres=_EFFECTS_0201,
        sqlite=_EFFECTS_0201,
    ),
    Migration(
        name="0202_runs_error_and_lease_index",
        postgres=_RUNS_0202,
        sqlite=_RUNS_0202,
    ),
    # Review queue filters: by reason, by age, by assignee (oldest first), expiry by deadline.
    Migration(
        name="0401_review_queue_indexes",
        postgres=_REVIEW_QUEUE_INDEXES,
        sqlite=_REVIEW_QUEUE_INDEXES,
    ),
    Migration(
        name="0410_review_inbox_urgency",
        postgres=_REVIEW_INBOX_INDEXES,
        sqlite=_REVIEW_INBOX_INDEXES,
    ),
    Migration(
        name="0203_runs_crash_count",
        postgres=_RUNS_0203,
        sqlite=_RUNS_0203,
    ),
]
"""Every harness migration, in the order they apply. Append; never edit an applied one."""

MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS harness_migrations (
    name TEXT PRIMARY KEY,
    applied_at {float} NOT NULL
)"""
