"""What the pages show, read from `ReviewQueue` and `build_trace`: plain dicts for templates.

No queue logic lives here: listing, validating, claiming, auditing and resuming are the
queue's; this module only reads its items, the task's trace and the graph's state.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from harness_nodes._trace_langfuse import Masker, marked_fields
from harness_nodes.errors import AlreadyDecided, HarnessError
from harness_nodes.inbox._forms import form_fields, parse_form
from harness_nodes.review_queue import masked_item, masked_items

_RISK_CLASSES = {"low": "low", "medium": "medium", "high": "high"}
_DECIDED = frozenset({"decided", "applied", "closed"})
# Trace nodes whose details are shown unfolded: what was called, what came back, decisions.
_OPEN_KINDS = frozenset({"tool_call", "tool_result", "verdict", "review", "outcome", "error"})
# Characters a reviewer cannot see, or that reorder what they see: controls, zero-width and
# bidi formatting characters (U+202E shows "moc.live@x" as "x@evil.com"), Unicode tags.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]"
)


def _visible(text: str) -> str:
    r"""*text* as the reviewer should read it: invisible characters shown as ``\uXXXX``.

    Only for what the pages display; the edit form keeps the values as they are, so an
    argument left unchanged is sent back unchanged.
    """
    return _INVISIBLE.sub(
        lambda m: f"\\u{ord(m[0]):04x}" if ord(m[0]) <= 0xFFFF else f"\\U{ord(m[0]):08x}", text
    )


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return ""
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _tool_schemas(queue: Any) -> dict[str, dict[str, Any]]:
    """JSON schemas of the tools' arguments, from the tools the queue validates with."""
    tools: Mapping[str, Any] = queue.tools
    out: dict[str, dict[str, Any]] = {}
    for name, tool in tools.items():
        try:
            out[name] = dict(tool.tool_call_schema.model_json_schema())
        except Exception:  # a tool without a pydantic schema: the form infers from values
            continue
    return out


def _actions(
    requests: Sequence[Mapping[str, Any]], schemas: Mapping[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for r in requests:
        ar = r.get("action_request", {})
        name = str(ar.get("action", ""))
        out.append(
            {
                "name": name,
                "args": dict(ar.get("args") or {}),
                "schema": schemas.get(name),
                "config": dict(r.get("config") or {}),
                "description": _visible(str(r.get("description") or "")),
                "reason": str(r.get("reason") or ""),
                "tool_call_id": str(r.get("tool_call_id") or ""),
            }
        )
    return out


def item_row(item: Any, now: float | None = None) -> dict[str, Any]:
    """One line of the pending list (from a `ReviewItem`)."""
    now = time.time() if now is None else now
    actions = _actions(item.requests, {})
    if len(actions) == 1:
        inner = json.dumps(actions[0]["args"], ensure_ascii=False)[1:-1]
        inner = inner if len(inner) <= 80 else inner[:79] + "…"
        summary = _visible(f"{actions[0]['name']}({inner})")
    else:
        summary = _visible(", ".join(a["name"] for a in actions)) or "(no action)"
    return {
        "id": item.id,
        "thread_id": item.thread_id,
        "summary": summary,
        "reason": item.reason,
        "risk": item.risk,
        "risk_class": _RISK_CLASSES.get(item.risk, "medium"),
        "task_type": item.task_type,
        "assignee": item.assignee,
        "priority": item.priority,
        "deadline": item.deadline,
        "deadline_text": _iso(item.deadline),
        "created_at": item.created_at,
        "created_text": _iso(item.created_at),
        "age_text": _age(item.created_at, now),
        "status": item.status,
    }


def item_json(item: Any) -> dict[str, Any]:
    """The JSON API's view of one list item."""
    row = item_row(item)
    row["actions"] = [{"name": a["name"], "args": a["args"]} for a in _actions(item.requests, {})]
    return row


def list_page(
    queue: Any, filters: Mapping[str, str | None], offset: int, size: int
) -> tuple[list[Any], bool]:
    """One page of pending items, most urgent first (and whether another page follows).

    The items are as the pages show them: secrets masked, as in a trace, with the fields each
    run marked sensitive.
    """
    items = list(
        queue.pending(
            task_type=filters.get("task_type"),
            reason=filters.get("reason"),
            assignee=filters.get("assignee"),
            limit=size + 1,
            offset=offset,
            order="urgency",
        )
    )
    return masked_items(items[:size], queue.graph.checkpointer), len(items) > size


@dataclass
class ItemDetail:
    """An item with everything its page shows."""

    item: Any
    view: dict[str, Any]
    actions: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """The JSON API's view of the item (trace as `build_trace` JSON)."""
        hidden = ("actions", "trace", "edited_args_json")
        v = {k: val for k, val in self.view.items() if k not in hidden}
        v["actions"] = [
            {
                "name": a["name"],
                "args": a["args"],
                "args_schema": a["schema"],
                "tool_call_id": a["tool_call_id"],
            }
            for a in self.actions
        ]
        v["trace"] = self.view["trace_json"]
        del v["trace_json"]
        return v


def _money(usd: float | None) -> str:
    if usd is None:
        return ""
    return f"${usd:.4f}" if usd >= 0.01 else f"${usd:.6f}"


def _trace_nodes(nodes: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for n in nodes:
        meta = []
        if n.input_tokens or n.output_tokens:
            meta.append(f"{n.input_tokens}+{n.output_tokens} tokens")
        if n.cost_usd:
            meta.append(_money(n.cost_usd))
        if n.duration_s is not None:
            meta.append(f"{n.duration_s:.2f}s")
        detail = (
            json.dumps(n.data, indent=2, ensure_ascii=False, default=str)
            if n.data and n.kind != "step"
            else None
        )
        out.append(
            {
                "kind": n.kind,
                "kind_class": "".join(c if c.isalnum() else "-" for c in n.kind),
                "name": _visible(n.name),
                "meta": " · ".join(meta),
                "detail": _visible(detail) if detail else None,
                "open": n.kind in _OPEN_KINDS,
                "children": _trace_nodes(n.children),
            }
        )
    return out


def _trace(queue: Any, thread_id: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None, Any]:
    from harness_nodes.tracing import build_trace

    try:
        trace = build_trace(queue.backend, thread_id)
    except HarnessError:
        return [], None, None
    return _trace_nodes(trace.steps), trace.to_dict(), trace


def _outcome(queue: Any, item: Any) -> dict[str, Any] | None:
    """How the task stands after the decision; ``None`` while it is still resuming."""
    if item.status not in ("applied", "closed"):
        return None
    graph = queue.graph
    snap = graph.get_state({"configurable": {"thread_id": item.thread_id}})
    if snap.interrupts:
        return {"status": "paused", "reason": "waiting for another review", "result": None}
    if snap.next:
        return None  # still running somewhere
    values = snap.values if isinstance(snap.values, Mapping) else {}
    outcome = values.get("outcome")
    last = None
    messages = values.get("messages") or []
    if messages:
        content = messages[-1].content
        last = content if isinstance(content, str) else json.dumps(content, default=str)
    if isinstance(outcome, Mapping):
        result = outcome.get("partial_result", last)
        return {
            "status": str(outcome.get("status", "completed")),
            "reason": _visible(str(outcome.get("reason", "") or "")),
            "result": _visible(result if isinstance(result, str) else json.dumps(result))
            if result is not None
            else None,
        }
    return {"status": "completed", "reason": "", "result": _visible(last) if last else last}


def item_detail(queue: Any, review_id: str, failure: str | None = None) -> ItemDetail:
    """The item page's data (raises `ReviewNotFound`).

    Secrets are masked, as in a trace: API keys and secret values in the calls, the decision
    and the outcome. Each action keeps its call as stored under ``stored_args``, for an edit.
    """
    stored = queue.get(review_id)
    snapshot = queue.graph.get_state({"configurable": {"thread_id": stored.thread_id}})
    masker = Masker(marked_fields([snapshot.metadata]))  # and the fields the run marked
    item: Any = masked_item(stored, masker)
    view = item_row(item)
    actions = _actions(item.requests, _tool_schemas(queue))
    for a, r in zip(actions, _actions(stored.requests, {}), strict=True):
        a["stored_args"] = r["args"]
        a["args_json"] = _visible(json.dumps(a["args"], indent=2, ensure_ascii=False))
        a["fields"] = form_fields(a["schema"], a["args"])
    nodes, trace_json, trace = _trace(queue, item.thread_id)
    excerpt = item.requests[0].get("trace", {}) if item.requests else {}
    usd = trace.cost_usd if trace is not None else excerpt.get("usd")
    tokens = (
        trace.input_tokens + trace.output_tokens if trace is not None else excerpt.get("tokens")
    )
    decisions = item.decision or []
    words = sorted({str(d.get("type")) for d in decisions})
    messages = [str(d["message"]) for d in decisions if d.get("message")]
    edited = [d["args"] for d in decisions if d.get("type") == "edit" and "args" in d]
    outcome = masker(data=_outcome(queue, item))
    if failure and outcome is None:
        outcome = {"status": "error", "reason": masker.text(failure), "result": None}
    view.update(
        actions=actions,
        description="\n\n".join(a["description"] for a in actions if a["description"]),
        allow_accept=all(a["config"].get("allow_accept", False) for a in actions),
        # One edit decision applies to a single call; a batch is approved or refused whole.
        allow_edit=len(actions) == 1 and bool(actions[0]["config"].get("allow_edit", False)),
        allow_reject=all(a["config"].get("allow_ignore", False) for a in actions),
        allow_respond=all(a["config"].get("allow_respond", False) for a in actions),
        spend_text=(
            f"{tokens or 0} tokens" + (f" · {_money(usd)}" if usd else "")
            if tokens or usd
            else "nothing recorded"
        ),
        spend={"tokens": tokens, "usd": usd},
        trace=nodes,
        trace_json=trace_json,
        decided_by=item.decided_by,
        decided_at=item.decided_at,
        decided_text=_iso(item.decided_at),
        decision="+".join(words) if words else None,
        decision_message="\n".join(messages) or None,
        edited_args=edited[0] if edited else None,
        edited_args_json=(
            _visible(json.dumps(edited[0], indent=2, ensure_ascii=False)) if edited else None
        ),
        outcome=outcome,
    )
    view["poll"] = item.status in _DECIDED and outcome is None
    return ItemDetail(item, view, actions)


def decision_from_form(detail: ItemDetail, form: Mapping[str, str]) -> dict[str, Any]:
    """The decision a submitted form asks for (raises `FormError` on unreadable fields)."""
    kind = form.get("decision", "")
    if kind == "edit" and detail.actions:
        a = detail.actions[0]
        schema, stored = a["schema"], a["stored_args"]
        # A field sent back as shown, with its secret masked, keeps the value it masks.
        shown = {f.input_name: f.value for f in form_fields(schema, a["args"])}
        real = {f.input_name: f.value for f in form_fields(schema, stored)}
        unmasked = {
            k: real[k]
            if k in real and real[k] != shown.get(k) and v.replace("\r\n", "\n") == shown.get(k)
            else v
            for k, v in form.items()
        }
        return {"type": "edit", "args": parse_form(schema, stored, unmasked)}
    message = form.get("message", "").replace("\r\n", "\n").strip()
    if kind == "reject":
        return {"type": "reject", "message": message} if message else {"type": "reject"}
    if kind == "respond":
        return {"type": "respond", "message": message}
    return {"type": kind}


def _unmasked(shown: Any, stored: Any, sent: Any) -> Any:
    """*sent*, with each value sent back as it was shown (its secret masked) as stored."""
    if sent == shown and shown != stored:
        return stored
    if isinstance(sent, dict) and isinstance(shown, dict) and isinstance(stored, dict):
        return {
            k: _unmasked(shown.get(k), stored[k], v) if k in stored else v for k, v in sent.items()
        }
    return sent


def unmasked_decision(detail: ItemDetail, decision: Any) -> Any:
    """A JSON decision whose edited arguments carry masked values as shown: the real ones."""
    by_id = {a["tool_call_id"]: a for a in detail.actions}
    decisions = decision if isinstance(decision, list) else [decision]
    out = []
    for i, d in enumerate(decisions):
        a = by_id.get(d.get("tool_call_id")) if isinstance(d, dict) else None
        if a is None and i < len(detail.actions):
            a = detail.actions[i]
        if (
            a
            and isinstance(d, dict)
            and d.get("type") == "edit"
            and isinstance(d.get("args"), dict)
        ):
            d = {**d, "args": _unmasked(a["args"], a["stored_args"], d["args"])}
        out.append(d)
    return out if isinstance(decision, list) else out[0]


def decide(queue: Any, review_id: str, decision: Any, reviewer: str) -> None:
    """Apply a decision through the queue, which validates, audits, claims and resumes."""
    queue.decide(review_id, decision, reviewer=reviewer)


def already_decided_text(e: AlreadyDecided) -> str:
    """The conflict message a second reviewer sees."""
    return (
        f"Already decided by {e.decided_by} at {e.decided_at} ({e.decision}); "
        "your decision was not applied."
    )
