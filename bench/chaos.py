"""Chaos benchmark: what the harness buys on the reference graphs under injected faults.

N tasks (default 200) of the reference graphs — 70% `graphs.research` (read-only, cost grows
with every read), 30% `graphs.support` (irreversible refund + email) — run with the scripted
model under fault profiles, in three modes on the same checkpointer:

- ``bare-restart``: a LangChain ``create_agent`` with the same model script and tools (no
  ledger, no verification, no review), ``ModelCallLimitMiddleware`` as its budget; after a
  crash the task is started again from scratch on a new thread (what a job queue that
  re-delivers the request does).
- ``bare-resume``: the same bare agent, but after a crash a fresh graph instance resumes the
  thread from its last checkpoint (LangGraph's own durability, ``durability="sync"``).
- ``harnessed``: the reference graph as shipped (`build_harnessed_agent`: cost envelope,
  verification, effect ledger, review) with ``budget_usd`` set to the envelope; after a
  crash a fresh graph instance resumes the thread; client retries are keyed by task id.

Faults (seeded per task, identical across modes): silent tool failures (one of
``empty_results`` / ``embedded_error`` / ``out_of_range``) in a fraction of tasks; process
crashes (an injected `SimulatedCrash`) at a fraction of model steps and, in support tasks,
inside the refund call (after its sibling email went out); runaway models in 5% of tasks;
client retries of 20% of submissions. A scripted reviewer answers every review request
(approve, reject an amount over $1,000).

Run: ``python -m bench.chaos`` (``--quick`` for CI, ``--tasks N``, ``--seed S``, ``--db URL``
for Postgres; default an embedded SQLite file). Writes ``bench/results/chaos.md`` and PNGs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import LLMResult
from langgraph.types import Command

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointers import Backend, open_backend
from graphs import Faults, SimulatedCrash, research, support
from harness_nodes import Pricing

MODES = ("bare-restart", "bare-resume", "harnessed")
SILENT = ("empty_results", "embedded_error", "out_of_range")
RESULTS = Path(__file__).resolve().parent / "results"
PRICING = Pricing()
ENVELOPE_FACTOR = 3.0
"""Each task type's envelope is this many times the cost of a clean run of the task."""


@dataclass(frozen=True)
class Profile:
    """One fault profile: the rates the tasks' faults are drawn with."""

    name: str
    silent: float = 0.0
    crash: float = 0.0
    runaway: float = 0.05
    retry: float = 0.20
    irreversible: float = 0.30


PROFILES = (
    Profile("clean", 0.0, 0.0),
    Profile("silent 10%", 0.10, 0.0),
    Profile("silent 30%", 0.30, 0.0),
    Profile("crash 10%", 0.0, 0.10),
    Profile("crash 30%", 0.0, 0.30),
    Profile("mixed 10/10", 0.10, 0.10),
)


@dataclass(frozen=True)
class TaskPlan:
    """The faults one task meets (the same in every mode)."""

    key: str
    kind: str
    silent: str | None
    runaway: bool
    retried: bool
    crash_turns: tuple[int, ...]
    crash_in_refund: bool


def plan_tasks(profile: Profile, n: int, seed: int) -> list[TaskPlan]:
    """Draw *n* task plans for *profile* from *seed* (deterministic)."""
    rng = random.Random(f"{seed}:{profile.name}")
    plans = []
    for i in range(n):
        kind = "support" if rng.random() < profile.irreversible else "research"
        silent = rng.choice(SILENT) if rng.random() < profile.silent else None
        runaway = kind == "research" and rng.random() < profile.runaway
        retried = rng.random() < profile.retry
        steps = 4 if kind == "support" else 7
        crash_turns = tuple(t for t in range(1, steps + 1) if rng.random() < profile.crash)
        crash_in_refund = kind == "support" and rng.random() < profile.crash
        plans.append(
            TaskPlan(f"task-{i:04d}", kind, silent, runaway, retried, crash_turns, crash_in_refund)
        )
    return plans


# --- metering ----------------------------------------------------------------------------------


class Meter(BaseCallbackHandler):
    """Counts what really ran: scripted-model calls (tokens, dollars) and completed tool calls."""

    def __init__(self) -> None:
        self.tokens = 0
        self.nanos = Decimal(0)
        # Keyed by turn / tool-call id, which are the same on every attempt of one task.
        self.model_steps: Counter[int] = Counter()
        self.tool_steps: Counter[str] = Counter()
        self.thread = ""
        self._turns: dict[UUID, int] = {}
        self._tools: dict[UUID, str] = {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        if "ScriptedChatModel" in str(serialized.get("id") or serialized.get("name")):
            self._turns[run_id] = sum(1 for m in messages[0] if isinstance(m, AIMessage))

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        turn = self._turns.pop(run_id, None)
        if turn is None:
            return
        msg = response.generations[0][0].message  # type: ignore[attr-defined]
        usage = msg.usage_metadata or {}
        name = msg.response_metadata.get("model_name", "gpt-4o")
        rates = PRICING.rates(name)
        inp, out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
        self.tokens += inp + out
        self.nanos += rates.input * inp + rates.output * out
        self.model_steps[turn] += 1

    def on_tool_start(
        self, serialized: dict[str, Any], input_str: str, *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._tools[run_id] = str(kwargs.get("tool_call_id"))

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        call_id = self._tools.pop(run_id, None)
        if call_id is not None:
            self.tool_steps[call_id] += 1

    @property
    def usd(self) -> float:
        return float(self.nanos) / 1e9

    @property
    def reexecuted(self) -> int:
        """Completed steps (model turns, tool calls) of the task that ran more than once."""
        return sum(n - 1 for n in self.model_steps.values() if n > 1) + sum(
            n - 1 for n in self.tool_steps.values() if n > 1
        )


# --- one task -----------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """What one task did in one mode."""

    key: str
    kind: str
    status: str  # correct | wrong | stopped
    tokens: int
    usd: float
    envelope_usd: float
    duplicates: int
    reexecuted: int
    escalations: int
    crashes: int
    seconds: float


@dataclass
class Env:
    """Per-run shared things: backend, expected answers, envelopes."""

    backend: Backend
    expected: dict[str, str] = field(default_factory=dict)
    envelope_usd: dict[str, float] = field(default_factory=dict)
    call_limit: dict[str, int] = field(default_factory=dict)


def _task_text(kind: str) -> str:
    return research.DEFAULT_TASK if kind == "research" else support.DEFAULT_TASK


def _build(
    env: Env, mode: str, kind: str, faults: Faults, world: support.SupportWorld
) -> tuple[Any, str | None]:
    """A fresh graph instance (a fresh "process") for *mode*; and its system prompt."""
    if mode == "harnessed":
        # The reference graphs as shipped: their cost envelope is the harness's own
        # (`build_harnessed_agent(envelope=...)`: budgeted ladder + BudgetGuard).
        budget = env.envelope_usd[kind]
        if kind == "research":
            graph = research.build_graph(backend=env.backend, faults=faults, budget_usd=budget)
            return graph, None
        graph = support.build_graph(
            backend=env.backend, world=world, faults=faults, budget_usd=budget
        )
        return graph, None
    limit = ModelCallLimitMiddleware(thread_limit=env.call_limit[kind], exit_behavior="end")
    if kind == "research":
        tools = research.make_tools(faults)
        model = research.scripted_models(faults)[0]
        prompt = research.SYSTEM_PROMPT
    else:
        tools = support.make_tools(world, faults, guarded=False)
        model = support.scripted_model(faults)
        prompt = support.SYSTEM_PROMPT
    agent = create_agent(
        model,
        tools,
        system_prompt=prompt,
        middleware=[limit],
        checkpointer=env.backend.checkpointer,
    )
    return agent, prompt


def _reviewer(value: Any, world: support.SupportWorld) -> Any:
    """The scripted reviewer, who can look at the payment processor and the mail server.

    A refund or email waiting for approval: approve, unless the amount is over $1,000 (a
    units bug). An effect of unknown outcome (started, no result recorded): approve ("it
    happened") when the world shows it, reject ("it did not") otherwise.
    """
    requests = value if isinstance(value, list) else [value]
    decisions = []
    for r in requests:
        action = (r or {}).get("action_request") or {}
        args = action.get("args") or {}
        if (r or {}).get("trigger") == "effect_unknown":
            if action.get("name") == "issue_refund":
                happened = any(e.get("invoice_id") == args.get("invoice_id") for e in world.refunds)
            else:
                happened = any(e.get("subject") == args.get("subject") for e in world.emails)
            decisions.append({"type": "approve" if happened else "reject"})
            continue
        amount = args.get("amount_usd")
        too_much = isinstance(amount, int | float) and amount > 1000
        decisions.append({"type": "reject" if too_much else "approve"})
    return decisions


def _final_text(values: dict[str, Any]) -> str:
    msgs = values.get("messages") or []
    last = msgs[-1] if msgs else None
    return last.text if isinstance(last, AIMessage) and not last.tool_calls else ""


def run_task(env: Env, plan: TaskPlan, mode: str) -> TaskResult:
    """Run one task (and its client retry, if planned) in *mode*; meter everything."""
    meter = Meter()
    world = support.SupportWorld()
    pending_turns = list(plan.crash_turns)
    pending_tool = plan.crash_in_refund
    crashes = escalations = 0
    attempt = 0
    thread = f"{mode}:{plan.key}:{uuid.uuid4().hex[:6]}"
    text = _task_text(plan.kind)
    started = time.perf_counter()

    def faults() -> Faults:
        flags: dict[str, Any] = {"runaway": plan.runaway}
        if plan.silent:
            flags[plan.silent] = True
        if pending_turns:
            flags["crash_at_turn"] = pending_turns[0]
        if pending_tool:
            flags["crash_in"] = "issue_refund"
        return Faults.parse(flags)

    def config() -> dict[str, Any]:
        return {
            "configurable": {"thread_id": f"{thread}:{attempt}"},
            "callbacks": [meter],
            "recursion_limit": 200,
        }

    def submit(first: bool) -> dict[str, Any]:
        nonlocal crashes, escalations, attempt, pending_tool
        graph, _ = _build(env, mode, plan.kind, faults(), world)
        meter.thread = f"{thread}:{attempt}"
        if mode == "harnessed" and not first:
            # A client retry of a known task id: the harness returns the task's outcome
            # (TaskRunner.submit joins an existing task) instead of running it again.
            state = graph.get_state(config())
            if state.values and not state.next:
                return dict(state.values)
        payload: Any = {"messages": [HumanMessage(text)]}
        while True:
            try:
                out = graph.invoke(payload, config(), durability="sync")
            except SimulatedCrash as crash:
                crashes += 1
                if crash.where.startswith("model turn") and pending_turns:
                    pending_turns.pop(0)
                else:
                    pending_tool = False
                graph, _ = _build(env, mode, plan.kind, faults(), world)
                if mode == "bare-restart":
                    attempt += 1
                    meter.thread = f"{thread}:{attempt}"
                    payload = {"messages": [HumanMessage(text)]}
                else:
                    payload = None
                continue
            if "__interrupt__" in out:
                escalations += 1
                payload = Command(resume=_reviewer(out["__interrupt__"][0].value, world))
                continue
            return out

    values = submit(first=True)
    if plan.retried:
        values = submit(first=False)
    seconds = time.perf_counter() - started
    answer = _final_text(values)
    outcome = (values.get("outcome") or {}).get("status")
    refunds = world.refunds
    distinct = {(r["invoice_id"], r["amount_usd"]) for r in refunds}
    emails = world.emails
    duplicates = (len(refunds) - len(distinct)) + max(0, len(emails) - 1)
    if plan.kind == "research":
        correct = answer == env.expected["research"]
        completed = bool(answer) and not plan.runaway and "limit" not in answer.lower()
        completed = completed and "budget" not in answer.lower()
    else:
        correct = distinct == {("inv_5003", 49.0)} and answer.startswith("Done: refunded $49.0")
        completed = bool(answer) and "limit" not in answer.lower() and "budget" not in answer
    if outcome not in (None, "completed"):  # budget_exhausted, verification failed...
        completed = False
    status = "correct" if correct else ("wrong" if completed else "stopped")
    return TaskResult(
        plan.key,
        plan.kind,
        status,
        meter.tokens,
        meter.usd,
        env.envelope_usd[plan.kind],
        duplicates,
        meter.reexecuted,
        escalations,
        crashes,
        seconds,
    )


def calibrate(env: Env) -> None:
    """Clean runs of each task type: the expected answers, the envelopes and call limits."""
    env.expected["research"] = ""
    for kind in ("research", "support"):
        env.envelope_usd[kind] = 100.0
        env.call_limit[kind] = 1000
        if kind == "research":
            graph, _ = _build(env, "bare-resume", kind, Faults(), support.SupportWorld())
            out = graph.invoke(
                {"messages": [HumanMessage(research.DEFAULT_TASK)]},
                {"configurable": {"thread_id": f"calibrate-{uuid.uuid4().hex}"}},
            )
            env.expected["research"] = _final_text(out)
        plan = TaskPlan("calibrate", kind, None, False, False, (), False)
        clean = run_task(env, plan, "bare-resume")
        assert clean.status == "correct", f"a clean {kind} run is not correct: {clean}"
        env.envelope_usd[kind] = round(clean.usd * ENVELOPE_FACTOR, 6)
        calls = 7 if kind == "research" else 4
        env.call_limit[kind] = int(calls * ENVELOPE_FACTOR)


# --- aggregation and output --------------------------------------------------------------------


def _p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)] if s else 0.0


def summarise(results: list[TaskResult]) -> dict[str, float]:
    n = len(results)
    usd = [r.usd for r in results]
    tokens = [float(r.tokens) for r in results]
    return {
        "n": n,
        "correct": sum(r.status == "correct" for r in results) / n,
        "wrong": sum(r.status == "wrong" for r in results) / n,
        "stopped": sum(r.status == "stopped" for r in results) / n,
        "tokens_mean": statistics.fmean(tokens),
        "tokens_p95": _p95(tokens),
        "tokens_max": max(tokens),
        "usd_mean": statistics.fmean(usd),
        "usd_p95": _p95(usd),
        "usd_max": max(usd),
        "overspend_max": max(max(0.0, r.usd - r.envelope_usd) for r in results),
        "overspend_tasks": sum(r.usd > r.envelope_usd + 1e-12 for r in results),
        "duplicates": sum(r.duplicates for r in results),
        "reexecuted": sum(r.reexecuted for r in results),
        "escalations": sum(r.escalations for r in results),
        "crashes": sum(r.crashes for r in results),
        "seconds_mean": statistics.fmean(r.seconds for r in results),
    }


@contextmanager
def open_db(url: str | None) -> Iterator[Backend]:
    if url:
        with open_backend(url) as backend:
            yield backend
        return
    with tempfile.TemporaryDirectory() as tmp, open_backend(f"sqlite:///{tmp}/chaos.db") as b:
        yield b


def run(
    n: int, seed: int, profiles: tuple[Profile, ...], db: str | None, log: Callable[[str], None]
) -> dict[tuple[str, str], dict[str, float]]:
    """Run every profile in every mode; the summaries by (profile, mode)."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    with open_db(db) as backend:
        env = Env(backend)
        calibrate(env)
        log(f"envelopes: {env.envelope_usd}; bare call limits: {env.call_limit}")
        for profile in profiles:
            plans = plan_tasks(profile, n, seed)
            for mode in MODES:
                t = time.perf_counter()
                results = [run_task(env, p, mode) for p in plans]
                table[(profile.name, mode)] = summarise(results)
                s = table[(profile.name, mode)]
                log(
                    f"{profile.name:12} {mode:12} correct={s['correct']:.0%} wrong={s['wrong']:.0%}"
                    f" dup={s['duplicates']} reexec={s['reexecuted']} "
                    f"overspend={s['overspend_max']:.4f} ({time.perf_counter() - t:.1f}s)"
                )
    return table


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.node()} · {platform.platform()} · Python {platform.python_version()} · "
        f"{cpus} CPUs · load average {load:.1f} at start"
    )


def markdown(
    table: dict[tuple[str, str], dict[str, float]], command: str, n: int, db: str, header: str
) -> str:
    lines = [
        "# Chaos benchmark",
        "",
        f"Command: `{command}`  ",
        f"Tasks per profile and mode: **{n}** · checkpointer: {db}  ",
        f"Machine: {header}",
        "",
        "Every profile also has runaway models in 5% of research tasks, client retries of 20% of "
        "submissions and 30% support tasks (irreversible refund + email). Envelope: "
        f"{ENVELOPE_FACTOR:g}x a clean run's cost per task type; bare budget: "
        "`ModelCallLimitMiddleware(thread_limit=3x clean calls)`.",
        "",
        "| profile | mode | correct | wrong output | stopped | tokens/task mean · p95 · max "
        "| $/task mean · p95 · max | max overspend $ (tasks over) | duplicate effects "
        "| re-executed steps | review pauses | crashes | wall ms/task |",
        "| --- | --- |" + " ---: |" * 11,
    ]
    for (profile, mode), s in table.items():
        lines.append(
            f"| {profile} | {mode} | {s['correct']:.1%} | {s['wrong']:.1%} | {s['stopped']:.1%} | "
            f"{s['tokens_mean']:,.0f} · {s['tokens_p95']:,.0f} · {s['tokens_max']:,.0f} | "
            f"{s['usd_mean']:.4f} · {s['usd_p95']:.4f} · {s['usd_max']:.4f} | "
            f"{s['overspend_max']:.4f} ({s['overspend_tasks']:.0f}) | {s['duplicates']:.0f} | "
            f"{s['reexecuted']:.0f} | {s['escalations']:.0f} | {s['crashes']:.0f} | "
            f"{s['seconds_mean'] * 1000:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plots(table: dict[tuple[str, str], dict[str, float]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for axis, metric, ylabel, fname, fmt in (
        ("silent", "correct", "correct-completion rate", "chaos_completion.png", "pct"),
        ("crash", "usd_mean", "mean $ per task", "chaos_cost.png", "usd"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        names = {0.0: "clean", 0.1: f"{axis} 10%", 0.3: f"{axis} 30%"}
        for mode in MODES:
            xs, ys = [], []
            for rate, name in names.items():
                if (name, mode) in table:
                    xs.append(rate * 100)
                    ys.append(table[(name, mode)][metric] * (100 if fmt == "pct" else 1))
            style = {"bare-restart": ":", "bare-resume": "--"}.get(mode, "-")
            ax.plot(xs, ys, marker="o", linestyle=style, label=mode)
        what = "silent tool failure" if axis == "silent" else "crash"
        ax.set_xlabel(f"{what} rate (%)")
        ax.set_ylabel(ylabel + (" (%)" if fmt == "pct" else ""))
        ax.set_title(f"{ylabel} vs {what} rate")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """Entry point of ``python -m bench.chaos``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10 tasks, 3 profiles, no files")
    parser.add_argument("--db", default=None, help="postgresql://... (default: SQLite file)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    profiles = PROFILES
    n = args.tasks
    if args.quick:
        n = 10
        profiles = (PROFILES[2], PROFILES[4], PROFILES[5])
    header = machine()
    table = run(n, args.seed, profiles, args.db, log=lambda s: print(s, flush=True))
    db = "PostgreSQL" if args.db else "SQLite (embedded)"
    command = "python -m bench.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(table, command.strip(), n, db, header)
    print(md)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.md").write_text(md, encoding="utf-8")
        for p in plots(table, args.out):
            print(f"wrote {p}")
    return table


if __name__ == "__main__":
    main()
