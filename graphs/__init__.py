"""Reference agent workflows built only from langgraph-harness's public names.

Each module (`research`, `support`, `documents`) exposes ``build_graph(model=None, *,
faults=...)``, a module-level compiled ``graph`` that ``langgraph.json`` serves,
``TASK_TYPE`` and ``DEFAULT_TASK``. Every graph runs with any chat model and, by default,
with a scripted model whose faults are switched on by `Faults` flags.
"""

from graphs._common import Faults, SimulatedCrash

__all__ = ["GRAPHS", "Faults", "SimulatedCrash"]

GRAPHS = ("research", "support", "documents")
"""The reference graphs, by module name."""
