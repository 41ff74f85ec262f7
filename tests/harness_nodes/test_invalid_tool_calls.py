"""A model answer whose tool-call arguments are not valid JSON is no final answer.

LangChain puts such calls in ``AIMessage.invalid_tool_calls`` (not ``tool_calls``), which
is how a provider's reply with bad JSON arguments arrives (``additional_kwargs`` parsed by
``default_tool_parser``, as the OpenAI integration does). Each is answered with a corrective
error message and the model tries again, within the tool's ``max_retries``; then the task
ends ``verification_failed`` — never ``completed`` with an empty answer.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from checkpointers import Backend, open_backend
from harness_nodes import (
    CostEnvelopeMiddleware,
    Envelope,
    ReviewPolicy,
    ToolContract,
    VerifyToolOutputsMiddleware,
    build_harnessed_agent,
    build_trace,
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


def malformed(call_id: str = "call_bad") -> AIMessage:
    """A reply as the OpenAI integration builds it when the arguments are cut-off JSON."""
    raw = {
        "id": call_id,
        "type": "function",
        "function": {"name": "search", "arguments": '{"query": "sto'},
    }
    return AIMessage("", additional_kwargs={"tool_calls": [raw]})


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


def test_the_reply_is_parsed_as_an_invalid_call() -> None:
    reply = malformed()
    assert reply.tool_calls == []
    assert [c["id"] for c in reply.invalid_tool_calls] == ["call_bad"]


def test_graph_sends_a_malformed_call_back_to_the_model(backend: Backend) -> None:
    model = ScriptedChatModel(
        script=[malformed(), ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("OK")],
        model_name="gpt-4o-mini",
    )
    agent = build_harnessed_agent(model, [search], envelope=Envelope(max_usd=1), backend=backend)
    config = {"configurable": {"thread_id": "bad-json"}}
    out = agent.invoke({"messages": [HumanMessage("find notes on storage")]}, config)

    first, retried = out["verdicts"][0], out["verdicts"][1]
    assert (first["tool_call_id"], first["ok"], first["action"]) == ("call_bad", False, "retry")
    assert "not valid JSON" in first["reasons"][0] and '{"query": "sto' in first["reasons"][0]
    assert (retried["ok"], retried["action"]) == (True, "ok")
    feedback = out["messages"][2]
    assert isinstance(feedback, ToolMessage) and feedback.tool_call_id == "call_bad"
    assert feedback.status == "error" and "not valid JSON" in str(feedback.content)
    assert "retry 1 of 2" in str(feedback.content)
    assert searched == ["storage"]
    assert out["outcome"] == {"status": "completed", "partial_result": "OK"}
    assert out["spend"]["usd"] > 0  # the budget saw both model calls
    assert unanswered_calls(out["messages"]) == []
    trace = build_trace(backend, "bad-json")
    assert ("verdict", "search: retry") in [(n.kind, n.name) for n in trace.decisions()]


async def test_graph_sends_a_malformed_call_back_to_the_model_async() -> None:
    model = ScriptedChatModel(
        script=[malformed(), ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("OK")]
    )
    agent = build_harnessed_agent(model, [search])
    out = await agent.ainvoke({"messages": [HumanMessage("find notes on storage")]})

    assert [(v["tool_call_id"], v["action"]) for v in out["verdicts"]] == [
        ("call_bad", "retry"),
        (out["messages"][3].tool_calls[0]["id"], "ok"),
    ]
    assert out["outcome"] == {"status": "completed", "partial_result": "OK"}
    assert unanswered_calls(out["messages"]) == []


def test_graph_fails_the_task_once_the_retries_are_spent() -> None:
    model = ScriptedChatModel(script=[malformed()], loop=True)
    agent = build_harnessed_agent(
        model, [search], contracts={"search": ToolContract(max_retries=1)}
    )
    out = agent.invoke({"messages": [HumanMessage("find notes on storage")]})

    assert [v["action"] for v in out["verdicts"]] == ["retry", "fail"]
    assert [v["attempt"] for v in out["verdicts"]] == [1, 2]
    assert out["outcome"]["status"] == "verification_failed"
    assert "search: the arguments are not valid JSON" in out["outcome"]["reason"]
    assert model.calls == 2 and searched == []
    assert unanswered_calls(out["messages"]) == []


def test_graph_runs_the_good_call_and_returns_the_malformed_sibling() -> None:
    both = AIMessage(
        "",
        additional_kwargs={
            "tool_calls": [
                {
                    "id": "call_ok",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"query": "a"}'},
                },
                {
                    "id": "call_bad",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"query": '},
                },
            ]
        },
    )
    model = ScriptedChatModel(
        script=[both, ai(tool_calls=[tool_call("search", {"query": "b"})]), ai("OK")]
    )
    out = build_harnessed_agent(model, [search]).invoke({"messages": [HumanMessage("a and b")]})

    assert searched == ["a", "b"]
    assert [(v["tool_call_id"], v["action"]) for v in out["verdicts"][:2]] == [
        ("call_bad", "retry"),
        ("call_ok", "ok"),
    ]
    assert out["outcome"] == {"status": "completed", "partial_result": "OK"}
    assert unanswered_calls(out["messages"]) == []


def test_graph_stops_before_the_good_call_when_the_malformed_one_fails() -> None:
    both = AIMessage(
        "",
        tool_calls=[tool_call("search", {"query": "a"}, id="call_ok")],
        invalid_tool_calls=[
            {
                "name": "search",
                "args": "{",
                "id": "call_bad",
                "error": None,
                "type": "invalid_tool_call",
            }
        ],
    )
    model = ScriptedChatModel(script=[both])
    agent = build_harnessed_agent(
        model, [search], contracts={"search": ToolContract(max_retries=0)}
    )
    out = agent.invoke({"messages": [HumanMessage("a")]})

    assert out["outcome"]["status"] == "verification_failed"
    assert searched == []  # the task stops: its sibling does not run either
    assert unanswered_calls(out["messages"]) == []


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
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_add_harness_sends_a_malformed_call_back_to_the_model(
    mode: str, review: dict[str, Any]
) -> None:
    model = ScriptedChatModel(
        script=[malformed(), ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("OK")]
    )
    app = app_with_harness(model, contracts={"search": ToolContract()}, **review)
    ask = {"messages": [HumanMessage("find notes on storage")]}
    out = app.invoke(ask) if mode == "invoke" else await app.ainvoke(ask)

    feedback = out["messages"][2]
    assert isinstance(feedback, ToolMessage) and feedback.tool_call_id == "call_bad"
    assert feedback.status == "error" and "not valid JSON" in str(feedback.content)
    assert searched == ["storage"]
    assert out["messages"][-1].content == "OK"
    assert unanswered_calls(out["messages"]) == []


def test_add_harness_stops_once_the_retries_on_a_malformed_call_are_spent() -> None:
    model = ScriptedChatModel(script=[malformed()], loop=True)
    app = app_with_harness(model, contracts={"search": ToolContract(max_retries=1)})
    out = app.invoke({"messages": [HumanMessage("find notes on storage")]})

    assert model.calls == 2 and searched == []
    assert out["messages"][-1].content.startswith("I stopped: a tool output failed")
    assert "not valid JSON" in str(out["messages"][-1].content)
    assert unanswered_calls(out["messages"]) == []


def test_add_harness_returns_the_malformed_sibling_of_a_good_call() -> None:
    both = AIMessage(
        "",
        tool_calls=[tool_call("search", {"query": "a"}, id="call_ok")],
        invalid_tool_calls=[
            {
                "name": "search",
                "args": "{",
                "id": "call_bad",
                "error": None,
                "type": "invalid_tool_call",
            }
        ],
    )
    model = ScriptedChatModel(
        script=[both, ai(tool_calls=[tool_call("search", {"query": "b"})]), ai("OK")]
    )
    out = app_with_harness(model).invoke({"messages": [HumanMessage("a and b")]})

    assert searched == ["a", "b"]
    assert out["messages"][-1].content == "OK"
    assert unanswered_calls(out["messages"]) == []


def create_agent_with(model: ScriptedChatModel, backend: Backend, **verify: Any) -> Any:
    middleware: list[Any] = [CostEnvelopeMiddleware(Envelope(max_usd=1), backend=backend)]
    if verify:
        middleware.append(VerifyToolOutputsMiddleware(verify["contracts"]))
    return create_agent(model, [search], middleware=middleware, checkpointer=backend.checkpointer)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_create_agent_sends_a_malformed_call_back_to_the_model(mode: str) -> None:
    model = ScriptedChatModel(
        script=[malformed(), ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("OK")],
        model_name="gpt-4o-mini",
    )
    with open_backend("memory://") as backend:
        agent = create_agent_with(model, backend, contracts=None)
        config = {"configurable": {"thread_id": "t1"}}
        ask = {"messages": [HumanMessage("find notes on storage")]}
        out = agent.invoke(ask, config) if mode == "invoke" else await agent.ainvoke(ask, config)

    assert [(v["tool_call_id"], v["action"]) for v in out["verdicts"]][0] == ("call_bad", "retry")
    assert isinstance(out["messages"][2], ToolMessage) and out["messages"][2].status == "error"
    assert searched == ["storage"]
    assert out["outcome"] == {"status": "completed", "partial_result": "OK"}
    assert unanswered_calls(out["messages"]) == []


def test_create_agent_fails_the_task_once_the_retries_are_spent() -> None:
    model = ScriptedChatModel(script=[malformed()], loop=True, model_name="gpt-4o-mini")
    with open_backend("memory://") as backend:
        agent = create_agent_with(model, backend, contracts={"search": ToolContract(max_retries=1)})
        out = agent.invoke(
            {"messages": [HumanMessage("find notes")]}, {"configurable": {"thread_id": "t1"}}
        )

    assert [v["action"] for v in out["verdicts"]] == ["retry", "fail"]
    assert out["outcome"]["status"] == "verification_failed"
    assert "not valid JSON" in out["outcome"]["reason"]
    assert model.calls == 2 and searched == []
    assert unanswered_calls(out["messages"]) == []


def test_cost_middleware_alone_does_not_call_a_malformed_reply_completed() -> None:
    model = ScriptedChatModel(script=[malformed()], model_name="gpt-4o-mini")
    with open_backend("memory://") as backend:
        agent = create_agent_with(model, backend)
        out = agent.invoke(
            {"messages": [HumanMessage("find notes")]}, {"configurable": {"thread_id": "t1"}}
        )

    assert out.get("outcome") is None


async def test_scripted_model_keeps_malformed_calls() -> None:
    reply = ScriptedChatModel(script=[malformed()]).invoke("hi")
    assert reply.tool_calls == [] and [c["id"] for c in reply.invalid_tool_calls] == ["call_bad"]
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    streaming = ScriptedChatModel(script=[malformed()], disable_streaming=False)
    assert [c["id"] for c in (await streaming.ainvoke("hi")).invalid_tool_calls] == ["call_bad"]


def test_add_harness_answers_a_malformed_call_after_a_conversation_given_as_input() -> None:
    # The conversation handed in ends on a tool's answer from before the harness (no verdict
    # on it); the model's next reply is malformed. The verify node answers that reply: the
    # tool message before it is history, not an output a tool node hid behind its own AI
    # message (which the node refuses with a UserError).
    # The script is indexed by the AI messages in the prompt: the first reply is history.
    model = ScriptedChatModel(script=[ai("unused"), malformed(), ai("OK")])
    app = app_with_harness(model, contracts={"search": ToolContract()})
    history: list[BaseMessage] = [
        HumanMessage("find notes on storage"),
        AIMessage("", tool_calls=[tool_call("search", {"query": "storage"}, id="call_old")]),
        ToolMessage('["note on storage"]', tool_call_id="call_old", name="search"),
    ]
    out = app.invoke({"messages": history})

    feedback = out["messages"][4]
    assert isinstance(feedback, ToolMessage) and feedback.tool_call_id == "call_bad"
    assert feedback.status == "error" and "not valid JSON" in str(feedback.content)
    assert out["messages"][-1].content == "OK"
    assert unanswered_calls(out["messages"]) == []
