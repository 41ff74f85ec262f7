"""Rebuild a task's decision tree from checkpoint history plus the harness ledgers.

No tracing server is involved: every superstep LangGraph ran is a checkpoint, so the
history says which node ran when, and the state diff between two checkpoints says what it
produced (prompts, model answers with their tool calls, tool results with the harness's
verdict/effect metadata, review records, the outcome). The ledgers add what the state does
not hold: review requests and decisions with their reviewer and latency, effect timings and
idempotency keys, and the authoritative spend.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import operator
import threading
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from checkpointers._spend import flush_pending
from harness_nodes import _codec, _verify
from harness_nodes._pricing import answer_cost
from harness_nodes._trace_langfuse import Masker, marked_fields
from harness_nodes.errors import UnknownThread, UserError
from harness_nodes.pricing import Pricing

if TYPE_CHECKING:
    from checkpointers import Backend

__all__ = ["Trace", "TraceNode", "build_trace"]

_INTERNAL_NODES = frozenset({"__input__", "__interrupt__", "__start__"})
_DECISION_KINDS = frozenset({"verdict", "budget", "review", "interrupt", "effect", "outcome"})


@dataclass
class TraceNode:
    """One node of the decision tree: a step, a model call, a tool call, a decision...

    Example:
        ```python
        from harness_nodes import TraceNode

        node = TraceNode(kind="verdict", name="search: retry", data={"ok": False})
        assert TraceNode.from_dict(node.to_dict()) == node
        ```
    """

    kind: str
    """``step`` | ``prompt`` | ``llm`` | ``tool_call`` | ``tool_result`` | ``verdict`` |
    ``budget`` | ``interrupt`` | ``review`` | ``effect`` | ``outcome`` | ``error``."""
    name: str
    """What the line says: node name, model, tool, decision."""
    started_at: float | None = None
    """Epoch seconds, when known."""
    duration_s: float | None = None
    """Wall time, when known (a step: checkpoint to checkpoint)."""
    input_tokens: int = 0
    """Prompt tokens (model calls; summed on steps)."""
    output_tokens: int = 0
    """Completion tokens (model calls; summed on steps)."""
    cost_usd: float = 0.0
    """Dollars (model calls; summed on steps)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The details: full tool arguments, contents, reasons, reviewer..."""
    children: list[TraceNode] = field(default_factory=list)
    """What happened inside, in order."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see `from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TraceNode:
        """Rebuild a node (and its children) from `to_dict` output."""
        kids = [cls.from_dict(c) for c in raw.get("children", [])]
        return cls(**{**raw, "children": kids})

    def walk(self) -> Iterator[TraceNode]:
        """This node, then every descendant, depth first in order."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Trace:
    """A task's execution, rebuilt locally: the steps in order, each with what it decided.

    Example:
        ```python
        from harness_nodes import Trace, TraceNode

        trace = Trace(thread_id="t-1", task_id="t-1", task_type="default", status="completed",
                      steps=[TraceNode(kind="step", name="agent")])
        assert Trace.from_json(trace.to_json()) == trace
        ```
    """

    thread_id: str
    """The LangGraph thread."""
    task_id: str
    """The task (defaults to the thread id)."""
    task_type: str
    """The task's type (``"default"`` when none was given)."""
    status: str
    """The outcome status, or ``paused`` / ``incomplete`` / ``running``."""
    started_at: float | None = None
    """First checkpoint (epoch seconds)."""
    ended_at: float | None = None
    """Last checkpoint (epoch seconds)."""
    input_tokens: int = 0
    """Prompt tokens over the task."""
    output_tokens: int = 0
    """Completion tokens over the task."""
    cost_usd: float = 0.0
    """Dollars over the task (the spend ledger when it has rows, else priced from usage)."""
    reason: str | None = None
    """Why it ended this way (outcome reason)."""
    steps: list[TraceNode] = field(default_factory=list)
    """One node per superstep, in order."""

    @property
    def duration_s(self) -> float | None:
        """First to last checkpoint, in seconds."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def walk(self) -> Iterator[TraceNode]:
        """Every node of the tree, in order."""
        for step in self.steps:
            yield from step.walk()

    def decisions(self) -> list[TraceNode]:
        """The harness's decisions (verdicts, budget, interrupts, reviews, effects, outcome)."""
        return [n for n in self.walk() if n.kind in _DECISION_KINDS]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see `from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Trace:
        """Rebuild a trace from `to_dict` output."""
        steps = [TraceNode.from_dict(s) for s in raw.get("steps", [])]
        return cls(**{**raw, "steps": steps})

    def to_json(self, *, indent: int | None = 2) -> str:
        """Serialise to JSON (`from_json` reads it back equal)."""
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Trace:
        """Read a trace written by `to_json`."""
        return cls.from_dict(json.loads(text))


def _json_default(o: Any) -> Any:
    if isinstance(o, BaseMessage):
        return o.model_dump()
    return repr(o)


def _jsonable(value: Any) -> Any:
    """Whatever the state holds, as plain JSON values (so the trace round-trips exactly).

    NaN and the infinities become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (as
    Langfuse writes them): `Trace.to_json` stays JSON that strict parsers (jq) read.
    """
    return json.loads(json.dumps(value, default=_json_default), parse_constant=str)


def _ts(checkpoint: Mapping[str, Any]) -> float | None:
    raw = checkpoint.get("ts")
    if not raw:
        return None
    return datetime.fromisoformat(str(raw)).timestamp()


def _harness_meta(msg: BaseMessage) -> dict[str, Any]:
    meta = msg.additional_kwargs.get("harness")
    return dict(meta) if isinstance(meta, Mapping) else {}


def _msg_key(msg: BaseMessage) -> tuple[str | None, str]:
    # Nodes replace messages in place (same id): verification swaps a refused output for an
    # error message, review records its decision on the AI message. Any change is a new fact.
    calls = msg.tool_calls if isinstance(msg, AIMessage) else None
    body = [msg.content, calls, _harness_meta(msg)]
    return msg.id, json.dumps(body, default=str, sort_keys=True)


def _review_nodes(old: AIMessage, new: AIMessage) -> list[TraceNode]:
    """What a reviewer decided, recorded on the AI message it reviewed."""
    before = _harness_meta(old).get("reviews") or {}
    after = _harness_meta(new).get("reviews") or {}
    old_args = {c["id"]: c["args"] for c in old.tool_calls}
    names = {c["id"]: c["name"] for c in new.tool_calls}
    nodes = []
    for call_id, record in after.items():
        if call_id in before or not isinstance(record, Mapping):
            continue
        new_args = next((c["args"] for c in new.tool_calls if c["id"] == call_id), None)
        data = {"tool_call_id": call_id, "tool": names.get(call_id), **record}
        if new_args is not None and new_args != old_args.get(call_id):
            data["args_before"], data["args_after"] = old_args.get(call_id), new_args
        nodes.append(
            TraceNode(
                kind="review",
                name=_review_name(record),
                data=_jsonable(data),
            )
        )
    return nodes


def _review_name(record: Mapping[str, Any]) -> str:
    decision, reviewer = record.get("decision", "?"), record.get("reviewer")
    # Resumed with Command(resume=...) directly: no queue recorded who decided.
    return f"{decision} by {reviewer}" if reviewer else f"{decision} (reviewer not recorded)"


def _messages(values: Mapping[str, Any]) -> list[BaseMessage]:
    raw = values.get("messages") or []
    if isinstance(raw, list) and _all_are(raw, BaseMessage):
        return raw
    return [m for m in raw if isinstance(m, BaseMessage)]


def _all_are(items: list[Any], kind: type[Any]) -> bool:
    """Whether every item is a *kind*: by their distinct types, gathered in C.

    It runs on every checkpoint's lists; ``isinstance`` item by item, against an abstract
    class, was a Python-level call per item per checkpoint.
    """
    return all(issubclass(t, kind) for t in set(map(type, items)))


def _ran_between(before: CheckpointTuple, after: CheckpointTuple) -> list[str]:
    seen_a: Mapping[str, Any] = before.checkpoint.get("versions_seen", {})
    seen_b: Mapping[str, Any] = after.checkpoint.get("versions_seen", {})
    return [
        node
        for node, versions in seen_b.items()
        if node not in _INTERNAL_NODES and seen_a.get(node) != versions
    ]


def _next_nodes(tup: CheckpointTuple) -> list[str]:
    return sorted(
        ch.removeprefix("branch:to:")
        for ch in tup.checkpoint.get("channel_values", {})
        if ch.startswith("branch:to:")
    )


class _Pricer:
    def __init__(self, pricing: Pricing | None) -> None:
        self._pricing = pricing

    def cost(self, msg: AIMessage) -> tuple[str, int, int, float, bool]:
        budget = _harness_meta(msg).get("budget") or {}
        model = str(
            budget.get("model")
            or msg.response_metadata.get("model_name")
            or msg.response_metadata.get("model")
            or ""
        )
        inp, out, priced = answer_cost(self._pricing, model, msg.usage_metadata)
        if isinstance(budget.get("spent_usd"), int | float):
            return model, inp, out, float(budget["spent_usd"]), True
        if priced is None:
            return model, inp, out, 0.0, False
        return model, inp, out, priced[0] + priced[1], True


def _llm_node(msg: AIMessage, pricer: _Pricer) -> list[TraceNode]:
    stopped = (_harness_meta(msg).get("budget") or {}).get("stopped")
    if isinstance(stopped, Mapping):
        # The budget refused the call: no model ran, the message says why.
        limit = stopped.get("limit", "?")
        return [
            TraceNode(
                kind="budget",
                name=f"stop: {limit} {stopped.get('used', '?')}/{stopped.get('maximum', '?')}",
                data=_jsonable({"action": "stop", **stopped, "content": msg.content}),
            )
        ]
    model, inp, out, usd, priced = pricer.cost(msg)
    nodes: list[TraceNode] = []
    budget = _harness_meta(msg).get("budget") or {}
    if budget.get("degraded_from"):
        nodes.append(
            TraceNode(
                kind="budget",
                name=f"degrade {budget['degraded_from']} → {model}",
                data=_jsonable({"action": "degrade", **budget}),
            )
        )
    calls = [
        TraceNode(
            kind="tool_call",
            name=str(c["name"]),
            data=_jsonable({"tool_call_id": c.get("id"), "args": c.get("args", {})}),
        )
        for c in msg.tool_calls
    ]
    nodes.append(
        TraceNode(
            kind="llm",
            name=model or "model",
            input_tokens=inp,
            output_tokens=out,
            cost_usd=usd,
            data=_jsonable(
                {
                    "content": msg.content,
                    "finish_reason": msg.response_metadata.get("finish_reason"),
                    "priced": priced,
                    **({"budget": budget} if budget else {}),
                }
            ),
            children=calls,
        )
    )
    cut = budget.get("truncated")
    if isinstance(cut, Mapping):
        # The answer ran into the output cap the budget lowered: the task stops on it.
        nodes.append(
            TraceNode(
                kind="budget",
                name=(
                    f"cut short at {cut.get('output_cap', '?')} output tokens: "
                    f"{cut.get('limit', '?')} {cut.get('used', '?')}/{cut.get('maximum', '?')}"
                ),
                data=_jsonable({"action": "truncate", **cut}),
            )
        )
    outcome = _harness_meta(msg).get("outcome")
    if isinstance(outcome, Mapping) and outcome.get("status"):
        # A node that ends the task in a plain MessagesState app says so on its message.
        nodes.append(
            TraceNode(kind="outcome", name=str(outcome["status"]), data=_jsonable(dict(outcome)))
        )
    return nodes


def _tool_node(msg: ToolMessage, previous: ToolMessage | None = None) -> TraceNode:
    """A tool's result with the harness's records on it.

    *previous* is the message it replaced in place (same id): a reviewer's answer to an
    escalation, verification's corrective message. Only the records that changed are new
    facts; the others (the verdict the escalation came from...) were shown with *previous*.
    """
    meta = _harness_meta(msg)
    before = _harness_meta(previous) if previous is not None else {}

    def changed(key: str) -> Mapping[str, Any] | None:
        value = meta.get(key)
        return value if isinstance(value, Mapping) and value != before.get(key) else None

    node = TraceNode(
        kind="tool_result",
        name=str(msg.name or "tool"),
        data=_jsonable(
            {
                "tool_call_id": msg.tool_call_id,
                "content": msg.content,
                "status": msg.status,
                **(
                    {"rejected_output": meta["rejected_output"]}
                    if "rejected_output" in meta
                    else {}
                ),
            }
        ),
    )
    effect = changed("effect")
    if effect is not None:
        replayed = bool(effect.get("replayed"))
        node.children.append(
            TraceNode(
                kind="effect",
                name="replayed" if replayed else "ran",
                data=_jsonable(dict(effect)),
            )
        )
    verdict = changed("verdict")
    if verdict is not None:
        node.children.append(_verdict_node(verdict))
    escalation = changed("escalation")
    if escalation is not None:
        node.children.append(
            TraceNode(
                kind="review",
                name=f"escalate: {escalation.get('kind', '?')}",
                data=_jsonable({"action": "escalate", **escalation}),
            )
        )
    review = changed("review")
    if review is not None and review.get("escalation"):
        # The decision on an escalation, recorded on the message it resolved (the only record
        # of it in a state with no `reviews` channel, resumed with Command(resume=...)). A
        # rejected call's answer carries its decision too, shown from the AI message.
        data = {"tool_call_id": msg.tool_call_id, "tool": msg.name, **review}
        node.children.append(
            TraceNode(kind="review", name=_review_name(review), data=_jsonable(data))
        )
    return node


def _verdict_node(verdict: Mapping[str, Any]) -> TraceNode:
    action = str(verdict.get("action", "ok" if verdict.get("ok") else "fail"))
    return TraceNode(
        kind="verdict",
        name=f"{verdict.get('tool', '?')}: {action}",
        data=_jsonable(dict(verdict)),
    )


def _message_nodes(msg: BaseMessage, pricer: _Pricer) -> list[TraceNode]:
    if isinstance(msg, AIMessage):
        return _llm_node(msg, pricer)
    if isinstance(msg, ToolMessage):
        return [_tool_node(msg)]
    if isinstance(msg, HumanMessage | SystemMessage):
        return [TraceNode(kind="prompt", name=msg.type, data=_jsonable({"content": msg.content}))]
    return [TraceNode(kind="prompt", name=msg.type, data=_jsonable({"content": msg.content}))]


def _harness_view(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """*values* with the harness's keys only where they hold what the harness writes.

    An application's own ``outcome``, ``task`` or ``verdicts`` of another shape (a string, say)
    is its data, not a harness record: left out of the decision tree rather than misread.
    """
    shapes = {"outcome": Mapping, "task": Mapping, "spend": Mapping}
    bad = [
        k
        for k, kind in shapes.items()
        if values.get(k) is not None and not isinstance(values[k], kind)
    ]
    lists = {
        k: [r for r in values[k] if isinstance(r, Mapping)]
        for k in ("verdicts", "reviews")
        if k in values and (not isinstance(values[k], list) or not _all_are(values[k], Mapping))
    }
    if not bad and not lists:
        return values
    view = {k: v for k, v in values.items() if k not in bad}
    for k, kept in lists.items():
        view[k] = kept if isinstance(values[k], list) else []
    if isinstance(view.get("outcome"), Mapping) and "status" not in view["outcome"]:
        view.pop("outcome")
    return view


def _new_items(before: Sequence[Any], after: Sequence[Any]) -> list[Any]:
    return list(after[len(before) :]) if len(after) >= len(before) else list(after)


def _state_nodes(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    seen_verdicts: set[tuple[str, int]],
    seen_reviews: set[str],
) -> list[TraceNode]:
    """Records a `HarnessState` app appends (verdicts not on a message, reviews, outcome)."""
    nodes: list[TraceNode] = []
    for v in _new_items(before.get("verdicts") or [], after.get("verdicts") or []):
        key = (str(v.get("tool_call_id")), int(v.get("attempt", 0)))
        if key not in seen_verdicts:
            seen_verdicts.add(key)
            nodes.append(_verdict_node(v))
    for r in _new_items(before.get("reviews") or [], after.get("reviews") or []):
        if str(r.get("review_id")) in seen_reviews:
            continue  # already shown under its interrupt, from the review ledger
        nodes.append(
            TraceNode(
                kind="review",
                name=_review_name(r),
                data=_jsonable(dict(r)),
            )
        )
    if after.get("outcome") and after.get("outcome") != before.get("outcome"):
        # (a new task on a finished thread replaces the previous task's outcome)
        outcome = after["outcome"]
        nodes.append(
            TraceNode(kind="outcome", name=str(outcome.get("status")), data=_jsonable(outcome))
        )
    return nodes


def needs_sync_backend(backend: Any, what: str) -> None:
    """Refuse an `AsyncBackend`: the local traces read with sync calls.

    Its saver refuses them on the event loop's thread, and its ``execute`` returns a
    coroutine: without this, the error named neither.
    """
    from checkpointers.aio import AsyncBackend

    if isinstance(backend, AsyncBackend):
        raise UserError(
            f"{what} reads with a sync Backend, not an AsyncBackend: open one on the same "
            "database with open_backend(url) (it can stay open beside the async one)"
        )


_PAGE = 25
"""Checkpoints listed at a time from a database (`PostgresSaver.list` fetches a listing whole)."""


def _history(backend: Backend, thread_id: str) -> list[CheckpointTuple]:
    """The thread's checkpoints, namespace by namespace (the root's first), newest first.

    Each is read once, through `_reader`, and shares with the others the values they repeat
    (`_Shared`, which deserializes each distinct message once). From a database, each
    namespace is listed on its own and a page at a time: a listing of every namespace is
    ordered by no index (SQLite sorted the whole thread's checkpoints in memory: 2 GB for
    3,000 steps), and `PostgresSaver.list` fetches every row — every checkpoint's whole
    state — before it yields the first.
    """
    saver, decode = _reader(backend.checkpointer)
    shared = _Shared(decode)
    if backend.kind not in ("sqlite", "postgres"):  # in memory: listed per namespace anyway
        config: Any = {"configurable": {"thread_id": thread_id}}
        return [shared(tup) for tup in saver.list(config)]
    rows = _rows(
        backend, "SELECT DISTINCT checkpoint_ns FROM checkpoints WHERE thread_id = %s", (thread_id,)
    )
    history: list[CheckpointTuple] = []
    for ns in sorted({""} | {str(r["checkpoint_ns"]) for r in rows}):
        config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns}}
        before: Any = None
        while True:
            page = list(saver.list(config, before=before, limit=_PAGE))
            history.extend(shared(tup) for tup in page)
            if len(page) < _PAGE:
                break
            before = page[-1].config
    return history


def _reader(
    saver: BaseCheckpointSaver[Any],
) -> tuple[BaseCheckpointSaver[Any], Callable[[int, bytes], Any] | None]:
    """*saver*, reading what its serializer writes as msgpack extensions as raw `slice`s.

    Every checkpoint holds the whole state, so a thread of n steps stores ≈ n²/2 messages;
    deserializing each copy (a pydantic model built per message per checkpoint, ≈ 60 µs) was
    the quadratic part of reading a long task: 3,000 steps took minutes. LangGraph's
    `JsonPlusSerializer` writes each message (each object that is not plain msgpack) as one
    extension; a copy of the saver whose serializer keeps each extension's bytes instead —
    ``slice(code, data)``, built in C — reads a checkpoint at the speed of msgpack, and
    `_Shared` decodes only what no checkpoint read before held, with the function returned
    beside the copy (the serializer's own). The copy shares the saver's connection (and its
    lock), not its serializer. Another serializer (encryption...) reads as is (and None).
    """
    serde = saver.serde
    # (`_unpack_ext_hook` is the serializer's own attribute, checked in langgraph-checkpoint 4.x)
    if type(serde) is not JsonPlusSerializer or not callable(
        getattr(serde, "_unpack_ext_hook", None)
    ):
        return saver, None
    reader = copy.copy(saver)
    reader.serde = raw = _RawExtensions(serde)
    return reader, raw.decode


class _RawExtensions:
    """A `JsonPlusSerializer` that reads its msgpack extensions as ``slice(code, data)``."""

    def __init__(self, serde: JsonPlusSerializer) -> None:
        self._serde = serde
        self._raw = copy.copy(serde)
        self._raw._unpack_ext_hook = slice
        self.decode: Callable[[int, bytes], Any] = serde._unpack_ext_hook
        """What turns an extension's bytes into its object (the serializer's own hook)."""

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self._raw.loads_typed(data)

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        # A saver writes while it reads only to migrate an old checkpoint (format < 4: its
        # pending sends, `PostgresSaver`): what it read is written back decoded.
        return self._serde.dumps_typed(_Shared(self.decode).value(obj))


def _root(history: Sequence[CheckpointTuple]) -> list[CheckpointTuple]:
    """The root graph's checkpoints of `_history`, oldest first."""
    return [t for t in reversed(history) if not t.config["configurable"].get("checkpoint_ns")]


class _Shared:
    """Makes the checkpoints of a history share the values they repeat.

    Every checkpoint holds the whole state, so a thread of n steps deserializes ≈ n²/2 messages
    (and verdicts, reviews): 1,000 steps held ≈ 500,000 messages, gigabytes. An item
    equal to one already read (the same message in the next checkpoint, by id; the same record
    at the same place of a list) is replaced by that one: what is kept grows with the distinct
    items, not with their repetitions. Equal values are interchangeable in the trace.

    A list that the previous checkpoint's list starts with, or that starts with it (a step
    appends; the history is listed newest first), is compared with it in C and shares its
    items; only the others are looked at one by one. Read through `_reader`, the extensions
    (messages...) come as raw bytes: compared as bytes, and each distinct one decoded once,
    with *decode*.
    """

    def __init__(self, decode: Callable[[int, bytes], Any] | None = None) -> None:
        self._decode = decode
        self._decoded: dict[tuple[int, bytes], Any] = {}
        self._lists: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
        self._messages: dict[tuple[type[Any], str], list[BaseMessage]] = {}

    def __call__(self, tup: CheckpointTuple) -> CheckpointTuple:
        if self._decode is not None:
            writes = [(t, ch, self.value(v)) for t, ch, v in tup.pending_writes or []]
            tup = tup._replace(
                metadata=self.value(tup.metadata),
                pending_writes=writes if tup.pending_writes is not None else None,
            )
        values = tup.checkpoint.get("channel_values")
        if not isinstance(values, dict):
            return tup
        ns = str(tup.config["configurable"].get("checkpoint_ns") or "")
        for channel, value in values.items():
            if isinstance(value, list) and value:
                values[channel] = self._list((ns, channel), value)
            else:
                values[channel] = self.value(value)
        return tup

    def value(self, value: Any) -> Any:
        """*value* with the extensions `_reader` kept raw decoded (each distinct one once)."""
        kind = type(value)
        if kind is slice:
            key = (value.start, value.stop)
            found = self._decoded.get(key, _MISSING)
            if found is _MISSING:
                assert self._decode is not None
                found = self._decoded[key] = self._decode(*key)
            return found
        if self._decode is None:
            return value
        if kind is list:
            items = [self.value(v) for v in value]
            return value if all(map(operator.is_, items, value)) else items
        if kind is dict:
            pairs = {k: self.value(v) for k, v in value.items()}
            return value if all(map(operator.is_, pairs.values(), value.values())) else pairs
        return value

    def _list(self, key: tuple[str, str], items: list[Any]) -> list[Any]:
        last_raw, last = self._lists.get(key, ([], []))
        n = _same_head(items, last_raw)
        shared = last[:n] + [
            self._item(self.value(item), last[i] if i < len(last) else None)
            for i, item in enumerate(items[n:], n)
        ]
        self._lists[key] = (items, shared)
        return shared

    def _item(self, item: Any, there: Any) -> Any:
        if not isinstance(item, BaseMessage | Mapping):
            return item
        if there is not None and _same(item, there):
            return there
        if isinstance(item, BaseMessage) and item.id:
            known = self._messages.setdefault((type(item), item.id), [])
            for other in known:
                if _same(item, other):
                    return other
            known.append(item)
        return item


_MISSING: Any = object()


def _same_head(items: list[Any], last: list[Any]) -> int:
    """How many items *items* and *last* have alike from the start, when one starts the other.

    Alike: the same objects, or equal items of the same types (extensions `_reader` kept raw
    are equal when their bytes are). 0 when neither list is the other's start.
    """
    n = min(len(items), len(last))
    if not n:
        return 0
    head, other = items[:n], last[:n]
    if all(map(operator.is_, head, other)):
        return n
    try:
        equal = list(map(type, head)) == list(map(type, other)) and head == other
    except Exception:  # a value that refuses to compare: item by item, as `_same` does
        return 0
    return n if equal else 0


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # a value that refuses to compare (an array...) is kept as is
        return False


def _rows(backend: Backend, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    return backend.execute(sql, params)


def _loads(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _decoded(raw: Any) -> Any:
    """A column the harness writes with its codec (a run's outcome, an effect's arguments).

    The codec wraps plain JSON as ``{"json": ...}`` and anything else (messages...) as
    LangGraph's serializer output; read as plain JSON, the wrapper hid the value.
    """
    doc = _loads(raw)
    if isinstance(raw, str) and isinstance(doc, Mapping) and ("json" in doc or "serde" in doc):
        return _codec.decode(raw)
    return doc


def _sub_key(ns: str, checkpoint_id: str) -> str:
    return f"{ns}\x00{checkpoint_id}"


def _subgraph_histories(
    history: Sequence[CheckpointTuple],
) -> dict[str, list[tuple[str, list[CheckpointTuple]]]]:
    """The checkpoints of the thread's subgraphs (from `_history`), by namespace, oldest first.

    A compiled graph added as a node (or invoked inside one) checkpoints in a namespace of its
    own (``node:task_id``, nested ones joined by ``|``), each checkpoint naming the parent
    checkpoint its task ran from: keyed by that parent namespace and checkpoint id (`_sub_key`).
    """
    by_ns: dict[str, list[CheckpointTuple]] = {}
    for tup in history:
        ns = str(tup.config["configurable"].get("checkpoint_ns") or "")
        if ns:
            by_ns.setdefault(ns, []).append(tup)
    out: dict[str, list[tuple[str, list[CheckpointTuple]]]] = {}
    for ns, tups in sorted(by_ns.items()):
        parent_ns = ns.rpartition("|")[0]
        parents = (tups[0].metadata or {}).get("parents") or {}
        parent_id = parents.get(parent_ns)
        if parent_id is not None:
            key = _sub_key(parent_ns, str(parent_id))
            out.setdefault(key, []).append((ns, list(reversed(tups))))
    return out


def _total(node: TraceNode) -> None:
    """Sum a step's (or a subgraph's) tokens and cost over what it holds."""
    inner = [n for n in node.walk() if n is not node and n.kind not in ("step", "subgraph")]
    node.input_tokens = sum(n.input_tokens for n in inner)
    node.output_tokens = sum(n.output_tokens for n in inner)
    node.cost_usd = sum(n.cost_usd for n in inner)


def _drop_nested_interrupts(step: TraceNode) -> None:
    """A subgraph's pause reaches its parent too: show it once, where it happened."""
    nested = {
        str(n.data.get("interrupt_id"))
        for sub in step.children
        if sub.kind == "subgraph"
        for n in sub.walk()
        if n.kind == "interrupt"
    }
    step.children = [
        c
        for c in step.children
        if c.kind != "interrupt" or str(c.data.get("interrupt_id")) not in nested
    ]


def _shown_reviews(step: TraceNode) -> dict[str, TraceNode]:
    """The review decisions *step* shows under their interrupt, by review id."""
    return {
        str(n.data.get("review_id")): n
        for i in step.walk()
        if i.kind == "interrupt"
        for n in i.children
        if n.kind == "review"
    }


def _review_ids(step: TraceNode) -> set[str]:
    return {str(n.data.get("review_id")) for n in step.walk() if n.kind == "review"}


def _shared_head(items: list[Any], start: list[Any]) -> int:
    """``len(start)`` when *items* begins with the very objects of *start* (in C), else 0."""
    n = len(start)
    return n if len(items) >= n and all(map(operator.is_, items[:n], start)) else 0


class _MessageIndex:
    """The `_msg_key`s and ids of one checkpoint's messages, carried to the next checkpoint."""

    def __init__(self, key: Callable[[BaseMessage], tuple[str | None, str]]) -> None:
        self._key = key
        self._of: list[BaseMessage] | None = None
        self.keys: set[tuple[str | None, str]] = set()
        """The keys of the messages."""
        self.by_id: dict[str | None, BaseMessage] = {}
        """The messages by id (the last one of an id)."""

    def at(self, messages: list[BaseMessage]) -> None:
        """Describe *messages*: the last ones described plus new ones, or from scratch."""
        if self._of is messages:
            return
        n = _shared_head(messages, self._of) if self._of is not None else 0
        if not n:
            self.keys, self.by_id = set(), {}
        for msg in messages[n:]:
            self.keys.add(self._key(msg))
            if msg.id:
                self.by_id[msg.id] = msg
        self._of = messages


class _StepBuilder:
    """Turns a checkpoint history (the root graph's, or a subgraph's) into step nodes."""

    def __init__(
        self,
        pricer: _Pricer,
        reviews: Mapping[str, Mapping[str, Any]],
        effects: Mapping[str, Mapping[str, Any]],
        subgraphs: Mapping[str, list[tuple[str, list[CheckpointTuple]]]],
    ) -> None:
        self.pricer, self.reviews, self.effects = pricer, reviews, effects
        self.subgraphs = subgraphs
        self.seen_verdicts: set[tuple[str, int]] = set()
        # What the steps built so far (nested ones too) show: review decisions under their
        # interrupt, by review id, and every review id. Kept as each step is added, not
        # re-walked from every step at each step (quadratic in a long task).
        self.shown: dict[str, TraceNode] = {}
        self.seen_reviews: set[str] = set()
        # A message's `_msg_key`, by object: the checkpoints share equal messages (`_Shared`),
        # so each is encoded once, not once per checkpoint holding it.
        self._msg_keys: dict[int, tuple[BaseMessage, tuple[str | None, str]]] = {}

    def _add(self, steps: list[TraceNode], step: TraceNode) -> None:
        steps.append(step)
        self.shown.update(_shown_reviews(step))
        self.seen_reviews.update(_review_ids(step))

    def _key(self, msg: BaseMessage) -> tuple[str | None, str]:
        cached = self._msg_keys.get(id(msg))
        if cached is None or cached[0] is not msg:
            cached = self._msg_keys[id(msg)] = (msg, _msg_key(msg))
        return cached[1]

    def _keys(self, tup: CheckpointTuple) -> set[tuple[str | None, str]]:
        """The keys (`_msg_key`) of the messages in a checkpoint's state."""
        values = _harness_view(tup.checkpoint["channel_values"])
        return {self._key(m) for m in _messages(values)}

    def _subgraph_nodes(
        self, ns: str, tup: CheckpointTuple, known: set[tuple[str | None, str]]
    ) -> list[TraceNode]:
        """The subgraphs that ran from *tup*, each holding its own steps."""
        nodes = []
        key = _sub_key(ns, _cid(tup))
        ran = self.subgraphs.get(key, [])
        if ran:
            known = known | self._keys(tup)
        for sub_ns, history in ran:
            name = sub_ns.rpartition("|")[2].partition(":")[0]
            sub_steps = self.steps(history, sub_ns, known)
            if sub_steps:
                node = TraceNode(kind="subgraph", name=name, children=sub_steps)
                _total(node)
                # Popped by the parent's step: its state repeats these messages.
                keys = sorted(self._keys(history[-1]))
                node.data = {"checkpoint_ns": sub_ns, "_message_keys": keys}
                nodes.append(node)
        return nodes

    def steps(
        self,
        history: Sequence[CheckpointTuple],
        ns: str = "",
        known: set[tuple[str | None, str]] | None = None,
    ) -> list[TraceNode]:
        """The steps of *history*; in a subgraph, messages in *known* were its input."""
        known = known or set()
        steps: list[TraceNode] = []
        index = _MessageIndex(self._key)
        for i, tup in enumerate(history):
            nxt = history[i + 1] if i + 1 < len(history) else None
            interrupts = [w for w in tup.pending_writes or [] if w[1] == "__interrupt__"]
            errors = [w for w in tup.pending_writes or [] if w[1] == "__error__"]
            if nxt is None:
                subgraphs = self._subgraph_nodes(ns, tup, known)
                if interrupts or errors or subgraphs:
                    step = TraceNode(kind="step", name=", ".join(_next_nodes(tup)) or "pending")
                    step.started_at = _ts(tup.checkpoint)
                    step.children.extend(subgraphs)
                    _add_interrupts(step, interrupts, self.reviews, pending=True)
                    _add_errors(step, errors)
                    _drop_nested_interrupts(step)
                    _total(step)
                    self._add(steps, step)
                break
            before = _harness_view(tup.checkpoint["channel_values"])
            after = _harness_view(nxt.checkpoint["channel_values"])
            ran = _ran_between(tup, nxt)
            if nxt.metadata and nxt.metadata.get("source") == "update" and not ran:
                ran = ["update_state"]
            name = ", ".join(ran) or ("input" if (tup.metadata or {}).get("step") == -1 else "?")
            if "__start__" in nxt.checkpoint.get("versions_seen", {}) and not ran:
                name = "input"
            start, end = _ts(tup.checkpoint), _ts(nxt.checkpoint)
            step = TraceNode(
                kind="step",
                name=name,
                started_at=start,
                duration_s=(end - start) if start is not None and end is not None else None,
                data={"step": (nxt.metadata or {}).get("step"), "checkpoint_id": _cid(nxt)},
            )
            # What a subgraph did in this step shows under it, in its own steps; the parent's
            # state then only repeats its messages.
            subgraphs = self._subgraph_nodes(ns, tup, known)
            step.children.extend(subgraphs)
            _add_interrupts(step, interrupts, self.reviews, pending=False)
            _add_errors(step, errors)
            _drop_nested_interrupts(step)
            # The messages of *after* not in *before*: past the messages the two share from
            # the start (the usual step appends), each looked up in *before*'s keys, which
            # are carried from checkpoint to checkpoint — not rebuilt at every step
            # (quadratic in a long task).
            old_msgs, new_msgs = _messages(before), _messages(after)
            index.at(old_msgs)
            also = set(known)
            for sub in subgraphs:
                also |= set(sub.data.pop("_message_keys", ()))
            for msg in new_msgs[_shared_head(new_msgs, old_msgs) :]:
                key = self._key(msg)
                if key in index.keys or key in also:
                    continue
                previous = index.by_id.get(msg.id) if msg.id else None
                if isinstance(previous, AIMessage) and isinstance(msg, AIMessage):
                    step.children.extend(_review_nodes(previous, msg))
                    continue
                if isinstance(previous, ToolMessage) and isinstance(msg, ToolMessage):
                    step.children.append(_tool_node(msg, previous))  # its effect was shown
                    continue
                for node in _message_nodes(msg, self.pricer):
                    if node.kind == "tool_result":
                        _add_effect_ledger(node, self.effects)
                    step.children.append(node)
            for node in step.walk():
                if node.kind == "verdict":
                    self.seen_verdicts.add(
                        (str(node.data.get("tool_call_id")), int(node.data.get("attempt", 0)))
                    )
            _drop_reviews(step, ChainMap(_shown_reviews(step), self.shown))
            seen_reviews = self.seen_reviews | _review_ids(step)
            for node in _state_nodes(before, after, self.seen_verdicts, seen_reviews):
                if node.kind == "outcome" and any(
                    c.kind == "outcome" and (c in step.children or c.data == node.data)
                    for c in step.walk()
                ):
                    continue  # the step, or a subgraph in it, reported this outcome
                step.children.append(node)
            llm_calls = [n for n in step.children if n.kind == "llm"]
            if len(llm_calls) == 1 and len(ran) == 1:
                llm_calls[0].duration_s = step.duration_s
            _total(step)
            if ns and name == "input" and not step.children:
                continue  # a subgraph's input: its parent's state, shown there
            self._add(steps, step)

        return steps


def build_trace(
    backend: Backend,
    thread_id: str,
    *,
    pricing: Pricing | None = None,
    masker: Masker | None = None,
) -> Trace:
    """Rebuild the decision tree of one task from its checkpoints and the ledgers.

    Each superstep becomes a ``step`` node (node name, wall time, tokens, cost) holding, in
    order, what it produced: prompts, model calls (model, tokens, cost, tool calls with their
    full arguments), tool results with the harness's verdict and effect records, budget
    degradations, interrupts with the review request and its decision (reviewer, latency),
    and the outcome. A budgeted call a crash or a cancellation cut off (no answer reached a
    checkpoint) shows as a ``lost_call`` budget node with the worst case the ledger charged or
    keeps booked for it, so the steps add up to the task's cost.

    Args:
        backend: The backend the task was checkpointed in.
        thread_id: The task's thread.
        pricing: How to price a model call (default: `Pricing()`, i.e. genai-prices). A call whose
            message carries the budget layer's ``spent_usd`` uses that figure.
        masker: What masks secrets in the tree, as in Langfuse (default: `Masker()`: API keys,
            passwords, tokens, secret environment variables). The fields the run marked
            sensitive (``langfuse_callbacks(sensitive_fields=...)``) are added to it.

    Raises:
        UnknownThread: No checkpoint and no run record exist for the thread.
        UserError: *backend* is an `AsyncBackend` (open a `Backend` on the same database).

    Example:
        ```python
        from checkpointers import open_backend
        from graphs.quickstart import build_graph, run
        from harness_nodes import build_trace

        with open_backend("memory://") as backend:
            run(build_graph(), backend, thread_id="t-1")
            trace = build_trace(backend, "t-1")
        assert trace.status == "completed"
        assert [s.name for s in trace.steps] == ["input", "agent", "tools", "agent", "finish"]
        ```
    """
    needs_sync_backend(backend, "build_trace")
    with _collection_paused():
        return _build_trace(backend, thread_id, pricing, masker)


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a trace is built.

    Reading a history allocates objects by the million (each checkpoint's lists, read as
    bytes), which set off collections, and each full collection visits every list the history
    keeps — one per checkpoint, ≈ n²/2 references for n steps: it was most of the time left
    (1,000 model calls: 14 s, 4.2 s paused). Reading makes little cyclic garbage (≈ 1,600
    objects over those 1,000 calls): the next collection after it takes it.
    """
    with _PAUSE_LOCK:
        global _PAUSED, _WAS_ENABLED
        if _PAUSED == 0:
            _WAS_ENABLED = gc.isenabled()
            gc.disable()
        _PAUSED += 1
    try:
        yield
    finally:
        with _PAUSE_LOCK:
            _PAUSED -= 1
            if _PAUSED == 0 and _WAS_ENABLED:  # an app that turned it off keeps it off
                gc.enable()


# Traces built at once (an inbox's request threads): the first pauses the collector, the last
# restores it as the first found it — none turns it back on while another is still reading.
_PAUSE_LOCK = threading.Lock()
_PAUSED = 0
_WAS_ENABLED = True


def _build_trace(
    backend: Backend, thread_id: str, pricing: Pricing | None, masker: Masker | None
) -> Trace:
    listed = _history(backend, thread_id)
    history = _root(listed)
    run_rows = _rows(backend, "SELECT * FROM harness_runs WHERE thread_id = %s", (thread_id,))
    if not history and not run_rows:
        raise UnknownThread(thread_id)
    run = run_rows[0] if run_rows else {}
    pricer = _Pricer(pricing)

    reviews = {
        str(r["interrupt_id"]): r
        for r in _rows(
            backend,
            "SELECT * FROM harness_reviews WHERE thread_id = %s ORDER BY created_at",
            (thread_id,),
        )
    }
    effects = {
        str(r["tool_call_id"]): r
        for r in _rows(backend, "SELECT * FROM harness_effects WHERE thread_id = %s", (thread_id,))
    }

    builder = _StepBuilder(pricer, reviews, effects, _subgraph_histories(listed))
    steps = builder.steps(history)

    last_values = _harness_view(history[-1].checkpoint["channel_values"] if history else {})
    task: Mapping[str, Any] = last_values.get("task") or {}
    stored = _decoded(run.get("outcome"))  # what a runner recorded (a cancellation...)
    current = task_outcome(last_values)
    outcome: Mapping[str, Any] = (
        current
        if current
        else stored
        if isinstance(stored, Mapping) and stored.get("status")
        else {}
    )
    if not any(n.kind == "outcome" for s in steps for n in s.walk()) and outcome:
        steps.append(
            TraceNode(
                kind="step",
                name="outcome",
                children=[
                    TraceNode(
                        kind="outcome", name=str(outcome.get("status")), data=_jsonable(outcome)
                    )
                ],
            )
        )
    status = _status(history, outcome, run)
    task_id = str(task.get("task_id") or thread_id)
    input_tokens = sum(s.input_tokens for s in steps)
    output_tokens = sum(s.output_tokens for s in steps)
    cost = sum(s.cost_usd for s in steps)
    ledger_cost = _ledger_cost(backend, task_id)
    if ledger_cost is not None:
        cost = ledger_cost
    lost = _lost_calls(backend, task_id, steps)
    if lost:
        _place(steps, lost)
        input_tokens = sum(s.input_tokens for s in steps)
        output_tokens = sum(s.output_tokens for s in steps)
    times = [_ts(t.checkpoint) for t in history]
    known = [t for t in times if t is not None]
    trace = Trace(
        thread_id=thread_id,
        task_id=task_id,
        task_type=str(run.get("task_type") or task.get("task_type") or "default"),
        status=status,
        started_at=min(known) if known else _float(run.get("created_at")),
        ended_at=max(known) if known else _float(run.get("updated_at")),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost,
        reason=(
            str(outcome["reason"])
            if outcome.get("reason")
            # A task its runner gave up on: the error of its last attempt.
            else str(run["error"])
            if status == "failed" and run.get("error")
            else None
        ),
        steps=steps,
    )
    masker = masker or Masker()
    # The fields the run marked sensitive (`langfuse_callbacks(sensitive_fields=...)`).
    masker.extend(marked_fields(t.metadata for t in listed))
    return _masked(trace, masker)


def _masked(trace: Trace, masker: Masker) -> Trace:
    """Secrets out of every name, datum and reason: a local trace is shown and shared too."""
    for node in trace.walk():
        node.name = masker.text(node.name)
        if node.data:
            node.data = masker(data=node.data)
    if trace.reason:
        trace.reason = masker.text(trace.reason)
    return trace


def task_outcome(values: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The outcome a graph's state reports for its current task, if any.

    Its ``outcome`` key, else the stop note a drop-in graph's messages carry (a
    `VerificationStop` in a ``MessagesState`` app, a `budgeted` model's refusal). A drop-in
    graph keeps an earlier task's stop after the next question started a new task: that task's
    state speaks for it (completed, paused...), not the stop.
    """
    view = _harness_view(values)
    messages = _messages(view)
    for found in (view.get("outcome"), _message_outcome(messages)):
        if found and not _verify.earlier_tasks_outcome(messages, found):
            return found
    return None


def _message_outcome(messages: Sequence[BaseMessage]) -> Mapping[str, Any] | None:
    budget = _harness_meta(messages[-1]).get("budget") if messages else None
    stopped = budget.get("stopped") if isinstance(budget, Mapping) else None
    if isinstance(stopped, Mapping):
        # A `budgeted` model's refusal with no BudgetGuard to record it: it ended the loop.
        limit, used, most = stopped.get("limit"), stopped.get("used"), stopped.get("maximum")
        reason = f"{limit} limit reached: used {used} of {most}"
        return {"status": "budget_exhausted", "reason": reason}
    for msg in reversed(messages):
        outcome = _harness_meta(msg).get("outcome")
        if isinstance(outcome, Mapping) and outcome.get("status"):
            return outcome
    return None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def _cid(tup: CheckpointTuple) -> str:
    return str(tup.config["configurable"].get("checkpoint_id", ""))


def _status(
    history: list[CheckpointTuple], outcome: Mapping[str, Any], run: Mapping[str, Any]
) -> str:
    if outcome.get("status"):
        return str(outcome["status"])
    if history:
        last = history[-1]
        if any(w[1] == "__interrupt__" for w in last.pending_writes or []):
            return "paused"
        if _next_nodes(last):
            return str(run.get("status") or "incomplete")
        return "completed"
    return str(run.get("status") or "unknown")


def _ledger_cost(backend: Backend, task_id: str) -> float | None:
    # Only settled calls are money spent (not reservations, releases or leases).
    with contextlib.suppress(Exception):  # a ledger that cannot be written is still read
        flush_pending(backend, task_id)  # settlements still riding in this process
    rows = _rows(
        backend,
        "SELECT count(*) AS n, coalesce(sum(cost_nanos), 0) AS nanos FROM harness_spend "
        "WHERE task_id = %s AND state = 'settled'",
        (task_id,),
    )
    if not rows or not rows[0]["n"]:
        return None
    return int(rows[0]["nanos"]) / 1e9


def _lost_calls(
    backend: Backend, task_id: str, steps: Sequence[TraceNode]
) -> list[tuple[float, TraceNode]]:
    """Budgeted calls whose answer never reached a checkpoint, as ``budget`` nodes.

    A call cut off by a crash or a cancellation may still have been billed: the ledger
    charges its worst case (settled) or, for a process killed mid-call, keeps it booked
    (reserved). Without these nodes the steps would not add up to the task's cost.
    """
    shown = {
        str(n.data["budget"]["spend_id"])
        for step in steps
        for n in step.walk()
        if n.kind == "llm" and isinstance(n.data.get("budget"), Mapping)
        if n.data["budget"].get("spend_id") is not None
    }
    rows = _rows(
        backend,
        "SELECT id, model, state, input_tokens, output_tokens, cost_nanos, reserved_nanos, "
        "created_at FROM harness_spend WHERE task_id = %s AND state IN ('settled', 'reserved') "
        "AND lease_id IS NULL AND reserved_calls = 0 ORDER BY id",
        (task_id,),
    )
    lost: list[tuple[float, TraceNode]] = []
    for row in rows:
        settled = row["state"] == "settled"
        if str(row["id"]) in shown:
            continue
        if settled and int(row["cost_nanos"]) != int(row["reserved_nanos"]):
            # Settled at what it cost: an answer came back (a call a `BudgetCallbackHandler`
            # recorded, inside a tool or a node, carries no spend id on any message).
            continue
        usd = int(row["cost_nanos" if settled else "reserved_nanos"]) / 1e9
        node = TraceNode(
            kind="budget",
            name=(
                f"lost call {row['model']}: charged its worst case ${usd:.6f}"
                if settled
                else f"call {row['model']} with no answer: ${usd:.6f} booked "
                "(still in flight, or its process died)"
            ),
            input_tokens=int(row["input_tokens"]) if settled else 0,
            output_tokens=int(row["output_tokens"]) if settled else 0,
            cost_usd=usd if settled else 0.0,
            data={
                "action": "lost_call",
                "spend_id": row["id"],
                "state": row["state"],
                "model": row["model"],
                ("charged_usd" if settled else "booked_usd"): usd,
                "why": "no answer reached a checkpoint (a crash or a cancellation cut the call "
                "off, or it is still running); it may be billed, so the ledger counts its "
                "worst case",
            },
        )
        lost.append((float(row["created_at"]), node))
    return lost


def _place(steps: list[TraceNode], lost: Sequence[tuple[float, TraceNode]]) -> None:
    """Put each lost call in the step that was running when it started (else the last before)."""
    for at, node in lost:
        home = None
        for step in steps:
            if step.started_at is not None and step.started_at <= at:
                home = step
                if step.duration_s is not None and at <= step.started_at + step.duration_s:
                    break
        home = home or (steps[0] if steps else None)
        if home is None:
            continue
        home.children.insert(0, node)  # it started before what the step then did
        home.input_tokens += node.input_tokens
        home.output_tokens += node.output_tokens
        home.cost_usd += node.cost_usd


def _add_interrupts(
    step: TraceNode,
    interrupts: Sequence[tuple[str, str, Any]],
    reviews: Mapping[str, Mapping[str, Any]],
    *,
    pending: bool,
) -> None:
    for _task, _channel, value in interrupts:
        for intr in value if isinstance(value, list | tuple) else [value]:
            interrupt_id = str(getattr(intr, "id", ""))
            payload = getattr(intr, "value", intr)
            node = TraceNode(
                kind="interrupt",
                name="paused for review" if pending else "paused → resumed",
                data=_jsonable({"interrupt_id": interrupt_id, "request": payload}),
            )
            row = reviews.get(interrupt_id)
            if row is not None:
                node.started_at = _float(row.get("created_at"))
                node.data.update(
                    _jsonable(
                        {"review_id": row["id"], "reason": row["reason"], "risk": row["risk"]}
                    )
                )
                if row.get("decided_at") is not None:
                    latency = float(row["decided_at"]) - float(row["created_at"])
                    node.duration_s = latency
                    decision = _loads(row.get("decision"))
                    word = _decision_word(decision)
                    node.children.append(
                        TraceNode(
                            kind="review",
                            name=f"{word} by {row.get('decided_by')}",
                            started_at=_float(row.get("decided_at")),
                            data=_jsonable(
                                {
                                    "review_id": row["id"],
                                    "decision": decision,
                                    "reviewer": row.get("decided_by"),
                                    "latency_s": latency,
                                }
                            ),
                        )
                    )
            step.children.append(node)


_CALL_DETAILS = ("tool_call_id", "tool", "decision", "args_before", "args_after", "message")
"""What a per-call review record adds to the queue's record of the same decision."""


def _drop_reviews(node: TraceNode, shown: Mapping[str, TraceNode]) -> None:
    """Fold the review records of decisions shown under their interrupt into that node.

    The queue's ledger has the decision with its reviewer and latency; the records on the
    messages have, per call, what it did: the arguments an edit gave, a reject's message.
    """
    kept = []
    for child in node.children:
        ledger = shown.get(str(child.data.get("review_id"))) if child.kind == "review" else None
        if ledger is None:
            kept.append(child)
        elif child.data.get("tool_call_id"):
            call = {k: child.data[k] for k in _CALL_DETAILS if child.data.get(k) is not None}
            ledger.data.setdefault("calls", []).append(call)
    node.children = kept
    for child in node.children:
        if child.kind != "interrupt":
            _drop_reviews(child, shown)


def _decision_word(decision: Any) -> str:
    # The queue stores one decision or a batch (one per paused call).
    items = decision if isinstance(decision, list) else [decision]
    words = {str(d.get("type", d)) if isinstance(d, Mapping) else str(d) for d in items}
    return "+".join(sorted(words))  # as the audit row and the inbox name it


def _add_errors(step: TraceNode, errors: Sequence[tuple[str, str, Any]]) -> None:
    for _task, _channel, value in errors:
        step.children.append(
            TraceNode(kind="error", name=str(value)[:200], data={"error": str(value)})
        )


def _add_effect_ledger(node: TraceNode, effects: Mapping[str, Mapping[str, Any]]) -> None:
    row = effects.get(str(node.data.get("tool_call_id")))
    if row is None:
        return
    started, finished = _float(row.get("started_at")), _float(row.get("finished_at"))
    node.started_at = started
    if started is not None and finished is not None:
        node.duration_s = finished - started
    data = {
        "status": row.get("status"),
        "idempotency_key": row.get("idempotency_key"),
        "args": _decoded(row.get("args")),
    }
    existing = [c for c in node.children if c.kind == "effect"]
    if existing:
        existing[0].data.update(_jsonable(data))
    else:
        node.children.append(
            TraceNode(kind="effect", name=str(row.get("status")), data=_jsonable(data))
        )
