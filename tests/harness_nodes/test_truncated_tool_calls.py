"""A model reply whose tool calls were cut off at the token limit is malformed, not a call.

A reply that reaches its output cap mid-arguments says so in its ``response_metadata``
(OpenAI's ``finish_reason == "length"``, Anthropic's ``stop_reason == "max_tokens"``,
Google's ``finish_reason == "MAX_TOKENS"``). Streamed, langchain-core's chunk aggregation
parses the arguments with ``parse_partial_json``, which *repairs* cut-off JSON:
``{"query": "sto`` becomes a valid call with ``query == "sto"``. Run, the tool would answer
a question nobody asked. Such a reply is treated as malformed, as ``invalid_tool_calls``
are: each call is answered with a corrective error message and a failed verdict, back to
the model within the tool's ``max_retries``, then ``verification_failed``.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from harness_nodes import (
    ReviewPolicy,
    ToolContract,
    VerifyToolOutputsMiddleware,
    build_harnessed_agent,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call
from tests.harness_nodes._apps import harnessed_messages_app

pytestmark = pytest.mark.anyio

searched: list[str] = []


@tool
def search(query: str) -> list[str]:
    """Search the notes."""
    searched.append(query)
    return ["note-1"]


@pytest.fixture(autouse=True)
def _clear_searched() -> None:
    searched.clear()


ASK = {"messages": [HumanMessage("find notes on storage")]}


def cut_off(call_id: str = "call_cut", **metadata: Any) -> AIMessage:
    """A reply cut at the token limit mid-arguments, as the provider sent it.

    Not streamed, the arguments are invalid JSON; streamed, langchain-core repairs them into
    ``{"query": "sto"}``. Either way the response metadata says the reply hit its cap.
    """
    return AIMessage(
        "",
        invalid_tool_calls=[
            {
                "name": "search",
                "args": '{"query": "sto',
                "id": call_id,
                "error": None,
                "type": "invalid_tool_call",
            }
        ],
        response_metadata=metadata or {"finish_reason": "length"},
    )


def repaired(**metadata: Any) -> AIMessage:
    """What a streamed cut-off reply aggregates to: a valid call with truncated arguments."""
    return AIMessage(
        "",
        tool_calls=[tool_call("search", {"query": "sto"}, id="call_cut")],
        response_metadata=metadata or {"finish_reason": "length"},
    )


def retry_script(first: AIMessage) -> list[Any]:
    return [first, ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("OK")]


def unanswered_calls(messages: list[BaseMessage]) -> list[str]:
    """Ids of tool calls (valid or malformed) no tool message answers: OpenAI refuses those."""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    ids = [
        str(c["id"])
        for m in messages
        if isinstance(m, AIMessage)
        for c in [*m.tool_calls, *m.invalid_tool_calls]
    ]
    return [i for i in ids if i not in answered]


def feedback_on(messages: list[BaseMessage], call_id: str = "call_cut") -> ToolMessage:
    [message] = [m for m in messages if isinstance(m, ToolMessage) and m.tool_call_id == call_id]
    return message


def assert_cut_call_was_retried(out: dict[str, Any]) -> None:
    assert searched == ["storage"]  # never "sto"
    feedback = feedback_on(out["messages"])
    assert feedback.status == "error"
    assert "cut off at the token limit" in str(feedback.content)
    assert "shorter" in str(feedback.content)
    assert out["messages"][-1].content == "OK"
    assert unanswered_calls(out["messages"]) == []


def run_streamed(app: Any, inputs: Any) -> dict[str, Any]:
    """Stream *app* with ``stream_mode="messages"`` (the model streams), return the state."""
    out: dict[str, Any] = {}
    for mode, chunk in app.stream(inputs, stream_mode=["messages", "values"]):
        if mode == "values":
            out = chunk
    return out


async def arun_streamed(app: Any, inputs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async for mode, chunk in app.astream(inputs, stream_mode=["messages", "values"]):
        if mode == "values":
            out = chunk
    return out


# --- the scripted model and langchain-core ------------------------------------------------


async def test_streaming_repairs_cut_off_arguments_into_a_valid_call() -> None:
    # What makes this a hole: streamed, the cut-off arguments are no longer invalid.
    model = ScriptedChatModel(script=[cut_off()], disable_streaming=False)
    streamed = None
    for chunk in model.stream("hi"):
        streamed = chunk if streamed is None else streamed + chunk
    assert isinstance(streamed, AIMessage)
    assert streamed.tool_calls[0]["args"] == {"query": "sto"}
    assert streamed.invalid_tool_calls == []
    assert streamed.response_metadata["finish_reason"] == "length"


async def test_scripted_model_keeps_a_scripted_finish_reason() -> None:
    model = ScriptedChatModel(script=[repaired(stop_reason="max_tokens")], model_name="m")
    reply = model.invoke("hi")
    assert reply.response_metadata["stop_reason"] == "max_tokens"
    assert reply.response_metadata["model_name"] == "m"
    assert reply.tool_calls[0]["args"] == {"query": "sto"}
    assert (await model.ainvoke("hi")).response_metadata["stop_reason"] == "max_tokens"


# --- build_harnessed_agent (ModelNode) ------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"finish_reason": "length"}, id="openai"),
        pytest.param({"stop_reason": "max_tokens"}, id="anthropic"),
        pytest.param({"finish_reason": "MAX_TOKENS"}, id="google"),
        # langchain-core's merge_dicts concatenates a string key sent in several chunks.
        pytest.param({"finish_reason": "lengthlength"}, id="aggregated-twice"),
    ],
)
def test_graph_sends_a_cut_off_call_back_to_the_model(metadata: dict[str, Any]) -> None:
    model = ScriptedChatModel(script=retry_script(repaired(**metadata)))
    out = build_harnessed_agent(model, [search]).invoke(ASK)

    assert_cut_call_was_retried(out)
    first = out["verdicts"][0]
    assert (first["tool_call_id"], first["ok"], first["action"]) == ("call_cut", False, "retry")
    assert "cut off at the token limit" in first["reasons"][0]
    assert out["outcome"] == {"status": "completed", "partial_result": "OK"}


@pytest.mark.parametrize(
    "review",
    [
        pytest.param({}, id="no-review-policy"),
        pytest.param({"review_policy": ReviewPolicy()}, id="review-policy"),
    ],
)
def test_graph_streamed_sends_a_cut_off_call_back_to_the_model(review: dict[str, Any]) -> None:
    model = ScriptedChatModel(script=retry_script(cut_off()), disable_streaming=False)
    out = run_streamed(build_harnessed_agent(model, [search], **review), ASK)

    assert_cut_call_was_retried(out)
    assert [v["action"] for v in out["verdicts"]] == ["retry", "ok"]


async def test_graph_astreamed_sends_a_cut_off_call_back_to_the_model() -> None:
    model = ScriptedChatModel(script=retry_script(cut_off()), disable_streaming=False)
    out = await arun_streamed(build_harnessed_agent(model, [search]), ASK)

    assert_cut_call_was_retried(out)


def test_graph_fails_the_task_once_the_retries_on_a_cut_off_call_are_spent() -> None:
    model = ScriptedChatModel(script=[cut_off()], loop=True, disable_streaming=False)
    agent = build_harnessed_agent(
        model, [search], contracts={"search": ToolContract(max_retries=1)}
    )
    out = run_streamed(agent, ASK)

    assert [v["action"] for v in out["verdicts"]] == ["retry", "fail"]
    assert out["outcome"]["status"] == "verification_failed"
    assert "search: the reply was cut off at the token limit" in out["outcome"]["reason"]
    assert model.calls == 2 and searched == []
    assert unanswered_calls(out["messages"]) == []


def test_graph_does_not_run_the_complete_sibling_of_a_cut_off_call() -> None:
    # The reply as a whole hit its cap: none of its calls is the model's finished intent.
    both = AIMessage(
        "",
        tool_calls=[
            tool_call("search", {"query": "a"}, id="call_ok"),
            tool_call("search", {"query": "sto"}, id="call_cut"),
        ],
        response_metadata={"finish_reason": "length"},
    )
    model = ScriptedChatModel(script=retry_script(both))
    out = build_harnessed_agent(model, [search]).invoke(ASK)

    assert_cut_call_was_retried(out)
    assert feedback_on(out["messages"], "call_ok").status == "error"


def test_a_cut_off_reply_without_tool_calls_still_completes() -> None:
    cut = ai("A long answer", response_metadata={"stop_reason": "max_tokens"})
    model = ScriptedChatModel(script=[cut])
    out = build_harnessed_agent(model, [search]).invoke(ASK)

    assert out["outcome"] == {"status": "completed", "partial_result": "A long answer"}
    assert out.get("verdicts", []) == []


# --- add_harness ------------------------------------------------------------------------------


def app_with_harness(model: ScriptedChatModel, **harness: Any) -> Any:
    """A user's ``MessagesState`` app searching the notes, harnessed."""
    return harnessed_messages_app(model, [search], **harness)


@pytest.mark.parametrize(
    "review",
    [
        pytest.param({}, id="no-review-policy"),
        pytest.param({"review_policy": ReviewPolicy()}, id="review-policy"),
    ],
)
def test_add_harness_streamed_sends_a_cut_off_call_back_to_the_model(
    review: dict[str, Any],
) -> None:
    model = ScriptedChatModel(script=retry_script(cut_off()), disable_streaming=False)
    app = app_with_harness(model, contracts={"search": ToolContract()}, **review)
    out = run_streamed(app, ASK)

    assert_cut_call_was_retried(out)


async def test_add_harness_sends_a_cut_off_call_back_to_the_model_async() -> None:
    model = ScriptedChatModel(script=retry_script(repaired()))
    out = await app_with_harness(model).ainvoke(ASK)

    assert_cut_call_was_retried(out)


def test_add_harness_stops_once_the_retries_on_a_cut_off_call_are_spent() -> None:
    model = ScriptedChatModel(script=[repaired()], loop=True)
    app = app_with_harness(model, contracts={"search": ToolContract(max_retries=1)})
    out = app.invoke(ASK)

    assert model.calls == 2 and searched == []
    assert out["messages"][-1].content.startswith("I stopped: a tool output failed")
    assert "cut off at the token limit" in str(out["messages"][-1].content)
    assert unanswered_calls(out["messages"]) == []


# --- VerifyToolOutputsMiddleware ------------------------------------------------------------


def agent_with_middleware(model: ScriptedChatModel, **contracts: ToolContract) -> Any:
    verify = VerifyToolOutputsMiddleware(contracts or None)
    return create_agent(model, [search], middleware=[verify])


def test_create_agent_streamed_sends_a_cut_off_call_back_to_the_model() -> None:
    model = ScriptedChatModel(script=retry_script(cut_off()), disable_streaming=False)
    out = run_streamed(agent_with_middleware(model), ASK)

    assert_cut_call_was_retried(out)
    assert [v["action"] for v in out["verdicts"]] == ["retry", "ok"]


async def test_create_agent_sends_a_cut_off_call_back_to_the_model_async() -> None:
    model = ScriptedChatModel(script=retry_script(repaired(stop_reason="max_tokens")))
    out = await agent_with_middleware(model).ainvoke(ASK)

    assert_cut_call_was_retried(out)


def test_create_agent_fails_the_task_once_the_retries_on_a_cut_off_call_are_spent() -> None:
    model = ScriptedChatModel(script=[repaired()], loop=True)
    out = agent_with_middleware(model, search=ToolContract(max_retries=1)).invoke(ASK)

    assert [v["action"] for v in out["verdicts"]] == ["retry", "fail"]
    assert out["outcome"]["status"] == "verification_failed"
    assert "cut off at the token limit" in out["outcome"]["reason"]
    assert model.calls == 2 and searched == []
    assert unanswered_calls(out["messages"]) == []
