"""Narration: one line per thing the graph (and the harness around it) did."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from rich.console import Console
from rich.markup import escape

from harness_nodes._trace_langfuse import Masker, answered_outcome
from harness_nodes._trace_local import task_outcome


def _short(value: Any, limit: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _call_text(call: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={_short(v, 40)}" for k, v in call.get("args", {}).items())
    return f"{call.get('name')}({args})"


def harness_meta(message: BaseMessage) -> dict[str, Any]:
    """The harness's records on a message (``additional_kwargs["harness"]``)."""
    meta = message.additional_kwargs.get("harness")
    return meta if isinstance(meta, dict) else {}


@dataclass
class Narrator:
    """Prints what happens during a run and keeps the notable harness decisions."""

    console: Console
    quiet: bool = False
    """Print only the harness's decisions and the outcome, not every step."""
    events: list[tuple[str, str]] = field(default_factory=list)
    """(kind, text) of each notable harness decision: verdict, budget, review, effect."""
    masker: Masker = field(default_factory=Masker, repr=False)
    """Masks secrets in every line, as in a trace (a terminal is shown and shared too)."""
    _seen: set[str] = field(default_factory=set, repr=False)

    def _say(self, text: str, *, always: bool = False) -> None:
        if always or not self.quiet:
            self.console.print(self.masker.text(text), highlight=False, soft_wrap=True)

    def record(self, kind: str, text: str) -> None:
        """Keep and print one harness decision."""
        text = self.masker.text(text)
        self.events.append((kind, text))
        self._say(f"  [bold magenta]harness[/] {escape(text)}", always=True)

    def note(self, text: str) -> None:
        """Print a line of context."""
        self._say(f"[dim]{escape(text)}[/]", always=True)

    def start(self, thread_id: str, graph: str, task: str) -> None:
        """Announce a run."""
        self._seen.clear()
        self._say(
            f"[bold]{escape(graph)}[/] thread [bold]{escape(thread_id)}[/]: "
            + escape(_short(task, 90)),
            always=True,
        )

    def update(self, update: dict[str, Any]) -> None:
        """Narrate one ``stream_mode="updates"`` chunk."""
        for node, value in update.items():
            if node == "__interrupt__":
                for intr in value:
                    self._interrupt(getattr(intr, "value", intr))
                continue
            # A node's update is a dict, or a list of them (a ToolNode answering with Commands).
            updates = value if isinstance(value, list | tuple) else [value]
            for one in updates:
                if isinstance(one, dict):
                    self._node_update(node, one)

    def message(self, node: str, message: BaseMessage) -> None:
        """Narrate one message written by *node*."""
        self._message(node, message)

    def _node_update(self, node: str, value: dict[str, Any]) -> None:
        for message in value.get("messages", []) or []:
            if isinstance(message, BaseMessage):
                self._message(node, message)
        outcome = value.get("outcome")
        if isinstance(outcome, dict) and outcome.get("status") != "completed":
            reason = f" ({outcome['reason']})" if outcome.get("reason") else ""
            self.record("outcome", f"stopped the task: {outcome['status']}{reason}")

    def _message(self, node: str, message: BaseMessage) -> None:
        meta = harness_meta(message)
        if isinstance(message, AIMessage) and isinstance(meta.get("reviews"), dict):
            names = {c["id"]: c["name"] for c in message.tool_calls}
            for call_id, rec in meta["reviews"].items():
                key = f"{call_id}:{rec.get('review_id', '')}:{rec.get('decision')}"
                if key in self._seen:
                    continue
                self._seen.add(key)
                who = f" by {rec['reviewer']}" if rec.get("reviewer") else ""
                self.record(
                    "review",
                    f"review decision{who}: {rec.get('decision')} {names.get(call_id, call_id)}",
                )
            return
        if isinstance(message, AIMessage):
            model = message.response_metadata.get("model_name", "model")
            budget = meta.get("budget")
            degraded = isinstance(budget, dict) and budget.get("degraded_from")
            key = f"degrade:{degraded}"
            if degraded and key not in self._seen:  # say it once per run, not every call
                self._seen.add(key)
                assert isinstance(budget, dict)
                self.record(
                    "budget",
                    f"degraded the model {budget['degraded_from']} → {budget.get('model', model)} "
                    "to stay inside the cost envelope",
                )
            if message.tool_calls:
                calls = ", ".join(_call_text(dict(c)) for c in message.tool_calls)
                self._say(f"  {escape(node)}: [cyan]{escape(str(model))}[/] calls {escape(calls)}")
            else:
                self._say(f"  {escape(node)}: [cyan]{escape(str(model))}[/] answers")
        elif isinstance(message, ToolMessage):
            verdict = meta.get("verdict")
            effect = meta.get("effect")
            if isinstance(verdict, dict) and not verdict.get("ok", True):
                reasons = "; ".join(verdict.get("reasons", []))
                self.record(
                    "verdict",
                    f"refused the output of {verdict.get('tool')} ({reasons}) → "
                    f"{verdict.get('action')}",
                )
            elif isinstance(meta.get("review"), dict):
                rec = meta["review"]
                answer = _short(message.content, 60)
                self.record("review", f"review decision: {rec.get('decision')} → {answer}")
            elif isinstance(effect, dict) and effect.get("replayed"):
                self.record(
                    "effect",
                    f"replayed {message.name} from the effect ledger instead of running it again",
                )
            else:
                status = " [red](error)[/]" if message.status == "error" else ""
                self._say(
                    f"  {escape(node)}: {escape(str(message.name))} →{status} "
                    f"{escape(_short(message.content))}"
                )

    def _interrupt(self, value: Any) -> None:
        requests = value if isinstance(value, list) else [value]
        for req in requests:
            if isinstance(req, dict):
                action = req.get("action_request") or {}
                what = _call_text({"name": action.get("action"), "args": action.get("args", {})})
                why = req.get("reason") or req.get("description") or ""
                self.record("review", f"paused for review: {what} {_short(why, 80)}".rstrip())
            else:
                self.record("review", f"paused for review: {_short(value)}")

    def end(self, state: dict[str, Any]) -> None:
        """Print how the run ended (finished, or paused)."""
        if state.get("__interrupts__"):
            thread = state.get("__thread__", "THREAD")
            self._say(
                "[yellow]paused[/] for review: decide with `harness review`, or "
                f"`harness resume {escape(str(thread))} --decision "
                '\'{"type": "approve"}\'`',
                always=True,
            )
            return
        # A graph whose own model node ends the task (`add_harness`) writes no outcome: it
        # completed when it ended on the model's answer, as `harness runs` counts it.
        outcome = task_outcome(state) or answered_outcome(state) or {}
        status = outcome.get("status", "unknown")
        colour = "green" if status == "completed" else "red"
        result = outcome.get("partial_result")
        tail = f" — {escape(_short(result, 100))}" if result else ""
        self._say(f"[bold {colour}]{escape(status)}[/]{tail}", always=True)
