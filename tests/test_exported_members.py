"""`__all__` lists exactly the public names of each package (after httpx's test)."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import checkpointers
import harness_nodes


@pytest.mark.parametrize("package", [harness_nodes, checkpointers], ids=lambda m: m.__name__)
def test_all_matches_public_names(package: ModuleType) -> None:
    public = {
        name
        for name, obj in vars(package).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert set(package.__all__) == public


def test_importing_checkpointers_does_not_import_drivers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, checkpointers, harness_nodes; "
        "assert 'psycopg' not in sys.modules, 'psycopg'; "
        "assert 'aiosqlite' not in sys.modules, 'aiosqlite'"
    )
    from tests.conftest import subprocess_env

    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())


@pytest.mark.parametrize("package", [harness_nodes, checkpointers], ids=lambda m: m.__name__)
def test_every_public_class_and_function_has_a_runnable_example(package: ModuleType) -> None:
    # tests/test_examples.py runs the blocks; this makes sure each public name has one.
    # Type aliases and constants cannot carry a docstring of their own and are not checked.
    missing = [
        name
        for name in package.__all__
        if (inspect.isclass(obj := getattr(package, name)) or inspect.isroutine(obj))
        and "```python" not in (inspect.getdoc(obj) or "")
    ]
    assert missing == []
