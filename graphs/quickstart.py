"""The smallest harnessed agent: a scripted model that calls one tool, checkpointed durably.

``harness demo`` runs it on the embedded SQLite default. It works with any chat model:
``build_graph(init_chat_model("openai:gpt-4o-mini"))``.

Example:
    ```python
    from checkpointers import open_backend
    from graphs.quickstart import build_graph, run

    with open_backend("memory://") as backend:
        result = run(build_graph(), backend, thread_id="t-1")
        assert result["outcome"]["status"] == "completed"
    ```
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from checkpointers import Backend
from harness_nodes import HarnessState, Outcome
from harness_nodes.testing import ScriptedChatModel, ai, tool_call

__all__ = ["build_graph", "get_weather", "run", "scripted_model"]

CITY_WEATHER = {"paris": "sunny, 21°C", "london": "drizzle, 14°C", "tokyo": "clear, 18°C"}


@tool
def get_weather(city: str) -> str:
    """Return today's weather for a city."""
    return CITY_WEATHER.get(city.lower(), "unknown city")


def scripted_model() -> ScriptedChatModel:
    """The default model: asks for the weather in Paris, then answers from the tool."""
    return ScriptedChatModel(
        model_name="gpt-4o-mini",
        script=[
            ai(tool_calls=[tool_call("get_weather", {"city": "Paris"}, id="call-weather-1")]),
            lambda msgs: f"The weather in Paris today: {msgs[-1].content}.",
        ],
    )


def build_graph(model: BaseChatModel | None = None) -> StateGraph[HarnessState]:
    """Build the agent → tools → agent loop; ``finish`` records the outcome."""
    llm = (model or scripted_model()).bind_tools([get_weather])

    def agent(state: HarnessState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    def finish(state: HarnessState) -> dict[str, Any]:
        last = state["messages"][-1]
        outcome: Outcome = {"status": "completed", "partial_result": last.text}
        if isinstance(last, AIMessage) and last.invalid_tool_calls:
            # Arguments that were not valid JSON: no tool ran, so this is no answer.
            names = ", ".join(str(call.get("name")) for call in last.invalid_tool_calls)
            reason = f"the model's tool call had malformed arguments ({names})"
            outcome = {"status": "failed", "reason": reason, "partial_result": last.text}
        return {"outcome": outcome}

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([get_weather]))
    builder.add_node("finish", finish)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "finish"})
    builder.add_edge("tools", "agent")
    builder.add_edge("finish", END)
    return builder


def run(
    builder: StateGraph[HarnessState],
    backend: Backend,
    *,
    thread_id: str,
    question: str = "What is the weather in Paris?",
) -> dict[str, Any]:
    """Run the graph durably (``durability="sync"``) on *backend* and return its final state."""
    graph: CompiledStateGraph[Any, Any, Any, Any] = builder.compile(
        checkpointer=backend.checkpointer
    )
    config = {"configurable": {"thread_id": thread_id}}
    state: dict[str, Any] = graph.invoke(
        {"messages": [HumanMessage(question)], "task": {"task_id": thread_id}},
        config,
        durability="sync",
    )
    return state


def spend_of(state: dict[str, Any]) -> dict[str, Any]:
    """Tokens per model in a finished state (from the AI messages' usage metadata)."""
    by_model: dict[str, dict[str, int]] = {}
    for m in state["messages"]:
        if isinstance(m, AIMessage) and m.usage_metadata:
            name = str(m.response_metadata.get("model_name", "unknown"))
            agg = by_model.setdefault(name, {"input_tokens": 0, "output_tokens": 0, "calls": 0})
            agg["input_tokens"] += m.usage_metadata["input_tokens"]
            agg["output_tokens"] += m.usage_metadata["output_tokens"]
            agg["calls"] += 1
    return by_model
