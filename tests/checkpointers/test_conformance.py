"""The official checkpointer conformance suite, run on the savers `open_backend` returns.

Async backends are validated directly; sync backends through `sync_as_async`, which maps
the suite's async calls onto the saver's sync methods (the code path sync users run).
We assert `passed_all_base()`: `conformance_level()` says FULL vacuously for a saver whose
async methods are not overridden, because nothing is detected and nothing fails.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import BASE_CAPABILITIES
from langgraph.checkpoint.conformance.report import CapabilityReport

from checkpointers import aopen_backend, open_backend
from tests.checkpointers._sync_adapter import sync_as_async

pytestmark = pytest.mark.anyio


def _failures(report: CapabilityReport) -> dict[str, list[str]]:
    return {name: r.failures for name, r in report.results.items() if r.failures}


def _assert_base_conformance(report: CapabilityReport) -> None:
    base = {c.value for c in BASE_CAPABILITIES}
    # Every base capability must have been detected *and* run: a saver the suite cannot see
    # would otherwise "pass" by testing nothing.
    for name in base:
        result = report.results[name]
        assert result.detected, f"{report.checkpointer_name}: {name} not detected"
        assert result.tests_passed > 0, f"{report.checkpointer_name}: no {name} tests ran"
    assert report.passed_all_base(), _failures(report)


async def test_async_saver_passes_base_conformance(backend_url: str) -> None:
    async def factory() -> AsyncGenerator[BaseCheckpointSaver[Any], None]:
        backend = await aopen_backend(backend_url)
        try:
            yield backend.checkpointer
        finally:
            await backend.close()

    registered = checkpointer_test(name=f"aopen_backend[{backend_url.split(':')[0]}]")(factory)
    report = await validate(registered)
    _assert_base_conformance(report)
    # Extended capabilities the saver implements must pass too (none may fail silently).
    assert report.passed_all(), _failures(report)


async def test_sync_saver_passes_base_conformance(backend_url: str) -> None:
    async def factory() -> AsyncGenerator[BaseCheckpointSaver[Any], None]:
        backend = open_backend(backend_url)
        try:
            yield sync_as_async(backend.checkpointer)
        finally:
            backend.close()

    registered = checkpointer_test(name=f"open_backend[{backend_url.split(':')[0]}]")(factory)
    report = await validate(registered)
    _assert_base_conformance(report)
    assert report.passed_all(), _failures(report)
