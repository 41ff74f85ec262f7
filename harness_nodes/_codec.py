"""Round-trip arbitrary values (messages, states, plain JSON) through a TEXT column.

Plain JSON stays readable (``{"json": ...}``); anything else (LangChain messages, Commands,
pydantic models) goes through LangGraph's own serializer, base64-encoded, with a readable
``text`` excerpt beside it for people looking at the table.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from langchain_core.messages import BaseMessage
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

_SERDE = JsonPlusSerializer()


def encode(value: Any) -> str:
    """Encode *value* as a JSON text that `decode` turns back into an equal value."""
    try:
        return json.dumps({"json": value}, allow_nan=False)
    except (TypeError, ValueError):
        pass
    kind, data = _SERDE.dumps_typed(value)
    text = value.text if isinstance(value, BaseMessage) else repr(value)[:500]
    return json.dumps({"serde": kind, "b64": base64.b64encode(data).decode(), "text": text})


def decode(raw: str | None) -> Any:
    """The value `encode` was given (``None`` for ``None``)."""
    if raw is None:
        return None
    doc = json.loads(raw)
    if "json" in doc:
        return doc["json"]
    return _SERDE.loads_typed((doc["serde"], base64.b64decode(doc["b64"])))
