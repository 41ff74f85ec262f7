"""Harness decisions as LangChain custom events — the one channel tracing listens to.

Every harness node reports its decisions (verdicts, budget reservations and stops, review
requests and decisions, effect replays, outcomes) through `emit`. It dispatches a LangChain
custom event named ``harness.<kind>``, which any callback handler can observe; the Langfuse
wiring turns them into ``guardrail``/``event`` observations and scores. Outside a runnable
context (a unit test calling a node directly) it is a no-op.
"""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableConfig

EventKind = Literal[
    "verdict",
    "budget.reserve",
    "budget.settle",
    "budget.warn",
    "budget.degrade",
    "budget.stop",
    "review.request",
    "review.decision",
    "effect.run",
    "effect.replay",
    "effect.unknown",
    "outcome",
]
"""What happened; the event's name is ``"harness." + kind``."""

EVENT_PREFIX = "harness."


def emit(kind: EventKind, data: dict[str, Any], config: RunnableConfig | None = None) -> None:
    """Report a harness decision to the callbacks of the current run (no-op outside one)."""
    try:
        dispatch_custom_event(EVENT_PREFIX + kind, data, config=config)
    except RuntimeError:
        # No parent run: called outside a graph/runnable. Nothing is listening.
        pass


async def aemit(
    kind: EventKind, data: dict[str, Any], config: RunnableConfig | None = None
) -> None:
    """Async `emit`."""
    try:
        await adispatch_custom_event(EVENT_PREFIX + kind, data, config=config)
    except RuntimeError:
        pass
