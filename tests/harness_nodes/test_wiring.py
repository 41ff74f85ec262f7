"""One-call wiring and `add_harness` on an existing graph."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any, Literal

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, ToolNode, tools_condition
from langgraph.types import Command
from typing_extensions import TypedDict

from checkpointers import AsyncBackend, aopen_backend, open_backend
from checkpointers._spend import aflush_pending, flush_pending
from harness_nodes import (
    EffectLedger,
    HarnessState,
    ReviewPolicy,
    ToolContract,
    UserError,
    VerifyToolOutputs,
    add_harness,
    build_harnessed_agent,
    irreversible,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call


@tool
def lookup(key: str) -> dict[str, Any]:
    """Look a key up."""
    if key == "empty":
        return {}
    if key == "broken":
        return {"status": "failed", "error": "upstream 504"}
    return {"key": key, "value": 42}


def _model(*keys: str, answer: str = "Done.") -> ScriptedChatModel:
    script: list[Any] = [
        ai(tool_calls=[tool_call("lookup", {"key": k}, id=f"c{i}")]) for i, k in enumerate(keys)
    ]
    return ScriptedChatModel(script=[*script, ai(answer)])


def _checkpoints(graph: Any, thread: str) -> int:
    return len(list(graph.get_state_history({"configurable": {"thread_id": thread}})))


def _bare_loop(model: ScriptedChatModel) -> Any:
    llm = model.bind_tools([lookup])
    builder = StateGraph(HarnessState)
    builder.add_node("agent", lambda s: {"messages": [llm.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([lookup]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder


# --- build_harnessed_agent -----------------------------------------------------------------


def test_common_path_adds_no_superstep_to_the_bare_loop(backend_url: str) -> None:
    with open_backend(backend_url) as backend:
        bare = _bare_loop(_model("a", "b")).compile(checkpointer=backend.checkpointer)
        harnessed = build_harnessed_agent(
            _model("a", "b"), [lookup], contracts={"lookup": ToolContract()}, backend=backend
        )
        for graph, thread in ((bare, "bare"), (harnessed, "harnessed")):
            graph.invoke(
                {"messages": [HumanMessage("go")]},
                {"configurable": {"thread_id": thread}},
                durability="sync",
            )
        assert _checkpoints(harnessed, "harnessed") == _checkpoints(bare, "bare")
        state = harnessed.get_state({"configurable": {"thread_id": "harnessed"}}).values
    assert [v["action"] for v in state["verdicts"]] == ["ok", "ok"]
    assert state["outcome"] == {"status": "completed", "partial_result": "Done."}


def test_a_bad_output_goes_back_to_the_model_and_the_retry_succeeds() -> None:
    agent = build_harnessed_agent(_model("empty", "good"), [lookup])
    out = agent.invoke({"messages": [HumanMessage("go")]})
    refused = out["messages"][2]
    assert isinstance(refused, ToolMessage) and refused.status == "error"
    assert "rejected by verification" in refused.text
    assert [v["action"] for v in out["verdicts"]] == ["retry", "ok"]
    assert out["outcome"]["status"] == "completed"


def test_exhausted_retries_end_the_task_as_verification_failed() -> None:
    contracts = {"lookup": ToolContract(max_retries=1)}
    agent = build_harnessed_agent(_model("broken", "broken", "good"), [lookup], contracts=contracts)
    out = agent.invoke({"messages": [HumanMessage("go")]})
    assert out["outcome"]["status"] == "verification_failed"
    assert "upstream 504" in out["outcome"]["reason"]
    assert [v["action"] for v in out["verdicts"]] == ["retry", "fail"]


@tool
def lookup_and_go(key: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command[Any]:
    """Look a key up and hand the answer straight back to the model."""
    answer = ToolMessage('{"error": "upstream 503"}', tool_call_id=tool_call_id)
    return Command(update={"messages": [answer]}, goto="agent")


@pytest.mark.parametrize("retries", [0, 1], ids=["fail", "retry"])
def test_a_refused_output_of_a_tool_that_routes_itself_follows_the_verdict(retries: int) -> None:
    """A tool's ``Command(goto=...)`` named the next node past the verdict: on ``fail`` the
    model ran on, and the task ended ``completed``. A refused output now goes where the
    verdict sends it."""
    model = ScriptedChatModel(
        script=[
            *[ai(tool_calls=[tool_call("lookup_and_go", {"key": "k"})])] * (retries + 1),
            ai("All fine."),
        ]
    )
    contracts = {"lookup_and_go": ToolContract(max_retries=retries)}
    agent = build_harnessed_agent(model, [lookup_and_go], contracts=contracts)
    out = agent.invoke({"messages": [HumanMessage("go")]})
    assert [v["action"] for v in out["verdicts"]] == [*["retry"] * retries, "fail"]
    assert out["outcome"]["status"] == "verification_failed"
    assert not any(m.text == "All fine." for m in out["messages"])


def test_a_state_schema_without_messages_is_refused_up_front() -> None:
    """It built, then failed in the tool node with LangGraph's "No message found in input"."""
    with pytest.raises(UserError, match=re.escape("state_schema ChatState has no 'messages'")):
        build_harnessed_agent(_model("a"), [lookup], state_schema=ChatState)


def test_system_prompt_reaches_the_model_but_not_the_state() -> None:
    seen: list[list[AnyMessage]] = []

    def answer(messages: list[AnyMessage]) -> Any:
        seen.append(messages)
        return ai("ok")

    agent = build_harnessed_agent(
        ScriptedChatModel(script=[answer]), [lookup], system_prompt="Be careful."
    )
    out = agent.invoke({"messages": [HumanMessage("go")]})
    assert isinstance(seen[0][0], SystemMessage) and seen[0][0].content == "Be careful."
    assert not any(isinstance(m, SystemMessage) for m in out["messages"])


@pytest.mark.parametrize(
    ("first", "second"),
    [("ok", "empty"), ("empty", "ok")],
    ids=["completed-then-stopped", "stopped-then-completed"],
)
def test_a_new_task_on_a_finished_thread_gets_its_own_outcome(first: str, second: str) -> None:
    # A second question in the same conversation: its outcome, not the first task's.
    script: list[Any] = []
    for n, key in enumerate((first, second)):
        script += [ai(tool_calls=[tool_call("lookup", {"key": key}, id=f"t{n}")]), ai(f"a{n}")]
    model = ScriptedChatModel(script=script)
    graph = build_harnessed_agent(
        model,
        [lookup],
        contracts={"lookup": ToolContract(max_retries=0)},
        checkpointer=InMemorySaver(),
    )
    cfg = {"configurable": {"thread_id": "chat"}}
    expected = {"ok": "completed", "empty": "verification_failed"}
    for key in (first, second):
        out = graph.invoke({"messages": [HumanMessage(f"look up {key}")]}, cfg)
        assert out["outcome"]["status"] == expected[key], out["outcome"]


def test_a_new_task_stopped_by_the_budget_at_its_start_reports_that() -> None:
    from harness_nodes import Envelope

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("lookup", {"key": "a"})]), ai("Done.")],
        model_name="gpt-4o-mini",
    )
    agent = build_harnessed_agent(
        model, [lookup], envelope=Envelope(max_calls=2), checkpointer=InMemorySaver()
    )
    cfg = {"configurable": {"thread_id": "chat"}}
    assert agent.invoke({"messages": [HumanMessage("one")]}, cfg)["outcome"]["status"] == (
        "completed"
    )
    out = agent.invoke({"messages": [HumanMessage("two")]}, cfg)  # the thread's budget is spent
    assert out["outcome"]["status"] == "budget_exhausted", out["outcome"]


def test_contract_for_a_tool_the_agent_lacks_is_a_wiring_error() -> None:
    with pytest.raises(UserError, match="contracts name tools the agent does not have: serch"):
        build_harnessed_agent(_model(), [lookup], contracts={"serch": ToolContract()})
    with pytest.raises(UserError, match="contracts must map tool names to ToolContract"):
        build_harnessed_agent(_model(), [lookup], contracts=[ToolContract()])  # type: ignore[arg-type]


def test_resumes_after_a_model_crash_with_verdicts_kept(backend_url: str) -> None:
    model = _model("empty", "good")
    model.faults[2] = RuntimeError("provider down")
    with open_backend(backend_url) as backend:
        agent = build_harnessed_agent(model, [lookup], backend=backend)
        config = {"configurable": {"thread_id": "t-crash"}}
        with pytest.raises(RuntimeError, match="provider down"):
            agent.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
        out = agent.invoke(None, config, durability="sync")
    assert [v["action"] for v in out["verdicts"]] == ["retry", "ok"]
    assert out["outcome"]["status"] == "completed"


# --- add_harness on a ReAct loop written the way LangGraph's docs write one ---------------

tools = [lookup]
tools_by_name = {t.name: t for t in tools}


def _docs_react_loop(model: ScriptedChatModel) -> StateGraph[MessagesState]:
    """LangGraph's quickstart agent: llm_call, a hand-written tool_node, should_continue."""
    model_with_tools = model.bind_tools(tools)

    def llm_call(state: MessagesState) -> dict[str, Any]:
        return {
            "messages": [
                model_with_tools.invoke(
                    [SystemMessage(content="You are a helpful assistant."), *state["messages"]]
                )
            ]
        }

    def tool_node(state: dict[str, Any]) -> dict[str, Any]:
        result = []
        for call in state["messages"][-1].tool_calls:
            t = tools_by_name[call["name"]]
            observation = t.invoke(call["args"])
            result.append(ToolMessage(content=observation, tool_call_id=call["id"]))
        return {"messages": result}

    def should_continue(state: MessagesState) -> Literal["tool_node", "__end__"]:
        last_message = state["messages"][-1]
        if getattr(last_message, "tool_calls", None):
            return "tool_node"
        return END

    agent_builder = StateGraph(MessagesState)
    agent_builder.add_node("llm_call", llm_call)
    agent_builder.add_node("tool_node", tool_node)
    agent_builder.add_edge(START, "llm_call")
    agent_builder.add_conditional_edges("llm_call", should_continue, ["tool_node", END])
    agent_builder.add_edge("tool_node", "llm_call")
    return agent_builder


def test_add_harness_leaves_a_good_run_unchanged() -> None:
    plain = _docs_react_loop(_model("a")).compile().invoke({"messages": [HumanMessage("go")]})
    builder = add_harness(
        _docs_react_loop(_model("a")), model_node="llm_call", tools_node="tool_node"
    )
    out = builder.compile().invoke({"messages": [HumanMessage("go")]})
    assert [m.content for m in out["messages"]] == [m.content for m in plain["messages"]]
    assert out["messages"][2].additional_kwargs["harness"]["verdict"]["action"] == "ok"


def test_add_harness_sends_a_silent_failure_back_to_the_users_model_node() -> None:
    builder = add_harness(
        _docs_react_loop(_model("empty", "good", answer="Value is 42.")),
        model_node="llm_call",
        tools_node="tool_node",
        contracts={"lookup": ToolContract()},
    )
    out = builder.compile().invoke({"messages": [HumanMessage("go")]})
    verdicts = [m.additional_kwargs["harness"]["verdict"] for m in out["messages"][2::2][:2]]
    assert [v["action"] for v in verdicts] == ["retry", "ok"]
    assert verdicts[0]["reasons"][0].startswith("empty result")
    assert out["messages"][-1].content == "Value is 42."


def test_add_harness_stops_the_task_when_retries_are_exhausted() -> None:
    builder = add_harness(
        _docs_react_loop(_model("empty", "empty")),
        model_node="llm_call",
        tools_node="tool_node",
        contracts={"lookup": ToolContract(max_retries=1)},
    )
    out = builder.compile().invoke({"messages": [HumanMessage("go")]})
    assert out["messages"][-1].content.startswith("I stopped: a tool output failed verification")
    outcome = out["messages"][-1].additional_kwargs["harness"]["outcome"]
    assert outcome["status"] == "verification_failed"


def test_add_harness_without_review_says_an_escalation_found_no_reviewer() -> None:
    builder = add_harness(
        _docs_react_loop(_model("broken")),
        model_node="llm_call",
        tools_node="tool_node",
        contracts={"lookup": ToolContract(on_fail="escalate")},
    )
    out = builder.compile().invoke({"messages": [HumanMessage("go")]})
    verdict = out["messages"][2].additional_kwargs["harness"]["verdict"]
    assert verdict["action"] == "escalate"
    reason = "lookup: " + "; ".join(verdict["reasons"])
    assert out["messages"][-1].content == (
        "I stopped: a tool output failed verification and needs a person, "
        f"but no human review is set up. {reason}"
    )


def test_add_harness_keeps_the_users_node_objects() -> None:
    builder = _docs_react_loop(_model("a"))
    before = {name: spec.runnable for name, spec in builder.nodes.items()}
    add_harness(builder, model_node="llm_call", tools_node="tool_node")
    assert all(builder.nodes[name].runnable is r for name, r in before.items())
    assert ("tool_node", "verify") in builder.edges and (
        "tool_node",
        "llm_call",
    ) not in builder.edges


def test_add_harness_works_with_a_richer_state() -> None:
    class State(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]
        notes: str

    model = _model("empty", "good").bind_tools(tools)
    builder = StateGraph(State)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    graph = add_harness(builder, model_node="agent", tools_node="tools").compile()
    out = graph.invoke({"messages": [HumanMessage("go")], "notes": "kept"})
    assert out["notes"] == "kept" and out["messages"][-1].content == "Done."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {"model_node": "agent", "tools_node": "tool_node"},
            "model_node='agent' is not a node of this graph",
            id="missing-model-node",
        ),
        pytest.param(
            {"model_node": "llm_call", "tools_node": "llm_call"},
            "'llm_call' must leave by exactly one plain edge",
            id="tools-node-branches",
        ),
        pytest.param(
            {"model_node": "llm_call", "tools_node": "tool_node", "verify_node": "llm_call"},
            "already has a node named 'llm_call'",
            id="name-clash",
        ),
        pytest.param(
            {
                "model_node": "llm_call",
                "tools_node": "tool_node",
                "tools": tools,
                "contracts": {"lookpu": ToolContract(required=("id",))},
            },
            "contracts name tools the graph does not have: lookpu",
            id="contract-typo",
        ),
    ],
)
def test_add_harness_wiring_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        add_harness(_docs_react_loop(_model()), **kwargs)


class ChatState(TypedDict):
    chat: Annotated[list[AnyMessage], add_messages]


def test_add_harness_refuses_a_state_whose_messages_are_not_under_messages() -> None:
    """Its nodes read the conversation from ``messages``: on a state that keeps it under
    another key they saw no tool output at all, and a failed one reached the model as data."""
    model = _model("broken")
    builder = StateGraph(ChatState)
    builder.add_node("agent", lambda s: {"chat": [model.invoke(s["chat"])]})
    builder.add_node("tools", ToolNode([lookup], messages_key="chat"))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", lambda s: tools_condition(s, messages_key="chat"))
    builder.add_edge("tools", "agent")
    with pytest.raises(UserError, match=re.escape("keeps its messages under 'chat'")):
        add_harness(builder, model_node="agent", tools_node="tools")


def test_add_harness_refuses_a_tools_node_that_hides_its_outputs_behind_an_ai_message() -> None:
    """A tools subgraph that sums up with an AI message of its own: the verify node checked
    the messages after the last AI message — none — and the failed output reached the model."""
    sub = StateGraph(MessagesState)
    sub.add_node("run", ToolNode([lookup]))
    sub.add_node("sum_up", lambda s: {"messages": [AIMessage("(the results, summed up)")]})
    sub.add_edge(START, "run")
    sub.add_edge("run", "sum_up")
    builder = StateGraph(MessagesState)
    model = _model("broken")
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", sub.compile())
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    graph = add_harness(builder, model_node="agent", tools_node="tools", tools=[lookup]).compile()
    with pytest.raises(UserError, match=re.escape("outputs of lookup are followed by an AI")):
        graph.invoke({"messages": [HumanMessage("go")]})


def test_add_harness_checks_a_function_tool_nodes_contracts_against_the_tools_given() -> None:
    """A function tool node has no tool list: the names are checked against ``tools=`` only
    (with none, as the docstring says, they cannot be)."""
    contracts = {"lookpu": ToolContract()}
    with pytest.raises(UserError, match=re.escape("does not have: lookpu (tools: lookup)")):
        add_harness(
            _docs_react_loop(_model()),
            model_node="llm_call",
            tools_node="tool_node",
            contracts=contracts,
            tools=tools,
        )
    unchecked = add_harness(
        _docs_react_loop(_model()),
        model_node="llm_call",
        tools_node="tool_node",
        contracts=contracts,
    )
    assert "verify" in unchecked.nodes


def test_add_harness_knows_the_tools_of_a_tool_node() -> None:
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": []})
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    nodes = set(builder.nodes)
    with pytest.raises(UserError, match=r"does not have: lookpu \(tools: lookup\)"):
        add_harness(
            builder, model_node="agent", tools_node="tools", contracts={"lookpu": ToolContract()}
        )
    assert set(builder.nodes) == nodes  # refused before the graph was changed
    add_harness(
        builder, model_node="agent", tools_node="tools", contracts={"lookup": ToolContract()}
    )
    assert set(builder.nodes) > nodes


# --- effects -------------------------------------------------------------------------------


def _refund_tool(log: list[str]) -> Any:
    from harness_nodes import current_effect, irreversible

    @irreversible
    @tool
    def refund(order: str) -> dict[str, Any]:
        """Refund an order."""
        log.append(current_effect().idempotency_key)
        return {"refund_id": f"r-{len(log)}", "order": order}

    return refund


def test_effectful_tools_without_a_backend_are_a_wiring_error() -> None:
    with pytest.raises(UserError, match="tools refund have side effects"):
        build_harnessed_agent(_model(), [lookup, _refund_tool([])])


def test_an_irreversible_call_runs_once_when_its_turn_is_replayed(backend_url: str) -> None:
    log: list[str] = []
    refund = _refund_tool(log)
    calls = [
        tool_call("refund", {"order": "A1"}, id="r1"),
        tool_call("lookup", {"key": "x"}, id="l1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Refunded.")])
    crashed: list[bool] = []

    @tool
    def lookup(key: str) -> dict[str, Any]:
        """Look a key up."""
        import time

        time.sleep(0.05)
        if not crashed:
            crashed.append(True)
            raise KeyboardInterrupt  # the process "dies" while the refund has already run
        return {"key": key}

    with open_backend(backend_url) as backend:
        agent = build_harnessed_agent(model, [refund, lookup], backend=backend)
        config = {"configurable": {"thread_id": "t-effects"}}
        with pytest.raises(KeyboardInterrupt):
            agent.invoke({"messages": [HumanMessage("refund A1")]}, config, durability="sync")
        assert log == ["t-effects:r1"]
        out = agent.invoke(None, config, durability="sync")
    assert log == ["t-effects:r1"]  # replayed, not run again
    assert out["outcome"]["status"] == "completed"
    refund_msg = next(
        m for m in out["messages"] if isinstance(m, ToolMessage) and m.name == "refund"
    )
    assert refund_msg.additional_kwargs["harness"]["effect"]["replayed"] is True


# --- review --------------------------------------------------------------------------------


@tool
def transfer(amount: int) -> dict[str, Any]:
    """Transfer money."""
    return {"transfer_id": "tr-1", "amount": amount}


def _paused(graph: Any, config: dict[str, Any]) -> list[dict[str, Any]]:
    state = graph.get_state(config)
    return [r for intr in state.interrupts for r in intr.value]


def test_a_flagged_call_pauses_for_review_and_runs_once_approved(backend_url: str) -> None:
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("transfer", {"amount": 900}, id="t1")]), ai("Sent.")]
    )
    policy = ReviewPolicy(rules={"transfer": lambda a: a["amount"] > 500 and "over $500"})
    with open_backend(backend_url) as backend:
        agent = build_harnessed_agent(model, [transfer], review_policy=policy, backend=backend)
        config = {"configurable": {"thread_id": "t-review"}}
        agent.invoke({"messages": [HumanMessage("send 900")]}, config, durability="sync")
        (request,) = _paused(agent, config)
        assert request["action_request"] == {"action": "transfer", "args": {"amount": 900}}
        assert request["reason"] == "over $500"
        assert not any(
            isinstance(m, ToolMessage) for m in agent.get_state(config).values["messages"]
        )
        out = agent.invoke(Command(resume={"type": "approve"}), config, durability="sync")
    assert out["outcome"] == {"status": "completed", "partial_result": "Sent."}
    assert [m.name for m in out["messages"] if isinstance(m, ToolMessage)] == ["transfer"]


def test_an_unflagged_call_does_not_enter_review() -> None:
    from harness_nodes import ReviewPolicy

    policy = ReviewPolicy(rules={"transfer": lambda a: a["amount"] > 500 and "over $500"})
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("transfer", {"amount": 5}, id="t1")]), ai("Sent.")]
    )
    agent = build_harnessed_agent(model, [transfer], review_policy=policy)
    steps = [next(iter(u)) for u in agent.stream({"messages": [HumanMessage("send 5")]})]
    assert steps == ["agent", "tools", "agent"]


def test_an_escalating_contract_sends_the_output_to_review() -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    contracts = {"lookup": ToolContract(on_fail="escalate")}
    agent = build_harnessed_agent(
        _model("broken", answer="Handled."),
        [lookup],
        contracts=contracts,
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "t-esc"}}
    agent.invoke({"messages": [HumanMessage("go")]}, config)
    (request,) = _paused(agent, config)
    assert request["kind"] == "escalation" and request["trigger"] == "verification"
    out = agent.invoke(
        Command(resume={"type": "respond", "message": '{"key": "broken", "value": 7}'}), config
    )
    assert out["outcome"]["status"] == "completed"


def test_an_escalation_nobody_reviews_stops_with_its_reasons() -> None:
    # add_harness without a review policy routes an escalated output to its stop node.
    contracts = {"lookup": ToolContract(side_effects=True)}
    graph = add_harness(
        _bare_loop(_model("broken")), model_node="agent", tools_node="tools", contracts=contracts
    ).compile()
    out = graph.invoke({"messages": [HumanMessage("go")]})
    assert out["outcome"]["status"] == "verification_failed"
    assert "lookup: the output reports a failure: status='failed'" in out["outcome"]["reason"]
    assert "upstream 504" in out["messages"][-1].content


@tool
def book(room: str) -> dict[str, Any]:
    """Book a room (a side effect)."""
    return {"booking_id": "", "room": room}


@pytest.mark.parametrize(
    "decision",
    [
        pytest.param({"type": "respond", "message": "booking id is B-7"}, id="respond"),
        pytest.param({"type": "approve"}, id="approve"),
        pytest.param({"type": "reject"}, id="reject"),
    ],
)
def test_a_sibling_fail_verdict_still_ends_the_task_once_the_escalation_is_reviewed(
    decision: dict[str, Any],
) -> None:
    """One AI message: `book` escalates, `lookup` fails for good. The person is asked about
    the booking first; once answered, the task ends on the lookup's failure, not the model."""
    from langgraph.types import Command

    contracts = {
        "book": ToolContract(required=("booking_id",), side_effects=True),
        "lookup": ToolContract(on_fail="fail"),
    }
    calls = [tool_call("book", {"room": "A"}, id="b"), tool_call("lookup", {"key": "broken"})]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("All done, everything worked.")])
    agent = build_harnessed_agent(
        model, [book, lookup], contracts=contracts, checkpointer=InMemorySaver()
    )
    config = {"configurable": {"thread_id": "t-esc-fail"}}
    agent.invoke({"messages": [HumanMessage("book A, look broken up")]}, config)
    (request,) = _paused(agent, config)
    assert request["kind"] == "escalation" and request["action_request"]["action"] == "book"

    out = agent.invoke(Command(resume=decision), config)

    (failed,) = [v for v in out["verdicts"] if v["action"] == "fail"]
    assert out["outcome"] == {
        "status": "verification_failed",
        "reason": "lookup: " + "; ".join(failed["reasons"]),
    }
    assert model.calls == 1  # the model never ran on the failed output
    assert out["messages"][-1].text.startswith("I stopped: a tool output failed verification.")
    assert [r["decision"] for r in out["reviews"]] == [decision["type"]]


@tool
def charge(order: str) -> dict[str, Any]:
    """Charge an order (a side effect)."""
    return {"status": "failed", "error": "card declined"}


def test_calls_left_after_a_rejection_are_routed_together_before_the_model_answers(
    backend_url: str,
) -> None:
    """One AI message: `transfer` is reviewed and rejected; of the calls left, `charge` (side
    effects) fails verification and escalates while `lookup` is fine. The model must not
    answer while the charge waits for a person: it answers once, after that decision."""
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    calls = [
        tool_call("transfer", {"amount": 900}, id="t1"),
        tool_call("charge", {"order": "A1"}, id="c1"),
        tool_call("lookup", {"key": "a"}, id="l1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Transfer refused, charge held.")])
    with open_backend(backend_url) as backend:
        agent = build_harnessed_agent(
            model,
            [transfer, charge, lookup],
            contracts={"charge": ToolContract(side_effects=True), "lookup": ToolContract()},
            review_policy=ReviewPolicy(always=["transfer"]),
            backend=backend,
        )
        config = {"configurable": {"thread_id": "t-split"}}
        agent.invoke({"messages": [HumanMessage("go")]}, config, durability="sync")
        (request,) = _paused(agent, config)
        assert (request["kind"], request["tool_call_id"]) == ("tool_call", "t1")
        agent.invoke(Command(resume={"type": "reject"}), config, durability="sync")

        (request,) = _paused(agent, config)
        assert (request["kind"], request["tool_call_id"]) == ("escalation", "c1")
        assert agent.get_state(config).next == ("review",)
        assert model.calls == 1  # no answer while a sibling's output waits for a person

        out = agent.invoke(Command(resume={"type": "approve"}), config, durability="sync")
    assert model.calls == 2
    answers = [m.text for m in out["messages"] if isinstance(m, AIMessage) and not m.tool_calls]
    assert answers == ["Transfer refused, charge held."]
    assert out["outcome"] == {"status": "completed", "partial_result": answers[0]}
    tool_msgs = [m.tool_call_id for m in out["messages"] if isinstance(m, ToolMessage)]
    assert sorted(tool_msgs) == ["c1", "l1", "t1"]
    assert [c["id"] for c in out["messages"][1].tool_calls] == ["t1", "c1", "l1"]  # all kept
    assert [r["decision"] for r in out["reviews"]] == ["reject", "approve"]


def test_a_fail_verdict_after_a_rejection_stops_the_task_without_the_model() -> None:
    """Of the calls left after a rejection, one fails verification for good and one is
    fine: the task stops on the failure, as it does when no call was rejected."""
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    calls = [
        tool_call("transfer", {"amount": 900}, id="t1"),
        tool_call("lookup", {"key": "broken"}, id="l1"),
        tool_call("lookup", {"key": "a"}, id="l2"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("All done, everything worked.")])
    agent = build_harnessed_agent(
        model,
        [transfer, lookup],
        contracts={"lookup": ToolContract(on_fail="fail")},
        review_policy=ReviewPolicy(always=["transfer"]),
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "t-split-fail"}}
    agent.invoke({"messages": [HumanMessage("go")]}, config)
    out = agent.invoke(Command(resume={"type": "reject"}), config)
    assert model.calls == 1  # the model never ran on the failed output
    assert out["outcome"]["status"] == "verification_failed"
    assert out["messages"][-1].text.startswith("I stopped: a tool output failed verification.")
    assert [v["action"] for v in out["verdicts"]] == ["fail", "ok"]


class SupportState(HarnessState):
    customer_id: str


@tool
def customer_lookup(key: str, customer_id: Annotated[str, InjectedState("customer_id")]) -> str:
    """Look a key up for the current customer (read from the app's state)."""
    return f"{key} of customer {customer_id}"


def test_calls_left_after_a_rejection_read_the_apps_own_state_keys() -> None:
    """A reviewer rejects one call of a turn; the other reads the app's own state key
    (``InjectedState``) and passes verification, instead of failing with a KeyError and
    costing the model a retry."""
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    calls = [
        tool_call("customer_lookup", {"key": "plan"}, id="l1"),
        tool_call("transfer", {"amount": 900}, id="t1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Plan found, transfer refused.")])
    agent = build_harnessed_agent(
        model,
        [customer_lookup, transfer],
        review_policy=ReviewPolicy(always=["transfer"]),
        state_schema=SupportState,
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "t-split-state"}}
    agent.invoke({"messages": [HumanMessage("go")], "customer_id": "c-7"}, config)

    out = agent.invoke(Command(resume={"type": "reject"}), config)

    answered = {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}
    assert answered["l1"].text == "plan of customer c-7"
    assert [(v["tool"], v["action"]) for v in out["verdicts"]] == [("customer_lookup", "ok")]
    assert model.calls == 2  # the answer, no retry
    assert out["outcome"] == {"status": "completed", "partial_result": out["messages"][-1].text}


def test_add_harness_puts_review_in_front_of_the_users_tool_node() -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    builder = add_harness(
        _docs_react_loop(_model("a", answer="Looked up.")),
        model_node="llm_call",
        tools_node="tool_node",
        review_policy=ReviewPolicy(always=["lookup"]),
        tools=[lookup],
    )
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t-add-review"}}
    graph.invoke({"messages": [HumanMessage("go")]}, config)
    (request,) = _paused(graph, config)
    assert request["action_request"]["action"] == "lookup"
    out = graph.invoke(Command(resume={"type": "edit", "args": {"key": "b"}}), config)
    assert out["messages"][1].tool_calls[0]["args"] == {"key": "b"}  # edited in place
    assert out["messages"][-1].content == "Looked up."


def test_add_harness_runs_the_calls_a_reviewer_left_through_the_users_tool_node() -> None:
    """The quickstart's hand-written tool node runs the calls of the last message: after one
    call of the turn is rejected, it gets the turn with the other calls only."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    calls = [tool_call("lookup", {"key": "a"}, id="a"), tool_call("lookup", {"key": "b"}, id="b")]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Looked a up.")])
    builder = add_harness(
        _docs_react_loop(model),
        model_node="llm_call",
        tools_node="tool_node",
        review_policy=ReviewPolicy(rules={"lookup": lambda args: args["key"] == "b"}),
        tools=[lookup],
    )
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t-add-partial"}}
    graph.invoke({"messages": [HumanMessage("go")]}, config)
    (request,) = _paused(graph, config)
    assert request["tool_call_id"] == "b"
    out = graph.invoke(Command(resume={"type": "reject"}), config)
    answered = {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}
    assert answered["a"].status == "success" and answered["b"].status == "error"
    assert [c["id"] for c in out["messages"][1].tool_calls] == ["a", "b"]
    assert out["messages"][-1].content == "Looked a up."


def test_add_harness_does_not_verify_a_reviewers_rejection_as_a_tool_output() -> None:
    """The verify node took the rejection note for the tool's failed output: it told the
    model to call the tool again (the note says not to) and spent the tool's retries — with
    ``max_retries=0`` the rejection ended the task ``verification_failed``."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    calls = [tool_call("lookup", {"key": "a"}, id="a"), tool_call("lookup", {"key": "b"}, id="b")]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Looked a up.")])
    builder = add_harness(
        _docs_react_loop(model),
        model_node="llm_call",
        tools_node="tool_node",
        contracts={"lookup": ToolContract(max_retries=0)},
        review_policy=ReviewPolicy(rules={"lookup": lambda args: args["key"] == "b"}),
        tools=[lookup],
    )
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t-add-reject-verify"}}
    graph.invoke({"messages": [HumanMessage("go")]}, config)
    out = graph.invoke(Command(resume={"type": "reject", "message": "not b"}), config)
    answered = {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}
    assert answered["b"].text.startswith("A human reviewer rejected this call to lookup")
    assert "verdict" not in answered["b"].additional_kwargs["harness"]
    assert out["messages"][-1].content == "Looked a up."


async def _async_should_continue(state: MessagesState) -> str:
    return "tools" if state["messages"][-1].tool_calls else END


def _should_continue(state: MessagesState) -> str:
    return "tools" if state["messages"][-1].tool_calls else END


def _should_continue_with_config(state: MessagesState, config: RunnableConfig) -> str:
    assert config["configurable"]["thread_id"] == "t-async-router"  # the run's config
    return "tools" if state["messages"][-1].tool_calls else END


@pytest.mark.anyio
@pytest.mark.parametrize(
    "router",
    [_async_should_continue, _should_continue, _should_continue_with_config],
    ids=["async", "sync", "sync-with-config"],
)
async def test_add_harness_review_runs_the_users_router_under_ainvoke(router: Any) -> None:
    """An async app (LangGraph's templates) whose router out of the model is ``async def``:
    with a review policy, the router still decides every turn the review does not take."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from harness_nodes import ReviewPolicy

    model = _model("a", "b", answer="Looked both up.")

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([lookup]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", router, ["tools", END])
    builder.add_edge("tools", "agent")
    add_harness(
        builder,
        model_node="agent",
        tools_node="tools",
        review_policy=ReviewPolicy(rules={"lookup": lambda args: args["key"] == "b"}),
        tools=[lookup],
    )
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t-async-router"}}

    await graph.ainvoke({"messages": [HumanMessage("go")]}, config)  # a: the router's turn
    (request,) = _paused(graph, config)  # b: the review's
    assert request["action_request"] == {"action": "lookup", "args": {"key": "b"}}
    out = await graph.ainvoke(Command(resume={"type": "approve"}), config)

    answered = [m.tool_call_id for m in out["messages"] if isinstance(m, ToolMessage)]
    assert answered == ["c0", "c1"]
    assert out["messages"][-1].content == "Looked both up."  # the router ended the task


def test_add_harness_review_needs_one_router_out_of_the_model_node() -> None:
    from harness_nodes import ReviewPolicy

    builder = StateGraph(MessagesState)
    builder.add_node("llm", lambda s: {})
    builder.add_node("tools", lambda s: {})
    builder.add_edge(START, "llm")
    builder.add_edge("llm", "tools")
    builder.add_edge("tools", END)
    with pytest.raises(UserError, match="'llm' must leave by exactly one router"):
        add_harness(builder, model_node="llm", tools_node="tools", review_policy=ReviewPolicy())


# --- budget --------------------------------------------------------------------------------


def test_the_budget_check_adds_no_superstep_and_stops_a_runaway() -> None:
    from harness_nodes import Envelope

    calm = build_harnessed_agent(
        ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("lookup", {"key": "a"})]), ai("Done.")],
            model_name="gpt-4o-mini",
        ),
        [lookup],
        envelope=Envelope(max_usd=0.05),
    )
    config = {"configurable": {"thread_id": "t-calm"}}
    steps = [next(iter(u)) for u in calm.stream({"messages": [HumanMessage("go")]}, config)]
    assert steps == ["agent", "tools", "agent"]

    runaway = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("lookup", {"key": "a"})])],
        loop=True,
        model_name="gpt-4o",
    )
    agent = build_harnessed_agent(runaway, [lookup], envelope=Envelope(max_usd=0.05))
    out = agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "t-run"}})
    assert out["outcome"]["status"] == "budget_exhausted"
    assert out["messages"][-1].content.startswith("Stopped: budget exhausted")


@pytest.mark.parametrize("run", ["invoke", "ainvoke"])
def test_the_budget_check_on_the_edge_counts_the_prompt_the_model_node_sends(run: str) -> None:
    # The guard on the edge into the model checked the state's messages without the system
    # prompt the node prepends, so the last answer's reported input tokens (counted with it)
    # could not anchor the estimate: the whole history was bounded by its bytes, and a task
    # whose real spend fitted three times over stopped at its second call.
    from harness_nodes import Envelope

    usage = {"input_tokens": 2000, "output_tokens": 10}
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("lookup", {"key": "a"})], usage=usage), ai("Done.")],
        model_name="gpt-4o-mini",
    )
    envelope = Envelope(max_usd=0.0064, max_output_tokens=256, min_output_tokens=256)
    agent = build_harnessed_agent(model, [lookup], envelope=envelope, system_prompt="Be brief.")
    long_task = "Summarise this. " + "x" * 40_000  # ~40k tokens by its bytes; 2,000 reported
    inputs = {"messages": [HumanMessage(long_task)]}
    config: RunnableConfig = {"configurable": {"thread_id": "t-anchor"}}
    if run == "invoke":
        out = agent.invoke(inputs, config)
    else:
        out = asyncio.run(agent.ainvoke(inputs, config))
    assert out["outcome"]["status"] == "completed", out["outcome"]
    assert out["messages"][-1].content == "Done."


def test_a_budgeted_model_is_guarded_with_its_own_envelope_and_options(
    postgres_url: str,
) -> None:
    from harness_nodes import Envelope, budgeted

    runaway = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("lookup", {"key": "a"})])],
        loop=True,
        model_name="gpt-4o-mini",
    )
    with open_backend(postgres_url) as backend:
        model = budgeted(runaway, envelope=Envelope(max_usd=0.05), backend=backend, lease=4)
        with pytest.raises(UserError, match="already budgeted"):
            build_harnessed_agent(model, [lookup], envelope=Envelope(max_usd=1), backend=backend)
        agent = build_harnessed_agent(model, [lookup], backend=backend)
        out = agent.invoke(
            {"messages": [HumanMessage("go")]},
            {"configurable": {"thread_id": "t-own"}, "recursion_limit": 500},
        )
        assert out["outcome"]["status"] == "budget_exhausted"
        answers = [m for m in out["messages"] if m.type == "ai" and m.tool_calls]
        assert any("lease_id" in m.additional_kwargs["harness"]["budget"] for m in answers)
        flush_pending(backend)
        (task,) = backend.execute(
            "SELECT reserved_nanos, spent_nanos FROM harness_spend_tasks WHERE task_id = %s",
            ("t-own",),
        )
    assert task["reserved_nanos"] == 0 and 0 < task["spent_nanos"] <= 0.05 * 1e9


# Each turn a tool call of 200 output tokens, on gpt-4o, under $0.006: the third call fits
# only with its output cap lowered from 256 to 132 tokens (min_output_tokens=64).
_TIGHT = {"max_usd": 0.006, "max_output_tokens": 256, "min_output_tokens": 64}


def _tight_model(*script: AIMessage) -> ScriptedChatModel:
    call = ai(tool_calls=[tool_call("lookup", {"key": "a"})], usage=_USAGE_200)
    return ScriptedChatModel(script=[call, call, *script], loop=True, model_name="gpt-4o")


_USAGE_200 = {"input_tokens": 50, "output_tokens": 200}


def _budget_record(message: Any) -> dict[str, Any]:
    return dict(message.additional_kwargs["harness"]["budget"])


@pytest.mark.anyio
@pytest.mark.parametrize("way", ["invoke", "ainvoke"])
async def test_an_answer_the_budget_cut_short_ends_as_a_budget_stop_with_the_work_so_far(
    way: str,
) -> None:
    from harness_nodes import Envelope

    agent = build_harnessed_agent(_tight_model(), [lookup], envelope=Envelope(**_TIGHT))
    config: Any = {"configurable": {"thread_id": f"t-cut-{way}"}}
    state = {"messages": [HumanMessage("go")]}
    out = agent.invoke(state, config) if way == "invoke" else await agent.ainvoke(state, config)

    cut, note = out["messages"][-2:]
    # The answer cut short stays in the state, marked with why it stopped there.
    assert isinstance(cut, AIMessage) and not cut.tool_calls
    assert cut.response_metadata["finish_reason"] == "length"
    truncated = _budget_record(cut)["truncated"]
    assert (truncated["limit"], truncated["uncapped"]) == ("usd", 256)
    assert 64 <= truncated["output_cap"] == cut.usage_metadata["output_tokens"] < 200
    assert note.content.startswith("Stopped: budget exhausted")
    outcome = out["outcome"]
    assert outcome["status"] == "budget_exhausted"
    assert f"cut short at the {truncated['output_cap']} output tokens" in outcome["reason"]
    results = outcome["partial_result"]["tool_results"]
    assert [r["tool_call_id"] for r in results] == ["call_t0_0", "call_t1_0"]


class _Provider(ScriptedChatModel):
    """Says "cut at the cap" in a given provider's words (langchain-core passes them as is)."""

    key: str = "finish_reason"
    word: str = "length"

    def _finish(self, msg: AIMessage, prompt: Any, kwargs: Any) -> AIMessage:
        out = super()._finish(msg, prompt, kwargs)
        meta = dict(out.response_metadata)
        if meta.pop("finish_reason") == "length":
            meta[self.key] = (
                {"reason": self.word} if self.key == "incomplete_details" else self.word
            )
        return out.model_copy(update={"response_metadata": meta})


class _CutMidCall(ScriptedChatModel):
    """Cut at the cap in the middle of a tool call's arguments, as a provider would be."""

    def _finish(self, msg: AIMessage, prompt: Any, kwargs: Any) -> AIMessage:
        out = super()._finish(msg, prompt, kwargs)
        if out.response_metadata.get("finish_reason") != "length":
            return out
        cut = {"name": "lookup", "args": '{"key": "a', "id": "call_cut", "error": None}
        return out.model_copy(update={"invalid_tool_calls": [cut]})


def test_a_cut_answers_tool_calls_are_answered_so_the_thread_can_go_on() -> None:
    # The cut call (invalid: its arguments end mid-way) stayed unanswered, and a provider
    # refuses the next model call on the thread ("tool_calls must be followed by tool
    # messages"), so the thread's next task could never run.
    from harness_nodes import Envelope

    call = ai(tool_calls=[tool_call("lookup", {"key": "a"})], usage=_USAGE_200)
    model = _CutMidCall(script=[call], loop=True, model_name="gpt-4o")
    agent = build_harnessed_agent(model, [lookup], envelope=Envelope(**_TIGHT))
    out = agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "c"}})

    assert out["outcome"]["status"] == "budget_exhausted"
    calls = {
        c["id"]
        for m in out["messages"]
        if isinstance(m, AIMessage)
        for c in [*m.tool_calls, *m.invalid_tool_calls]
    }
    answered = {m.tool_call_id for m in out["messages"] if isinstance(m, ToolMessage)}
    assert "call_cut" in calls and calls <= answered
    [note] = [
        m for m in out["messages"] if isinstance(m, ToolMessage) and m.tool_call_id == "call_cut"
    ]
    assert note.status == "error" and "cut short" in note.content
    assert out["messages"][-1].content.startswith("Stopped: budget exhausted")


@pytest.mark.parametrize(
    ("key", "word"),
    [
        pytest.param("stop_reason", "max_tokens", id="anthropic"),
        pytest.param("finish_reason", "MAX_TOKENS", id="google"),
        pytest.param("stopReason", "max_tokens", id="bedrock"),
        pytest.param("done_reason", "length", id="ollama"),
        pytest.param("incomplete_details", "max_output_tokens", id="openai-responses-api"),
    ],
)
def test_an_answer_cut_short_is_read_in_each_providers_words(key: str, word: str) -> None:
    from harness_nodes import Envelope

    call = ai(tool_calls=[tool_call("lookup", {"key": "a"})], usage=_USAGE_200)
    model = _Provider(script=[call], loop=True, model_name="gpt-4o", key=key, word=word)
    agent = build_harnessed_agent(model, [lookup], envelope=Envelope(**_TIGHT))
    out = agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "p"}})

    assert word in str(out["messages"][-2].response_metadata[key])
    assert out["outcome"]["status"] == "budget_exhausted"


def test_an_answer_the_budget_cut_short_raises_with_exit_behavior_error_and_stays() -> None:
    from harness_nodes import BudgetExceeded, Envelope

    with open_backend("memory://") as backend:
        agent = build_harnessed_agent(
            _tight_model(),
            [lookup],
            envelope=Envelope(**_TIGHT, exit_behavior="error"),
            backend=backend,
        )
        config: Any = {"configurable": {"thread_id": "t-cut-error"}}
        with pytest.raises(BudgetExceeded) as info:
            agent.invoke({"messages": [HumanMessage("go")]}, config)
        assert info.value.limit == "usd"
        last = agent.get_state(config).values["messages"][-1]
    assert _budget_record(last)["truncated"]["limit"] == "usd"  # the answer is kept


def test_an_answer_that_fits_under_a_lowered_cap_completes() -> None:
    from harness_nodes import Envelope

    done = ai("Done.", usage={"input_tokens": 50, "output_tokens": 20})
    agent = build_harnessed_agent(_tight_model(done), [lookup], envelope=Envelope(**_TIGHT))
    out = agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "t-f"}})

    assert out["outcome"] == {"status": "completed", "partial_result": "Done."}
    assert "truncated" not in _budget_record(out["messages"][-1])
    # Its cap was lowered (a longer prompt, a smaller worst case reserved than the first's).
    assert (
        _budget_record(out["messages"][-1])["reserved_usd"]
        < _budget_record(out["messages"][1])["reserved_usd"]
    )


def test_an_answer_cut_at_the_models_own_cap_completes_as_before() -> None:
    from harness_nodes import Envelope

    # Not the budget's doing: the model's own max_tokens cut it, with plenty of budget left.
    model = ScriptedChatModel(
        script=[ai("A long answer. " * 40, usage={"input_tokens": 50, "output_tokens": 200})],
        model_name="gpt-4o",
        max_tokens=64,
    )
    agent = build_harnessed_agent(model, [lookup], envelope=Envelope(max_usd=1))
    out = agent.invoke({"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "t-o"}})

    answer = out["messages"][-1]
    assert answer.response_metadata["finish_reason"] == "length"
    assert "truncated" not in _budget_record(answer)
    assert out["outcome"]["status"] == "completed"


def test_a_model_ladder_needs_an_envelope() -> None:
    with pytest.raises(UserError, match="a model ladder needs an envelope"):
        build_harnessed_agent([_model(), _model()], [lookup])


# --- async apps: an AsyncBackend under ainvoke / astream -----------------------------------


class _Died(BaseException):
    """The process dies (not an error a tool node could turn into a result)."""


def _mini(*script: Any, loop: bool = False, name: str = "gpt-4o-mini") -> ScriptedChatModel:
    return ScriptedChatModel(script=list(script), loop=loop, model_name=name)


@pytest.mark.anyio
async def test_a_budgeted_agent_on_an_async_backend_runs_under_ainvoke(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import Envelope

    model = _mini(ai(tool_calls=[tool_call("lookup", {"key": "a"})]), ai("Done."))
    agent = build_harnessed_agent(
        model, [lookup], envelope=Envelope(max_usd=0.05), backend=abackend
    )
    config = {"configurable": {"thread_id": "t-async"}}
    out = await agent.ainvoke({"messages": [HumanMessage("go")]}, config, durability="sync")

    assert out["outcome"] == {"status": "completed", "partial_result": "Done."}
    assert [v["action"] for v in out["verdicts"]] == ["ok"]
    assert (await agent.aget_state(config)).values["outcome"]["status"] == "completed"
    await aflush_pending(abackend)
    (task,) = await abackend.execute(
        "SELECT reserved_nanos, spent_nanos FROM harness_spend_tasks WHERE task_id = %s",
        ("t-async",),
    )
    assert task["reserved_nanos"] == 0 and task["spent_nanos"] > 0  # in the backend's ledger


@pytest.mark.anyio
async def test_astream_on_an_async_backend_adds_no_superstep_and_stops_a_runaway(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import Envelope

    calm = build_harnessed_agent(
        _mini(ai(tool_calls=[tool_call("lookup", {"key": "a"})]), ai("Done.")),
        [lookup],
        envelope=Envelope(max_usd=0.05),
        backend=abackend,
    )
    config = {"configurable": {"thread_id": "t-calm"}}
    steps = [next(iter(u)) async for u in calm.astream({"messages": [HumanMessage("go")]}, config)]
    assert steps == ["agent", "tools", "agent"]

    runaway = _mini(ai(tool_calls=[tool_call("lookup", {"key": "a"})]), loop=True, name="gpt-4o")
    agent = build_harnessed_agent(
        runaway, [lookup], envelope=Envelope(max_usd=0.05), backend=abackend
    )
    config = {"configurable": {"thread_id": "t-runaway"}}
    steps = [next(iter(u)) async for u in agent.astream({"messages": [HumanMessage("go")]}, config)]
    out = (await agent.aget_state(config)).values
    assert steps[-1] == "budget_exhausted"
    assert out["outcome"]["status"] == "budget_exhausted"
    assert out["messages"][-1].content.startswith("Stopped: budget exhausted")
    assert out["spend"]["usd"] > 0  # the finish node read the backend's ledger


@pytest.mark.anyio
async def test_an_irreversible_call_runs_once_under_ainvoke_when_its_turn_is_replayed(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import AsyncEffectLedger

    log: list[str] = []
    refund = _refund_tool(log)
    calls = [
        tool_call("refund", {"order": "A1"}, id="r1"),
        tool_call("lookup", {"key": "x"}, id="l1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("Refunded.")])
    ledger = AsyncEffectLedger(abackend)
    died: list[bool] = []

    @tool
    async def lookup(key: str) -> dict[str, Any]:
        """Look a key up."""
        if not died:
            # The process dies once the refund has run and its result is recorded.
            while (record := await ledger.aget("t-effects", "r1")) is None or (
                record.status != "done"
            ):
                await asyncio.sleep(0.01)
            died.append(True)
            raise _Died
        return {"key": key}

    agent = build_harnessed_agent(model, [refund, lookup], backend=abackend)
    config = {"configurable": {"thread_id": "t-effects"}}
    with pytest.raises(_Died):
        await agent.ainvoke({"messages": [HumanMessage("refund A1")]}, config, durability="sync")
    assert log == ["t-effects:r1"]

    out = await agent.ainvoke(None, config, durability="sync")

    assert log == ["t-effects:r1"]  # replayed from the ledger, not run again
    assert out["outcome"]["status"] == "completed"
    refund_msg = next(
        m for m in out["messages"] if isinstance(m, ToolMessage) and m.name == "refund"
    )
    assert refund_msg.additional_kwargs["harness"]["effect"]["replayed"] is True
    assert [(r.tool_call_id, r.status) for r in await ledger.alist("t-effects")] == [("r1", "done")]


@pytest.mark.anyio
async def test_two_concurrent_resumes_under_ainvoke_run_an_approved_refund_once(
    abackend: AsyncBackend,
) -> None:
    """Both resume the same approval (a client retry): the ledger lets one run the refund;
    the other replays it, or — while it runs — asks a person instead of running it again."""
    from langgraph.types import Command

    from harness_nodes import AsyncEffectLedger, ReviewPolicy, current_effect, irreversible

    log: list[str] = []

    @irreversible
    @tool
    async def refund(order: str) -> dict[str, Any]:
        """Refund an order."""
        log.append(current_effect().idempotency_key)
        await asyncio.sleep(0.2)  # long enough for the other resume to reach the ledger
        return {"refund_id": "r-1", "order": order}

    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("refund", {"order": "A1"}, id="r1")]), ai("Refunded.")]
    )
    agent = build_harnessed_agent(
        model, [refund], review_policy=ReviewPolicy(always=["refund"]), backend=abackend
    )
    config = {"configurable": {"thread_id": "t-retry"}}
    await agent.ainvoke({"messages": [HumanMessage("refund A1")]}, config, durability="sync")
    approve = Command(resume={"type": "approve"})

    outs = await asyncio.gather(
        *(agent.ainvoke(approve, config, durability="sync") for _ in range(2))
    )

    assert log == ["t-retry:r1"]
    assert "completed" in [(out.get("outcome") or {}).get("status") for out in outs]
    records = await AsyncEffectLedger(abackend).alist("t-retry")
    assert [(r.tool_call_id, r.status) for r in records] == [("r1", "done")]


@pytest.mark.anyio
@pytest.mark.parametrize("needs", ["budget", "effects"])
async def test_an_agent_on_an_async_backend_refuses_invoke_before_anything_runs(
    abackend: AsyncBackend, needs: str
) -> None:
    """Which of invoke/ainvoke a run uses is only known when it starts: it is refused there,
    naming the fix, before the model or any tool runs."""
    from harness_nodes import Envelope

    log: list[str] = []
    model = _mini(ai(tool_calls=[tool_call("refund", {"order": "A1"}, id="r1")]), ai("Done."))
    tools = [lookup, _refund_tool(log)] if needs == "effects" else [lookup]
    envelope = Envelope(max_usd=0.05) if needs == "budget" else None
    agent = build_harnessed_agent(model, tools, envelope=envelope, backend=abackend)
    config = {"configurable": {"thread_id": "t-sync"}}
    message = "in an AsyncBackend: run it with ainvoke() or astream()"
    with pytest.raises(UserError, match=re.escape(message)):
        # From a worker thread, as a sync caller would: the async saver itself answers there.
        await asyncio.to_thread(agent.invoke, {"messages": [HumanMessage("go")]}, config)
    assert model.calls == 0 and log == []


@pytest.mark.anyio
async def test_a_review_resumed_with_invoke_on_an_async_budget_runs_no_tool(
    abackend: AsyncBackend,
) -> None:
    """A run resumed after a review starts at the tools: with the budget in an AsyncBackend
    (no effectful tool), invoke() is refused there, before the approved call runs — not by
    the budget check after it, which left the thread with the tool run and no way on."""
    from langgraph.types import Command

    from harness_nodes import Envelope, ReviewPolicy

    sent: list[str] = []

    @tool
    def send_email(to: str) -> str:
        """Send an email."""
        sent.append(to)
        return f"sent to {to}"

    model = _mini(ai(tool_calls=[tool_call("send_email", {"to": "bob"}, id="e1")]), ai("Done."))
    agent = build_harnessed_agent(
        model,
        [send_email],
        envelope=Envelope(max_usd=0.05),
        review_policy=ReviewPolicy(always=["send_email"]),
        backend=abackend,
    )
    config = {"configurable": {"thread_id": "t-mail"}}
    await agent.ainvoke({"messages": [HumanMessage("mail bob")]}, config)
    approve = Command(resume={"type": "approve"})
    with pytest.raises(UserError, match=re.escape("run it with ainvoke() or astream()")):
        await asyncio.to_thread(agent.invoke, approve, config)
    assert sent == []
    out = await agent.ainvoke(None, config)  # carried on as it should have been run
    assert sent == ["bob"] and out["messages"][-1].content == "Done."


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sqlite:///harness.db", id="url"),
        pytest.param(InMemorySaver(), id="saver"),
    ],
)
def test_a_backend_that_is_neither_backend_is_a_wiring_error(backend: Any) -> None:
    with pytest.raises(UserError, match=re.escape("backend must be a checkpointers.Backend")):
        build_harnessed_agent(_model(), [lookup], backend=backend)


@pytest.mark.anyio
async def test_model_node_awaits_the_model_under_ainvoke() -> None:
    """`ModelNode` dropped into an async app: under ``ainvoke`` it calls ``model.ainvoke``
    (a model budgeted on an AsyncBackend has no sync path)."""
    from harness_nodes import Envelope, ModelNode, budgeted

    async with await aopen_backend("memory://") as backend:
        llm = budgeted(_mini(ai("Hello.")), envelope=Envelope(max_usd=0.05), backend=backend)
        builder = StateGraph(HarnessState)
        builder.add_node("agent", ModelNode(llm, system_prompt="Be brief."))
        builder.add_edge(START, "agent")
        builder.add_edge("agent", END)
        out = await builder.compile().ainvoke(
            {"messages": [HumanMessage("hi")]}, {"configurable": {"thread_id": "t-node"}}
        )
        spend = await llm.aspend({"configurable": {"thread_id": "t-node"}})
    assert spend["calls"] == 1
    assert out["outcome"] == {"status": "completed", "partial_result": "Hello."}
    assert out["messages"][-1].additional_kwargs["harness"]["budget"]["model"] == "gpt-4o-mini"


# --- the spend mirror: written with the outcome --------------------------------------------

_USAGE = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}


def _spent(messages: list[Any]) -> tuple[float, int]:
    """What the model's answers say they cost, and how many there were."""
    costs = [
        m.additional_kwargs["harness"]["budget"]["spent_usd"]
        for m in messages
        if isinstance(m, AIMessage)
    ]
    return sum(costs), len(costs)


def _assert_mirror(out: dict[str, Any]) -> None:
    assert out["outcome"]["status"] == "completed"
    usd, calls = _spent(out["messages"])
    spend = out["spend"]
    assert spend["calls"] == calls == 2
    assert spend["usd"] == pytest.approx(usd) and usd > 0
    assert spend["by_model"]["gpt-4o-mini"]["input_tokens"] == 200
    assert spend["model"] == "gpt-4o-mini"


def test_a_task_that_completes_has_its_spend_mirror(backend: Any) -> None:
    # The guard on the edge into the model cannot write state: the mirror was written only by
    # a budget stop, so a task that ended well showed spend {} in its final state.
    from harness_nodes import Envelope

    model = _mini(
        ai(tool_calls=[tool_call("lookup", {"key": "a"})], usage=_USAGE), ai("Done.", usage=_USAGE)
    )
    agent = build_harnessed_agent(model, [lookup], envelope=Envelope(max_usd=1), backend=backend)
    config: Any = {"configurable": {"thread_id": "t-mirror"}}
    _assert_mirror(agent.invoke({"messages": [HumanMessage("go")]}, config))
    assert agent.get_state(config).values["spend"]["calls"] == 2  # checkpointed


@pytest.mark.anyio
async def test_a_task_that_completes_has_its_spend_mirror_under_ainvoke(
    abackend: AsyncBackend,
) -> None:
    from harness_nodes import Envelope

    model = _mini(
        ai(tool_calls=[tool_call("lookup", {"key": "a"})], usage=_USAGE), ai("Done.", usage=_USAGE)
    )
    agent = build_harnessed_agent(model, [lookup], envelope=Envelope(max_usd=1), backend=abackend)
    config: Any = {"configurable": {"thread_id": "t-amirror"}}
    _assert_mirror(await agent.ainvoke({"messages": [HumanMessage("go")]}, config))


@irreversible
def pay(order: str) -> str:
    """Pay an order."""
    return f"paid {order}"


def _react_with(tools_node: Any) -> StateGraph[Any]:
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call("pay", {"order": "A1"})]), ai("Paid.")]
    )
    builder: StateGraph[Any] = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", tools_node)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder


@pytest.mark.parametrize(
    "hooks",
    [
        pytest.param({}, id="no-hook"),
        pytest.param("verify", id="verification-hook-only"),
    ],
)
def test_add_harness_refuses_an_irreversible_tool_whose_tool_node_has_no_ledger(
    hooks: Any,
) -> None:
    # Without the ledger the tool raises UnguardedEffect at its first call — under a review
    # policy only after a person approved it. The wiring mistake is refused at construction.
    if hooks == "verify":
        verify = VerifyToolOutputs()
        hooks = {"wrap_tool_call": verify.wrap_tool_call, "awrap_tool_call": verify.awrap_tool_call}
    builder = _react_with(ToolNode([pay, lookup], **hooks))
    with pytest.raises(UserError, match=re.escape("'pay' is marked irreversible")) as exc:
        add_harness(
            builder,
            model_node="agent",
            tools_node="tools",
            review_policy=ReviewPolicy(irreversible=["pay"]),
            tools=[pay, lookup],
        )
    assert "wrap_tool_call=ledger.wrap_tool_call" in str(exc.value)
    assert "verify" not in builder.nodes  # refused before anything was added


def _composed(ledger: EffectLedger, verify: VerifyToolOutputs) -> Any:
    def hook(request: Any, execute: Any) -> Any:
        return verify.wrap_tool_call(request, lambda r: ledger.wrap_tool_call(r, execute))

    return hook


@pytest.mark.parametrize(
    "wiring",
    [
        pytest.param("ledger", id="ledger-hooks"),
        pytest.param("async-ledger-only", id="async-ledger-hook-only"),
        pytest.param("composed", id="ledger-inside-a-composed-hook"),
        pytest.param("function", id="own-tool-node-function"),
    ],
)
def test_add_harness_accepts_the_documented_ledger_wirings(wiring: str) -> None:
    with open_backend("memory://") as backend:
        ledger = EffectLedger(backend)
        verify = VerifyToolOutputs()
        if wiring == "ledger":
            node: Any = ToolNode(
                [pay], wrap_tool_call=ledger.wrap_tool_call, awrap_tool_call=ledger.awrap_tool_call
            )
        elif wiring == "async-ledger-only":
            node = ToolNode([pay], awrap_tool_call=ledger.awrap_tool_call)
        elif wiring == "composed":
            node = ToolNode([pay], wrap_tool_call=_composed(ledger, verify))
        else:
            ledgered = ToolNode([pay], wrap_tool_call=ledger.wrap_tool_call)

            def node(state: MessagesState, config: RunnableConfig) -> Any:
                return ledgered.invoke(state, config)

        graph = add_harness(_react_with(node), model_node="agent", tools_node="tools").compile(
            checkpointer=backend.checkpointer
        )
        if wiring == "async-ledger-only":
            return  # built: that is what this test checks (it runs under ainvoke)
        out = graph.invoke(
            {"messages": [HumanMessage("pay A1")]}, {"configurable": {"thread_id": "t"}}
        )
        assert out["messages"][-1].content == "Paid."
        assert [r.status for r in ledger.list("t")] == ["done"]
