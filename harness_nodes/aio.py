"""Async twins over an `AsyncBackend`: `AsyncEffectLedger` (and `AsyncTaskRunner`).

Example:
    ```python
    import asyncio

    from checkpointers import aopen_backend
    from harness_nodes.aio import AsyncEffectLedger


    async def main() -> None:
        async with await aopen_backend("memory://") as backend:
            ledger = AsyncEffectLedger(backend)

            async def send(ctx):
                return f"sent {ctx.idempotency_key}"

            first = await ledger.arun(send, name="email", thread_id="t", call_id="c1")
            again = await ledger.arun(send, name="email", thread_id="t", call_id="c1")
            assert first == again == "sent t:c1"


    asyncio.run(main())
    ```
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from langchain_core.messages import ToolMessage
from langgraph.errors import GraphBubbleUp

from harness_nodes import _codec
from harness_nodes._events import aemit
from harness_nodes.effects import (
    _ABORT,
    _FINISH,
    _RESOLVE,
    _SELECT,
    EffectContext,
    EffectRecord,
    EffectStatus,
    _abegin,
    _active,
    _Begin,
    _Call,
    _call_of,
    _error_text,
    _event,
    _list_query,
    _replay_result,
    _replayed,
    _resolution,
    _unknown_message,
    _with_effect_meta,
    effect_kind,
)
from harness_nodes.errors import UserError

if TYPE_CHECKING:
    from langgraph.prebuilt.tool_node import ToolCallRequest
    from langgraph.types import Command

    from checkpointers import AsyncBackend

__all__ = ["AsyncEffectLedger"]

T = TypeVar("T")


class AsyncEffectLedger:
    """The async `EffectLedger`, over an `AsyncBackend`; same guarantees, awaited.

    Pass ``awrap_tool_call=ledger.awrap_tool_call`` to the `ToolNode` of a graph run with
    ``ainvoke``.

    Args:
        backend: Where the ledger lives.
        on_unknown: ``"escalate"`` (default) or ``"raise"``, as in `EffectLedger`.
    """

    def __init__(
        self, backend: AsyncBackend, *, on_unknown: Literal["escalate", "raise"] = "escalate"
    ) -> None:
        from checkpointers import AsyncBackend

        if not isinstance(backend, AsyncBackend):
            raise UserError(
                f"AsyncEffectLedger needs a checkpointers.AsyncBackend, got "
                f"{type(backend).__name__}; for a Backend use harness_nodes.EffectLedger"
            )
        if on_unknown not in ("escalate", "raise"):
            raise UserError(f"on_unknown must be 'escalate' or 'raise', not {on_unknown!r}")
        self.backend = backend
        self.on_unknown = on_unknown

    def __repr__(self) -> str:
        return f"AsyncEffectLedger({self.backend!r}, on_unknown={self.on_unknown!r})"

    async def aget(self, thread_id: str, tool_call_id: str) -> EffectRecord | None:
        """The ledger row for one call, or ``None``."""
        rows = await self.backend.execute(_SELECT, (thread_id, tool_call_id))
        return EffectRecord.from_row(rows[0]) if rows else None

    async def alist(
        self, thread_id: str | None = None, *, status: EffectStatus | None = None
    ) -> list[EffectRecord]:
        """Ledger rows, oldest first, optionally for one thread and/or one status."""
        sql, params = _list_query(thread_id, status)
        return [EffectRecord.from_row(r) for r in await self.backend.execute(sql, params)]

    async def aresolve(
        self,
        thread_id: str,
        tool_call_id: str,
        *,
        happened: bool,
        result: Any = None,
        reviewer: str,
    ) -> EffectRecord:
        """Record a person's answer to an unknown outcome (see `EffectLedger.resolve`)."""
        lock = " FOR UPDATE" if self.backend.dialect == "postgres" else ""
        async with self.backend.transaction() as tx:
            rows = await tx.execute(_SELECT + lock, (thread_id, tool_call_id))
            status, encoded = _resolution(thread_id, tool_call_id, happened, result, rows)
            rows = await tx.execute(
                _RESOLVE, (status, encoded, time.time(), reviewer, thread_id, tool_call_id)
            )
        return EffectRecord.from_row(rows[0])

    async def arun(
        self,
        fn: Callable[[EffectContext], Awaitable[T]],
        *,
        name: str,
        thread_id: str,
        call_id: str,
        args: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> T:
        """Run ``await fn(context)`` at most once for ``(thread_id, call_id)``.

        Raises:
            EffectOutcomeUnknown: an earlier execution started and never recorded a result.
        """
        call = _Call(thread_id, call_id, name, dict(args or {}), idempotent)
        begin = await self._begin(call)
        if begin.unknown is not None:
            await aemit("effect.unknown", _event(call))
            raise begin.unknown
        if begin.replay is not None:
            await aemit("effect.replay", _event(begin.replay))
            return _replayed(begin.replay)  # type: ignore[no-any-return]
        assert begin.run is not None
        await aemit("effect.run", _event(begin.run))
        with _active(begin.run):
            try:
                value = await fn(begin.run)
            except GraphBubbleUp:
                await self._abort(call)
                raise
            except BaseException as e:
                await self._finish(call, "error", None, _error_text(e))
                raise
        await self._finish(call, "done", value, None)
        return value

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        execute: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """`ToolNode` hook (``awrap_tool_call=``): marked tools run through the ledger."""
        kind = effect_kind(request.tool)
        if kind is None:
            return await execute(request)
        call = _call_of(request, idempotent=kind == "idempotent")
        config = request.runtime.config
        begin = await self._begin(call)
        if begin.unknown is not None:
            await aemit("effect.unknown", _event(call), config)
            if self.on_unknown == "raise":
                raise begin.unknown
            return _unknown_message(begin.unknown)
        if begin.replay is not None:
            await aemit("effect.replay", _event(begin.replay), config)
            return _replay_result(begin.replay, call)
        assert begin.run is not None
        await aemit("effect.run", _event(begin.run), config)
        with _active(begin.run):
            try:
                out = await execute(request)
            except GraphBubbleUp:
                await self._abort(call)
                raise
            except BaseException as e:
                await self._finish(call, "error", None, _error_text(e))
                raise
        if isinstance(out, ToolMessage):
            out = _with_effect_meta(out, call.key, replayed=False)
        await self._finish(call, "done", out, None)
        return out

    async def _begin(self, call: _Call) -> _Begin:
        async with self.backend.transaction() as tx:
            return await _abegin(tx, self.backend.dialect, call)

    async def _finish(self, call: _Call, status: str, value: Any, error: str | None) -> None:
        encoded = None if value is None else _codec.encode(value)
        await self.backend.execute(
            _FINISH, (status, encoded, error, time.time(), call.thread_id, call.call_id)
        )

    async def _abort(self, call: _Call) -> None:
        await self.backend.execute(_ABORT, (time.time(), call.thread_id, call.call_id))
