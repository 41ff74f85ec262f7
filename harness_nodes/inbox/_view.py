"""What the pages show, built from the queue's items: the only module that knows their shape.

Everything here reads `ReviewQueue` and `build_trace` results and turns them into plain
dicts for the templates and the JSON API; no queue logic lives here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from harness_nodes.errors import AlreadyDecided
from harness_nodes.inbox._forms import form_fields, parse_form

_RISK_CLASSES = {"low": "low", "medium": "medium", "high": "high", "critical": "high"}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


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
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _actions(request: Any) -> list[dict[str, Any]]:
    """The proposed tool calls of a review request (one, or a batch)."""
    reqs = request if isinstance(request, list) else [request]
    out = []
    for r in reqs:
        ar = _get(r, "action_request") or {}
        cfg = _get(r, "config") or {}
        out.append(
            {
                "name": str(_get(ar, "action", "")),
                "args": dict(_get(ar, "args") or {}),
                "schema": _get(r, "args_schema"),
                "config": dict(cfg),
                "description": _get(r, "description") or "",
            }
        )
    return out


def item_row(item: Any, now: float | None = None) -> dict[str, Any]:
    """One line of the pending list."""
    now = time.time() if now is None else now
    actions = _actions(_get(item, "request"))
    names = ", ".join(a["name"] for a in actions) or "(no action)"
    first_args = json.dumps(actions[0]["args"], ensure_ascii=False) if actions else ""
    inner = first_args[1:-1]
    inner = inner if len(inner) <= 80 else inner[:79] + "…"
    summary = f"{names}({inner})" if len(actions) == 1 else names
    risk = str(_get(item, "risk", "medium"))
    deadline = _get(item, "deadline")
    return {
        "id": str(_get(item, "id")),
        "thread_id": str(_get(item, "thread_id")),
        "summary": summary,
        "reason": str(_get(item, "reason", "")),
        "risk": risk,
        "risk_class": _RISK_CLASSES.get(risk, "medium"),
        "task_type": str(_get(item, "task_type", "default")),
        "assignee": _get(item, "assignee"),
        "priority": _get(item, "priority", 0),
        "deadline": deadline,
        "deadline_text": _iso(deadline),
        "created_at": _get(item, "created_at"),
        "created_text": _iso(_get(item, "created_at")),
        "age_text": _age(_get(item, "created_at"), now),
        "status": str(_get(item, "status", "pending")),
    }


def item_json(item: Any) -> dict[str, Any]:
    """The JSON API's view of one list item."""
    row = item_row(item)
    row["actions"] = [
        {"name": a["name"], "args": a["args"]} for a in _actions(_get(item, "request"))
    ]
    return row


def list_page(
    queue: Any, filters: Mapping[str, str | None], offset: int, size: int
) -> tuple[list[Any], bool]:
    """One page of pending items (and whether another page follows)."""
    items = list(
        queue.pending(
            task_type=filters.get("task_type"),
            reason=filters.get("reason"),
            assignee=filters.get("assignee"),
            limit=size + 1,
            offset=offset,
        )
    )
    return items[:size], len(items) > size


@dataclass
class ItemDetail:
    """An item with everything its page shows."""

    item: Any
    view: dict[str, Any]
    actions: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """The JSON API's view of the item."""
        v = dict(self.view)
        v["actions"] = [
            {"name": a["name"], "args": a["args"], "args_schema": a["schema"]} for a in self.actions
        ]
        return v


def _spend_text(spend: Any) -> str:
    if not spend:
        return "nothing recorded"
    if isinstance(spend, Mapping):
        usd = spend.get("usd", spend.get("total_usd"))
        tokens = spend.get("tokens", spend.get("total_tokens"))
        parts = []
        if usd is not None:
            parts.append(f"${float(usd):.4f}")
        if tokens is not None:
            parts.append(f"{tokens} tokens")
        if parts:
            return " · ".join(parts)
    return str(spend)


def _trace_nodes(nodes: Any) -> list[dict[str, Any]]:
    out = []
    for n in nodes or []:
        kind = str(_get(n, "kind", "step"))
        detail = _get(n, "detail")
        if detail is not None and not isinstance(detail, str):
            detail = json.dumps(detail, indent=2, ensure_ascii=False, default=str)
        out.append(
            {
                "kind": kind,
                "kind_class": "".join(c if c.isalnum() else "-" for c in kind),
                "name": str(_get(n, "name", "")),
                "meta": str(_get(n, "meta", "") or ""),
                "detail": detail,
                "children": _trace_nodes(_get(n, "children")),
            }
        )
    return out


def item_detail(queue: Any, review_id: str) -> ItemDetail:
    """The item page's data (raises `ReviewNotFound`)."""
    item = queue.show(review_id)
    view = item_row(item)
    actions = _actions(_get(item, "request"))
    first_cfg = actions[0]["config"] if actions else {}
    for a in actions:
        a["args_json"] = json.dumps(a["args"], indent=2, ensure_ascii=False)
        a["fields"] = form_fields(a["schema"], a["args"])
    decision = _get(item, "decision")
    view.update(
        actions=actions,
        description="\n\n".join(a["description"] for a in actions if a["description"]),
        allow_accept=all(a["config"].get("allow_accept", False) for a in actions),
        # One edit decision applies only to a single call; batches are approved or refused.
        allow_edit=len(actions) == 1 and bool(first_cfg.get("allow_edit", False)),
        allow_reject=all(a["config"].get("allow_ignore", False) for a in actions),
        allow_respond=all(a["config"].get("allow_respond", False) for a in actions),
        spend_text=_spend_text(_get(item, "spend")),
        trace=_trace_nodes(_get(item, "trace")),
        decided_by=_get(item, "decided_by"),
        decided_text=_iso(_get(item, "decided_at")),
        decision=_get(decision, "type") if isinstance(decision, Mapping) else decision,
        decision_message=_get(decision, "message") if isinstance(decision, Mapping) else None,
        outcome=_get(item, "outcome"),
    )
    view["poll"] = view["status"] != "pending" and not view["outcome"]
    return ItemDetail(item, view, actions)


def decision_from_form(detail: ItemDetail, form: Mapping[str, str]) -> dict[str, Any]:
    """The decision a submitted form asks for (raises `FormError` on unreadable fields)."""
    kind = form.get("decision", "")
    if kind == "edit" and detail.actions:
        a = detail.actions[0]
        return {"type": "edit", "args": parse_form(a["schema"], a["args"], form)}
    message = form.get("message", "").replace("\r\n", "\n").strip()
    if kind == "reject":
        return {"type": "reject", "message": message or None}
    if kind == "respond":
        return {"type": "respond", "message": message}
    return {"type": kind}


def decide(queue: Any, review_id: str, decision: Mapping[str, Any], reviewer: str) -> Any:
    """Apply a decision through the queue (which validates, audits and resumes)."""
    return queue.decide(review_id, dict(decision), reviewer=reviewer)


def already_decided_text(e: AlreadyDecided) -> str:
    """The conflict message a second reviewer sees."""
    return (
        f"Already decided by {e.decided_by} at {e.decided_at} ({e.decision}); nothing was applied."
    )
