"""Harness decisions as LangChain custom events — the one channel tracing listens to.

Every harness node reports its decisions (verdicts, budget reservations and stops, review
requests and decisions, effect replays, outcomes) through `emit`. It dispatches a LangChain
custom event named ``harness.<kind>``, which any callback handler can observe; the Langfuse
wiring turns them into ``guardrail``/``event`` observations and scores. Outside a runnable
context (a unit test calling a node directly) it is a no-op.
"""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config

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


def _nobody_listening(config: RunnableConfig | None) -> bool:
    """True when the run has no callback handler, so a custom event would reach no one.

    Dispatching builds a callback manager (~0.1 ms), a cost paid on every tool call by the
    verification hook; with no handler in the run's config there is nobody to tell. Custom
    events only reach handlers given in the config (the env-configured LangSmith tracer does
    not record them), so skipping is not observable.
    """
    callbacks = ensure_config(config).get("callbacks")
    if callbacks is None:
        return True
    if isinstance(callbacks, BaseCallbackManager):
        return not callbacks.handlers
    return not callbacks


def emit(kind: EventKind, data: dict[str, Any], config: RunnableConfig | None = None) -> None:
    """Report a harness decision to the callbacks of the current run (no-op outside one)."""
    if _nobody_listening(config):
        return
    try:
        dispatch_custom_event(EVENT_PREFIX + kind, data, config=config)
    except RuntimeError:
        # No parent run: called outside a graph/runnable. Nothing is listening.
        pass


async def aemit(
    kind: EventKind, data: dict[str, Any], config: RunnableConfig | None = None
) -> None:
    """Async `emit`."""
    if _nobody_listening(config):
        return
    try:
        await adispatch_custom_event(EVENT_PREFIX + kind, data, config=config)
    except RuntimeError:
        pass
