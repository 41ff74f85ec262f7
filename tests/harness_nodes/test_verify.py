"""Verification at tool boundaries: failure classes, policies, both forms, resume, drop-in."""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    RemoveMessage,
    ToolMessage,
)
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.errors import GraphInterrupt
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import REMOVE_ALL_MESSAGES, add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, interrupt
from pydantic import BaseModel
from typing_extensions import TypedDict

from checkpointers import Backend, open_backend
from harness_nodes import (
    BudgetExceeded,
    EffectLedger,
    ErrorSignals,
    HarnessState,
    ToolContract,
    UserError,
    Verdict,
    VerificationFailed,
    VerificationStop,
    VerifyToolOutputs,
    irreversible,
    route_after_verify,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

pytestmark = pytest.mark.anyio


class Weather(BaseModel):
    city: str
    temp_c: float
    conditions: list[str]


WEATHER = ToolContract(
    schema=Weather,
    required=("city", "conditions"),
    ranges={"temp_c": (-90, 60)},
    max_retries=2,
)
GOOD = {"city": "Paris", "temp_c": 18.5, "conditions": ["sunny"]}


def harness(message: AnyMessage) -> dict[str, Any]:
    meta = message.additional_kwargs.get("harness", {})
    assert isinstance(meta, dict)
    return meta


def verdict_of(message: AnyMessage) -> Verdict:
    v = harness(message)["verdict"]
    return v  # type: ignore[no-any-return]


def call_state(*outputs: tuple[str, Any], artifact: Any = None) -> dict[str, list[AnyMessage]]:
    """An AI message calling ``weather`` once per output, followed by the tool messages."""
    calls = [tool_call(name, {"city": "x"}, id=f"c{i}") for i, (name, _) in enumerate(outputs)]
    messages: list[AnyMessage] = [
        HumanMessage("hi", id="h"),
        AIMessage("", tool_calls=calls, id="a"),
    ]
    for i, (name, out) in enumerate(outputs):
        content = out if isinstance(out, str) else json.dumps(out)
        messages.append(
            ToolMessage(content, tool_call_id=f"c{i}", name=name, id=f"t{i}", artifact=artifact)
        )
    return {"messages": messages}


# --- each failure class --------------------------------------------------------------------


@dataclass
class Case:
    id: str
    output: Any
    reason: str
    contract: ToolContract = WEATHER
    status: Literal["success", "error"] = "success"


def boom(output: Any) -> str | None:
    return str(1 / 0)


FAILURES = [
    Case(
        "schema-mismatch",
        {"city": "Paris", "temp_c": "warm", "conditions": []},
        "does not match Weather: temp_c",
    ),
    Case("schema-text", "sunny, 18C", "expected JSON matching Weather, got text"),
    Case("missing-required", {"temp_c": 10, "conditions": ["rain"]}, "city: Field required"),
    Case(
        "missing-required-no-schema",
        {"temp_c": 10},
        "required field 'city' is missing",
        ToolContract(required=("city",)),
    ),
    Case(
        "empty-required",
        {"city": "  ", "temp_c": 10, "conditions": ["rain"]},
        "required field 'city' is empty",
    ),
    Case(
        "empty-required-list",
        {"city": "Oslo", "temp_c": 10, "conditions": []},
        "required field 'conditions' is empty",
    ),
    Case(
        "out-of-range",
        {"city": "Paris", "temp_c": 999, "conditions": ["hot"]},
        "field 'temp_c' = 999 is out of range [-90, 60]",
    ),
    Case(
        "not-a-number",
        {"t": "hot"},
        "field 't' is not a number",
        ToolContract(ranges={"t": (0, 1)}),
    ),
    Case(
        "error-object",
        {"error": {"code": 503, "message": "upstream down"}},
        "the output carries an error: error=",
    ),
    Case(
        "status-failed",
        {"status": "failed", "data": [1]},
        "the output reports a failure: status='failed'",
    ),
    Case(
        "success-false",
        {"success": False, "items": [1]},
        "the output reports a failure: success=false",
    ),
    Case(
        "http-status",
        {"status_code": 502, "body": "x"},
        "the output reports an error status: status_code=502",
    ),
    Case(
        "http-status-as-text",
        {"status_code": "500", "body": "x"},
        "the output reports an error status: status_code='500'",
    ),
    Case(
        "http-status-as-float",
        {"statusCode": 503.0, "body": "x"},
        "the output reports an error status: statusCode=503.0",
    ),
    Case(
        "success-false-as-text",
        {"success": "false", "items": [1]},
        "the output reports a failure: success='false'",
    ),
    Case(
        "nested-error",
        {"data": None, "response": {"error": "quota exceeded"}},
        "the output carries an error: response.error='quota exceeded'",
        ToolContract(),
    ),
    Case(
        "nested-success-false",
        {"body": {"success": False}},
        "the output reports a failure: body.success=false",
        ToolContract(),
    ),
    Case(
        "nested-success-false-as-text",
        {"payload": {"ok": "false", "items": [1]}},
        "the output reports a failure: payload.ok='false'",
        ToolContract(),
    ),
    Case(
        "two-envelopes-deep",
        {"response": {"status_code": 200, "body": {"errors": ["token expired"]}}},
        "the output carries an error: response.body.errors=['token expired']",
        ToolContract(),
    ),
    # the error bodies of well-known APIs, each sent with a "successful" tool call
    Case(
        "twilio-error",
        {"code": 20404, "message": "The requested resource was not found", "status": 404},
        "the output reports an error status: status=404",
        ToolContract(),
    ),
    Case(
        "problem-details",
        {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no order 7"},
        "the output reports an error status: status=404",
        ToolContract(),
    ),
    Case(
        "github-error",
        {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"},
        "the output is an error message: message='Bad credentials'",
        ToolContract(),
    ),
    Case(
        "api-gateway-forbidden",
        {"message": "Forbidden"},
        "the output is an error message: message='Forbidden'",
        ToolContract(),
    ),
    Case(
        "api-gateway-timeout",
        {"message": "Endpoint request timed out"},
        "the output is an error message: message='Endpoint request timed out'",
        ToolContract(),
    ),
    Case(
        "django-rest-not-found",
        {"detail": "Not found."},
        "the output is an error message: detail='Not found.'",
        ToolContract(),
    ),
    Case(
        "fastapi-validation-error",
        {"detail": [{"loc": ["body", "city"], "msg": "Field required", "type": "missing"}]},
        "the output is a validation error: detail=",
        ToolContract(),
    ),
    Case(
        "grpc-deadline",
        {"status": "DEADLINE_EXCEEDED", "message": "deadline exceeded after 30s"},
        "the output reports a failure: status='DEADLINE_EXCEEDED'",
        ToolContract(),
    ),
    Case(
        "graphql-mutation-user-errors",
        {"data": {"productCreate": {"product": None, "userErrors": [{"message": "Title blank"}]}}},
        "the output carries an error: data.productCreate.userErrors=",
        ToolContract(),
    ),
    Case(
        "lambda-proxy-json-body",
        {"statusCode": 200, "body": '{"error": "card declined"}'},
        "the output carries an error: body.error='card declined'",
        ToolContract(),
    ),
    Case(
        "rate-limit-text",
        "Rate limit exceeded, retry in 30s",
        "the output reads like an error ('Rate limit'",
    ),
    Case(
        "too-many-requests",
        "429 Too Many Requests",
        "the output reads like an error ('Too Many Requests'",
    ),
    Case(
        "timeout-text", "Request timed out after 30s", "the output reads like an error ('timed out'"
    ),
    Case("http-status-line", "ERROR 404 Not Found", "the output reads like an error ('ERROR 404"),
    Case(
        "http-status-line-with-version",
        "HTTP/1.1 403 Forbidden",
        "the output reads like an error ('HTTP/1.1 403 Forbidden'",
    ),
    Case("access-denied", "Access denied: token expired", "the output reads like an error"),
    Case(
        "html-page",
        "  <!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
        "the tool returned an HTML page",
    ),
    Case(
        "python-repr-error",
        "{'status': 'failed', 'error': 'card declined'}",
        "the output reports a failure",
    ),
    Case("python-repr-empty", "{'results': []}", "empty result"),
    Case("empty-list", [], "empty result"),
    Case("null", "null", "empty result"),
    Case("blank", "   ", "empty result"),
    Case("python-none", "None", "empty result"),
    Case("all-empty-object", {"results": [], "next": None}, "empty result"),
    Case("empty-with-zero-total", {"results": [], "total": 0}, "empty result", ToolContract()),
    Case(
        "empty-with-count-and-cursor",
        {"items": [], "count": 0, "next": None},
        "empty result",
        ToolContract(),
    ),
    Case(
        "empty-page",
        {"items": [], "page": 1, "per_page": 20, "total_count": 0, "has_more": False},
        "empty result",
        ToolContract(),
    ),
    # the standard empty list responses of major APIs
    Case(
        "github-empty-search",
        {"total_count": 0, "incomplete_results": False, "items": []},
        "empty result",
        ToolContract(),
    ),
    Case(
        "stripe-empty-list",
        {"object": "list", "data": [], "has_more": False, "url": "/v1/charges"},
        "empty result",
        ToolContract(),
    ),
    Case(
        "slack-empty-history",
        {"ok": True, "messages": [], "has_more": False, "response_metadata": {"next_cursor": ""}},
        "empty result",
        ToolContract(),
    ),
    Case(
        "google-empty-list",
        {"kind": "youtube#searchListResponse", "items": [], "pageInfo": {"totalResults": 0}},
        "empty result",
        ToolContract(),
    ),
    Case("empty-in-a-wrapper", {"data": {"items": [], "total": 0}}, "empty result", ToolContract()),
    Case(
        "empty-beside-page-meta",
        {"results": [], "meta": {"page": 1, "total": 0}},
        "empty result",
        ToolContract(),
    ),
    Case(
        "error-on-a-later-line",
        "Search failed.\nRate limit exceeded: retry after 30s",
        "the output reads like an error ('Rate limit",
    ),
    Case(
        "error-label-on-a-later-line",
        "Search results:\nError: Rate limit exceeded",
        "the output reads like an error ('Rate limit'",
    ),
    Case(
        "axios-timeout",
        "timeout of 5000ms exceeded",
        "the output reads like an error ('timeout of 5000ms exceeded'",
    ),
    Case(
        "timeout-after",
        "Timeout after 30s waiting for the upstream",
        "the output reads like an error ('Timeout after'",
    ),
    Case(
        "timeout-label",
        "Timeout: the server did not respond in time",
        "the output reads like an error ('Timeout:'",
    ),
    Case(
        "traceback-last-line",
        "Traceback (most recent call last):\n  ...\nasyncio.exceptions.TimeoutError",
        "the output reads like an error",
    ),
    Case(
        "exception-class-opening-a-line",
        "Fetching https://example.com/feed\nReadTimeoutError: read timed out after 10s",
        "the output reads like an error ('ReadTimeoutError'",
    ),
    Case(
        "tool-error-status",
        "Error: ValueError('bad city')",
        "the tool raised an error",
        status="error",
    ),
    Case(
        "check-predicate",
        {"city": "Paris", "temp_c": 10, "conditions": ["x"] * 5},
        "too many conditions",
        ToolContract(
            schema=Weather,
            checks=(lambda w: "too many conditions" if len(w.conditions) > 3 else None,),
        ),
    ),
    Case(
        "check-raises",
        {"city": "Paris", "temp_c": 10, "conditions": ["x"]},
        "check boom raised ZeroDivisionError",
        ToolContract(checks=(boom,)),
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FAILURES])
def test_each_failure_class_is_refused_with_its_reason(case: Case) -> None:
    state = call_state(("weather", case.output))
    state["messages"][-1].status = case.status  # type: ignore[union-attr]
    verify = VerifyToolOutputs({"weather": case.contract})

    update = verify(state)

    (verdict,) = update["verdicts"]
    assert verdict["ok"] is False and verdict["action"] == "retry" and verdict["attempt"] == 1
    assert any(case.reason in r for r in verdict["reasons"]), verdict["reasons"]
    (replaced,) = update["messages"]
    assert isinstance(replaced, ToolMessage)
    assert (replaced.id, replaced.tool_call_id, replaced.status) == ("t0", "c0", "error")
    # The model is told what was wrong and what is needed; the refused output is kept.
    assert case.reason.split("(")[0].strip() in replaced.content
    assert "Do not use this output" in replaced.content
    assert harness(replaced)["verdict"] == verdict
    assert harness(replaced)["rejected_output"] == state["messages"][-1].content


def test_schema_feedback_says_what_is_needed() -> None:
    update = VerifyToolOutputs({"weather": WEATHER})(call_state(("weather", {"city": "P"})))
    content = update["messages"][0].content
    assert "What is needed: a JSON object matching Weather {city: str, temp_c: float" in content
    assert "non-empty city, conditions; temp_c in [-90, 60]" in content


@pytest.mark.parametrize(
    ("output", "contract"),
    [
        pytest.param(GOOD, WEATHER, id="schema-good"),
        pytest.param([], ToolContract(allow_empty=True), id="empty-allowed"),
        pytest.param("The forecast: sunny all week.", ToolContract(), id="plain-text"),
        pytest.param(
            {"status": "failed"},
            ToolContract(signals=ErrorSignals(failed_statuses=frozenset())),
            id="status-is-data",
        ),
        pytest.param("Rate limit exceeded", ToolContract(signals=None), id="signals-off"),
        pytest.param({"error": None, "items": [1]}, ToolContract(), id="null-error-key"),
        pytest.param({"error": 0, "items": [1]}, ToolContract(), id="errno-zero"),
        pytest.param({"code": "12345", "items": [1]}, ToolContract(), id="code-is-data"),
        pytest.param("450 results for your query", ToolContract(), id="a-count-is-not-a-status"),
        pytest.param(
            "x" * 600 + " the request timed out", ToolContract(), id="late-timeout-is-data"
        ),
        # errors in envelopes are read; data that merely looks like one is not
        pytest.param(
            {"data": [{"job": 1, "status": "failed"}, {"job": 2, "status": "done"}]},
            ToolContract(),
            id="a-list-of-jobs-some-failed",
        ),
        pytest.param(
            {"order": {"id": "A1", "status": "failed"}, "data": {"id": "A1"}},
            ToolContract(),
            id="status-of-a-domain-record",
        ),
        pytest.param(
            {"data": {"error": None, "items": [1]}}, ToolContract(), id="nested-null-error"
        ),
        pytest.param(
            {"response": {"error": "quota exceeded"}},
            ToolContract(signals=ErrorSignals(envelope_keys=frozenset())),
            id="envelopes-off",
        ),
        pytest.param(
            {"response": {"error": "quota exceeded"}},
            ToolContract(signals=ErrorSignals(envelope_depth=0)),
            id="envelope-depth-0",
        ),
        pytest.param(
            {"result": {"status": "failed", "message": "disk full"}},
            ToolContract(),
            id="status-in-an-envelope-is-data",
        ),
        pytest.param(
            {"data": {"order_id": "o1", "status": "failed", "reason": "card declined"}},
            ToolContract(),
            id="a-failed-order-in-data",
        ),
        pytest.param({"data": {"sku": "X", "code": "404"}}, ToolContract(), id="a-product-code"),
        pytest.param(
            {"url": "https://example.com/a", "response": {"status_code": 404, "body": "gone"}},
            ToolContract(),
            id="an-http-fetch-of-a-missing-page",
        ),
        pytest.param({"result": {"state": "timeout"}}, ToolContract(), id="a-timed-out-job"),
        # a message is an error only when nothing else is there and it reads like one
        pytest.param({"message": "Email sent"}, ToolContract(), id="a-confirmation-message"),
        pytest.param(
            {"data": {"productCreate": {"product": {"id": "gid://P/1"}, "userErrors": []}}},
            ToolContract(),
            id="a-graphql-mutation-that-worked",
        ),
        pytest.param(
            {"data": {"job": {"id": 1, "userErrors": ["x"]}}, "meta": {"page": 1}},
            ToolContract(),
            id="not-a-graphql-response",
        ),
        pytest.param(
            {"level": "error", "message": "Request timed out", "ts": 1},
            ToolContract(),
            id="a-log-record-of-an-error",
        ),
        pytest.param({"id": 3, "message": "Not Found"}, ToolContract(), id="a-chat-message"),
        pytest.param(
            {"type": "message", "message": "the nightly deploy timed out again", "timestamp": 1},
            ToolContract(),
            id="a-chat-event-about-an-error",
        ),
        pytest.param(
            {"message": "Retry requests that timed out", "timestamp": 1, "path": "src/a.py"},
            ToolContract(),
            id="a-commit-about-an-error",
        ),
        pytest.param(
            {"title": "Payments", "type": "incident", "detail": "Service unavailable on /pay"},
            ToolContract(),
            id="a-ticket-about-an-error",
        ),
        pytest.param(
            {"title": "Deploy", "message": "Request timed out on host 3, retried OK"},
            ToolContract(),
            id="a-notification-about-an-error",
        ),
        pytest.param(
            {"status": "sent", "message": "Sorry, the request timed out."},
            ToolContract(),
            id="a-sent-message-echoed",
        ),
        pytest.param({"status": 200, "items": [1]}, ToolContract(), id="an-ok-status"),
        pytest.param({"status": "unavailable"}, ToolContract(), id="a-product-out-of-stock"),
        pytest.param(
            {"statusCode": 200, "body": '{"items": [1]}'}, ToolContract(), id="a-json-body"
        ),
        pytest.param(
            {"statusCode": 200, "body": "{ not json }"}, ToolContract(), id="a-braced-text-body"
        ),
        # an empty list beside data, or beside counts that say there is data, is not empty
        pytest.param({"count": 0}, ToolContract(), id="a-zero-count-is-an-answer"),
        pytest.param(
            {"results": [], "total": 0, "query": "storage"}, ToolContract(), id="beside-data"
        ),
        pytest.param({"results": [], "total": 57}, ToolContract(), id="nonzero-total"),
        pytest.param({"items": [], "next": "cursor-2"}, ToolContract(), id="more-to-come"),
        pytest.param({"data": {"count": 0}}, ToolContract(), id="a-zero-count-in-a-wrapper"),
        pytest.param(
            {"ok": True, "channel": "C1", "messages": []}, ToolContract(), id="slack-beside-data"
        ),
        pytest.param(
            {"object": "list", "data": [{"id": "ch_1"}], "has_more": False, "url": "/v1/charges"},
            ToolContract(),
            id="stripe-list-with-data",
        ),
        pytest.param(
            {"notifications": True, "blocked_users": []}, ToolContract(), id="a-settings-record"
        ),
        pytest.param({"url": "https://sho.rt/x", "tags": []}, ToolContract(), id="a-link-record"),
        # text that mentions an error is data; an error message leads with it
        pytest.param(
            "Our API has a rate limit of 100 requests per minute.",
            ToolContract(),
            id="docs-mention-a-rate-limit",
        ),
        pytest.param(
            "1. Rate limits | Example API docs\n"
            "https://example.com/docs/rate-limits\n"
            "Over the limit, requests fail with 429 Too Many Requests until the window resets.",
            ToolContract(),
            id="search-snippet-mentions-429",
        ),
        pytest.param(
            "Set the request timeout to 30 seconds in config.yaml.",
            ToolContract(),
            id="docs-mention-a-timeout",
        ),
        pytest.param(
            "# Errors\n\nTimeoutError is raised when the call takes too long.",
            ToolContract(),
            id="docs-name-an-exception-class",
        ),
        pytest.param(
            "TimeoutError is raised when the call takes longer than its deadline.",
            ToolContract(),
            id="docs-open-with-an-exception-class",
        ),
        pytest.param(
            'def fetch(url):\n    """Raises:\n        TimeoutError: past the deadline."""',
            ToolContract(),
            id="a-docstring-names-an-exception-class",
        ),
        pytest.param("timeout: 30\nretries: 3", ToolContract(), id="a-config-dump"),
        pytest.param(
            "A timeout of 30 seconds applies to every request.",
            ToolContract(),
            id="docs-state-a-timeout",
        ),
        pytest.param(
            "Search results:\nThe message Error: Rate limit exceeded means the quota is spent.",
            ToolContract(),
            id="docs-quote-an-error-mid-line",
        ),
        pytest.param(
            "Troubleshooting uploads\nA slow upload may have timed out; retry a smaller file.",
            ToolContract(),
            id="timed-out-mid-line",
        ),
    ],
)
def test_good_outputs_pass_and_keep_their_content(output: Any, contract: ToolContract) -> None:
    state = call_state(("weather", output))
    update = VerifyToolOutputs({"weather": contract})(state)
    (verdict,) = update["verdicts"]
    assert verdict == {
        "tool": "weather",
        "tool_call_id": "c0",
        "ok": True,
        "reasons": [],
        "attempt": 1,
        "action": "ok",
    }
    (msg,) = update["messages"]
    assert msg.content == state["messages"][-1].content and msg.status == "success"
    assert route_after_verify({"messages": [*state["messages"][:-1], msg]}) == "ok"


def test_artifact_is_checked_against_the_schema() -> None:
    state = call_state(
        ("weather", "3 conditions found"),
        artifact={"city": "Paris", "temp_c": 500, "conditions": ["x"]},
    )
    (verdict,) = VerifyToolOutputs({"weather": WEATHER})(state)["verdicts"]
    assert verdict["reasons"] == ["field 'temp_c' = 500 is out of range [-90, 60]"]
    ok_state = call_state(("weather", "summary"), artifact=Weather(**GOOD))
    assert VerifyToolOutputs({"weather": WEATHER})(ok_state)["verdicts"][0]["ok"] is True


def test_parallel_calls_where_one_fails_replace_only_that_one() -> None:
    state = call_state(("weather", GOOD), ("weather", {"error": "quota"}), ("search", ["hit"]))
    update = VerifyToolOutputs({"weather": WEATHER})(state)

    assert [(v["tool_call_id"], v["ok"], v["action"]) for v in update["verdicts"]] == [
        ("c0", True, "ok"),
        ("c1", False, "retry"),
        ("c2", True, "ok"),
    ]
    by_id = {m.tool_call_id: m for m in update["messages"]}
    assert by_id["c0"].content == json.dumps(GOOD) and by_id["c2"].content == '["hit"]'
    assert by_id["c1"].status == "error" and "quota" in by_id["c1"].content
    assert (
        route_after_verify({"messages": [*state["messages"][:2], *update["messages"]]}) == "retry"
    )


def test_already_verified_messages_are_not_checked_again() -> None:
    verify = VerifyToolOutputs({"weather": WEATHER})
    state = call_state(("weather", {"error": "x"}))
    first = verify(state)
    again = verify({"messages": [*state["messages"][:2], *first["messages"]]})
    assert again == {}


def test_tools_without_a_contract_get_the_default_or_nothing() -> None:
    state = call_state(("other", "<html><body>Oops</body></html>"))
    assert VerifyToolOutputs({"weather": WEATHER})(state)["verdicts"][0]["ok"] is False
    assert VerifyToolOutputs({"weather": WEATHER}, default=None)(state) == {}


# --- policies ------------------------------------------------------------------------------


def prior(tool: str, failures: int) -> list[AnyMessage]:
    """History with ``failures`` earlier failed verdicts of ``tool`` (one per AI turn)."""
    out: list[AnyMessage] = [HumanMessage("go", id="h0")]
    for i in range(failures):
        out.append(AIMessage("", tool_calls=[tool_call(tool, {}, id=f"p{i}")], id=f"pa{i}"))
        v = Verdict(
            tool=tool, tool_call_id=f"p{i}", ok=False, reasons=["x"], attempt=i + 1, action="retry"
        )
        out.append(
            ToolMessage(
                "err",
                tool_call_id=f"p{i}",
                id=f"pt{i}",
                additional_kwargs={"harness": {"verdict": v}},
            )
        )
    return out


@pytest.mark.parametrize(
    ("contract", "failures_before", "action", "route"),
    [
        pytest.param(ToolContract(max_retries=2), 0, "retry", "retry", id="retry-1"),
        pytest.param(ToolContract(max_retries=2), 1, "retry", "retry", id="retry-2"),
        pytest.param(ToolContract(max_retries=2), 2, "fail", "fail", id="exhausted-fail"),
        pytest.param(
            ToolContract(max_retries=2, on_exhausted="escalate"),
            2,
            "escalate",
            "escalate",
            id="exhausted-escalate",
        ),
        pytest.param(ToolContract(max_retries=0), 0, "fail", "fail", id="no-retries"),
        pytest.param(ToolContract(on_fail="escalate"), 0, "escalate", "escalate", id="escalate"),
        pytest.param(ToolContract(on_fail="fail"), 0, "fail", "fail", id="fail"),
        pytest.param(
            ToolContract(side_effects=True), 0, "escalate", "escalate", id="side-effects-escalate"
        ),
        pytest.param(
            ToolContract(side_effects=True, on_fail="fail"),
            0,
            "fail",
            "fail",
            id="side-effects-fail",
        ),
    ],
)
def test_policy_paths(
    contract: ToolContract, failures_before: int, action: str, route: str
) -> None:
    history = prior("pay", failures_before)
    calls = [tool_call("pay", {"amount": 5}, id="now")]
    messages = [
        *history,
        AIMessage("", tool_calls=calls, id="a"),
        ToolMessage("[]", tool_call_id="now", id="t"),
    ]
    update = VerifyToolOutputs({"pay": contract})({"messages": messages})
    (verdict,) = update["verdicts"]
    assert (verdict["attempt"], verdict["action"]) == (failures_before + 1, action)
    after = [*messages[:-1], *update["messages"]]
    assert route_after_verify({"messages": after}) == route
    escalation = harness(update["messages"][0]).get("escalation")
    if action == "escalate":
        assert escalation is not None
        assert escalation["kind"] == "verification" and escalation["tool_call_id"] == "now"
        assert escalation["args"] == {"amount": 5}
        assert escalation["details"]["reasons"] == verdict["reasons"]
        assert "held for a person's review" in update["messages"][0].content
    else:
        assert escalation is None


def test_calls_through_the_effect_ledger_are_never_retried() -> None:
    """An output carrying effect metadata came from an irreversible call: it escalates, and
    an escalation another layer already wrote (effect outcome unknown) is kept as it is."""
    calls = [tool_call("refund", {"order_id": "o-1"}, id="r1"), tool_call("email", {}, id="e1")]
    effect = {"idempotency_key": "t:r1", "replayed": False}
    unknown = {"kind": "effect_unknown", "reason": "refund started, no result recorded"}
    messages = [
        AIMessage("", tool_calls=calls, id="a"),
        ToolMessage(
            '{"status": "failed"}',
            tool_call_id="r1",
            id="t1",
            additional_kwargs={"harness": {"effect": effect}},
        ),
        ToolMessage(
            "Outcome unknown for irreversible call",
            tool_call_id="e1",
            id="t2",
            status="error",
            additional_kwargs={"harness": {"effect": effect, "escalation": unknown}},
        ),
    ]
    update = VerifyToolOutputs()({"messages": messages})
    assert [v["action"] for v in update["verdicts"]] == ["escalate", "escalate"]
    refund_meta, email_meta = (harness(m) for m in update["messages"])
    assert refund_meta["escalation"]["kind"] == "verification"
    assert refund_meta["escalation"]["details"]["side_effects"] is True
    assert refund_meta["effect"] == effect
    assert email_meta["escalation"] == unknown  # not overwritten
    assert "Call the tool again" not in update["messages"][1].content
    assert route_after_verify({"messages": [messages[0], *update["messages"]]}) == "escalate"


def test_irreversible_tool_behind_the_effect_ledger_escalates_once() -> None:
    """Verification composed outside the effect ledger: a marked tool with a bad output is
    escalated (default contract, no side_effects flag), never re-run."""

    @irreversible
    @tool
    def pay(order_id: str) -> dict[str, Any]:
        """Pay an order."""
        CALLS.append(f"pay:{order_id}")
        return {"status": "failed", "order_id": order_id}

    with open_backend("memory://") as backend:
        ledger = EffectLedger(backend)
        verify = VerifyToolOutputs()

        def hooks(request: Any, execute: Any) -> Any:
            return verify.wrap_tool_call(request, lambda r: ledger.wrap_tool_call(r, execute))

        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("pay", {"order_id": "o-9"}, id="p1")]), ai("again")]
        )
        builder = StateGraph(MessagesState)
        builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
        builder.add_node("tools", ToolNode([pay], wrap_tool_call=hooks))
        builder.add_node("review", lambda s: {"messages": [AIMessage("escalated to a person")]})
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", tools_condition)
        routes = {"ok": "agent", "retry": "agent", "escalate": "review", "fail": END}
        builder.add_conditional_edges("tools", route_after_verify, routes)
        app = builder.compile(checkpointer=backend.checkpointer)
        out = app.invoke({"messages": [HumanMessage("pay")]}, {"configurable": {"thread_id": "t"}})

    assert CALLS == ["pay:o-9"] and model.calls == 1
    meta = harness(out["messages"][2])
    assert meta["verdict"]["action"] == "escalate"
    assert meta["escalation"]["details"]["side_effects"] is True
    assert meta["effect"]["replayed"] is False
    assert out["messages"][-1].content == "escalated to a person"


def test_route_prefers_escalate_over_fail_over_retry() -> None:
    def tm(i: int, action: str, escalate: bool = False) -> ToolMessage:
        v = Verdict(
            tool="t", tool_call_id=f"c{i}", ok=action == "ok", reasons=[], attempt=1, action=action
        )  # type: ignore[typeddict-item]
        meta: dict[str, Any] = {"verdict": v}
        if escalate:
            meta["escalation"] = {"kind": "effect_unknown", "reason": "crash mid-call"}
        return ToolMessage("x", tool_call_id=f"c{i}", additional_kwargs={"harness": meta})

    ai_msg = AIMessage("", tool_calls=[tool_call("t", {}, id=f"c{i}") for i in range(3)])
    assert route_after_verify([ai_msg, tm(0, "ok"), tm(1, "retry"), tm(2, "fail")]) == "fail"
    assert (
        route_after_verify([ai_msg, tm(0, "ok"), tm(1, "fail"), tm(2, "ok", escalate=True)])
        == "escalate"
    )
    assert route_after_verify([ai_msg, tm(0, "ok"), tm(1, "retry")]) == "retry"
    assert route_after_verify([HumanMessage("x")]) == "ok"


def test_an_escalation_a_person_answered_no_longer_routes_to_review() -> None:
    """After `HumanReview` resolves an escalated output, a sibling's failure is what routes."""
    verdict = Verdict(
        tool="pay", tool_call_id="p", ok=False, reasons=["x"], attempt=1, action="escalate"
    )
    review = {"decision": "respond", "escalation": "verification"}
    answered = ToolMessage(
        "paid",
        tool_call_id="p",
        additional_kwargs={"harness": {"verdict": verdict, "review": review}},
    )
    failed = ToolMessage(
        "err",
        tool_call_id="l",
        additional_kwargs={
            "harness": {"verdict": {**verdict, "tool_call_id": "l", "action": "fail"}}
        },
    )
    ai_msg = AIMessage("", tool_calls=[tool_call("pay", {}, id="p"), tool_call("l", {}, id="l")])
    assert route_after_verify([ai_msg, answered, failed]) == "fail"
    assert route_after_verify([ai_msg, answered]) == "ok"


def test_verification_stop_can_raise_instead() -> None:
    history = prior("pay", 0)
    messages = [
        *history,
        AIMessage("", tool_calls=[tool_call("pay", {}, id="n")], id="a"),
        ToolMessage("[]", tool_call_id="n", id="t"),
    ]
    update = VerifyToolOutputs({"pay": ToolContract(on_fail="fail")})({"messages": messages})
    after = {"messages": [*messages[:-1], *update["messages"]]}
    with pytest.raises(
        VerificationFailed,
        match=re.escape("Output of tool 'pay' (call n) failed verification: empty result"),
    ) as e:
        VerificationStop(exit_behavior="error")(after)
    assert (e.value.tool, e.value.tool_call_id) == ("pay", "n")


def test_verification_stop_of_an_unreviewed_escalation_gives_the_escalations_reason() -> None:
    """An escalation another layer wrote (no verdict of its own) and nobody reviewed."""
    unknown = {"kind": "effect_unknown", "reason": "refund started, no result recorded"}
    messages = [
        AIMessage("", tool_calls=[tool_call("refund", {}, id="r")], id="a"),
        ToolMessage(
            "?", tool_call_id="r", id="t", additional_kwargs={"harness": {"escalation": unknown}}
        ),
    ]
    update = VerificationStop()({"messages": messages})
    assert update["outcome"]["reason"] == "refund started, no result recorded"
    assert update["messages"][0].content == (
        "I stopped: a tool output failed verification and needs a person, but no human review "
        "is set up. refund started, no result recorded"
    )


# --- wiring mistakes -----------------------------------------------------------------------


class Item(BaseModel):
    name: str
    price: float | None
    tags: list[str]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(
            lambda: ToolContract(max_retries=-1),
            "max_retries must be >= 0, got -1",
            id="negative-retries",
        ),
        pytest.param(
            lambda: ToolContract(on_fail="ignore"), "on_fail must be one of", id="bad-policy"
        ),  # type: ignore[arg-type]
        pytest.param(
            lambda: ToolContract(on_exhausted="retry"), "on_exhausted must be", id="bad-exhausted"
        ),  # type: ignore[arg-type]
        pytest.param(
            lambda: ToolContract(schema=dict),
            "must be a pydantic BaseModel subclass",
            id="schema-not-model",
        ),  # type: ignore[arg-type]
        pytest.param(
            lambda: ToolContract(schema=Item, required=("nmae",)),
            "field 'nmae' is not in schema Item (fields of Item: name, price, tags)",
            id="unknown-field",
        ),
        pytest.param(
            lambda: ToolContract(schema=Item, ranges={"tags": (0, 5)}),
            "field type list[str] of Item is not a number",
            id="range-on-list",
        ),
        pytest.param(
            lambda: ToolContract(schema=Item, ranges={"name.x": (0, 5)}),
            "goes through 'x', which is not a model field",
            id="path-through-str",
        ),
        pytest.param(
            lambda: ToolContract(required="city"), "not the str 'city'", id="required-str"
        ),  # type: ignore[arg-type]
        pytest.param(
            lambda: ToolContract(ranges={"t": (5, 1)}), "low 5 > high 1", id="inverted-range"
        ),
        pytest.param(
            lambda: ToolContract(ranges={"t": ("a", 1)}),
            "bound 'a' is not a number",
            id="bound-not-number",
        ),  # type: ignore[dict-item]
        pytest.param(
            lambda: ToolContract(checks=("x",)), "is not callable", id="check-not-callable"
        ),  # type: ignore[arg-type]
        pytest.param(
            lambda: ToolContract(checks=len),  # type: ignore[arg-type]
            "must be a tuple of callables",
            id="bare-check",
        ),
        pytest.param(
            lambda: ToolContract(ranges={"t": (float("nan"), 5)}),
            "bound nan is not a number",
            id="nan-bound",
        ),
        pytest.param(
            lambda: ErrorSignals(text_patterns=("(",)), "invalid text pattern '('", id="bad-regex"
        ),
        pytest.param(
            lambda: ErrorSignals(envelope_depth=-1),
            "envelope_depth must be >= 0, got -1",
            id="negative-envelope-depth",
        ),
        pytest.param(
            lambda: ErrorSignals(envelope_keys="data"),  # type: ignore[arg-type]
            "envelope_keys must be a set of strings, not a str",
            id="envelope-keys-str",
        ),
        pytest.param(
            lambda: ErrorSignals(payload_error_keys="userErrors"),  # type: ignore[arg-type]
            "payload_error_keys must be a set of strings, not a str",
            id="payload-error-keys-str",
        ),
        pytest.param(
            lambda: ErrorSignals(message_keys="message"),  # type: ignore[arg-type]
            "message_keys must be a set of strings, not a str",
            id="message-keys-str",
        ),
        pytest.param(
            lambda: VerifyToolOutputs({"t": {"max_retries": 1}}),
            "must be a ToolContract, got dict",
            id="contract-not-contract",
        ),  # type: ignore[dict-item]
        pytest.param(
            lambda: VerifyToolOutputs([ToolContract()]), "must map tool names", id="contracts-list"
        ),  # type: ignore[arg-type]
        pytest.param(
            lambda: VerificationStop(exit_behavior="crash"),
            "exit_behavior must be",
            id="stop-behavior",
        ),  # type: ignore[arg-type]
    ],
)
def test_wiring_mistakes_raise_user_error_at_construction(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        build()


def test_a_predicate_check_passes_on_true_and_fails_on_false() -> None:
    from harness_nodes._verify import check_output

    def positive_price(output: Any) -> bool:
        return bool(output["price"] > 0)

    contract = ToolContract(checks=(positive_price,))
    assert check_output(contract, '{"price": 3}') == []
    assert check_output(contract, '{"price": -1}') == ["check positive_price returned False"]


@dataclass(slots=True)
class _SlotsJob:
    status: str
    rows: int


def test_a_slots_dataclass_artifact_is_checked_like_any_object() -> None:
    from harness_nodes._verify import check_output

    failed = check_output(ToolContract(), "", artifact=_SlotsJob("failed", 0))
    assert failed == ["the output reports a failure: status='failed'"]
    assert check_output(ToolContract(), "", artifact=_SlotsJob("done", 3)) == []


def test_range_on_optional_number_field_is_accepted() -> None:
    contract = ToolContract(schema=Item, ranges={"price": (0, None)})
    assert contract.requirements().endswith("price in [0, +inf]; a non-empty result")


# --- graphs: the node form and the tool-node hook ------------------------------------------

WEATHER_DB: dict[str, Any] = {
    "Paris": GOOD,
    "Atlantis": {"city": "Atlantis", "temp_c": 999, "conditions": ["underwater"]},
    "Down": {"status": "error", "error": "upstream timeout"},
    "Html": "<!doctype html><html><head><title>503</title></head></html>",
    "Empty": [],
}
CALLS: list[str] = []


@tool
def weather(city: str) -> Any:
    """Current weather for a city."""
    CALLS.append(city)
    if city == "Boom":
        raise ConnectionError("connection reset by peer")
    return WEATHER_DB[city]


@tool
def refund(order_id: str) -> dict[str, Any]:
    """Refund an order (side effect)."""
    CALLS.append(f"refund:{order_id}")
    return {"status": "failed", "order_id": order_id}


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def script(*cities: str, final: str = "done") -> list[AIMessage]:
    turns = [
        ai(tool_calls=[tool_call("weather", {"city": c}, id=f"w{i}")]) for i, c in enumerate(cities)
    ]
    return [*turns, ai(final)]


Form = Literal["node", "hook"]


def build_app(
    model: ScriptedChatModel,
    verify: VerifyToolOutputs,
    *,
    form: Form,
    tools: Sequence[BaseTool] = (weather, refund),
    state_schema: type[Any] = MessagesState,
    checkpointer: BaseCheckpointSaver[Any] | None = None,
    interrupt_before: list[str] | None = None,
    trim: bool = False,
) -> Any:
    """A ReAct loop with verification; escalations go to a `review` node that marks the end.

    With ``trim``, the history is trimmed (`keep_last_turn`) on the way back to the model.
    """
    builder = StateGraph(state_schema)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    if form == "node":
        builder.add_node("tools", ToolNode(tools, handle_tool_errors=True))
        builder.add_node("verify", verify)
        builder.add_edge("tools", "verify")
        after = "verify"
    else:
        builder.add_node(
            "tools",
            ToolNode(
                tools, wrap_tool_call=verify.wrap_tool_call, awrap_tool_call=verify.awrap_tool_call
            ),
        )
        after = "tools"
    builder.add_node("review", lambda s: {"messages": [AIMessage("escalated to a person")]})
    builder.add_node("stop", VerificationStop())
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    into_model = "agent"
    if trim:
        builder.add_node("trim", keep_last_turn)
        builder.add_edge("trim", "agent")
        into_model = "trim"
    builder.add_conditional_edges(
        after,
        route_after_verify,
        {"ok": into_model, "retry": into_model, "escalate": "review", "fail": "stop"},
    )
    builder.add_edge("review", END)
    builder.add_edge("stop", END)
    return builder.compile(checkpointer=checkpointer, interrupt_before=interrupt_before)


def keep_last_turn(state: Any) -> dict[str, Any]:
    """The LangChain docs' trimming pattern: keep the first message and the last turn."""
    messages = state["messages"]
    if len(messages) <= 3:
        return {"messages": []}
    return {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), messages[0], *messages[-2:]]}


def verdicts_in(messages: Sequence[AnyMessage]) -> list[Verdict]:
    return [
        verdict_of(m) for m in messages if isinstance(m, ToolMessage) and "verdict" in harness(m)
    ]


FORMS = [pytest.param("node", id="node"), pytest.param("hook", id="hook")]


@pytest.mark.parametrize("form", FORMS)
def test_bad_output_is_retried_with_feedback_then_recovers(form: Form) -> None:
    model = ScriptedChatModel(script=script("Atlantis", "Paris"))
    app = build_app(model, VerifyToolOutputs({"weather": WEATHER}), form=form)

    out = app.invoke({"messages": [HumanMessage("weather?")]})

    assert [(v["attempt"], v["action"]) for v in verdicts_in(out["messages"])] == [
        (1, "retry"),
        (2, "ok"),
    ]
    refused = out["messages"][2]
    assert refused.status == "error" and "999 is out of range" in refused.content
    assert out["messages"][-1].content == "done"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("on_exhausted", "last_node_text"),
    [
        pytest.param("fail", "I stopped: a tool output failed verification.", id="fail"),
        pytest.param("escalate", "escalated to a person", id="escalate"),
    ],
)
def test_retries_exhausted_take_the_configured_path(
    form: Form, on_exhausted: Literal["fail", "escalate"], last_node_text: str
) -> None:
    model = ScriptedChatModel(script=script("Down", "Html", "Empty", "Paris"))
    contract = ToolContract(max_retries=2, on_exhausted=on_exhausted)
    out = build_app(model, VerifyToolOutputs({"weather": contract}), form=form).invoke(
        {"messages": [HumanMessage("q")]}
    )

    assert [(v["attempt"], v["action"]) for v in verdicts_in(out["messages"])] == [
        (1, "retry"),
        (2, "retry"),
        (3, on_exhausted),
    ]
    assert CALLS == ["Down", "Html", "Empty"]  # never reached Paris: the loop stopped
    assert out["messages"][-1].content.startswith(last_node_text)


@pytest.mark.parametrize("form", FORMS)
def test_side_effect_tool_escalates_instead_of_retrying(form: Form) -> None:
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order_id": "o-1"}, id="r1")]),
            ai("retrying the refund"),
        ]
    )
    verify = VerifyToolOutputs({"refund": ToolContract(side_effects=True, max_retries=5)})
    out = build_app(model, verify, form=form).invoke({"messages": [HumanMessage("refund o-1")]})

    assert CALLS == ["refund:o-1"]  # ran once; the model never got the chance to re-run it
    assert model.calls == 1
    (verdict,) = verdicts_in(out["messages"])
    assert verdict["action"] == "escalate"
    escalation = harness(out["messages"][2])["escalation"]
    assert escalation["kind"] == "verification" and escalation["args"] == {"order_id": "o-1"}
    assert out["messages"][-1].content == "escalated to a person"


@pytest.mark.parametrize("form", FORMS)
def test_tool_exception_is_a_failed_verdict_on_the_same_policy(form: Form) -> None:
    model = ScriptedChatModel(script=script("Boom", "Paris"))
    out = build_app(model, VerifyToolOutputs({"weather": WEATHER}), form=form).invoke(
        {"messages": [HumanMessage("q")]}
    )
    first, second = verdicts_in(out["messages"])
    assert first["action"] == "retry" and "connection reset by peer" in first["reasons"][0]
    assert first["reasons"][0].startswith("the tool raised an error")
    assert second["ok"] is True


@pytest.mark.parametrize("form", FORMS)
def test_parallel_calls_in_a_graph(form: Form) -> None:
    calls = [
        tool_call("weather", {"city": "Paris"}, id="p"),
        tool_call("weather", {"city": "Empty"}, id="e"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("done")])
    out = build_app(model, VerifyToolOutputs({"weather": WEATHER}), form=form).invoke(
        {"messages": [HumanMessage("q")]}
    )
    by_call = {v["tool_call_id"]: v for v in verdicts_in(out["messages"])}
    assert by_call["p"]["ok"] is True and by_call["e"]["action"] == "retry"
    assert sorted(CALLS) == ["Empty", "Paris"]
    assert out["messages"][-1].content == "done"


@pytest.mark.parametrize("form", FORMS)
def test_parallel_failures_in_one_turn_use_one_retry(form: Form) -> None:
    """Three calls of one tool fail in the same turn: one attempt ("retry 1 of 2"), so the
    model still gets its second retry before max_retries=2 runs out."""
    cities = ("Down", "Html", "Empty")
    parallel = [tool_call("weather", {"city": c}, id=f"p{i}") for i, c in enumerate(cities)]
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=parallel),
            ai(tool_calls=[tool_call("weather", {"city": "Atlantis"}, id="r1")]),
            ai(tool_calls=[tool_call("weather", {"city": "Paris"}, id="r2")]),
            ai("done"),
        ]
    )
    out = build_app(model, VerifyToolOutputs({"weather": WEATHER}), form=form).invoke(
        {"messages": [HumanMessage("q")]}
    )

    verdicts = {
        v["tool_call_id"]: (v["attempt"], v["action"]) for v in verdicts_in(out["messages"])
    }
    assert verdicts == {
        "p0": (1, "retry"),
        "p1": (1, "retry"),
        "p2": (1, "retry"),
        "r1": (2, "retry"),
        "r2": (3, "ok"),
    }
    feedback = {m.tool_call_id: m.text for m in out["messages"] if isinstance(m, ToolMessage)}
    assert all("(retry 1 of 2 for this tool" in feedback[f"p{i}"] for i in range(3))
    assert "(retry 2 of 2 for this tool" in feedback["r1"]
    assert out["messages"][-1].content == "done"


def test_hook_lets_interrupts_through_and_checks_the_resumed_output() -> None:
    @tool
    def ask_human(question: str) -> str:
        """Ask a person."""
        return str(interrupt(question))

    from langgraph.checkpoint.memory import InMemorySaver

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("ask_human", {"question": "sure?"}, id="q")]), ai("ok")]
    )
    verify = VerifyToolOutputs()
    app = build_app(model, verify, form="hook", tools=[ask_human], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    first = app.invoke({"messages": [HumanMessage("q")]}, config)
    assert first["__interrupt__"][0].value == "sure?"
    out = app.invoke(Command(resume="Rate limit exceeded"), config)
    (verdict,) = verdicts_in(out["messages"])
    assert verdict["action"] == "retry" and "Rate limit" in verdict["reasons"][0]


def test_hook_never_swallows_graph_bubble_up_or_harness_errors() -> None:
    verify = VerifyToolOutputs()

    class FakeRequest:
        tool_call = tool_call("t", {}, id="c")
        state: dict[str, Any] = {"messages": []}
        runtime = None

    for error in (GraphInterrupt(()), BudgetExceeded("task", "usd", 1.0, 1.0)):

        def execute(_: Any, error: Exception = error) -> ToolMessage:
            raise error

        with pytest.raises(type(error)):
            verify.wrap_tool_call(FakeRequest(), execute)  # type: ignore[arg-type]


# --- dropping the node into existing apps --------------------------------------------------


def react_app(model: ScriptedChatModel, *, with_verify: VerifyToolOutputs | None) -> Any:
    """A hand-built MessagesState ReAct loop; verification is one node and one edge."""
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([weather]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    if with_verify is None:
        builder.add_edge("tools", "agent")
    else:
        builder.add_node("verify", with_verify)  # + a node
        builder.add_edge("tools", "verify")  # + an edge (and verify → agent below)
        builder.add_edge("verify", "agent")
    return builder.compile()


def test_drop_into_hand_built_messages_state_react_loop() -> None:
    bare = react_app(ScriptedChatModel(script=script("Atlantis", "Paris")), with_verify=None)
    out = bare.invoke({"messages": [HumanMessage("q")]})
    assert (
        "999" in out["messages"][2].content and out["messages"][2].status == "success"
    )  # silently accepted

    CALLS.clear()
    model = ScriptedChatModel(script=script("Atlantis", "Paris"))
    out = react_app(model, with_verify=VerifyToolOutputs({"weather": WEATHER})).invoke(
        {"messages": [HumanMessage("q")]}
    )
    assert out["messages"][2].status == "error" and "out of range" in out["messages"][2].content
    assert set(out) == {"messages"}  # the app's state schema is untouched
    assert [v["ok"] for v in verdicts_in(out["messages"])] == [False, True]


def test_drop_into_prebuilt_loop_shape_with_tools_condition() -> None:
    model = ScriptedChatModel(script=script("Down", "Paris"))
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([weather]))
    builder.add_node("verify", VerifyToolOutputs({"weather": WEATHER}))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "verify")
    builder.add_conditional_edges(
        "verify",
        route_after_verify,
        {"ok": "agent", "retry": "agent", "escalate": END, "fail": END},
    )
    out = builder.compile().invoke({"messages": [HumanMessage("q")]})
    assert [v["action"] for v in verdicts_in(out["messages"])] == ["retry", "ok"]
    assert "upstream timeout" in out["messages"][2].content


@dataclass
class DataclassState:
    messages: Annotated[list[AnyMessage], add_messages] = field(default_factory=list)
    user: str = "anon"


class PydanticState(BaseModel):
    messages: Annotated[list[AnyMessage], add_messages] = []
    user: str = "anon"


@pytest.mark.parametrize(
    "state_schema", [DataclassState, PydanticState], ids=["dataclass", "pydantic"]
)
@pytest.mark.parametrize("form", FORMS)
async def test_dataclass_and_pydantic_state_apps_async(state_schema: type[Any], form: Form) -> None:
    model = ScriptedChatModel(script=script("Empty", "Paris"))
    builder = StateGraph(state_schema)

    async def agent(state: Any) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state.messages)]}

    verify = VerifyToolOutputs({"weather": WEATHER})
    builder.add_node("agent", agent)
    if form == "node":
        builder.add_node("tools", ToolNode([weather]))
        builder.add_node("verify", verify)
        builder.add_edge("tools", "verify")
        after = "verify"
    else:
        builder.add_node("tools", ToolNode([weather], awrap_tool_call=verify.awrap_tool_call))
        after = "tools"
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_conditional_edges(
        after, route_after_verify, {"ok": "agent", "retry": "agent", "escalate": END, "fail": END}
    )
    out = await builder.compile().ainvoke(state_schema(messages=[HumanMessage("q")], user="u1"))
    assert out["user"] == "u1"
    assert [v["action"] for v in verdicts_in(out["messages"])] == ["retry", "ok"]


class ChatState(TypedDict):
    chat: Annotated[list[AnyMessage], add_messages]


@pytest.mark.parametrize("sync", [pytest.param(True, id="sync"), pytest.param(False, id="async")])
async def test_hook_on_a_tool_node_with_its_own_messages_key(sync: bool) -> None:
    # ToolNode(messages_key="chat") reads and writes "chat": the checked message must land
    # there too (it was written to a "messages" key the state lacks, and dropped), and the
    # retries must be counted from it.
    model = ScriptedChatModel(script=script("Atlantis", "Empty", "Atlantis"))
    verify = VerifyToolOutputs({"weather": WEATHER})
    hook = {"wrap_tool_call": verify.wrap_tool_call, "awrap_tool_call": verify.awrap_tool_call}
    builder = StateGraph(ChatState)

    builder.add_node("agent", lambda s: {"chat": [model.invoke(s["chat"])]})
    builder.add_node("tools", ToolNode([weather], messages_key="chat", **hook))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", lambda s: tools_condition(s, messages_key="chat"))
    builder.add_conditional_edges(
        "tools",
        lambda s: route_after_verify(s, messages_key="chat"),
        {"ok": "agent", "retry": "agent", "escalate": END, "fail": END},
    )
    app = builder.compile()
    inputs = {"chat": [HumanMessage("weather?")]}
    out = app.invoke(inputs) if sync else await app.ainvoke(inputs)

    assert [(v["attempt"], v["action"]) for v in verdicts_in(out["chat"])] == [
        (1, "retry"),
        (2, "retry"),
        (3, "fail"),
    ]
    assert all(isinstance(m, AIMessage) for m in out["chat"][1::2])  # every call answered


def test_node_after_a_tool_node_with_its_own_messages_key_says_so() -> None:
    # The node reads "messages" (its input schema): after ToolNode(messages_key="chat") it saw
    # none, let every output through, and the failed one reached the model as data.
    model = ScriptedChatModel(script=script("Down"))
    builder = StateGraph(ChatState)
    builder.add_node("agent", lambda s: {"chat": [model.invoke(s["chat"])]})
    builder.add_node("tools", ToolNode([weather], messages_key="chat"))
    builder.add_node("verify", VerifyToolOutputs({"weather": WEATHER}))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", lambda s: tools_condition(s, messages_key="chat"))
    builder.add_edge("tools", "verify")
    builder.add_edge("verify", "agent")
    with pytest.raises(UserError, match=re.escape("found no messages under 'messages'")):
        builder.compile().invoke({"chat": [HumanMessage("weather?")]})


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append((name, data))


class AppState(HarnessState):
    user: str


@pytest.mark.parametrize("form", FORMS)
def test_harness_state_gets_verdicts_outcome_and_events(form: Form) -> None:
    model = ScriptedChatModel(script=script("Down", "Down"))
    verify = VerifyToolOutputs({"weather": ToolContract(max_retries=1)})
    recorder = Recorder()
    out = build_app(model, verify, form=form, state_schema=AppState).invoke(
        {"messages": [HumanMessage("q")], "user": "u"}, {"callbacks": [recorder]}
    )
    assert [(v["attempt"], v["action"]) for v in out["verdicts"]] == [(1, "retry"), (2, "fail")]
    assert out["verdicts"] == verdicts_in(out["messages"])
    assert out["outcome"]["status"] == "verification_failed"
    assert (
        out["outcome"]["reason"] == "weather: the output reports a failure: status='error'; "
        "the output carries an error: error='upstream timeout'"
    )
    assert harness(out["messages"][-1])["outcome"] == out["outcome"]
    names = [n for n, _ in recorder.events]
    assert names == ["harness.verdict", "harness.verdict", "harness.outcome"]
    assert recorder.events[0][1] == out["verdicts"][0]


def test_verdicts_key_is_dropped_quietly_from_a_messages_state_app() -> None:
    model = ScriptedChatModel(script=script("Down", "Paris"))
    out = build_app(model, VerifyToolOutputs(), form="hook").invoke(
        {"messages": [HumanMessage("q")]}
    )
    assert set(out) == {"messages"}


@pytest.mark.parametrize(
    ("form", "state_schema"),
    [
        pytest.param("node", HarnessState, id="node"),
        pytest.param("hook", HarnessState, id="hook"),
        pytest.param("node", MessagesState, id="node-messages-state"),
    ],
)
def test_retry_limit_holds_when_the_history_is_trimmed(form: Form, state_schema: type[Any]) -> None:
    """A trimming node drops the refused outputs from the messages; the verdicts keep the
    count, so max_retries=2 still stops a model that repeats the same bad call."""
    ids = itertools.count()

    def same_bad_call(_: list[AnyMessage]) -> AIMessage:
        return ai(tool_calls=[tool_call("weather", {"city": "Empty"}, id=f"w{next(ids)}")])

    model = ScriptedChatModel(script=[same_bad_call], loop=True)
    verify = VerifyToolOutputs({"weather": ToolContract(max_retries=2)})
    app = build_app(model, verify, form=form, state_schema=state_schema, trim=True)

    out = app.invoke({"messages": [HumanMessage("q")]}, {"recursion_limit": 40})

    assert CALLS == ["Empty", "Empty", "Empty"]
    last = verdicts_in(out["messages"])[-1]
    assert (last["attempt"], last["action"]) == (3, "fail")
    assert out["messages"][-1].content.startswith("I stopped")
    if "verdicts" in out:
        assert [(v["attempt"], v["action"]) for v in out["verdicts"]] == [
            (1, "retry"),
            (2, "retry"),
            (3, "fail"),
        ]


@pytest.mark.parametrize(
    ("form", "state_schema", "trim"),
    [
        pytest.param("node", HarnessState, False, id="node"),
        pytest.param("hook", HarnessState, False, id="hook"),
        pytest.param("node", MessagesState, False, id="node-messages-state"),
        pytest.param("hook", MessagesState, False, id="hook-messages-state"),
        pytest.param("node", HarnessState, True, id="node-trimmed"),
        pytest.param("hook", HarnessState, True, id="hook-trimmed"),
    ],
)
def test_a_new_task_on_the_thread_gets_its_full_retry_budget(
    backend: Backend, form: Form, state_schema: type[Any], trim: bool
) -> None:
    """Task 1 exhausts weather's retries (max_retries=1) and stops; a new question on the
    same thread is a new task: its first refused output is attempt 1 again, and its own
    limit still holds (trimmed or not)."""
    config = {"configurable": {"thread_id": f"tasks-{uuid.uuid4().hex}"}}
    ids = itertools.count()

    def same_bad_call(_: list[AnyMessage]) -> AIMessage:
        return ai(tool_calls=[tool_call("weather", {"city": "Empty"}, id=f"w{next(ids)}")])

    model = ScriptedChatModel(script=[same_bad_call], loop=True)
    verify = VerifyToolOutputs({"weather": ToolContract(max_retries=1)})
    app = build_app(
        model,
        verify,
        form=form,
        state_schema=state_schema,
        trim=trim,
        checkpointer=backend.checkpointer,
    )

    first = app.invoke({"messages": [HumanMessage("weather in Empty?")]}, config)
    assert [(v["attempt"], v["action"]) for v in verdicts_in(first["messages"])] == [
        (1, "retry"),
        (2, "fail"),
    ]
    assert first["messages"][-1].content.startswith("I stopped")

    CALLS.clear()
    second = app.invoke({"messages": [HumanMessage("and now?")]}, config)

    assert CALLS == ["Empty", "Empty"]  # one retry again, then the limit
    task_two = verdicts_in(second["messages"][len(first["messages"]) :])
    if trim:  # the first refused output of task 2 was trimmed away
        task_two = verdicts_in(second["messages"])[-1:]
    assert [(v["attempt"], v["action"]) for v in task_two][-1] == (2, "fail")
    assert second["messages"][-1].content.startswith("I stopped")
    if "verdicts" in second:
        assert [(v["attempt"], v["action"]) for v in second["verdicts"]] == [
            (1, "retry"),
            (2, "fail"),
            (1, "retry"),
            (2, "fail"),
        ]


# --- resume in the middle of a retry loop --------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_retry_counts_survive_a_crash_between_retries(backend: Backend, form: Form) -> None:
    """A crash after the first refused output: a fresh process (new model, new verifier, new
    graph) resumes from the checkpoint and the retry budget continues where it was."""
    config = {"configurable": {"thread_id": f"crash-{uuid.uuid4().hex}"}}
    turns = script("Atlantis", "Down", "Empty", "Paris")
    contract = {"weather": ToolContract(schema=Weather, ranges={"temp_c": (-90, 60)})}
    crashing = ScriptedChatModel(script=turns, faults={1: RuntimeError("worker died")})
    app = build_app(
        crashing, VerifyToolOutputs(contract), form=form, checkpointer=backend.checkpointer
    )
    with pytest.raises(RuntimeError, match="worker died"):
        app.invoke({"messages": [HumanMessage("q")]}, config, durability="sync")

    fresh = build_app(
        ScriptedChatModel(script=turns),
        VerifyToolOutputs(contract),
        form=form,
        checkpointer=backend.checkpointer,
    )
    out = fresh.invoke(None, config, durability="sync")

    assert [(v["attempt"], v["action"]) for v in verdicts_in(out["messages"])] == [
        (1, "retry"),
        (2, "retry"),
        (3, "fail"),
    ]
    assert CALLS == ["Atlantis", "Down", "Empty"]  # nothing ran twice, Paris never reached
    assert out["messages"][-1].content.startswith("I stopped")


@pytest.mark.parametrize("form", FORMS)
def test_retry_counts_of_a_trimmed_history_survive_a_crash(backend: Backend, form: Form) -> None:
    """The verdicts that carry the count past trimming are checkpointed: a fresh process
    resuming after a crash between retries still stops at the limit."""
    config = {"configurable": {"thread_id": f"trim-crash-{uuid.uuid4().hex}"}}
    ids = itertools.count()

    def same_bad_call(_: list[AnyMessage]) -> AIMessage:
        return ai(tool_calls=[tool_call("weather", {"city": "Empty"}, id=f"w{next(ids)}")])

    verify = VerifyToolOutputs({"weather": ToolContract(max_retries=2)})
    crashing = ScriptedChatModel(
        script=[same_bad_call], loop=True, faults={1: RuntimeError("worker died")}
    )
    options: dict[str, Any] = {
        "form": form,
        "state_schema": HarnessState,
        "trim": True,
        "checkpointer": backend.checkpointer,
    }
    with pytest.raises(RuntimeError, match="worker died"):
        build_app(crashing, verify, **options).invoke(
            {"messages": [HumanMessage("q")]}, config, durability="sync"
        )

    fresh = build_app(ScriptedChatModel(script=[same_bad_call], loop=True), verify, **options)
    out = fresh.invoke(None, {**config, "recursion_limit": 40}, durability="sync")

    assert CALLS == ["Empty", "Empty", "Empty"]
    assert [(v["attempt"], v["action"]) for v in out["verdicts"]] == [
        (1, "retry"),
        (2, "retry"),
        (3, "fail"),
    ]


def test_retry_counts_survive_an_interrupt_between_retries(backend: Backend) -> None:
    config = {"configurable": {"thread_id": f"pause-{uuid.uuid4().hex}"}}
    turns = script("Empty", "Empty", "Paris")
    contract = {"weather": ToolContract(max_retries=1, on_exhausted="escalate")}
    app = build_app(
        ScriptedChatModel(script=turns),
        VerifyToolOutputs(contract),
        form="node",
        checkpointer=backend.checkpointer,
        interrupt_before=["agent"],
    )
    app.invoke({"messages": [HumanMessage("q")]}, config, durability="sync")  # paused before turn 0
    app.invoke(None, config, durability="sync")  # turn 0 → refused → paused before the retry
    snapshot = app.get_state(config)
    assert snapshot.next == ("agent",)
    assert [v["action"] for v in verdicts_in(snapshot.values["messages"])] == ["retry"]

    resumed = build_app(
        ScriptedChatModel(script=turns),
        VerifyToolOutputs(contract),
        form="node",
        checkpointer=backend.checkpointer,
        interrupt_before=["agent"],
    )
    out = resumed.invoke(None, config, durability="sync")
    assert [(v["attempt"], v["action"]) for v in verdicts_in(out["messages"])] == [
        (1, "retry"),
        (2, "escalate"),
    ]
    assert out["messages"][-1].content == "escalated to a person"


@pytest.mark.slow
def test_retry_count_survives_sigkill_between_retries(durable_url: str, tmp_path: Path) -> None:
    """A real process death after two refused outputs: the new process resumes at attempt 3,
    so the retry budget (2) is exhausted there and the task fails — no retry is given twice."""
    import signal
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    log = tmp_path / "calls.log"
    thread_id = f"sigkill-{uuid.uuid4().hex[:8]}"
    child = [sys.executable, "-m", "tests.harness_nodes._verify_children", durable_url, thread_id]

    first = subprocess.run(
        [*child, str(log), "1"], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert log.read_text().split() == ["k1", "k2"]

    second = subprocess.run(
        [*child, str(log), "0"], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["resumed"] is True
    assert [(v["tool_call_id"], v["attempt"], v["action"]) for v in result["verdicts"]] == [
        ("c1", 1, "retry"),
        ("c2", 2, "retry"),
        ("c3", 3, "fail"),
    ]
    assert log.read_text().split() == ["k1", "k2", "k3"]  # no call ran twice
    assert result["last"].startswith("I stopped: a tool output failed verification.")


def _through_tool_node(result: Any, contract: ToolContract | None = None) -> ToolMessage:
    """What verification makes of *result* returned by a real tool run by a ToolNode."""

    @tool
    def probe() -> Any:
        """Return the output under test."""
        return result

    verify = VerifyToolOutputs({"probe": contract} if contract else {})
    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode([probe], wrap_tool_call=verify.wrap_tool_call))
    builder.add_edge(START, "tools")
    call = {"name": "probe", "args": {}, "id": "p1", "type": "tool_call"}
    out = builder.compile().invoke({"messages": [AIMessage("", tool_calls=[call])]})
    message = out["messages"][-1]
    assert isinstance(message, ToolMessage)
    return message


@dataclass
class _Job:
    status: str
    rows: int


@pytest.mark.parametrize(
    ("result", "contract", "reasons"),
    [
        # LangChain hands the model str(model) / repr(dataclass): the checks read it back
        pytest.param(Weather(**GOOD), WEATHER, [], id="pydantic-good"),
        pytest.param(
            Weather(**{**GOOD, "temp_c": 500}),
            WEATHER,
            ["field 'temp_c' = 500 is out of range [-90, 60]"],
            id="pydantic-out-of-range",
        ),
        pytest.param(
            _Job(status="failed", rows=0),
            None,
            ["the output reports a failure: status='failed'"],
            id="dataclass-failed",
        ),
        pytest.param(
            b'{"error": "boom"}', None, ["the output carries an error: error='boom'"], id="bytes"
        ),
        pytest.param({"city": "San Francisco", "code": 94107}, None, [], id="zip-code-is-data"),
        pytest.param(
            {"code": 503}, None, ["the output reports an error status: code=503"], id="http-503"
        ),
        pytest.param(
            [{"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"}],
            None,
            [],
            id="image-block-is-not-empty",
        ),
        pytest.param(
            "Error: upstream timed out",
            None,
            ["the output reads like an error"],
            id="text",
        ),
        pytest.param(
            json.dumps("Error: upstream timed out"),
            None,
            ["the output reads like an error"],
            id="json-string",
        ),
        pytest.param(
            {"data": None, "response": {"error": "quota exceeded"}},
            None,
            ["the output carries an error: response.error='quota exceeded'"],
            id="nested-error",
        ),
        pytest.param({"results": [], "total": 0}, None, ["empty result"], id="empty-wrapper"),
        pytest.param(
            "Rate limits\nOur API has a rate limit of 100 requests per minute; over it, "
            "requests get 429 Too Many Requests.",
            None,
            [],
            id="docs-text",
        ),
    ],
)
def test_outputs_of_every_kind_get_the_verdict_their_data_deserves(
    result: Any, contract: ToolContract | None, reasons: list[str]
) -> None:
    message = _through_tool_node(result, contract)
    verdict = message.additional_kwargs["harness"]["verdict"]
    assert len(verdict["reasons"]) == len(reasons)
    for got, expected in zip(verdict["reasons"], reasons, strict=True):
        assert got.startswith(expected)


def test_a_refused_output_keeps_its_artifact_out_of_the_conversation() -> None:
    class Report(BaseModel):
        status: str
        rows: list[int]

    @tool(response_format="content_and_artifact")
    def rows() -> Any:
        """Rows and a report."""
        return "3 rows", Report(status="error", rows=[1, 2, 3])

    verify = VerifyToolOutputs()
    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode([rows], wrap_tool_call=verify.wrap_tool_call))
    builder.add_edge(START, "tools")
    call = {"name": "rows", "args": {}, "id": "r1", "type": "tool_call"}
    [message] = builder.compile().invoke({"messages": [AIMessage("", tool_calls=[call])]})[
        "messages"
    ][1:]
    meta = message.additional_kwargs["harness"]
    assert meta["verdict"]["reasons"] == ["the output reports a failure: status='error'"]
    assert message.artifact is None
    assert meta["rejected_artifact"] == Report(status="error", rows=[1, 2, 3])


def test_an_approved_escalation_gives_the_model_the_output_and_its_artifact_back() -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    from harness_nodes import build_harnessed_agent

    @tool(response_format="content_and_artifact")
    def book(room: str) -> Any:
        """Book a room."""
        return '{"booking_id": ""}', {"booking_id": "", "room": room}

    seen: list[ToolMessage] = []

    def answer(messages: list[Any]) -> Any:
        seen.append(messages[-1])
        return ai("booked")

    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("book", {"room": "A"})]), answer])
    contract = ToolContract(required=("booking_id",), side_effects=True)
    agent = build_harnessed_agent(
        model, [book], contracts={"book": contract}, checkpointer=InMemorySaver()
    )
    config = {"configurable": {"thread_id": "t-approve"}}
    agent.invoke({"messages": [HumanMessage("book A")]}, config)
    assert agent.get_state(config).interrupts
    agent.invoke(Command(resume={"type": "approve"}), config)
    [message] = seen
    assert (message.status, message.content) == ("success", '{"booking_id": ""}')
    assert message.artifact == {"booking_id": "", "room": "A"}


def test_a_text_message_in_the_middle_of_a_task_does_not_restart_its_retry_count() -> None:
    # A planner (or a supervisor's sub-agent) writes a text-only AI message between the
    # model's attempts: that is not the end of the task, so it gives no fresh retries.
    from langgraph.checkpoint.memory import InMemorySaver

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("weather", {"city": "Down"})])], loop=True
    )
    verify = VerifyToolOutputs({"weather": ToolContract(max_retries=1)})
    builder = StateGraph(HarnessState)
    builder.add_node("planner", lambda s: {"messages": [AIMessage("Plan: ask for the weather.")]})
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([weather], handle_tool_errors=True))
    builder.add_node("verify", verify)
    builder.add_node("stop", VerificationStop())
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "agent")
    builder.add_edge("agent", "tools")
    builder.add_edge("tools", "verify")
    builder.add_conditional_edges(
        "verify", route_after_verify, {"ok": "planner", "retry": "planner", "fail": "stop"}
    )
    builder.add_edge("stop", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    out = graph.invoke(
        {"messages": [HumanMessage("weather in Down?")]},
        {"configurable": {"thread_id": "planner"}, "recursion_limit": 60},
    )
    assert [(v["attempt"], v["action"]) for v in out["verdicts"]] == [(1, "retry"), (2, "fail")]
    assert out["outcome"]["status"] == "verification_failed"
