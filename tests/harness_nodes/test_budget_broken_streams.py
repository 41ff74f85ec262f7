"""A streamed answer that breaks after the provider started it keeps its reserved worst case.

The provider accepted the request (a 200) and was generating: it bills the prompt in full and
what it generated, whatever broke the stream afterwards. Checked against langchain-openai
1.7.4 (openai 3.57) and a loopback server speaking chat-completions SSE, through
``budgeted(...).stream``/``astream`` and a graph streamed with ``stream_mode="messages"``: a
malformed ``data:`` line raises ``json.JSONDecodeError``; an error event mid-stream raises
openai's bare ``APIError`` (no status, no response); a chunked body cut short raises
langchain-openai's ``OpenAIConnectionError`` over openai's ``APIConnectionError`` over the
client's ``RemoteProtocolError``; a chunk of a shape it cannot convert raises a bare
``TypeError``. Before, the error event and the bad chunk were released as free.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, MessagesState, StateGraph
from pydantic import SkipValidation

from checkpointers import AsyncBackend, Backend
from checkpointers._spend import aflush_pending, flush_pending
from harness_nodes import BudgetCallbackHandler, Envelope, budgeted
from tests.harness_nodes.test_budget import _SPEND_ROWS, NANOS, Events, _charged_at_worst_case

pytestmark = pytest.mark.anyio


class _APIError(Exception):
    """openai's ``APIError`` for an error event in the stream: the request, the event's
    ``error`` body, and no response (the 200 was already sent)."""

    def __init__(self, message: str, request: httpx.Request, body: object) -> None:
        super().__init__(message, request, body)
        self.request, self.body = request, body


class _ConnectionError(Exception):
    """openai's ``APIConnectionError`` (and langchain-openai's subclass over it)."""


_REQUEST = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def _malformed_chunk() -> Exception:
    return json.JSONDecodeError("Unterminated string starting at", '{"id": "c1", "choi', 13)


def _error_event() -> Exception:
    message = "The server had an error while processing your request."
    return _APIError(message, _REQUEST, {"message": message, "type": "server_error"})


def _cut_short() -> Exception:
    try:
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body "
            "(incomplete chunked read)",
            request=_REQUEST,
        )
    except httpx.RemoteProtocolError as e:
        try:
            raise _ConnectionError("Connection error.") from e
        except _ConnectionError as wrapped:
            return wrapped


def _unconvertible_chunk() -> Exception:
    return TypeError("string indices must be integers, not 'str'")  # "choices": "nope"


class _BrokenStream(GenericFakeChatModel):
    """Streams *sent* chunks of an answer, then raises *error()*, as the real stack does.

    The first chunk reports the prompt's usage, as a provider that sends it up front does
    (Anthropic's ``message_start``): the stream never reports the output's.
    """

    model_name: str = "gpt-4o"
    sent: int = 2
    error: SkipValidation[Callable[[], Exception]] = _malformed_chunk
    calls: int = 0

    def _chunks(self) -> Iterator[ChatGenerationChunk]:
        self.calls += 1
        for i in range(self.sent):
            usage = {"input_tokens": 9, "output_tokens": 0, "total_tokens": 9} if i == 0 else None
            yield ChatGenerationChunk(
                message=AIMessageChunk(content=f"w{i} ", usage_metadata=usage)  # type: ignore[arg-type]
            )

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks()
        raise self.error()

    async def _astream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks():
            yield chunk
        raise self.error()


@dataclass(frozen=True)
class _Break:
    error: Callable[[], Exception]
    raises: type[Exception]
    before: str | None
    """How the same error raised before any chunk is settled (today's classification)."""

    def model(self, sent: int = 2) -> _BrokenStream:
        return _BrokenStream(messages=iter([]), error=self.error, sent=sent)


_BREAKS = [
    pytest.param(
        _Break(_malformed_chunk, json.JSONDecodeError, "answer unreadable"), id="bad-json"
    ),
    pytest.param(_Break(_error_event, _APIError, None), id="error-event"),
    pytest.param(_Break(_cut_short, _ConnectionError, "timed out"), id="cut-short"),
    pytest.param(_Break(_unconvertible_chunk, TypeError, None), id="bad-chunk"),
]
_ENTRIES = ["stream", "graph-messages"]


def _graph(llm: Any, entry: str) -> Any:
    """A one-node graph calling *llm*: its ``stream`` added up, or ``invoke`` (the model then
    streams inside it when the graph is streamed with ``stream_mode="messages"``)."""

    def agent(state: MessagesState) -> dict[str, Any]:
        if entry == "stream":
            chunks = list(llm.stream(state["messages"]))
            return {"messages": [sum(chunks[1:], chunks[0])]}
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        if entry == "stream":
            chunks = [c async for c in llm.astream(state["messages"])]
            return {"messages": [sum(chunks[1:], chunks[0])]}
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", RunnableLambda(agent, aagent))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    return builder.compile()


def _config(thread_id: str, events: Events) -> Any:
    return {"configurable": {"thread_id": thread_id}, "callbacks": [events]}


@pytest.mark.parametrize("entry", _ENTRIES)
@pytest.mark.parametrize("brk", _BREAKS)
def test_a_stream_broken_after_its_first_chunk_keeps_its_worst_case(
    backend: Backend, brk: _Break, entry: str
) -> None:
    events = Events()
    llm = budgeted(brk.model(), envelope=Envelope(max_usd=0.05), backend=backend)
    streamed: list[Any] = []
    with pytest.raises(brk.raises):
        for part in _graph(llm, entry).stream(
            {"messages": [("user", "hi")]}, _config("broken", events), stream_mode="messages"
        ):
            streamed.append(part)
    assert streamed  # the answer had started when it broke
    flush_pending(backend)
    rows = backend.execute(_SPEND_ROWS, ("broken",))
    # Worst case, not the prompt's usage the first chunk reported: the output went unreported.
    assert _charged_at_worst_case(rows), rows
    assert llm.spend(_config("broken", events))["usd"] == int(rows[0]["cost_nanos"]) / NANOS > 0
    [settled] = events.of("budget.settle")
    assert settled["reason"] == f"stream broken ({brk.raises.__name__}): worst case kept"
    assert settled["usd"] == int(rows[0]["cost_nanos"]) / NANOS


@pytest.mark.parametrize("entry", _ENTRIES)
@pytest.mark.parametrize("brk", _BREAKS)
async def test_a_stream_broken_after_its_first_chunk_keeps_its_worst_case_async(
    abackend: AsyncBackend, brk: _Break, entry: str
) -> None:
    events = Events()
    llm = budgeted(brk.model(), envelope=Envelope(max_usd=0.05), backend=abackend)
    streamed: list[Any] = []
    with pytest.raises(brk.raises):
        async for part in _graph(llm, entry).astream(
            {"messages": [("user", "hi")]}, _config("broken", events), stream_mode="messages"
        ):
            streamed.append(part)
    assert streamed
    await aflush_pending(abackend)
    rows = await abackend.execute(_SPEND_ROWS, ("broken",))
    assert _charged_at_worst_case(rows), rows
    [settled] = events.of("budget.settle")
    assert settled["reason"] == f"stream broken ({brk.raises.__name__}): worst case kept"


@pytest.mark.parametrize("brk", _BREAKS)
async def test_a_stream_broken_before_its_first_chunk_is_settled_as_before(
    abackend: AsyncBackend, brk: _Break
) -> None:
    # Nothing streamed: the error alone tells (a bare TypeError or an error event with no
    # status is no evidence the provider answered).
    events = Events()
    llm = budgeted(brk.model(sent=0), envelope=Envelope(max_usd=0.05), backend=abackend)
    with pytest.raises(brk.raises):
        async for _ in _graph(llm, "stream").astream(
            {"messages": [("user", "hi")]}, _config("early", events), stream_mode="messages"
        ):
            pass
    await aflush_pending(abackend)
    rows = await abackend.execute(_SPEND_ROWS, ("early",))
    if brk.before is None:
        assert [r["state"] for r in rows] == ["released"]
        assert events.of("budget.settle") == []
    else:
        assert _charged_at_worst_case(rows), rows
        [settled] = events.of("budget.settle")
        assert settled["reason"].startswith(f"{brk.before} (")


def test_repeated_broken_streams_stop_the_task_at_its_envelope(backend: Backend) -> None:
    # A provider that breaks every stream with an error event after a few chunks: each call is
    # billed, yet the task retried without limit at $0.
    model = _Break(_error_event, _APIError, None).model()
    llm = budgeted(model, envelope=Envelope(max_usd=0.02, max_output_tokens=500), backend=backend)
    config: Any = {"configurable": {"thread_id": "flaky-stream"}}
    stopped = None
    for _ in range(30):
        try:
            chunks = list(llm.stream("hi", config))
        except _APIError:
            continue
        stopped = chunks[-1].additional_kwargs["harness"]["budget"]["stopped"]
        break
    assert stopped is not None and stopped["limit"] == "usd"
    assert model.calls < 10  # about $0.0055 booked per call
    assert 0.02 * 0.6 < llm.spend(config)["usd"] <= 0.02


async def test_repeated_broken_streams_stop_the_task_at_its_envelope_async(
    abackend: AsyncBackend,
) -> None:
    model = _Break(_unconvertible_chunk, TypeError, None).model()
    llm = budgeted(model, envelope=Envelope(max_usd=0.02, max_output_tokens=500), backend=abackend)
    config: Any = {"configurable": {"thread_id": "flaky-stream"}}
    stopped = None
    for _ in range(30):
        try:
            chunks = [c async for c in llm.astream("hi", config)]
        except TypeError:
            continue
        stopped = chunks[-1].additional_kwargs["harness"]["budget"]["stopped"]
        break
    assert stopped is not None and stopped["limit"] == "usd"
    assert model.calls < 10
    assert 0.02 * 0.6 < (await llm.aspend(config))["usd"] <= 0.02


@pytest.mark.parametrize(("sent", "charged"), [(2, True), (0, False)])
@pytest.mark.parametrize("brk", _BREAKS[1::2])  # the two released before any chunk
def test_an_unwrapped_stream_broken_after_its_first_chunk_is_recorded_at_its_worst_case(
    backend: Backend, brk: _Break, sent: int, charged: bool
) -> None:
    handler = BudgetCallbackHandler(backend)
    config: Any = {"callbacks": [handler], "metadata": {"thread_id": "raw-broken"}}
    with pytest.raises(brk.raises):
        for _ in brk.model(sent=sent).stream("summarise " * 100, config, max_tokens=300):
            pass
    flush_pending(backend)
    rows = backend.execute(
        "SELECT output_tokens, cost_nanos FROM harness_spend WHERE task_id = %s",
        ("raw-broken",),
    )
    if charged:
        assert len(rows) == 1 and rows[0]["output_tokens"] == 300 and rows[0]["cost_nanos"] > 0
    else:
        assert rows == [{"output_tokens": 0, "cost_nanos": 0}]
