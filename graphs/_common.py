"""What the reference graphs share: fault flags, attempt counting, the scripted-policy model.

Faults are deterministic functions of the conversation (how many times this exact call was
already answered), never of hidden process state, so a graph resumed in a new process after
a crash meets exactly the faults it would have met — except crashes, which fire once per
`Faults` instance (a new process builds a new one: the crash does not recur on resume).
"""

from __future__ import annotations

import json
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from harness_nodes import UserError
from harness_nodes.testing import ScriptedChatModel, tool_call

__all__ = [
    "Faults",
    "SimulatedCrash",
    "attempt_of",
    "data_text",
    "last_tool_results",
    "scripted_policy_model",
]

MAX_TURNS = 40
"""How many turns a scripted policy plays before `ScriptExhausted` (unless runaway)."""


class SimulatedCrash(BaseException):
    """Raised where a fault flag simulates the process dying (a worker killed, a node lost).

    A `BaseException`, like `KeyboardInterrupt`: a dying process is not an error any handler
    could catch and turn into a tool result, so nothing in the graph catches it.
    """

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where

    def __str__(self) -> str:
        return f"simulated crash in {self.where}"


_FLAG_WORDS: dict[type, str] = {bool: "true or false", str: "a tool name", int: "a turn number"}


@dataclass(frozen=True)
class Faults:
    """Fault-injection flags for a reference graph; all off by default.

    Example:
        ```python
        from graphs import Faults

        faults = Faults.parse({"empty_results": True})
        assert faults.empty_results and not faults.runaway
        ```
    """

    empty_results: bool = False
    """A lookup/search tool returns nothing on its first call (a silent failure)."""
    embedded_error: bool = False
    """A tool "succeeds" with an error inside its output (``{"error": ...}``, an HTML page)."""
    out_of_range: bool = False
    """A tool returns a value outside its valid range on its first call."""
    runaway: bool = False
    """The model never stops calling tools."""
    crash_in: str | None = None
    """Name of a tool that raises `SimulatedCrash` (after doing its work) on its first call."""
    crash_at_turn: int | None = None
    """Model turn at which the model raises `SimulatedCrash` (once per model instance)."""

    _fired: set[str] = field(default_factory=set, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def parse(cls, value: Faults | Mapping[str, Any] | None) -> Faults:
        """Accept a `Faults`, a mapping of flag → value (e.g. parsed JSON), or None.

        Raises:
            UserError: for an unknown flag name, or a value of the wrong type (``"no"`` for
                a yes/no flag would otherwise switch it on).
        """
        if value is None:
            return cls()
        if isinstance(value, Faults):
            return value
        if not isinstance(value, Mapping):
            raise UserError(
                f'faults must be an object of flag → value, e.g. {{"runaway": true}}, got {value!r}'
            )
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(
                f"Unknown fault flag(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        hints = typing.get_type_hints(cls)
        for name, flag in value.items():
            kind = next(
                t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None)
            )
            if flag is None and kind is not bool:
                continue
            if type(flag) is not kind:  # bool is not an int here, nor "yes" a bool
                raise UserError(f"Fault flag {name} takes {_FLAG_WORDS[kind]}, got {flag!r}")
        return cls(**dict(value))

    def crash_once(self, tool: str) -> None:
        """Raise `SimulatedCrash` the first time *tool* runs, if ``crash_in`` names it.

        Once per `Faults` instance: the same graph carries on when resumed in this process,
        and a new process (a new instance) resumes without the crash only if it is built
        without the flag — as ``harness resume`` does.
        """
        if self.crash_in != tool:
            return
        with self._lock:
            if tool in self._fired:
                return
            self._fired.add(tool)
        raise SimulatedCrash(f"tool {tool!r}")


def data_text(*parts: str) -> str:
    """Read a data file shipped in ``graphs/data``."""
    node = resources.files("graphs").joinpath("data")
    for p in parts:
        node = node.joinpath(p)
    return node.read_text(encoding="utf-8")


def data_names(folder: str) -> list[str]:
    """Names of the data files in ``graphs/data/<folder>``, sorted."""
    node = resources.files("graphs").joinpath("data").joinpath(folder)
    return sorted(p.name for p in node.iterdir() if p.is_file())


def attempt_of(messages: Sequence[BaseMessage], name: str, args: Mapping[str, Any]) -> int:
    """1 + how many times a call with this tool name and these arguments was already answered.

    Derived from the conversation, so it survives crashes and new processes.
    """
    ids = {
        c["id"]
        for m in messages
        if isinstance(m, AIMessage)
        for c in m.tool_calls
        if c["name"] == name and c["args"] == dict(args)
    }
    answered = sum(1 for m in messages if isinstance(m, ToolMessage) and m.tool_call_id in ids)
    return answered + 1


def last_tool_results(messages: Sequence[BaseMessage]) -> list[ToolMessage]:
    """The tool messages after the last AI message (the answers to its calls)."""
    out: list[ToolMessage] = []
    for m in reversed(messages):
        if isinstance(m, ToolMessage):
            out.append(m)
        elif isinstance(m, AIMessage):
            break
    return list(reversed(out))


def calls_by_id(messages: Sequence[BaseMessage]) -> dict[str, dict[str, Any]]:
    """Every tool call in the conversation, by id."""
    return {
        str(c["id"]): dict(c) for m in messages if isinstance(m, AIMessage) for c in m.tool_calls
    }


def failed_calls(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The latest calls whose answer is an error message (``status="error"``), to be retried.

    The harness's verifier replaces a bad output with such a message; a model that reads
    it calls the tool again. A call a reviewer rejected is not retried (the reviewer's
    answer to an escalation — "it did not take effect" — is: the call must still be made).
    """
    calls = calls_by_id(messages)
    return [
        calls[m.tool_call_id]
        for m in last_tool_results(messages)
        if m.status == "error" and m.tool_call_id in calls and not _rejected_by_reviewer(m)
    ]


def _rejected_by_reviewer(message: ToolMessage) -> bool:
    meta = message.additional_kwargs.get("harness")
    review = meta.get("review") if isinstance(meta, dict) else None
    return isinstance(review, dict) and "escalation" not in review


def as_json(content: Any) -> Any:
    """Parse a tool message's content as JSON when it is JSON, else return it as is."""
    if isinstance(content, str):
        try:
            return json.loads(content)
        except ValueError:
            return content
    return content


def turn_of(messages: Sequence[BaseMessage]) -> int:
    """The model turn being answered (number of AI messages so far)."""
    return sum(1 for m in messages if isinstance(m, AIMessage))


def call(messages: Sequence[BaseMessage], name: str, args: dict[str, Any], i: int = 0) -> Any:
    """A tool call with an id that is deterministic for this turn (same id on resume)."""
    return tool_call(name, args, id=f"call_{name}_{turn_of(messages)}_{i}")


Policy = Callable[[list[BaseMessage]], AIMessage]


def scripted_policy_model(policy: Policy, *, model_name: str, faults: Faults) -> ScriptedChatModel:
    """A `ScriptedChatModel` whose every turn is *policy* (a function of the prompt)."""
    crash: dict[int, BaseException] = {}
    if faults.crash_at_turn is not None:
        crash[faults.crash_at_turn] = SimulatedCrash(f"model turn {faults.crash_at_turn}")
    return ScriptedChatModel(
        script=[policy] * MAX_TURNS,
        loop=faults.runaway,
        model_name=model_name,
        faults=crash,
    )


def first_human_text(messages: Sequence[BaseMessage]) -> str:
    """The task as the user wrote it (the first human message)."""
    for m in messages:
        if m.type == "human":
            return m.text
    return ""
