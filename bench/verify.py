"""Verification overhead per tool call, as a ratio to the tool node's own time.

A typical contract: a ~2.5 KB JSON output checked against a pydantic schema, required fields,
a range and the default error signals. Figures measured in the same run (CPU time, so other
load on a shared machine stays out of them):

- ``tool node``: a bare ``ToolNode`` running the tool (a one-node graph, invoked per call);
- ``hook in graph``: the same graph with ``wrap_tool_call=verify.wrap_tool_call``, as the
  median of paired differences with the bare graph (noisy: two ~1.5 ms figures subtracted);
- ``hook alone``: ``verify.wrap_tool_call`` around an ``execute`` that returns the tool's
  message — everything verification adds inside the tool node, without the graph around it;
- ``node form``: the ``VerifyToolOutputs`` node on a state holding that output.

Target: verification < 0.2 ms per call. Run: ``python bench/verify.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from pydantic import BaseModel

from harness_nodes import ToolContract, VerifyToolOutputs


class Hit(BaseModel):
    id: str
    title: str
    url: str
    score: float
    snippet: str


class SearchResult(BaseModel):
    query: str
    total: int
    hits: list[Hit]


OUTPUT = {
    "query": "langgraph verification",
    "total": 12,
    "hits": [
        {
            "id": f"doc-{i}",
            "title": f"Result number {i} about tool output verification",
            "url": f"https://example.com/articles/{i}/tool-output-verification",
            "score": 0.9 - i * 0.05,
            "snippet": "Agents fail silently when a tool returns an empty list or an error "
            "object inside a successful response; check outputs at the boundary. ",
        }
        for i in range(8)
    ],
}
PAYLOAD = json.dumps(OUTPUT)


@tool
def search(query: str) -> str:
    """Search the corpus."""
    return PAYLOAD


CONTRACT = ToolContract(
    schema=SearchResult, required=("query", "hits"), ranges={"total": (0, 10_000)}
)
VERIFY = VerifyToolOutputs({"search": CONTRACT})
CALL = {"name": "search", "args": {"query": "q"}, "id": "c1", "type": "tool_call"}


def one_node_graph(node: ToolNode) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("tools", node)
    builder.add_edge(START, "tools")
    return builder.compile()


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    """CPU milliseconds per call over ``n`` calls (the whole process: ToolNode uses threads)."""
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1000


def main() -> None:
    bare = one_node_graph(ToolNode([search]))
    hooked = one_node_graph(ToolNode([search], wrap_tool_call=VERIFY.wrap_tool_call))
    history = [HumanMessage("q"), AIMessage("", tool_calls=[CALL], id="a")]
    inputs = {"messages": history}
    verdict = hooked.invoke(inputs)["messages"][-1].additional_kwargs["harness"]["verdict"]
    assert verdict["ok"], verdict  # the benchmark must measure the common (passing) path
    message = ToolMessage(PAYLOAD, tool_call_id="c1", name="search", id="t1")
    state = {"messages": [*history, message]}
    assert VERIFY(state)["verdicts"][0]["ok"]
    request = ToolCallRequest(tool_call=CALL, tool=search, state=inputs, runtime=None)  # type: ignore[arg-type]

    def run_bare() -> object:
        return bare.invoke(inputs)

    def run_hooked() -> object:
        return hooked.invoke(inputs)

    def run_hook_alone() -> object:
        return VERIFY.wrap_tool_call(request, lambda _: message)

    def run_node() -> object:
        return VERIFY(state)

    for fn in (run_bare, run_hooked, run_hook_alone, run_node):  # warm up
        cpu_ms(fn, 50)
    bare_ms, hooked_ms, diffs, alone_ms, node_ms = [], [], [], [], []
    for _ in range(40):  # interleaved rounds
        b, h = cpu_ms(run_bare, 25), cpu_ms(run_hooked, 25)
        bare_ms.append(b)
        hooked_ms.append(h)
        diffs.append(h - b)
        alone_ms.append(cpu_ms(run_hook_alone, 200))
        node_ms.append(cpu_ms(run_node, 200))
    tool_node = statistics.median(bare_ms)
    in_graph = statistics.median(diffs)
    alone = statistics.median(alone_ms)
    node = statistics.median(node_ms)

    print(
        f"output: {len(PAYLOAD)} bytes of JSON; "
        f"contract: {SearchResult.__name__} + required + range"
    )
    print(f"tool node alone (baseline)    {tool_node:7.3f} ms/call")
    print(f"tool node + verify hook       {statistics.median(hooked_ms):7.3f} ms/call")
    print(
        f"  hook in graph (paired diff) {in_graph:7.3f} ms/call  "
        f"= {in_graph / tool_node:.3f} x tool node (noise-dominated)"
    )
    print(
        f"  hook alone                  {alone:7.3f} ms/call  = {alone / tool_node:.3f} x tool node"
    )
    print(
        f"node form (VerifyToolOutputs) {node:7.3f} ms/call  = {node / tool_node:.3f} x tool node"
    )
    target = 0.2
    print(
        f"target: verification < {target} ms/call -> {'met' if alone < target else 'NOT met'} "
        f"(hook alone {alone:.3f} ms)"
    )


if __name__ == "__main__":
    main()
