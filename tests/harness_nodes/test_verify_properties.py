"""Property: any tool output gets a verdict (never a crash or a hang), and an output that
breaks the contract is never passed as ok."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import BaseModel, ValidationError

from harness_nodes import ToolContract, VerifyToolOutputs


class Reading(BaseModel):
    sensor: str
    value: float
    tags: list[str]


def few_tags(reading: Reading) -> str | None:
    return "too many tags" if len(reading.tags) > 3 else None


CONTRACT = ToolContract(
    schema=Reading, required=("sensor",), ranges={"value": (0, 100)}, checks=(few_tags,)
)
VERIFY = VerifyToolOutputs({"read": CONTRACT}, default=None)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
near_valid = st.fixed_dictionaries(
    {
        "sensor": st.text(max_size=10),
        "value": st.floats(0, 100) | st.floats() | st.integers(-10, 200),
        "tags": st.lists(st.text(max_size=5), max_size=5),
    },
    optional={
        "error": json_scalars,
        "status": st.sampled_from(["ok", "failed", "error", "done"]),
        "success": st.booleans(),
        "extra": json_values,
    },
)


def deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


contents = st.one_of(
    json_values.map(json.dumps),
    near_valid.map(json.dumps),
    near_valid.map(json.dumps),
    near_valid.map(json.dumps),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.text(max_size=200),
    st.builds(lambda n, head: head + "x" * n, st.integers(10_000, 1_000_000), st.text(max_size=20)),
    st.builds(deep, st.integers(1, 50_000), st.sampled_from(["list", "dict"])),
    st.sampled_from(
        ["null", "None", "", "[]", "{}", "<html><body>502</body></html>", "Rate limit"]
    ),
)


def deep_artifact(depth: int) -> Any:
    value: Any = {"sensor": "s", "value": 1.0, "tags": []}
    for _ in range(depth):
        value = {"nested": value}
    return value


artifacts = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    near_valid,
    json_values,
    st.binary(max_size=100),
    st.integers(1, 3000).map(deep_artifact),
)


def satisfies_contract(payload: Any) -> bool:
    """Independent oracle: does this payload meet CONTRACT (schema, fields, signals)?"""
    if not isinstance(payload, dict):
        return False
    try:
        reading = Reading.model_validate(payload)
    except (ValidationError, RecursionError):
        return False
    if not reading.sensor.strip() or not (0 <= reading.value <= 100) or math.isnan(reading.value):
        return False
    if len(reading.tags) > 3:
        return False
    if payload.get("error") not in (None, "", [], {}, False):
        return False
    if (
        str(payload.get("status", "")).lower() in {"failed", "error"}
        or payload.get("success") is False
    ):
        return False
    return True


def payload_seen(content: str, artifact: Any) -> Any:
    if artifact is not None:
        return artifact
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return content


@settings(
    max_examples=200,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    content=contents, artifact=artifacts, status=st.sampled_from(["success", "success", "error"])
)
def test_any_output_gets_a_verdict_and_violations_never_pass(
    content: str, artifact: Any, status: str
) -> None:
    call = {"name": "read", "args": {}, "id": "c1", "type": "tool_call"}
    message = ToolMessage(content, tool_call_id="c1", id="t1", artifact=artifact, status=status)
    state = {"messages": [HumanMessage("q"), AIMessage("", tool_calls=[call], id="a"), message]}

    update = VERIFY(state)

    (verdict,) = update["verdicts"]
    event(f"ok={verdict['ok']}")
    assert verdict["ok"] is (not verdict["reasons"])
    (checked,) = update["messages"]
    assert checked.id == "t1" and checked.tool_call_id == "c1"
    if verdict["ok"]:
        assert status == "success"
        assert satisfies_contract(payload_seen(content, artifact))
        assert checked.content == content
    else:
        assert verdict["action"] == "retry" and checked.status == "error"
        assert all(isinstance(r, str) and len(r) < 2000 for r in verdict["reasons"])
