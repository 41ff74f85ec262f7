"""A scripted chat model for tests, demos and benchmarks — no API key, no network.

`ScriptedChatModel` answers by **turn**: the n-th model call of a conversation (n = the
number of AI messages already in the prompt) gets ``script[n]``. So a graph resumed in a
new process after a crash gets exactly the answers it would have got — the script has no
hidden position to lose. Each answer carries a model name and ``usage_metadata`` (given, or
a deterministic estimate from the prompt's and answer's sizes), so budgets and traces see
realistic figures. Faults are injected deterministically by turn.

Example:
    ```python
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("get_weather", {"city": "Paris"})]),
            ai("It is sunny in Paris."),
        ],
        model_name="gpt-4o-mini",
    )
    first = model.invoke("What is the weather in Paris?")
    assert first.tool_calls[0]["name"] == "get_weather"
    assert first.usage_metadata is not None and first.usage_metadata["input_tokens"] > 0
    ```
"""

from __future__ import annotations

import json
import math
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCall
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from pydantic import ConfigDict, Field, PrivateAttr

from harness_nodes._langfuse_receiver import LangfuseReceiver, ReceivedSpan

__all__ = [
    "LangfuseReceiver",
    "ReceivedSpan",
    "ScriptExhausted",
    "ScriptedChatModel",
    "ai",
    "tool_call",
]

Reply = AIMessage | str | Callable[[list[BaseMessage]], AIMessage | str]
"""One scripted answer: a message, plain text, or a function of the prompt."""


class ScriptExhausted(RuntimeError):
    """The model was called more times than its script has turns (and ``loop`` is off)."""

    def __init__(self, turn: int, length: int) -> None:
        super().__init__(turn, length)
        self.turn = turn
        self.length = length

    def __str__(self) -> str:
        return (
            f"ScriptedChatModel was called for turn {self.turn} but its script has only "
            f"{self.length} turn(s); add turns or pass loop=True to repeat the last one"
        )


_AUTO_ID = "call_auto_"
"""Prefix of the ids `tool_call` invents; `ScriptedChatModel` replaces them by turn."""


def tool_call(name: str, args: dict[str, Any] | None = None, id: str | None = None) -> ToolCall:
    """Build a tool call for a scripted answer.

    Without an *id*, the call gets a placeholder id that `ScriptedChatModel` replaces with
    one derived from the turn (``call_t{turn}_{index}``): the same in every process, so a
    run resumed after a crash sees the ids it would have seen, and distinct across turns.

    Example:
        ```python
        from harness_nodes.testing import tool_call

        call = tool_call("refund", {"amount": 10}, id="call-1")
        assert call["id"] == "call-1" and call["args"] == {"amount": 10}
        ```
    """
    return ToolCall(
        name=name,
        args=dict(args or {}),
        id=id or f"{_AUTO_ID}{uuid.uuid4().hex[:12]}",
        type="tool_call",
    )


def ai(
    content: str = "",
    *,
    tool_calls: Sequence[ToolCall] = (),
    usage: Mapping[str, int] | None = None,
    response_metadata: Mapping[str, Any] | None = None,
) -> AIMessage:
    """Build a scripted AI answer, optionally with tool calls and explicit token usage.

    *response_metadata* is kept on the answer (`ScriptedChatModel` adds its model name and,
    unless given, a finish reason): ``{"finish_reason": "length"}`` scripts a reply the
    provider cut off at its output cap, ``{"stop_reason": "max_tokens"}`` Anthropic's.

    Example:
        ```python
        from harness_nodes.testing import ai

        msg = ai("done", usage={"input_tokens": 100, "output_tokens": 5})
        assert msg.usage_metadata == {"input_tokens": 100, "output_tokens": 5, "total_tokens": 105}
        ```
    """
    usage_metadata = None
    if usage is not None:
        inp, out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
        usage_metadata = UsageMetadata(input_tokens=inp, output_tokens=out, total_tokens=inp + out)
    return AIMessage(
        content=content,
        tool_calls=list(tool_calls),
        usage_metadata=usage_metadata,
        response_metadata=dict(response_metadata or {}),
    )


def _estimate_tokens(text: str) -> int:
    # ~4 bytes per token is the usual rule of thumb for English with BPE tokenizers.
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


def _prompt_text(messages: Sequence[BaseMessage]) -> str:
    parts: list[str] = []
    for m in messages:
        parts.append(m.text if isinstance(m.content, list) else str(m.content))
        if isinstance(m, AIMessage) and m.tool_calls:
            parts.append(json.dumps([dict(c) for c in m.tool_calls], default=str))
    return "\n".join(parts)


def _chunks(msg: AIMessage) -> Iterator[ChatGenerationChunk]:
    """Split an answer as a provider streams it.

    Its text word by word, each tool call as a chunk with its name and id and then its
    arguments in pieces, and a last chunk with the usage and the response metadata (model
    name, finish reason), which providers send once, at the end.
    """
    content = msg.content
    if isinstance(content, str):
        for word in re.split(r"(\s)", content):
            if word:
                yield ChatGenerationChunk(message=AIMessageChunk(content=word, id=msg.id))
    elif content:
        yield ChatGenerationChunk(message=AIMessageChunk(content=content, id=msg.id))
    for index, call in enumerate(msg.tool_calls):
        start = tool_call_chunk(name=call["name"], args="", id=call["id"], index=index)
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", id=msg.id, tool_call_chunks=[start])
        )
        for piece in re.split(r"(?<=,)", json.dumps(call["args"])):
            args = tool_call_chunk(args=piece, index=index)
            yield ChatGenerationChunk(
                message=AIMessageChunk(content="", id=msg.id, tool_call_chunks=[args])
            )
    for index, bad in enumerate(msg.invalid_tool_calls, start=len(msg.tool_calls)):
        # The raw arguments as sent. Aggregated, langchain-core parses them with
        # ``parse_partial_json``, which repairs JSON cut off mid-way (``{"query": "sto`` becomes
        # a valid call with ``query == "sto"``): only arguments it cannot repair stay in
        # ``invalid_tool_calls``. Script the provider's finish reason (``finish_reason:
        # "length"``) to say the reply was cut off.
        raw = tool_call_chunk(name=bad["name"], args=bad["args"] or "", id=bad["id"], index=index)
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", id=msg.id, tool_call_chunks=[raw])
        )
    yield ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            id=msg.id,
            usage_metadata=msg.usage_metadata,
            response_metadata=dict(msg.response_metadata),
            chunk_position="last",
        )
    )


class _Carried(Exception):
    """A fault that is not an `Exception` (a simulated crash), carried through ``agenerate``.

    langchain-core's ``agenerate`` gathers its calls with ``return_exceptions=True``, then
    reads ``.generations`` off every result that is not an ``Exception``: such a fault came out
    of ``ainvoke`` as ``AttributeError: ... has no attribute 'generations'`` (``invoke`` raises
    it as it is). Carried as an ``Exception``, it is raised as itself again past the gather.
    """

    def __init__(self, fault: BaseException) -> None:
        super().__init__(fault)
        self.fault = fault


def _answer(result: ChatResult) -> AIMessage:
    message = result.generations[0].message
    if not isinstance(message, AIMessage):  # a subclass's _generate answered something else
        raise TypeError(f"expected an AIMessage answer, got {type(message).__name__}")
    return message


class ScriptedChatModel(GenericFakeChatModel):
    """A deterministic chat model that plays a script, turn by turn.

    It subclasses LangChain's `GenericFakeChatModel`, binds tools (by ignoring them, so graphs
    that call ``bind_tools`` work), honours ``max_tokens`` (truncating its answer and its
    reported output tokens), and reports ``model_name`` in its response metadata. With
    ``disable_streaming=False`` it streams each answer as a provider does: the aggregated
    chunks carry the same text, tool calls, usage and metadata as the answer itself — except
    that langchain-core repairs an invalid call's arguments cut off mid-way into a valid call
    (as it does a provider's stream). A scripted ``response_metadata`` is kept (see `ai`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    __test__ = False  # not a pytest test class

    messages: Iterator[AIMessage | str] = Field(default_factory=lambda: iter(()))
    """Unused: the script is read by turn (kept for `GenericFakeChatModel` compatibility)."""
    script: list[Any] = Field(default_factory=list)
    """The answers, by turn: `AIMessage`, text, or a function of the prompt (see `Reply`).

    Typed ``Any`` because pydantic would otherwise try to coerce functions into messages."""
    model_name: str = "scripted"
    """Reported as the model that answered (``response_metadata["model_name"]``)."""
    loop: bool = False
    """Repeat the last turn forever (a runaway agent) instead of raising `ScriptExhausted`."""
    faults: dict[int, BaseException] = Field(default_factory=dict)
    """Turn → exception raised on the first ``fault_attempts`` calls for that turn."""
    fault_attempts: int = 1
    """How many attempts at a faulty turn fail before it answers normally."""
    max_tokens: int | None = None
    """Cap on output tokens; the answer is truncated to fit, as a provider would."""
    disable_streaming: bool | Any = True

    _attempts: dict[int, int] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        """Accept tools like a real model would; the script decides the calls."""
        return self

    @property
    def _llm_type(self) -> str:
        return "scripted-chat-model"

    @property
    def calls(self) -> int:
        """How many times this instance was called (all turns, faults included)."""
        return sum(self._attempts.values())

    def _turn(self, messages: Sequence[BaseMessage]) -> int:
        return sum(1 for m in messages if isinstance(m, AIMessage))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn = self._turn(messages)
        with self._lock:
            attempt = self._attempts.get(turn, 0) + 1
            self._attempts[turn] = attempt
        if turn in self.faults and attempt <= self.fault_attempts:
            raise self.faults[turn]
        if turn >= len(self.script):
            if not self.loop or not self.script:
                raise ScriptExhausted(turn, len(self.script))
            reply = self.script[-1]
        else:
            reply = self.script[turn]
        if callable(reply):
            reply = reply(list(messages))
        if isinstance(reply, str):
            msg = AIMessage(content=reply)
        elif isinstance(reply, AIMessage):
            msg = reply
        else:
            raise TypeError(f"script turn {turn} gave {type(reply).__name__}, not AIMessage/str")
        if msg.tool_calls:
            msg = msg.model_copy(
                update={
                    "tool_calls": [self._call_id(c, turn, i) for i, c in enumerate(msg.tool_calls)]
                }
            )
        finished = self._finish(msg, messages, kwargs)
        return ChatResult(generations=[ChatGeneration(message=finished)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        answer = _answer(self._generate(messages, stop=stop, run_manager=run_manager, **kwargs))
        for chunk in _chunks(answer):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        try:
            return await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)
        except BaseException as e:
            # Only a scripted fault: a cancellation must stay one.
            if isinstance(e, Exception) or all(e is not f for f in self.faults.values()):
                raise
            raise _Carried(e) from None

    async def agenerate(self, *args: Any, **kwargs: Any) -> LLMResult:
        """`BaseChatModel.agenerate`, a fault that is not an `Exception` raised as itself."""
        try:
            return await super().agenerate(*args, **kwargs)
        except _Carried as e:
            raise e.fault from None

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Through _agenerate, so a subclass that answers asynchronously streams that answer.
        try:
            result = await self._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)
        except _Carried as e:
            raise e.fault from None
        for chunk in _chunks(_answer(result)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _call_id(self, call: ToolCall, turn: int, index: int) -> ToolCall:
        call_id = call["id"] or ""
        if not call_id or call_id.startswith(_AUTO_ID):
            # Invented ids are derived from the turn, so they are the same in every process.
            return {**call, "id": f"call_t{turn}_{index}"}
        if turn >= len(self.script):
            # A looping script must not reuse one tool-call id, or the effect ledger would
            # (rightly) treat each new call as a replay of the first. Derived ids stay
            # deterministic, so a resumed run sees the same ids.
            return {**call, "id": f"{call_id}_t{turn}"}
        return call

    def _finish(
        self, msg: AIMessage, prompt: Sequence[BaseMessage], kwargs: Mapping[str, Any]
    ) -> AIMessage:
        cap = kwargs.get("max_tokens", self.max_tokens)
        content = msg.content
        usage = msg.usage_metadata
        if usage is None:
            inp = _estimate_tokens(_prompt_text(prompt))
            out_text = (content if isinstance(content, str) else json.dumps(content)) + json.dumps(
                [dict(c) for c in msg.tool_calls], default=str
            )
            usage = UsageMetadata(
                input_tokens=inp,
                output_tokens=_estimate_tokens(out_text),
                total_tokens=0,
            )
        out_tokens = usage["output_tokens"]
        # A malformed call (arguments that are not valid JSON) is still a call the provider
        # made: it stays, in ``invalid_tool_calls``, as langchain's parsers leave it.
        finish = msg.response_metadata.get("finish_reason") or (
            "tool_calls" if msg.tool_calls or msg.invalid_tool_calls else "stop"
        )
        capped = cap is not None and out_tokens > int(cap)
        if capped:
            out_tokens = int(cap)
            finish = "length"
            if isinstance(content, str):
                content = content[: max(0, int(cap) * 4)]
        usage = UsageMetadata(
            input_tokens=usage["input_tokens"],
            output_tokens=out_tokens,
            total_tokens=usage["input_tokens"] + out_tokens,
        )
        # Cut by its own cap, the answer loses its calls; a scripted "length" keeps them.
        tool_calls = [] if capped else list(msg.tool_calls)
        invalid = [] if capped else list(msg.invalid_tool_calls)
        return AIMessage(
            content=content,
            tool_calls=tool_calls,
            invalid_tool_calls=invalid,
            usage_metadata=usage,
            # The scripted metadata stays (a finish reason in a provider's words, as
            # ``stop_reason``); the model name is this model's.
            response_metadata={
                **msg.response_metadata,
                "model_name": self.model_name,
                "finish_reason": finish,
            },
            id=msg.id,
        )
