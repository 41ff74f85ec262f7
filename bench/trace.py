"""Tracing overhead per step: the Langfuse handler exporting to a loopback receiver vs untraced.

The same graph (agent → tools loop with a verification verdict on every tool call, scripted
model, checkpointed) runs untraced and traced, alternating, several times; the traced runs
export every span and score over real OTLP/HTTP to a `LangfuseReceiver` on 127.0.0.1, run in its
own process as a server would be (decoding spans is the server's work, not the app's). Each
traced run ends with a flush, timed separately: the run's own time is what a step pays
(spans are created, masked and serialised inline; export runs on the SDK's background thread
meanwhile), the flush is the export work still pending at the end. Both are reported per
step, as ratios to the untraced run (target: run <= 1.3x); the flush, and waiting for the
receiver to decode what it acknowledged, keep that work from spilling into the next untraced
run. Each round runs both (which goes first alternates); the headline is the median of the
per-round ratios. The receiver's span count proves everything arrived.

    python bench/trace.py [--turns 10] [--repeats 40] [--db memory|sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langfuse import get_client  # noqa: E402
from langgraph.graph import START, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from checkpointers import open_backend  # noqa: E402
from harness_nodes import (  # noqa: E402
    HarnessState,
    ToolContract,
    VerifyToolOutputs,
    langfuse_callbacks,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call  # noqa: E402


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    return json.dumps({"key": key, "value": "v" * 200})


def build(turns: int, checkpointer: Any) -> Any:
    script: list[Any] = [
        ai(tool_calls=[tool_call("lookup", {"key": f"k{i}"}, id=f"call-{i}")]) for i in range(turns)
    ]
    script.append(ai("done"))
    model = ScriptedChatModel(model_name="gpt-4o-mini", script=script)
    verify = VerifyToolOutputs({"lookup": ToolContract()})

    def agent(state: HarnessState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([lookup], wrap_tool_call=verify.wrap_tool_call))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer)


def run_once(graph: Any, config: Any) -> int:
    out = graph.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
    msgs = out["messages"]
    assert isinstance(msgs[-1], AIMessage) and msgs[-1].content == "done"
    return sum(1 for m in msgs if isinstance(m, AIMessage | ToolMessage))  # supersteps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--repeats", type=int, default=40)  # the machine is noisy: many pairs
    p.add_argument("--db", choices=["memory", "sqlite"], default="sqlite")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="then, in separate untimed rounds, account the traced runs' CPU time by part",
    )
    args = p.parse_args()
    public_key = f"pk-lf-bench-{uuid.uuid4().hex[:8]}"
    receiver = subprocess.Popen(
        [sys.executable, "-m", "harness_nodes._langfuse_receiver"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert receiver.stdout is not None
    base_url = receiver.stdout.readline().strip()
    try:
        _bench(args, public_key, base_url)
        if args.breakdown:
            _breakdown(args, public_key, base_url)
    finally:
        receiver.kill()
        receiver.wait()


def _received(base_url: str) -> int:
    # Waits for the receiver to finish decoding what it acknowledged (its own CPU work, on
    # the same cores), so that work does not land in the next timed run.
    with urllib.request.urlopen(f"{base_url}/_received") as r:
        return int(json.load(r)["spans"])


def _plain(graph: Any, config: Any) -> tuple[float, float, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    steps = run_once(graph, config)
    return time.perf_counter() - t0, time.process_time() - c0, steps


def _traced(graph: Any, config: Any, public_key: str, base_url: str) -> tuple[float, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    run_once(graph, config)
    t1, c1 = time.perf_counter(), time.process_time()
    get_client(public_key=public_key).flush()
    t2 = time.perf_counter()
    _received(base_url)
    return t1 - t0, c1 - c0, t2 - t1


def _bench(args: argparse.Namespace, public_key: str, base_url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = "memory://" if args.db == "memory" else f"sqlite:///{tmp}/bench.db"
        with open_backend(url) as backend:
            graph = build(args.turns, backend.checkpointer)
            base: list[float] = []
            runs: list[float] = []
            flushes: list[float] = []
            ratios: list[float] = []
            cpu_ratios: list[float] = []
            for i in range(args.repeats + 1):  # the first round warms both paths up
                thread = f"bench-{i}"
                config = langfuse_callbacks(
                    thread + "-traced",
                    task_type="bench",
                    public_key=public_key,
                    secret_key="sk-lf-bench",
                    base_url=base_url,
                )

                # Alternate which goes first, so drift on a shared machine hits both alike.
                plain_config: Any = {"configurable": {"thread_id": thread + "-plain"}}
                if i % 2:
                    t_run, c_run, t_flush = _traced(graph, config, public_key, base_url)
                    t_plain, c_plain, steps = _plain(graph, plain_config)
                else:
                    t_plain, c_plain, steps = _plain(graph, plain_config)
                    t_run, c_run, t_flush = _traced(graph, config, public_key, base_url)
                if i:
                    base.append(t_plain / steps)
                    runs.append(t_run / steps)
                    flushes.append(t_flush / steps)
                    ratios.append(t_run / t_plain)
                    cpu_ratios.append(c_run / c_plain)
        spans = _received(base_url)
    b, r, f = (statistics.median(x) for x in (base, runs, flushes))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"backend={args.db} turns={args.turns} repeats={args.repeats} spans received={spans}")
    print(f"untraced: {b * 1000:.2f} ms/step (median)")
    print(f"traced run: {r * 1000:.2f} ms/step, export flushed at the end: {f * 1000:.2f} ms/step")
    print(
        f"ratio traced/untraced, per step: {statistics.median(ratios):.2f}x median of "
        f"{len(ratios)} paired rounds (quartiles {q[0]:.2f}-{q[2]:.2f}; ratio of medians "
        f"{r / b:.2f}x) (target <= 1.30x)"
    )
    print(f"ratio including the final flush: {(r + f) / b:.2f}x (ratio of medians)")
    print(
        f"process CPU time ratio traced/untraced (all threads, less sensitive to other load "
        f"on the machine): {statistics.median(cpu_ratios):.2f}x median"
    )


def _breakdown(args: argparse.Namespace, public_key: str, base_url: str) -> None:
    """Where a traced step's extra time goes: the time inside each part, per thread.

    Wraps (in this process only, after the timed rounds) the handler's callbacks, the spans,
    the SDK's score calls and the harness's masking/encoding with ``time.perf_counter``
    accumulators (``time.thread_time`` is a system call on some VMs, ~10 µs, which would
    swamp parts of a few µs; the SDK's export runs at the flush, outside the timed runs, so
    little else competes for the interpreter meanwhile). Each part counts its own time only:
    a part called from another (a span from a callback, masking from the handler) is taken
    out of the caller's figure, so the parts add up.
    """
    import collections
    import functools
    import threading

    from langchain_core.callbacks import BaseCallbackHandler
    from langfuse import Langfuse
    from opentelemetry.sdk import trace as otel_sdk

    from harness_nodes._otel_span import SpanWriter, WholeSpan
    from harness_nodes._trace_langfuse import HarnessLangfuseHandler, Masker

    spent: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    local = threading.local()
    counting = [True]  # off while the comparison handlers run

    def account(owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*a: Any, **k: Any) -> Any:
            if not counting[0]:
                return original(*a, **k)
            stack: list[list[Any]] | None = getattr(local, "stack", None)
            if stack is None:
                stack = local.stack = []
            if stack and stack[-1][0] == part:  # nested call of the same part: counted once
                return original(*a, **k)
            frame: list[Any] = [part, 0.0]
            stack.append(frame)
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                elapsed = time.perf_counter() - t0
                stack.pop()
                spent[part] += elapsed - frame[1]
                calls[part] += 1
                if stack:
                    stack[-1][1] += elapsed  # the caller's part does not count it

        setattr(owner, name, wrapper)

    def config(thread: str) -> Any:
        return langfuse_callbacks(
            thread, public_key=public_key, secret_key="sk-lf-bench", base_url=base_url
        )

    handler = "the handler's own work (run bookkeeping, names, metadata, pricing, attributes)"
    spans = "spans with Langfuse's span processor (start, attributes, end)"
    scores = "Langfuse SDK scores (create_score)"
    masking = "harness masking + JSON encoding"
    handler_class = HarnessLangfuseHandler

    class NoOp(BaseCallbackHandler):
        """Receives every callback and does nothing: LangChain's plumbing alone."""

    noop = NoOp()
    spans_only = _spans_only_handler(public_key)
    for name in (
        "on_chain_start",
        "on_chain_end",
        "on_chain_error",
        "on_chat_model_start",
        "on_llm_end",
        "on_tool_start",
        "on_tool_end",
        "on_custom_event",
    ):
        account(handler_class, name, handler)
    account(otel_sdk.Tracer, "start_span", spans)  # includes LangfuseSpanProcessor.on_start
    account(otel_sdk.Span, "end", spans)  # includes LangfuseSpanProcessor.on_end
    account(otel_sdk.Span, "set_attributes", spans)
    # the handler's own spans, written whole (harness_nodes/_otel_span.py)
    account(SpanWriter, "start", spans)  # includes Langfuse's start-time bookkeeping
    account(WholeSpan, "put", spans)
    account(WholeSpan, "set_attributes", spans)
    account(WholeSpan, "end", spans)  # includes LangfuseSpanProcessor.on_end
    account(Langfuse, "create_score", scores)
    account(Masker, "_prepare", masking)
    account(Masker, "_metadata_attributes", masking)
    account(Masker, "__call__", masking)
    with tempfile.TemporaryDirectory() as tmp:
        url = "memory://" if args.db == "memory" else f"sqlite:///{tmp}/breakdown.db"
        with open_backend(url) as backend:
            graph = build(args.turns, backend.checkpointer)
            cpu: collections.Counter[str] = collections.Counter()
            steps = 0
            for i in range(args.repeats + 1):
                if i == 1:
                    spent.clear()
                    calls.clear()
                    cpu.clear()
                    steps = 0
                c0 = time.process_time()
                steps += run_once(graph, config(f"breakdown-{i}"))
                cpu["traced"] += time.process_time() - c0
                get_client(public_key=public_key).flush()
                _received(base_url)
                c0 = time.process_time()
                run_once(graph, {"configurable": {"thread_id": f"breakdown-{i}-plain"}})
                cpu["untraced"] += time.process_time() - c0
                idle = {"configurable": {"thread_id": f"breakdown-{i}-idle"}, "callbacks": [noop]}
                c0 = time.process_time()
                run_once(graph, idle)
                cpu["idle handler"] += time.process_time() - c0
                bare = {"configurable": {"thread_id": f"breakdown-{i}-bare"}}
                counting[0] = False
                c0 = time.process_time()
                run_once(graph, {**bare, "callbacks": [spans_only()]})
                cpu["spans only"] += time.process_time() - c0
                get_client(public_key=public_key).flush()
                _received(base_url)
                counting[0] = True
    per = {k: v / steps * 1000 for k, v in cpu.items()}
    extra = per["traced"] - per["untraced"]
    print(
        "breakdown (ms/step; totals are process CPU, parts the time spent inside each): "
        f"untraced {per['untraced']:.2f}, traced {per['traced']:.2f}, extra {extra:.2f}"
    )
    for part in (spans, scores, handler, masking):
        print(
            f"  {part}: {spent[part] / steps * 1000:.2f} ms/step "
            f"({calls[part] / steps:.1f} calls/step)"
        )
    rest = extra - sum(spent.values()) / steps * 1000
    plumbing = per["idle handler"] - per["untraced"]
    print(f"  outside these (LangChain callback plumbing, SDK threads, GC): {rest:.2f}")
    print(f"    of which LangChain's plumbing (a handler that does nothing): {plumbing:.2f}")
    floor = per["spans only"] - per["untraced"]
    print(
        f"the same spans alone, as the handler writes them (no payload, metadata, trace "
        f"attributes or scores; incl. LangChain's plumbing): {floor:.2f} ms/step, "
        f"{per['spans only'] / per['untraced']:.2f}x of the untraced CPU (traced: "
        f"{per['traced'] / per['untraced']:.2f}x)"
    )


def _spans_only_handler(public_key: str) -> Any:
    """A handler that creates the traced run's spans as the harness's does, and nothing else.

    One span per exported run (graph, node, generation, tool; routing and sequence pieces
    skipped as the harness skips them) and one per harness event, each with its observation
    type only: what the tree costs before anything a reviewer reads is written on it.
    """
    from langchain_core.callbacks import BaseCallbackHandler
    from opentelemetry.trace import set_span_in_context

    from harness_nodes._otel_span import SpanWriter
    from harness_nodes._trace_langfuse import _is_plumbing

    writer = SpanWriter(get_client(public_key=public_key)._otel_tracer)
    skipped_marker = object()

    class SpansOnly(BaseCallbackHandler):
        run_inline = True

        def __init__(self) -> None:
            self.spans: dict[Any, Any] = {}
            self.skipped: dict[Any, Any] = {}

        def _start(self, run_id: Any, parent_run_id: Any, name: str, kind: str) -> None:
            parent = self.spans.get(self.skipped.get(parent_run_id, parent_run_id))
            context = set_span_in_context(parent) if parent is not None else None
            attributes = {"langfuse.observation.type": kind}
            self.spans[run_id] = writer.start(name, context, attributes, propagated=False)

        def _end(self, run_id: Any, **_: Any) -> None:
            if self.skipped.pop(run_id, skipped_marker) is not skipped_marker:
                return
            span = self.spans.pop(run_id, None)
            if span is not None:
                span.end()

        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            run_id, parent_run_id = kw["run_id"], kw.get("parent_run_id")
            if parent_run_id is not None and _is_plumbing(
                serialized, kw.get("name"), kw.get("tags"), kw.get("metadata")
            ):
                self.skipped[run_id] = self.skipped.get(parent_run_id, parent_run_id)
                return
            self._start(run_id, parent_run_id, str(kw.get("name") or "chain"), "chain")

        def on_chain_end(self, outputs: Any, **kw: Any) -> None:
            self._end(kw["run_id"])

        def on_chain_error(self, error: BaseException, **kw: Any) -> None:
            self._end(kw["run_id"])

        def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
            self._start(kw["run_id"], kw.get("parent_run_id"), "generation", "generation")

        def on_llm_end(self, response: Any, **kw: Any) -> None:
            self._end(kw["run_id"])

        def on_tool_start(self, serialized: Any, input_str: str, **kw: Any) -> None:
            self._start(kw["run_id"], kw.get("parent_run_id"), "tool", "tool")

        def on_tool_end(self, output: Any, **kw: Any) -> None:
            self._end(kw["run_id"])

        def on_custom_event(self, name: str, data: Any, **kw: Any) -> None:
            event = uuid.uuid4()
            self._start(event, kw["run_id"], name, "guardrail")
            self._end(event)

    return SpansOnly


if __name__ == "__main__":
    main()
