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
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

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
        if name.startswith("_"):
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
