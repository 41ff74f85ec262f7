"""Reference agent workflows built only from langgraph-harness's public names.

Each module exposes a builder and, where it makes sense, a module-level compiled ``graph``
that ``langgraph.json`` can serve.
"""
