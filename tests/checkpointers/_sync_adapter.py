"""Expose a sync LangGraph saver's methods under the async names the conformance suite calls.

The conformance suite only calls ``a*`` methods, and detects a capability by whether the
saver's class overrides the async method. `SqliteSaver` and `PostgresSaver` implement the
sync methods only (their ``a*`` methods raise or are the base defaults), so without this
adapter the suite would test nothing, or the async twins instead of what sync users run.

The adapter calls the sync method directly (no thread): it is the sync code path exactly.
Only capabilities the wrapped class really implements (overrides the sync method of
`BaseCheckpointSaver`) are exposed, so detection stays honest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)


def _overrides(saver: BaseCheckpointSaver[Any], method: str) -> bool:
    return getattr(type(saver), method) is not getattr(BaseCheckpointSaver, method)


class _SyncAsAsync(BaseCheckpointSaver[Any]):
    """Base capabilities: put, put_writes, get_tuple, list, delete_thread."""

    def __init__(self, inner: BaseCheckpointSaver[Any]) -> None:
        super().__init__(serde=inner.serde)
        self.inner = inner

    def get_next_version(self, current: Any, channel: None) -> Any:
        return self.inner.get_next_version(current, channel)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self.inner.put(config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self.inner.put_writes(config, writes, task_id, task_path)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self.inner.get_tuple(config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        for item in self.inner.list(config, filter=filter, before=before, limit=limit):
            yield item

    async def adelete_thread(self, thread_id: str) -> None:
        self.inner.delete_thread(thread_id)


class _WithPrune(_SyncAsAsync):
    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self.inner.prune(thread_ids, strategy=strategy)


class _WithDeleteForRuns(_SyncAsAsync):
    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        self.inner.delete_for_runs(run_ids)


class _WithCopyThread(_SyncAsAsync):
    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self.inner.copy_thread(source_thread_id, target_thread_id)


_EXTENSIONS = {
    "prune": _WithPrune,
    "delete_for_runs": _WithDeleteForRuns,
    "copy_thread": _WithCopyThread,
}


def sync_as_async(saver: BaseCheckpointSaver[Any]) -> BaseCheckpointSaver[Any]:
    """Wrap *saver* so its sync methods answer the async calls the suite makes."""
    bases = tuple(cls for name, cls in _EXTENSIONS.items() if _overrides(saver, name))
    cls = type(f"SyncAsAsync[{type(saver).__name__}]", bases or (_SyncAsAsync,), {})
    adapted: BaseCheckpointSaver[Any] = cls(saver)
    return adapted
