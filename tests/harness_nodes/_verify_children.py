"""Child process for the verification crash test (run as ``python -m`` on this module).

``URL THREAD LOG CRASH``: run (or resume, when the thread has a checkpoint) a ReAct loop whose
tool keeps returning bad outputs, verification inside the tool node; with ``CRASH=1`` the
process SIGKILLs itself when the model is asked for its third turn (after two refused
outputs). Prints the verdicts and the last message as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from checkpointers import open_backend
from harness_nodes import ToolContract, VerificationStop, VerifyToolOutputs, route_after_verify
from harness_nodes.testing import ScriptedChatModel, ai, tool_call


def main(url: str, thread_id: str, log: str, crash: str) -> None:
    @tool
    def lookup(key: str) -> dict[str, Any]:
        """Look a key up."""
        with Path(log).open("a") as f:
            f.write(key + "\n")
        return {"status": "error", "error": f"no data for {key}"}

    def third_turn(messages: list[BaseMessage]) -> AIMessage:
        if crash == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return ai(tool_calls=[tool_call("lookup", {"key": "k3"}, id="c3")])

    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("lookup", {"key": "k1"}, id="c1")]),
            ai(tool_calls=[tool_call("lookup", {"key": "k2"}, id="c2")]),
            third_turn,
            ai("gave up"),
        ]
    )
    verify = VerifyToolOutputs({"lookup": ToolContract(max_retries=2)})
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([lookup], wrap_tool_call=verify.wrap_tool_call))
    builder.add_node("stop", VerificationStop())
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_conditional_edges(
        "tools",
        route_after_verify,
        {"ok": "agent", "retry": "agent", "escalate": END, "fail": "stop"},
    )
    builder.add_edge("stop", END)
    with open_backend(url) as backend:
        graph = builder.compile(checkpointer=backend.checkpointer)
        config = {"configurable": {"thread_id": thread_id}}
        resuming = graph.get_state(config).next != ()
        inputs = None if resuming else {"messages": [HumanMessage("look k up")]}
        out = graph.invoke(inputs, config, durability="sync")
    verdicts = [
        m.additional_kwargs["harness"]["verdict"]
        for m in out["messages"]
        if isinstance(m, ToolMessage) and "harness" in m.additional_kwargs
    ]
    print(
        json.dumps({"resumed": resuming, "verdicts": verdicts, "last": out["messages"][-1].content})
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
