"""The edit form generated from a tool's argument schema, and its parsing."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from harness_nodes.inbox._forms import FormError, form_fields, parse_form


class RefundArgs(BaseModel):
    order: str = Field(description="Order id")
    amount: float
    count: int = 1
    notify: bool = False
    reason: Literal["damaged", "late", "other"] = "other"
    meta: dict[str, Any] | None = None


SCHEMA = RefundArgs.model_json_schema()
ARGS = {
    "order": "A1",
    "amount": 120.5,
    "count": 2,
    "notify": True,
    "reason": "late",
    "meta": {"k": [1]},
}


def test_fields_follow_the_schema_types() -> None:
    kinds = {f.name: f.kind for f in form_fields(SCHEMA, ARGS)}
    assert kinds == {
        "order": "text",
        "amount": "number",
        "count": "integer",
        "notify": "boolean",
        "reason": "select",
        "meta": "json",
    }
    order = form_fields(SCHEMA, ARGS)[0]
    assert (order.required, order.description, order.input_name) == (True, "Order id", "arg.order")


def test_unchanged_form_round_trips_to_the_same_args() -> None:
    form = {f.input_name: f.value for f in form_fields(SCHEMA, ARGS)}
    assert parse_form(SCHEMA, ARGS, form) == ARGS


def test_edited_values_are_typed() -> None:
    form = {f.input_name: f.value for f in form_fields(SCHEMA, ARGS)}
    form.update(
        {"arg.amount": "40", "arg.count": "3", "arg.notify": "false", "arg.meta": '{"a": 1}'}
    )
    out = parse_form(SCHEMA, ARGS, form)
    assert (
        out["amount"] == 40
        and out["count"] == 3
        and out["notify"] is False
        and out["meta"] == {"a": 1}
    )
    RefundArgs.model_validate(out)


def test_unreadable_values_are_reported_by_field() -> None:
    form = {f.input_name: f.value for f in form_fields(SCHEMA, ARGS)}
    form.update({"arg.count": "two", "arg.meta": "{not json", "arg.amount": ""})
    with pytest.raises(FormError) as info:
        parse_form(SCHEMA, ARGS, form)
    assert set(info.value.problems) == {"count", "meta", "amount"}


def test_args_outside_the_schema_are_still_shown_and_kept() -> None:
    fields = form_fields(SCHEMA, {**ARGS, "extra": [1, 2]})
    assert fields[-1].name == "extra" and fields[-1].kind == "json"


def test_tools_without_schema_get_fields_from_the_values() -> None:
    args = {"to": "x@example.com", "n": 3, "ok": True, "body": "line1\nline2"}
    kinds = {f.name: f.kind for f in form_fields(None, args)}
    assert kinds == {"to": "text", "n": "integer", "ok": "boolean", "body": "textarea"}
    form = {f.input_name: f.value for f in form_fields(None, args)}
    assert parse_form(None, args, form) == args
