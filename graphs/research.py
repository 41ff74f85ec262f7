"""Research agent: search, read and summarise a small corpus shipped with the package.

Budget-heavy: every document read grows the prompt, so each model call costs more than the
last — the graph to watch a cost envelope reserve, degrade to a cheaper model and stop.

The corpus (eight notes on grid energy storage) lives in ``graphs/data/research``. By
default the agent is a scripted model that searches, reads the top hits one by one and
summarises them; any chat model works instead (``build_graph(init_chat_model(...))``).

Fault flags (`Faults`): ``empty_results`` (the first search returns nothing),
``embedded_error`` (the first read returns a rate-limit page instead of the document),
``out_of_range`` (the first search reports relevance scores outside [0, 1]), ``runaway``
(the model never stops searching), ``crash_in`` / ``crash_at_turn``.

Example:
    ```python
    from langchain_core.messages import HumanMessage

    from graphs import research

    graph = research.build_graph(faults={"empty_results": True})
    out = graph.invoke({"messages": [HumanMessage(research.DEFAULT_TASK)]})
    assert out["verdicts"][0]["action"] == "retry"  # the empty search went back to the model
    assert "Lithium-ion" in out["outcome"]["partial_result"]
    ```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolRuntime

from graphs._common import (
    Faults,
    as_json,
    attempt_of,
    call,
    calls_by_id,
    data_names,
    data_text,
    failed_calls,
    first_human_text,
    scripted_policy_model,
)
from harness_nodes import Envelope, ToolContract, build_harnessed_agent

__all__ = [
    "CONTRACTS",
    "DEFAULT_BUDGET_USD",
    "DEFAULT_TASK",
    "SYSTEM_PROMPT",
    "TASK_TYPE",
    "build_graph",
    "graph",
    "make_tools",
    "scripted_models",
]

TASK_TYPE = "research"
"""The task type: selects the envelope, tags traces, groups the report."""

DEFAULT_TASK = "Compare the main grid energy storage technologies on cost, efficiency and duration."
"""The task ``harness demo`` and ``harness run research`` use by default."""

SYSTEM_PROMPT = (
    "You are a research assistant. Use `search` to find notes in the corpus, `read` to read "
    "the most relevant ones, then answer with a short summary that cites the notes you read."
)

DEFAULT_BUDGET_USD = 0.05
"""The research envelope's dollar limit when none is given (``harness run --budget``)."""

TOP_K = 4
"""How many hits a search returns (and the scripted model reads)."""

_WORD = re.compile(r"[a-z][a-z-]{2,}")
_STOP = {"the", "and", "for", "with", "how", "what", "main", "compare", "are", "which", "that"}


def _corpus() -> dict[str, str]:
    return {
        name.removesuffix(".md"): data_text("research", name) for name in data_names("research")
    }


def _title(text: str) -> str:
    return text.splitlines()[0].lstrip("# ").strip()


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def make_tools(faults: Faults | Mapping[str, Any] | None = None) -> list[BaseTool]:
    """The research tools, with *faults* injected.

    Example:
        ```python
        from graphs import research

        search, read = research.make_tools()
        hits = search.invoke({"query": "pumped hydro storage"})
        assert hits[0]["doc_id"] == "pumped-hydro"
        ```
    """
    flags = Faults.parse(faults)
    corpus = _corpus()

    def _messages(runtime: ToolRuntime | None) -> list[BaseMessage]:
        if runtime is None or not isinstance(runtime.state, Mapping):
            return []
        return list(runtime.state.get("messages", []))

    @tool
    def search(query: str, runtime: ToolRuntime = None) -> list[dict[str, Any]]:  # type: ignore[assignment]
        """Search the storage-technology notes; returns the best hits with relevance in [0, 1]."""
        messages = _messages(runtime)
        first = attempt_of(messages, "search", {"query": query}) == 1 and bool(messages)
        if flags.empty_results and first:
            return []
        wanted = _terms(query)
        hits: list[dict[str, Any]] = []
        for doc_id, text in corpus.items():
            body = _terms(text)
            title = _terms(_title(text))
            found = len(wanted & body) + len(wanted & title)
            if found:
                score = round(min(1.0, found / (2 * max(1, len(wanted))) + 0.25), 2)
                hits.append({"doc_id": doc_id, "title": _title(text), "score": score})
        hits.sort(key=lambda h: (-h["score"], h["doc_id"]))
        hits = hits[:TOP_K]
        if flags.out_of_range and first:
            hits = [{**h, "score": round(h["score"] * 100, 1)} for h in hits]
        if runtime is not None:
            flags.crash_once("search")
        return hits

    @tool
    def read(doc_id: str, runtime: ToolRuntime = None) -> str:  # type: ignore[assignment]
        """Read one note of the corpus by its ``doc_id``."""
        messages = _messages(runtime)
        if flags.embedded_error and bool(messages):
            reads = [c for c in calls_by_id(messages).values() if c["name"] == "read"]
            first_doc = reads[0]["args"].get("doc_id") if reads else doc_id
            if doc_id == first_doc and attempt_of(messages, "read", {"doc_id": doc_id}) == 1:
                return "429 Too Many Requests: rate limit exceeded, retry after 30 seconds."
        if runtime is not None:
            flags.crash_once("read")
        if doc_id not in corpus:
            return f"No note with doc_id {doc_id!r}."
        return corpus[doc_id]

    return [search, read]


def _scores_in_range(hits: Any) -> str | None:
    if not isinstance(hits, list):
        return f"expected a list of hits, got {type(hits).__name__}"
    bad = [h.get("score") for h in hits if not 0 <= float(h.get("score", -1)) <= 1]
    return f"relevance scores {bad} are outside [0, 1]" if bad else None


CONTRACTS = {
    "search": ToolContract(
        checks=(_scores_in_range,),
        instructions="Search again with the same or a broader query.",
    ),
    "read": ToolContract(instructions="Read the same note again."),
}
"""What good `search` and `read` outputs look like (empty hits, scores outside [0, 1], rate
limit pages are refused and retried)."""


def _summary(question: str, notes: list[str]) -> str:
    if not notes:
        return f"I could not find any notes about: {question}"
    lines = [f"Summary for: {question}", ""]
    for text in notes:
        body = " ".join(text.splitlines()[1:]).strip()
        sentences = re.split(r"(?<=\.)\s+", body)
        lines.append(f"- {_title(text)}: " + " ".join(sentences[:2]))
    lines += ["", f"Sources: {len(notes)} notes read."]
    return "\n".join(lines)


def _policy(faults: Faults) -> Any:
    def policy(messages: list[BaseMessage]) -> AIMessage:
        retry = failed_calls(messages)
        if retry:
            return AIMessage(
                "Retrying the failed call.",
                tool_calls=[call(messages, c["name"], c["args"], i) for i, c in enumerate(retry)],
            )
        question = first_human_text(messages)
        calls = calls_by_id(messages)
        answers = {
            m.tool_call_id: m
            for m in messages
            if isinstance(m, ToolMessage) and m.status != "error"
        }
        searches = [answers[i] for i, c in calls.items() if c["name"] == "search" and i in answers]
        if faults.runaway or not searches:
            n = len(searches)
            query = question if n == 0 else f"{question} (more sources, pass {n + 1})"
            return AIMessage(
                "Searching the notes.", tool_calls=[call(messages, "search", {"query": query})]
            )
        hits = as_json(searches[-1].content)
        hits = hits if isinstance(hits, list) else []
        read_docs = {
            calls[i]["args"].get("doc_id"): answers[i].text
            for i in calls
            if calls[i]["name"] == "read" and i in answers
        }
        for hit in hits:
            doc_id = hit.get("doc_id") if isinstance(hit, dict) else None
            if doc_id and doc_id not in read_docs:
                return AIMessage(
                    f"Reading {doc_id}.", tool_calls=[call(messages, "read", {"doc_id": doc_id})]
                )
        return AIMessage(_summary(question, list(read_docs.values())))

    return policy


def scripted_models(faults: Faults | Mapping[str, Any] | None = None) -> list[BaseChatModel]:
    """The default model ladder: a scripted "gpt-4o", then a scripted "gpt-4o-mini".

    Both play the same policy (search, read the top hits, summarise), so degrading to the
    cheaper one mid-task changes the price, not the plot.
    """
    flags = Faults.parse(faults)
    return [
        scripted_policy_model(_policy(flags), model_name=name, faults=flags)
        for name in ("gpt-4o", "gpt-4o-mini")
    ]


def build_graph(
    model: BaseChatModel | None = None,
    *,
    backend: Any = None,
    cheaper: BaseChatModel | None = None,
    faults: Faults | Mapping[str, Any] | None = None,
    budget_usd: float | None = DEFAULT_BUDGET_USD,
    **compile_kwargs: Any,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Build the harnessed research agent.

    Args:
        model: Any chat model; defaults to the scripted "gpt-4o".
        backend: A `checkpointers.Backend` for checkpoints and ledgers (none: in-memory run),
            or an `AsyncBackend` to run the agent with ``ainvoke``/``astream``.
        cheaper: The model to degrade to when the budget runs low; defaults to the
            scripted "gpt-4o-mini" when *model* is the default, else to *model* itself.
        faults: Fault-injection flags (`Faults` or a mapping).
        budget_usd: The task's dollar limit; the agent steps down to *cheaper* when the next
            call would not fit, and stops (outcome ``budget_exhausted``) when neither fits.
            ``None``: no cost envelope.
        **compile_kwargs: Passed on to `build_harnessed_agent` (e.g. ``checkpointer=None``).
    """
    flags = Faults.parse(faults)
    default, default_cheap = scripted_models(flags)
    primary = model or default
    fallback = cheaper or (default_cheap if model is None else None)
    ladder = [primary, fallback] if fallback is not None else [primary]
    envelope = None
    if budget_usd is not None:
        # Summaries are short: a 1k output cap keeps each call's worst case (what is
        # reserved before the call) close to what it really costs.
        envelope = Envelope(max_usd=budget_usd, max_output_tokens=1024)
    return build_harnessed_agent(
        ladder if envelope is not None else primary,
        make_tools(flags),
        envelope=envelope,
        contracts=CONTRACTS,
        system_prompt=SYSTEM_PROMPT,
        backend=backend,
        task_type=TASK_TYPE,
        name=TASK_TYPE,
        **compile_kwargs,
    )


graph = build_graph()
"""The default research agent, compiled for ``langgraph.json`` (the server adds persistence)."""
