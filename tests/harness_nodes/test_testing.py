"""`harness_nodes.testing.ScriptedChatModel`: deterministic by turn, faults, limits, metadata."""

from __future__ import annotations

import pickle
import re
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import RetryPolicy

from harness_nodes.testing import ScriptedChatModel, ScriptExhausted, ai, tool_call

pytestmark = pytest.mark.anyio


def _script() -> list[Any]:
    return [
        ai(tool_calls=[tool_call("lookup", {"q": "a"}), tool_call("lookup", {"q": "b"})]),
        lambda msgs: f"saw {len(msgs)} messages",
        "bye",
    ]


def _conversation_after(first: AIMessage) -> list[BaseMessage]:
    return [
        HumanMessage("hi"),
        first,
        *(ToolMessage("ok", tool_call_id=c["id"] or "") for c in first.tool_calls),
    ]


def test_answers_by_turn_so_a_fresh_instance_resumes_where_the_conversation_is() -> None:
    model = ScriptedChatModel(script=_script())
    first = model.invoke([HumanMessage("hi")])
    assert [c["name"] for c in first.tool_calls] == ["lookup", "lookup"]
    history = _conversation_after(first)
    second = model.invoke(history)
    assert second.content == "saw 4 messages"

    # A crash loses the model object; a new one in a new process builds the script again.
    resumed = ScriptedChatModel(script=_script())
    again_first = resumed.invoke([HumanMessage("hi")])
    assert again_first.tool_calls == first.tool_calls  # same ids, not fresh random ones
    assert resumed.invoke(history).content == second.content
    assert resumed.invoke([*history, second, HumanMessage("thanks")]).content == "bye"


def test_invented_tool_call_ids_are_per_turn_and_distinct() -> None:
    model = ScriptedChatModel(script=_script())
    first = model.invoke([HumanMessage("hi")])
    assert [c["id"] for c in first.tool_calls] == ["call_t0_0", "call_t0_1"]


def test_explicit_tool_call_ids_are_kept() -> None:
    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("x", id="mine")])])
    assert model.invoke("go").tool_calls[0]["id"] == "mine"


def test_loop_repeats_the_last_turn_with_distinct_deterministic_ids() -> None:
    def run(model: ScriptedChatModel, turns: int) -> list[str]:
        msgs: list[BaseMessage] = [HumanMessage("go")]
        ids: list[str] = []
        for _ in range(turns):
            reply = model.invoke(msgs)
            call = reply.tool_calls[0]
            ids.append(call["id"] or "")
            msgs += [reply, ToolMessage("again", tool_call_id=call["id"] or "")]
        return ids

    script = [ai(tool_calls=[tool_call("poll", {}, id="poll-1")])]
    ids = run(ScriptedChatModel(script=script, loop=True), 4)
    assert ids == ["poll-1", "poll-1_t1", "poll-1_t2", "poll-1_t3"]
    assert run(ScriptedChatModel(script=script, loop=True), 4) == ids


def test_exhausted_script_raises_with_turn_and_length() -> None:
    model = ScriptedChatModel(script=["only"])
    assert model.invoke("a").content == "only"
    with pytest.raises(ScriptExhausted, match=re.escape("turn 1 but its script has only 1")) as e:
        model.invoke([HumanMessage("a"), AIMessage("only"), HumanMessage("b")])
    assert (e.value.turn, e.value.length) == (1, 1)
    clone = pickle.loads(pickle.dumps(e.value))
    assert (clone.turn, clone.length, str(clone)) == (1, 1, str(e.value))


def test_empty_script_is_exhausted_even_with_loop() -> None:
    with pytest.raises(ScriptExhausted):
        ScriptedChatModel(script=[], loop=True).invoke("a")


def test_faults_fail_the_first_attempts_of_their_turn_only() -> None:
    model = ScriptedChatModel(
        script=["zero", "one"], faults={1: TimeoutError("provider timeout")}, fault_attempts=2
    )
    assert model.invoke("a").content == "zero"  # turn 0 is unaffected
    prompt = [HumanMessage("a"), AIMessage("zero"), HumanMessage("b")]
    for _ in range(2):
        with pytest.raises(TimeoutError, match="provider timeout"):
            model.invoke(prompt)
    assert model.invoke(prompt).content == "one"
    assert model.invoke(prompt).content == "one"
    assert model.calls == 5


def test_faults_are_retried_by_a_langgraph_retry_policy() -> None:
    model = ScriptedChatModel(script=["recovered"], faults={0: ConnectionError("reset")})

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node(
        "agent",
        agent,
        retry_policy=RetryPolicy(max_attempts=2, initial_interval=0.0, jitter=False),
    )
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    out = builder.compile().invoke({"messages": [HumanMessage("hi")]})
    assert out["messages"][-1].content == "recovered"
    assert model.calls == 2


def test_max_tokens_truncates_like_a_provider() -> None:
    long = "word " * 200  # 1000 bytes, ~250 tokens
    capped = ScriptedChatModel(script=[long], max_tokens=10).invoke("go")
    assert capped.usage_metadata is not None
    assert capped.usage_metadata["output_tokens"] == 10
    assert len(capped.text) <= 40 and long.startswith(capped.text)
    assert capped.response_metadata["finish_reason"] == "length"

    # Per-call max_tokens (what a budget wrapper passes) wins, and cuts off tool calls.
    model = ScriptedChatModel(script=[ai(long, tool_calls=[tool_call("t")])])
    cut = model.invoke("go", max_tokens=5)
    assert cut.usage_metadata is not None and cut.usage_metadata["output_tokens"] == 5
    assert cut.tool_calls == []
    uncapped = model.invoke("go")
    assert uncapped.usage_metadata is not None and uncapped.usage_metadata["output_tokens"] > 200
    assert uncapped.response_metadata["finish_reason"] == "tool_calls"


def test_usage_and_model_name_are_reported() -> None:
    model = ScriptedChatModel(script=["short", ai("given", usage={"input_tokens": 7})])
    first = model.invoke("x" * 400)
    assert first.response_metadata["model_name"] == "scripted"
    usage = first.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] == 100  # 400 bytes / 4
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    second = model.invoke([HumanMessage("x"), first, HumanMessage("y")])
    assert second.usage_metadata == {"input_tokens": 7, "output_tokens": 0, "total_tokens": 7}
    named = ScriptedChatModel(script=["hi"], model_name="gpt-4o-mini").invoke("a")
    assert named.response_metadata["model_name"] == "gpt-4o-mini"


@tool
def lookup(q: str) -> str:
    """Look something up."""
    return f"result for {q}"


def test_bind_tools_works_in_a_tool_calling_graph() -> None:
    model = ScriptedChatModel(script=_script())
    bound = model.bind_tools([lookup])
    assert bound is model

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([lookup]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    out = builder.compile().invoke({"messages": [HumanMessage("hi")]})
    tool_results = [m.content for m in out["messages"] if isinstance(m, ToolMessage)]
    assert tool_results == ["result for a", "result for b"]
    assert out["messages"][-1].content == "saw 4 messages"


async def _streamed(model: ScriptedChatModel, prompt: Any, how: str, **kwargs: Any) -> AIMessage:
    chunks: list[AIMessageChunk] = []
    if how == "astream":
        chunks = [c async for c in model.astream(prompt, **kwargs)]
    else:
        chunks = list(model.stream(prompt, **kwargs))
    assert len(chunks) > 1  # it streams, not one chunk with the whole answer
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    return AIMessage(
        content=whole.content,
        tool_calls=whole.tool_calls,
        invalid_tool_calls=whole.invalid_tool_calls,
        usage_metadata=whole.usage_metadata,
        response_metadata=whole.response_metadata,
    )


@pytest.mark.parametrize("how", ["stream", "astream"])
@pytest.mark.parametrize(
    ("reply", "kwargs"),
    [
        pytest.param(ai("It is sunny in Paris."), {}, id="text"),
        pytest.param("an estimated answer", {}, id="estimated-usage"),
        pytest.param(
            ai(
                "Let me look.",
                tool_calls=[
                    tool_call("lookup", {"q": "a, b", "n": 2}),
                    tool_call("lookup", {}, id="mine"),
                ],
                usage={"input_tokens": 30, "output_tokens": 12},
            ),
            {},
            id="tool-calls",
        ),
        pytest.param(ai("word " * 200), {"max_tokens": 5}, id="truncated"),
    ],
)
async def test_a_streamed_answer_carries_what_the_invoked_one_does(
    reply: Any, kwargs: dict[str, Any], how: str
) -> None:
    def model() -> ScriptedChatModel:
        return ScriptedChatModel(script=[reply], model_name="gpt-4o-mini", disable_streaming=False)

    invoked = model().invoke("What is the weather in Paris?", **kwargs)
    streamed = await _streamed(model(), "What is the weather in Paris?", how, **kwargs)
    assert streamed.content == invoked.content
    assert streamed.tool_calls == invoked.tool_calls and streamed.invalid_tool_calls == []
    assert streamed.usage_metadata is not None
    assert streamed.usage_metadata == invoked.usage_metadata
    assert streamed.response_metadata["model_name"] == "gpt-4o-mini"
    assert streamed.response_metadata["finish_reason"] == invoked.response_metadata["finish_reason"]


class _Crash(BaseException):
    """A fault that is not an `Exception`, as `graphs.SimulatedCrash` (a dying process)."""


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "astream"])
async def test_a_crash_fault_is_raised_as_itself_under_every_call(mode: str) -> None:
    # langchain-core's agenerate turned a BaseException that is not an Exception into
    # "AttributeError: '_Crash' object has no attribute 'generations'" under ainvoke only.
    model = ScriptedChatModel(script=["zero", "one"], faults={1: _Crash("killed")})
    prompt = [HumanMessage("hi"), AIMessage("zero"), HumanMessage("again")]
    with pytest.raises(_Crash, match="killed"):
        if mode == "invoke":
            model.invoke(prompt)
        elif mode == "ainvoke":
            await model.ainvoke(prompt)
        else:
            async for _ in model.astream(prompt):
                pass
    assert (await model.ainvoke(prompt)).content == "one"  # once: the next attempt answers
    assert model.calls == 2
