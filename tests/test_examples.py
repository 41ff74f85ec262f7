"""Every ```python block in the README and in public docstrings runs as written.

Covers the README and the docstrings of every public module, class, function and method in
`harness_nodes`, `checkpointers` and `graphs` ("one runnable example each" stays true, and
examples cannot drift from the code). Each block runs in a fresh namespace in a temp cwd.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import textwrap
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from checkpointers._spend import SpendLedger
from harness_nodes import Envelope
from tests.conftest import REPO_ROOT

PACKAGES = ("harness_nodes", "checkpointers", "graphs")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def _blocks(text: str) -> Iterator[tuple[int, str]]:
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        yield line, textwrap.dedent(m.group("body"))


def _public_modules() -> Iterator[ModuleType]:
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if any(part.startswith("_") for part in info.name.split(".")):
                continue
            yield importlib.import_module(info.name)


def _documented(module: ModuleType) -> Iterator[tuple[str, Any]]:
    yield module.__name__, module
    exported = set(getattr(module, "__all__", ()))
    for name, obj in vars(module).items():
        # Not a name one imports: pydantic files a parametrized generic it builds at module
        # level (`RunnableBinding[Any, Any]`, a base class) under its repr, in that module.
        if name.startswith("_") or not name.isidentifier():
            continue
        # Defined here, or re-exported from a private module (``checkpointers._url``).
        if name not in exported and getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) or inspect.ismethod(member):
                    yield f"{module.__name__}.{name}.{attr}", member


def _examples() -> Iterator[Any]:
    readme = REPO_ROOT / "README.md"
    for line, code in _blocks(readme.read_text()):
        yield pytest.param(code, id=f"README.md:{line}")
    seen: set[int] = set()
    for module in _public_modules():
        for qualname, obj in _documented(module):
            doc = inspect.getdoc(obj) if not isinstance(obj, ModuleType) else obj.__doc__
            if not doc or id(obj) in seen:
                continue
            seen.add(id(obj))
            if not isinstance(obj, ModuleType):  # name it where it is defined
                qualname = f"{obj.__module__}.{obj.__qualname__}"
            for i, (_, code) in enumerate(_blocks(doc)):
                yield pytest.param(code, id=qualname if i == 0 else f"{qualname}[{i}]")


EXAMPLES = list(_examples())


def test_examples_were_found() -> None:
    ids = {p.id for p in EXAMPLES}
    assert any(i.startswith("README.md:") for i in ids)
    for expected in ("checkpointers.backend.open_backend", "harness_nodes.testing"):
        assert expected in ids


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


class OtherWorker(BaseCallbackHandler):
    """Another worker spending on the README's task between the guard's edge and the call.

    Once the task has stepped down to gpt-4o-mini, as the agent node starts again (the edge
    has let it through; the wrapper has not reserved yet), it takes all but a few nano-dollars
    of what is left on the backend the example opened: the wrapper's reservation refuses.
    """

    raise_error = True  # a failure here fails the test, not a logged warning

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.degraded = False
        self.took_nanos = 0

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        for generation in (g for gs in response.generations for g in gs):
            if isinstance(generation, ChatGeneration):
                model = generation.message.response_metadata.get("model_name")
                self.degraded |= model == "gpt-4o-mini"

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        if kwargs.get("name") != "agent" or not self.degraded or self.took_nanos:
            return
        ledger = SpendLedger(self.namespace["backend"])
        limits = Envelope(max_usd=0.50).limits()  # the example's envelope
        assert limits.max_nanos is not None
        left = limits.max_nanos - ledger.totals("task-1", "default", limits).committed_nanos
        r = ledger.reserve("task-1", "default", "gpt-4o", 0, 0, left - 1000, limits)
        assert r.id is not None
        ledger.settle(r.id, 1000, 1000, left - 1000, model="gpt-4o")
        self.took_nanos = left - 1000


_OTHER_WORKER: ContextVar[OtherWorker | None] = ContextVar("other_worker", default=None)
register_configure_hook(_OTHER_WORKER, inheritable=True)  # joins every run while set


def test_readme_budget_example_ends_budget_exhausted_when_another_worker_takes_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wrapper answers the refused call with a flagged stop message; wired straight to END
    # (tools_condition) that left no outcome, no spend mirror and the README's asserts failing.
    readme = (REPO_ROOT / "README.md").read_text()
    (code,) = (c for _, c in _blocks(readme) if "BudgetGuard(llm)" in c and "runaway" in c)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__example__"}
    worker = OtherWorker(namespace)
    token = _OTHER_WORKER.set(worker)
    try:
        exec(compile(code, "<README budget example>", "exec"), namespace)  # its asserts hold
    finally:
        _OTHER_WORKER.reset(token)
    assert worker.took_nanos > 0
    out = namespace["out"]
    assert out["outcome"]["partial_result"]  # the task's result so far is kept
    refused = out["messages"][-2].additional_kwargs["harness"]["budget"]
    assert refused["stopped"]["limit"] == "usd" and refused["model"] is None  # the race happened


def test_the_readmes_async_example_runs_again_in_the_same_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader runs it twice: the second run reused the finished thread, whose next task
    # asked the one-answer scripted model again (ScriptExhausted).
    [code] = [
        p.values[0]
        for p in EXAMPLES
        if str(p.id).startswith("README.md:") and "aopen_backend(" in str(p.values[0])
    ]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        exec(compile(str(code), "<example>", "exec"), {"__name__": "__example__"})
