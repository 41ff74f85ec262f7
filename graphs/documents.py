"""Document-extraction pipeline: vendor, date, total and currency from a batch of documents.

Verification-heavy: the extraction service is the kind of tool that fails silently — an
empty record, an HTML error page returned with a 200, a negative total — and every field is
checked before the model builds on it. The batch (six documents) lives in
``graphs/data/documents``.

By default the agent is a scripted model (list the batch → extract every document in one
turn → report the records as JSON); any chat model works instead. Fault flags (`Faults`),
each on the first extraction of a different document: ``empty_results`` (doc-002 comes back
``{}``), ``embedded_error`` (doc-003 comes back as a 502 HTML page), ``out_of_range``
(doc-004's total comes back negative); also ``runaway``, ``crash_in`` / ``crash_at_turn``.

Example:
    ```python
    import json

    from langchain_core.messages import HumanMessage

    from graphs import documents

    graph = documents.build_graph()
    out = graph.invoke({"messages": [HumanMessage(documents.DEFAULT_TASK)]})
    records = json.loads(out["messages"][-1].text)
    assert {r["doc_id"]: r["total"] for r in records}["doc-003"] == 939.30
    ```
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolRuntime
from pydantic import BaseModel

from graphs._common import (
    Faults,
    as_json,
    attempt_of,
    call,
    calls_by_id,
    data_names,
    data_text,
    failed_calls,
    scripted_policy_model,
)
from harness_nodes import Envelope, ToolContract, build_harnessed_agent

__all__ = [
    "CONTRACTS",
    "DEFAULT_BUDGET_USD",
    "DEFAULT_TASK",
    "FIELDS",
    "SYSTEM_PROMPT",
    "TASK_TYPE",
    "Extracted",
    "build_graph",
    "graph",
    "make_tools",
    "scripted_model",
]

DEFAULT_BUDGET_USD = 0.05
"""The envelope's dollar limit when none is given (``harness run --budget``)."""

TASK_TYPE = "documents"
"""The task type: selects the envelope, tags traces, groups the report."""

DEFAULT_TASK = "Extract vendor, date, total and currency from every document in the batch."
"""The task ``harness demo`` and ``harness run documents`` use by default."""

SYSTEM_PROMPT = (
    "You extract structured fields from business documents. List the batch, call "
    "`extract_fields` for every document, then answer with a JSON list of the records."
)

FIELDS = ("vendor", "date", "total", "currency")
"""The fields extracted from each document."""

_FAULTY_DOC = {"empty_results": "doc-002", "embedded_error": "doc-003", "out_of_range": "doc-004"}


def _batch() -> dict[str, str]:
    return {n.removesuffix(".txt"): data_text("documents", n) for n in data_names("documents")}


def _extract(text: str) -> dict[str, Any]:
    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text, re.MULTILINE)
        return m.group(1).strip() if m else None

    total = grab(r"^Total:\s*([\d.,]+)")
    return {
        "vendor": grab(r"^Vendor:\s*(.+)$"),
        "date": grab(r"^Date:\s*(\d{4}-\d{2}-\d{2})"),
        "total": float(total.replace(",", "")) if total else None,
        "currency": grab(r"^Total:\s*[\d.,]+\s+([A-Z]{3})"),
    }


def make_tools(faults: Faults | Mapping[str, Any] | None = None) -> list[BaseTool]:
    """The extraction tools, with *faults* injected.

    Example:
        ```python
        from graphs import documents

        list_documents, extract_fields = documents.make_tools()
        assert extract_fields.invoke({"doc_id": "doc-001"})["vendor"] == "Northwind Office Supply"
        ```
    """
    flags = Faults.parse(faults)
    batch = _batch()

    @tool
    def list_documents() -> list[str]:
        """List the ids of the documents in the batch."""
        return sorted(batch)

    @tool
    def extract_fields(doc_id: str, runtime: ToolRuntime = None) -> Any:  # type: ignore[assignment]
        """Extract vendor, date, total and currency from one document."""
        messages: list[BaseMessage] = []
        if runtime is not None and isinstance(runtime.state, Mapping):
            messages = list(runtime.state.get("messages", []))
            flags.crash_once("extract_fields")
        first = bool(messages) and attempt_of(messages, "extract_fields", {"doc_id": doc_id}) == 1
        if first and flags.empty_results and doc_id == _FAULTY_DOC["empty_results"]:
            return {}
        if first and flags.embedded_error and doc_id == _FAULTY_DOC["embedded_error"]:
            return (
                "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway"
                "</h1><p>The OCR service is temporarily unavailable.</p></body></html>"
            )
        if doc_id not in batch:
            return {"error": f"no document {doc_id!r} in the batch"}
        record = {"doc_id": doc_id, **_extract(batch[doc_id])}
        if first and flags.out_of_range and doc_id == _FAULTY_DOC["out_of_range"]:
            record["total"] = -abs(float(record["total"] or 0))
        return record

    return [list_documents, extract_fields]


class Extracted(BaseModel):
    """One extracted record."""

    doc_id: str
    vendor: str
    date: str
    total: float
    currency: str


CONTRACTS = {
    "extract_fields": ToolContract(
        schema=Extracted,
        required=FIELDS,
        ranges={"total": (0, None)},
        checks=(lambda r: None if re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.date) else "bad date",),
        instructions="Extract the same document again.",
    ),
}
"""Every field present, a non-negative total, an ISO date: anything else is retried."""


def _policy(messages: list[BaseMessage]) -> AIMessage:
    retry = failed_calls(messages)
    if retry:
        return AIMessage(
            "Retrying the failed extractions.",
            tool_calls=[call(messages, c["name"], c["args"], i) for i, c in enumerate(retry)],
        )
    calls = calls_by_id(messages)
    answers = {
        m.tool_call_id: m for m in messages if isinstance(m, ToolMessage) and m.status != "error"
    }
    listed = [
        as_json(answers[i].content)
        for i, c in calls.items()
        if c["name"] == "list_documents" and i in answers
    ]
    if not listed:
        return AIMessage("Listing the batch.", tool_calls=[call(messages, "list_documents", {})])
    doc_ids = listed[-1] if isinstance(listed[-1], list) else []
    records: dict[str, Any] = {}
    for i, c in calls.items():
        if c["name"] == "extract_fields" and i in answers:
            records[c["args"].get("doc_id")] = as_json(answers[i].content)
    todo = [d for d in doc_ids if d not in records]
    if todo:
        return AIMessage(
            f"Extracting {len(todo)} documents.",
            tool_calls=[
                call(messages, "extract_fields", {"doc_id": d}, i) for i, d in enumerate(todo)
            ],
        )
    rows = []
    for d in doc_ids:
        rec = records[d]
        rows.append(
            {"doc_id": d, **{k: rec.get(k) for k in FIELDS}}
            if isinstance(rec, dict)
            else {"doc_id": d, "raw": rec}
        )
    return AIMessage(json.dumps(rows))


def scripted_model(faults: Faults | Mapping[str, Any] | None = None) -> BaseChatModel:
    """The default model: a scripted "gpt-4o-mini" that extracts the whole batch."""
    return scripted_policy_model(_policy, model_name="gpt-4o-mini", faults=Faults.parse(faults))


def build_graph(
    model: BaseChatModel | None = None,
    *,
    backend: Any = None,
    faults: Faults | Mapping[str, Any] | None = None,
    budget_usd: float | None = DEFAULT_BUDGET_USD,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Build the harnessed extraction agent.

    Args:
        model: Any chat model; defaults to the scripted one.
        backend: A `checkpointers.Backend` for checkpoints and ledgers (none: in-memory run),
            or an `AsyncBackend` to run the agent with ``ainvoke``/``astream``.
        faults: Fault-injection flags (`Faults` or a mapping).
        budget_usd: The task's dollar limit (outcome ``budget_exhausted`` when reached);
            ``None``: no cost envelope.
    """
    flags = Faults.parse(faults)
    return build_harnessed_agent(
        model or scripted_model(flags),
        make_tools(flags),
        envelope=Envelope(max_usd=budget_usd) if budget_usd is not None else None,
        task_type=TASK_TYPE,
        contracts=CONTRACTS,
        system_prompt=SYSTEM_PROMPT,
        backend=backend,
        name=TASK_TYPE,
    )


def build(backend: Any) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The factory `TaskRunner` and ``harness worker`` take: ``"graphs.documents:build"``.

    Batches are submitted as background tasks, one per batch key: a retried submission joins
    the running task instead of extracting the batch twice.

    Example:
        ```python
        from langchain_core.messages import HumanMessage

        from checkpointers import open_backend
        from graphs import documents
        from harness_nodes import TaskRunner

        with open_backend("memory://") as backend, TaskRunner(backend, documents.build) as runner:
            batch = {"messages": [HumanMessage(documents.DEFAULT_TASK)]}
            runner.submit("batch-2026-11", batch, task_type=documents.TASK_TYPE)
            runner.submit("batch-2026-11", batch, task_type=documents.TASK_TYPE)  # joins it
            assert runner.result("batch-2026-11", timeout=30)["status"] == "completed"
        ```
    """
    return build_graph(backend=backend)


graph = build_graph()
"""The default extraction agent, compiled for ``langgraph.json`` (the server adds persistence)."""
