"""ReviewPolicy and the HumanReview node, run inside real graphs on every backend."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, ToolNode, ToolRuntime
from langgraph.types import Command
from pydantic import BaseModel, Field, field_validator

from checkpointers import Backend
from harness_nodes import (
    HarnessState,
    HumanReview,
    InvalidDecision,
    ReviewDecision,
    ReviewPolicy,
    UserError,
    build_trace,
    check_decisions,
)
from harness_nodes.testing import ScriptedChatModel, ai, tool_call
from tests.harness_nodes import review_app
from tests.harness_nodes.review_app import (
    EFFECTS,
    TOOLS,
    build_builder,
    refund_reading_state,
    refund_replying,
    refund_turns,
    refund_with_runtime,
)


@pytest.fixture(autouse=True)
def _reset_effects() -> None:
    EFFECTS.clear()


def _cfg() -> dict[str, Any]:
    return {"configurable": {"thread_id": f"t-{uuid.uuid4().hex[:8]}"}}


def _paused(checkpointer: BaseCheckpointSaver[Any], **kw: Any) -> tuple[Any, dict[str, Any], Any]:
    graph = build_builder(**kw).compile(checkpointer=checkpointer)
    cfg = _cfg()
    out = graph.invoke({"messages": [HumanMessage("refund order A1")]}, cfg, durability="sync")
    return graph, cfg, out


# --- policy --------------------------------------------------------------------------------


def test_policy_checks_never_always_irreversible_rules_confidence_in_order() -> None:
    policy = ReviewPolicy(
        irreversible=["send_email"],
        always=["delete"],
        never=["lookup"],
        rules={"refund": lambda a: a["amount"] > 100},
        min_confidence=0.7,
    )
    calls = {
        "lookup": tool_call("lookup", {"order": "A1"}, id="c1"),
        "delete": tool_call("delete", {}, id="c2"),
        "email": tool_call("send_email", {"to": "x"}, id="c3"),
        "big": tool_call("refund", {"amount": 101}, id="c4"),
        "small": tool_call("refund", {"amount": 100}, id="c5"),
        "unsure": tool_call("search", {}, id="c6"),
        "sure": tool_call("search2", {}, id="c7"),
    }
    msg = AIMessage(
        "",
        tool_calls=list(calls.values()),
        additional_kwargs={"harness": {"confidence": {"c6": 0.4, "c7": 0.9, "c1": 0.0}}},
    )
    flags = {k: policy.check(c, msg) for k, c in calls.items()}
    assert flags["lookup"] is None  # never wins even at confidence 0
    assert flags["delete"] is not None and flags["delete"].trigger == "always"
    assert flags["email"] is not None and (flags["email"].trigger, flags["email"].risk) == (
        "irreversible",
        "high",
    )
    assert flags["big"] is not None and flags["big"].trigger == "argument_rule"
    assert flags["small"] is None
    assert flags["unsure"] is not None and flags["unsure"].reason == (
        "confidence 0.40 is below 0.70"
    )
    assert flags["sure"] is None


def test_policy_uses_a_user_scorer() -> None:
    policy = ReviewPolicy(min_confidence=0.5, scorer=lambda call, msg: len(call["args"]) / 4)
    msg = ai(tool_calls=[])
    assert policy.check(tool_call("x", {"a": 1}), msg) is not None
    assert policy.check(tool_call("x", {"a": 1, "b": 2, "c": 3}), msg) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"never": ["a"], "always": ["a"]}, "both in 'never'", id="never-and-always"),
        pytest.param({"min_confidence": 1.5}, "must be in [0, 1]", id="confidence-range"),
        pytest.param({"scorer": lambda c, m: 1.0}, "needs min_confidence", id="scorer-alone"),
        pytest.param({"irreversible": "refund"}, "collection of tool names", id="bare-string"),
    ],
)
def test_policy_wiring_mistakes_raise_user_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        ReviewPolicy(**kwargs)


def test_review_decision_accepts_agent_inbox_words() -> None:
    assert ReviewDecision.model_validate({"type": "accept", "args": None}).type == "approve"
    assert ReviewDecision.model_validate({"type": "ignore", "args": None}).type == "reject"
    edit = ReviewDecision.model_validate(
        {"type": "edit", "args": {"action": "refund", "args": {"order": "A1", "amount": 5}}}
    )
    assert edit.args == {"order": "A1", "amount": 5}
    assert edit.action == "refund"
    resp = ReviewDecision.model_validate({"type": "response", "args": "no"})
    assert (resp.type, resp.message) == ("respond", "no")
    # LangChain's HumanInTheLoopMiddleware form of an edit
    lc = ReviewDecision.model_validate(
        {"type": "edit", "edited_action": {"name": "refund", "args": {"amount": 5}}}
    )
    assert (lc.type, lc.action, lc.args) == ("edit", "refund", {"amount": 5})


# --- the node in a graph -------------------------------------------------------------------


def test_irreversible_call_pauses_before_any_tool_runs(
    checkpointer: BaseCheckpointSaver[Any],
) -> None:
    graph, cfg, out = _paused(checkpointer)
    [intr] = out["__interrupt__"]
    [req] = intr.value  # the read-only sibling needs no review: one request
    assert req["action_request"] == {"action": "refund", "args": {"order": "A1", "amount": 250}}
    assert req["config"] == {
        "allow_accept": True,
        "allow_edit": True,
        "allow_respond": True,
        "allow_ignore": True,
    }
    assert (req["trigger"], req["risk"], req["tool_call_id"]) == (
        "argument_rule",
        "high",
        "call_refund",
    )
    assert req["reason"] == "refund of $250 > $100"
    assert "model called refund" in req["trace"]["steps"][0]
    assert req["trace"]["tokens"] > 0
    assert intr.response_schema is not None  # a UI can render the decision form
    assert EFFECTS == {}  # nothing ran, not even the read-only sibling
    assert graph.get_state(cfg).next == ("review",)


@pytest.mark.parametrize(
    ("decision", "refunds", "refund_result"),
    [
        pytest.param({"type": "approve"}, 1, "refunded 250 on A1", id="approve"),
        pytest.param(
            {"type": "edit", "args": {"order": "A1", "amount": 80}},
            1,
            "refunded 80 on A1",
            id="edit",
        ),
        pytest.param(
            {
                "type": "edit",
                "edited_action": {"name": "refund", "args": {"order": "A1", "amount": 70}},
            },
            1,
            "refunded 70 on A1",
            id="edit-langchain-form",
        ),
        pytest.param(
            {"type": "reject", "message": "over the limit"}, 0, "over the limit", id="reject"
        ),
        pytest.param(
            {"type": "respond", "message": "Refund already issued yesterday."},
            0,
            "Refund already issued yesterday.",
            id="respond",
        ),
    ],
)
def test_each_decision_resumes_and_no_tool_runs_twice(
    checkpointer: BaseCheckpointSaver[Any],
    decision: dict[str, Any],
    refunds: int,
    refund_result: str,
) -> None:
    graph, cfg, _ = _paused(checkpointer)
    out = graph.invoke(Command(resume=decision), cfg, durability="sync")
    # The parallel read-only sibling ran exactly once, after the decision; the refund at most once.
    assert EFFECTS["lookup"] == 1
    assert EFFECTS["refund"] == refunds
    msgs = out["messages"]
    tool_msgs = {m.tool_call_id: m for m in msgs if isinstance(m, ToolMessage)}
    assert set(tool_msgs) == {"call_refund", "call_lookup"}
    assert refund_result in tool_msgs["call_refund"].content
    assert msgs[-1].content.startswith("Done: ")  # the model continued with the results
    ai_msgs = [m for m in msgs if isinstance(m, AIMessage)]
    first = ai_msgs[0]
    assert (
        first.additional_kwargs["harness"]["reviews"]["call_refund"]["decision"]
        == (decision["type"])
    )
    if decision["type"] == "edit":
        # edited in place: one AI message with this id, carrying the edited args
        edited = decision.get("args") or decision["edited_action"]["args"]
        assert [c["args"] for c in first.tool_calls if c["id"] == "call_refund"] == [edited]
        assert len([m for m in msgs if m.id == first.id]) == 1
    if decision["type"] in ("reject", "respond"):
        status = "error" if decision["type"] == "reject" else "success"
        assert tool_msgs["call_refund"].status == status
    # Replaying the finished thread runs nothing again.
    graph.invoke(None, cfg, durability="sync")
    assert EFFECTS["lookup"] == 1 and EFFECTS["refund"] == refunds


MALFORMED = [
    pytest.param(None, 42, "expected a decision object", id="wrong-type"),
    pytest.param(None, {"type": "maybe"}, "Input should be 'approve'", id="unknown-action"),
    pytest.param(
        ReviewPolicy(rules={"refund": lambda a: True}, allow_edit=False),
        {"type": "edit", "args": {"order": "A1", "amount": 1}},
        "'edit' is not allowed for refund",
        id="edit-not-editable",
    ),
    pytest.param(
        None,
        {"type": "edit", "args": {"order": "A1", "amount": "lots"}},
        "fail its schema",
        id="args-fail-schema",
    ),
    pytest.param(
        None,
        {"type": "edit", "args": {"amount": 90}},
        "order: Field required (an edit replaces all of the call's arguments)",
        id="args-partial",  # a reviewer who meant "change the amount only"
    ),
    pytest.param(
        None,
        {"type": "edit", "args": {"order": "A1", "amount": 250, "amuont": 90}},
        "name no argument of the tool: amuont",
        id="args-misspelt",  # the schema would drop it: the audit would show a lie
    ),
    pytest.param(None, {"type": "respond"}, "non-empty 'message'", id="respond-no-message"),
    pytest.param(
        None,
        {"type": "edit", "edited_action": {"name": "delete_account", "args": {"order": "A1"}}},
        "an edit changes arguments, not the tool",
        id="edit-swaps-the-tool",
    ),
    pytest.param(
        None,
        {"type": "edit", "edited_action": ["refund", {"amount": 1}]},
        "edited_action",
        id="edited-action-malformed",
    ),
    pytest.param(
        None, {"type": "edit", "edited_action": {"name": "refund"}}, "new arguments", id="no-args"
    ),
    pytest.param(
        None,
        [{"type": "approve"}, {"type": "approve"}],
        "2 decision(s) for 1 call(s)",
        id="wrong-count",
    ),
]


@pytest.mark.parametrize(("policy", "decision", "reason"), MALFORMED)
def test_malformed_decision_is_refused_and_the_run_stays_paused(
    policy: ReviewPolicy | None, decision: Any, reason: str
) -> None:
    graph, cfg, _ = _paused(InMemorySaver(), policy=policy)
    with pytest.raises(InvalidDecision, match=re.escape(reason)):
        graph.invoke(Command(resume=decision), cfg)
    state = graph.get_state(cfg)
    assert state.next == ("review",) and len(state.interrupts) == 1
    assert EFFECTS == {}
    # Nothing was lost: a valid decision still resumes the same pause.
    out = graph.invoke(Command(resume={"type": "approve"}), cfg)
    assert out["messages"][-1].content.startswith("Done: refunded")
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_refused_decisions_are_not_saved_on_durable_savers(
    checkpointer: BaseCheckpointSaver[Any],
) -> None:
    # Several bad answers in a row on a real saver, then a good one: the pause survives each.
    graph, cfg, _ = _paused(checkpointer)
    for case in MALFORMED:
        policy, decision, reason = case.values
        if policy is not None:
            continue
        with pytest.raises(InvalidDecision, match=re.escape(str(reason))):
            graph.invoke(Command(resume=decision), cfg, durability="sync")
        assert graph.get_state(cfg).next == ("review",)
    out = graph.invoke(Command(resume={"type": "approve"}), cfg, durability="sync")
    assert out["messages"][-1].content.startswith("Done: refunded")
    assert EFFECTS == {"refund": 1, "lookup": 1}


def test_all_calls_needing_review_are_batched_into_one_interrupt() -> None:
    script = [
        ai(
            tool_calls=[
                tool_call("refund", {"order": "A1", "amount": 500}, id="r1"),
                tool_call("send_email", {"to": "a@b.c", "body": "hi"}, id="e1"),
                tool_call("lookup", {"order": "A1"}, id="l1"),
            ]
        ),
        ai("ok"),
    ]
    graph = build_builder(script=script).compile(checkpointer=InMemorySaver())
    cfg = _cfg()
    out = graph.invoke({"messages": [HumanMessage("go")]}, cfg)
    [intr] = out["__interrupt__"]
    assert [r["tool_call_id"] for r in intr.value] == ["r1", "e1"]
    with pytest.raises(InvalidDecision, match="one edit cannot apply to 2 calls"):
        graph.invoke(Command(resume={"type": "edit", "args": {}}), cfg)
    decisions = [
        {"type": "reject", "message": "no", "tool_call_id": "r1"},
        {"type": "approve", "tool_call_id": "e1"},
    ]
    graph.invoke(Command(resume=list(reversed(decisions))), cfg)  # matched by call id
    assert EFFECTS == {"send_email": 1, "lookup": 1}


SEEN: dict[str, list[AnyMessage]] = {}


@tool
def conversation(
    order: str, messages: Annotated[list[AnyMessage], InjectedState("messages")]
) -> str:
    """Read the conversation (state injected)."""
    SEEN["conversation"] = list(messages)
    return f"{len(messages)} messages about {order}"


@tool
def order_status(order: str, runtime: ToolRuntime) -> str:
    """Read the run (runtime injected)."""
    SEEN["order_status"] = list(runtime.state["messages"])
    return f"order {order}: paid ({runtime.tool_call_id})"


def test_calls_left_after_a_rejection_run_as_one_task_with_the_state_injected() -> None:
    """The calls a reviewer left run together, in one task of the tools node; tools that read
    the graph state get the conversation that asked for them (the turn's calls left)."""
    SEEN.clear()
    calls = [
        tool_call("refund", {"order": "A1", "amount": 500}, id="r1"),
        tool_call("conversation", {"order": "A1"}, id="h1"),
        tool_call("order_status", {"order": "A1"}, id="s1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("ok")])
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=TOOLS)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([*TOOLS, conversation, order_status]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    cfg = _cfg()
    graph.invoke({"messages": [HumanMessage("go")]}, cfg)

    steps = [next(iter(u)) for u in graph.stream(Command(resume={"type": "reject"}), cfg)]

    assert steps == ["review", "tools", "agent"]
    assert EFFECTS == {}
    out = graph.get_state(cfg).values
    answered = {m.tool_call_id: m.content for m in out["messages"] if isinstance(m, ToolMessage)}
    assert answered["h1"] == "2 messages about A1"
    assert answered["s1"] == "order A1: paid (s1)"
    assert set(SEEN) == {"conversation", "order_status"}
    for seen in SEEN.values():
        assert seen[0].content == "go"
        assert [c["id"] for c in seen[-1].tool_calls] == ["h1", "s1"]
    assert [c["id"] for c in out["messages"][1].tool_calls] == ["r1", "h1", "s1"]


INJECTED_TOOLS = [
    pytest.param(refund_replying, "tool_call_id", id="InjectedToolCallId"),
    pytest.param(refund_with_runtime, "runtime", id="ToolRuntime"),
    pytest.param(refund_reading_state, "messages", id="InjectedState"),
]


@pytest.mark.parametrize(("refund_tool", "injected"), INJECTED_TOOLS)
def test_an_edit_of_a_tool_with_injected_arguments_gives_the_calls_arguments_only(
    refund_tool: Any, injected: str
) -> None:
    """A reviewer sets what the model sets (the tool's call schema); the arguments LangGraph
    injects when the tool runs are neither required in an edit nor settable by one."""
    name = refund_tool.name
    model = ScriptedChatModel(
        script=[ai(tool_calls=[tool_call(name, {"order": "A1", "amount": 250}, id="r1")]), ai("ok")]
    )
    review = HumanReview(ReviewPolicy(irreversible=[name]), tools=[refund_tool])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([refund_tool]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    cfg = _cfg()
    graph.invoke({"messages": [HumanMessage("refund A1")]}, cfg)

    refused = [
        ({"amount": 90}, "order: Field required (an edit replaces all of the call's arguments)"),
        (
            {"order": "A1", "amount": 90, injected: "forged"},
            f"set arguments the tool gets injected when it runs: {injected}",
        ),
    ]
    for args, reason in refused:
        with pytest.raises(InvalidDecision, match=re.escape(reason)):
            graph.invoke(Command(resume={"type": "edit", "args": args}), cfg)
        assert graph.get_state(cfg).next == ("review",)
    out = graph.invoke(Command(resume={"type": "edit", "args": {"order": "A1", "amount": 90}}), cfg)

    [result] = [m.content for m in out["messages"] if isinstance(m, ToolMessage)]
    assert result.startswith("refunded 90 on A1")
    assert out["messages"][1].tool_calls[0]["args"] == {"order": "A1", "amount": 90}


def test_an_edit_is_checked_by_the_validators_of_a_tool_with_injected_arguments() -> None:
    """The call's arguments are still checked by the tool's own schema (constraints,
    validators, aliases), which LangChain's call schema for the model leaves out."""

    class RefundArgs(BaseModel):
        order: str = Field(alias="order_id")
        amount: float = Field(gt=0)
        tool_call_id: Annotated[str, InjectedToolCallId]

        @field_validator("order")
        @classmethod
        def _known_order(cls, order: str) -> str:
            if not order.startswith("A"):
                raise ValueError("orders start with A")
            return order

    @tool(args_schema=RefundArgs)
    def refund_order(order: str, amount: float, tool_call_id: str) -> str:
        """Refund an order."""
        return f"refunded {amount:g} on {order}"

    [request] = HumanReview(ReviewPolicy(irreversible=["refund_order"])).requests(
        [ai(tool_calls=[tool_call("refund_order", {"order_id": "A1", "amount": 5})])]
    )
    for args, reason in [
        ({"order_id": "B1", "amount": 5}, "orders start with A"),
        ({"order_id": "A1", "amount": -5}, "amount: Input should be greater than 0"),
        ({"order": "A1", "amount": 5}, "order_id: Field required"),
    ]:
        with pytest.raises(InvalidDecision, match=re.escape(reason)):
            check_decisions([request], {"type": "edit", "args": args}, [refund_order])
    [ok] = check_decisions(
        [request], {"type": "edit", "args": {"order_id": "A2", "amount": 5}}, [refund_order]
    )
    assert ok.args == {"order_id": "A2", "amount": 5}


class CustomerState(MessagesState):
    customer_id: str


@dataclass
class CustomerDataclassState:
    messages: Annotated[list[AnyMessage], add_messages] = field(default_factory=list)
    customer_id: str = ""


class CustomerModelState(BaseModel):
    messages: Annotated[list[AnyMessage], add_messages] = []
    customer_id: str = ""


CUSTOMER_STATES = [
    pytest.param(CustomerState, id="TypedDict"),
    pytest.param(CustomerDataclassState, id="dataclass"),
    pytest.param(CustomerModelState, id="pydantic"),
]


@tool
def customer_order(order: str, customer_id: Annotated[str, InjectedState("customer_id")]) -> str:
    """Look up an order of the current customer (read from the app's state)."""
    return f"order {order} of customer {customer_id}"


def _customer_graph(state_schema: type[Any], checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A lookup reading the app's own state key beside a refund a reviewer rejects."""
    calls = [
        tool_call("customer_order", {"order": "A1"}, id="o1"),
        tool_call("refund", {"order": "A1", "amount": 500}, id="r1"),
    ]
    model = ScriptedChatModel(script=[ai(tool_calls=calls), ai("ok")])
    review = HumanReview(ReviewPolicy(irreversible=["refund"]), tools=TOOLS)

    def agent(state: Any) -> dict[str, Any]:
        messages = state["messages"] if isinstance(state, dict) else state.messages
        return {"messages": [model.invoke(messages)]}

    builder = StateGraph(state_schema)
    builder.add_node("agent", agent)
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode([*TOOLS, customer_order]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer)


def _answered(graph: Any, cfg: dict[str, Any]) -> dict[str, str]:
    messages = graph.get_state(cfg).values["messages"]
    return {m.tool_call_id: m.text for m in messages if isinstance(m, ToolMessage)}


@pytest.mark.parametrize("state_schema", CUSTOMER_STATES)
def test_calls_left_after_a_rejection_read_the_whole_state(
    state_schema: type[Any], checkpointer: BaseCheckpointSaver[Any]
) -> None:
    """A tool reading the app's own key (``InjectedState("customer_id")``) runs after the
    reviewer turned down its sibling as it runs when nothing was turned down."""
    graph = _customer_graph(state_schema, checkpointer)
    cfg = _cfg()
    graph.invoke({"messages": [HumanMessage("refund A1")], "customer_id": "c-7"}, cfg)

    graph.invoke(Command(resume={"type": "reject", "message": "no refunds today"}), cfg)

    answered = _answered(graph, cfg)
    assert answered["o1"] == "order A1 of customer c-7"
    assert answered["r1"].endswith("no refunds today Do not retry it unless the user asks.")
    assert EFFECTS == {}
    values = graph.get_state(cfg).values
    assert values["customer_id"] == "c-7"
    assert [c["id"] for c in values["messages"][1].tool_calls] == ["o1", "r1"]  # all kept


@pytest.mark.anyio
@pytest.mark.parametrize("state_schema", CUSTOMER_STATES)
async def test_async_calls_left_after_a_rejection_read_the_whole_state(
    state_schema: type[Any],
) -> None:
    graph = _customer_graph(state_schema, InMemorySaver())
    cfg = _cfg()
    await graph.ainvoke({"messages": [HumanMessage("refund A1")], "customer_id": "c-7"}, cfg)

    await graph.ainvoke(Command(resume={"type": "respond", "message": "Refunded by hand."}), cfg)

    answered = _answered(graph, cfg)
    assert answered == {"o1": "order A1 of customer c-7", "r1": "Refunded by hand."}
    assert EFFECTS == {}


def test_calls_no_one_flags_go_straight_to_the_tools() -> None:
    script = [ai(tool_calls=[tool_call("lookup", {"order": "A1"}, id="l1")]), ai("ok")]
    graph = build_builder(script=script).compile(checkpointer=InMemorySaver())
    out = graph.invoke({"messages": [HumanMessage("go")]}, _cfg())
    assert "__interrupt__" not in out and EFFECTS == {"lookup": 1}


def test_low_confidence_from_the_model_pauses() -> None:
    # A model node that reports its confidence on the AI message's harness metadata.
    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("lookup", {"order": "A1"})])])
    review = HumanReview(ReviewPolicy(min_confidence=0.6), tools=TOOLS)

    def agent(state: MessagesState) -> dict[str, Any]:
        msg = model.invoke(state["messages"])
        msg.additional_kwargs["harness"] = {"confidence": 0.3}
        return {"messages": [msg]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode(TOOLS))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    graph = builder.compile(checkpointer=InMemorySaver())
    out = graph.invoke({"messages": [HumanMessage("go")]}, _cfg())
    [req] = out["__interrupt__"][0].value
    assert (req["trigger"], req["reason"]) == ("low_confidence", "confidence 0.30 is below 0.60")
    assert EFFECTS == {}


def _escalating_graph(kind: str, checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """tools → a verifier-like node that escalates the refund's result → review → agent."""
    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 20}, id="r1")]),
            lambda msgs: "final: " + str(msgs[-1].content),
        ]
    )
    review = HumanReview(ReviewPolicy(), tools=TOOLS)

    def escalate(state: MessagesState) -> dict[str, Any]:
        last = state["messages"][-1]
        assert isinstance(last, ToolMessage)
        esc = {
            "kind": kind,
            "reason": "refund outcome unknown" if kind == "effect_unknown" else "empty body",
            "tool": "refund",
            "tool_call_id": last.tool_call_id,
            "args": {"order": "A1", "amount": 20},
        }
        meta: dict[str, Any] = {"escalation": esc}
        update: dict[str, Any] = {"additional_kwargs": {"harness": meta}}
        if kind == "verification":  # as the verifier does: feedback in place of the output
            meta["rejected_output"] = last.content
            update.update(content="rejected by verification: empty body", status="error")
        return {"messages": [last.model_copy(update=update)]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("review", review)
    builder.add_node("tools", ToolNode(TOOLS))
    builder.add_node("verify", escalate)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", review.route)
    builder.add_edge("tools", "verify")
    builder.add_conditional_edges("verify", review.route)
    return builder.compile(checkpointer=checkpointer)


@pytest.mark.parametrize(
    ("kind", "decision", "expected"),
    [
        pytest.param("verification", {"type": "approve"}, "final: refunded 20", id="verif-ok"),
        pytest.param(
            "verification",
            {"type": "approve", "message": "the body is empty on purpose"},
            "accepted this output. Reviewer's note: the body is empty on purpose",
            id="verif-ok-note",
        ),
        pytest.param(
            "verification",
            {"type": "reject", "message": "bad"},
            "final: A human reviewer rejected this result. Reviewer's note: bad",
            id="verif-reject",
        ),
        pytest.param(
            "verification",
            {"type": "respond", "message": "refund id R-9"},
            "final: refund id R-9",
            id="verif-respond",
        ),
        pytest.param(
            "effect_unknown",
            {"type": "approve"},
            "final: A human reviewer confirmed the call took effect.",
            id="effect-happened",
        ),
        pytest.param(
            "effect_unknown",
            {"type": "reject", "message": "bank shows nothing"},
            "did NOT take effect. Reviewer's note: bank shows nothing",
            id="effect-did-not",
        ),
    ],
)
def test_escalations_get_sensible_decisions(
    kind: str, decision: dict[str, Any], expected: str
) -> None:
    graph = _escalating_graph(kind, InMemorySaver())
    cfg = _cfg()
    out = graph.invoke({"messages": [HumanMessage("refund")]}, cfg, durability="sync")
    [req] = out["__interrupt__"][0].value
    assert (req["kind"], req["trigger"]) == ("escalation", kind)
    assert req["config"]["allow_edit"] is False
    with pytest.raises(InvalidDecision, match="'edit' is not allowed"):
        graph.invoke(Command(resume={"type": "edit", "args": {}}), cfg, durability="sync")
    out = graph.invoke(Command(resume=decision), cfg, durability="sync")
    assert expected in out["messages"][-1].content
    assert EFFECTS == {"refund": 1}  # escalation never re-runs the tool
    [tool_msg] = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert "escalation" not in tool_msg.additional_kwargs["harness"]
    assert tool_msg.additional_kwargs["harness"]["review"]["decision"] == decision["type"]


def test_check_decisions_matches_the_node_for_agent_inbox_lists() -> None:
    graph, cfg, out = _paused(InMemorySaver())
    requests = out["__interrupt__"][0].value
    inbox = [{"type": "edit", "args": {"action": "refund", "args": {"order": "A1", "amount": 9}}}]
    [d] = check_decisions(requests, inbox, TOOLS)
    assert (d.type, d.args) == ("edit", {"order": "A1", "amount": 9})
    out = graph.invoke(Command(resume=inbox), cfg)
    assert "refunded 9 on A1" in out["messages"][-1].content


def test_review_node_works_with_a_module_level_builder() -> None:
    # The CLI loads this builder by spec; it must compile and pause like the others.
    graph = review_app.builder.compile(checkpointer=InMemorySaver())
    out = graph.invoke({"messages": [HumanMessage("refund")]}, _cfg())
    assert out["__interrupt__"][0].value[0]["action_request"]["action"] == "refund"


def test_refund_under_the_limit_needs_no_review() -> None:
    graph = build_builder(script=refund_turns(amount=40)).compile(checkpointer=InMemorySaver())
    out = graph.invoke({"messages": [HumanMessage("refund")]}, _cfg())
    assert "__interrupt__" not in out and EFFECTS == {"refund": 1, "lookup": 1}


@pytest.mark.parametrize(
    "decision",
    [
        {"type": "approve", "reviewer": "alice"},
        {"type": "reject", "message": "too much", "reviewer": "bob"},
        {"type": "edit", "args": {"order": "A1", "amount": 50}, "reviewer": "carol"},
    ],
    ids=["approve", "reject", "edit"],
)
def test_decisions_are_appended_to_the_state_reviews_once_in_the_trace(
    backend: Backend, decision: dict[str, Any]
) -> None:
    graph = build_builder(state=HarnessState).compile(checkpointer=backend.checkpointer)
    cfg = _cfg()
    graph.invoke({"messages": [HumanMessage("refund order A1")]}, cfg, durability="sync")
    out = graph.invoke(Command(resume=decision), cfg, durability="sync")
    (record,) = out["reviews"]
    assert record["tool_call_ids"] == ["call_refund"]
    assert (record["decision"], record["reviewer"]) == (decision["type"], decision["reviewer"])
    assert record["reason"] == "argument_rule"
    assert record.get("message") == decision.get("message")
    assert datetime.fromisoformat(record["decided_at"]).tzinfo is not None
    # The trace shows the decision once (from the reviewed message), not again from the state.
    trace = build_trace(backend, cfg["configurable"]["thread_id"])
    reviews = [n for n in trace.walk() if n.kind == "review" and n.data.get("decision")]
    assert [(n.data["tool_call_id"], n.data["decision"]) for n in reviews] == [
        ("call_refund", decision["type"])
    ]


def test_a_state_record_no_message_shows_is_in_the_trace(backend: Backend) -> None:
    # An app that appends its own review records (no HumanReview) still sees them traced.
    def agent(state: HarnessState) -> dict[str, Any]:
        return {
            "messages": [AIMessage("ok")],
            "reviews": [
                {
                    "review_id": "manual-1",
                    "tool_call_ids": ["call_x"],
                    "decision": "approve",
                    "reviewer": "dana",
                }
            ],
        }

    builder = StateGraph(HarnessState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=backend.checkpointer)
    cfg = _cfg()
    graph.invoke({"messages": [HumanMessage("hi")]}, cfg, durability="sync")
    trace = build_trace(backend, cfg["configurable"]["thread_id"])
    assert [n.name for n in trace.walk() if n.kind == "review"] == ["approve by dana"]


def test_a_review_request_shows_api_keys_masked_but_keeps_the_call_to_edit() -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    args = {"to": "ann@example.com", "body": f"your new key: {secret}"}
    first = ai(tool_calls=[tool_call("lookup", {"order": "A1"}, id="c0")])
    looked = ToolMessage(f"order A1: paid with {secret}", tool_call_id="c0")
    [request] = HumanReview(ReviewPolicy(irreversible=["send_email"])).requests(
        [first, looked, ai(tool_calls=[tool_call("send_email", args)])]
    )
    assert request["action_request"]["args"] == args  # what an edit starts from
    shown = [request["description"], *request["trace"]["steps"]]
    assert "ann@example.com" in request["description"]
    assert not [line for line in shown if secret in line]


def test_a_review_request_masks_the_fields_the_run_marked_sensitive() -> None:
    # langfuse_callbacks(sensitive_fields=...) records the names in the run's metadata: the
    # pause payload a review UI shows (description, trace excerpt) masks them, as the traces
    # and the review queue's screens do; the call as made stays whole, for an edit.
    from harness_nodes import ToolContract, add_harness, langfuse_callbacks

    @tool
    def charge(card: str, amount: float) -> str:
        """Charge a card."""
        return f"charged {amount} to card={card}"

    card = "4111111111111111"
    args = {"card": card, "amount": 12.5}
    model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("charge", args)]), ai("done")])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([charge]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else "__end__"
    )
    builder.add_edge("tools", "agent")
    add_harness(
        builder,
        model_node="agent",
        tools_node="tools",
        contracts={"charge": ToolContract()},
        review_policy=ReviewPolicy(irreversible=["charge"]),
        tools=[charge],
    )
    graph = builder.compile(checkpointer=InMemorySaver())
    config = langfuse_callbacks("marked-1", sensitive_fields=["card"])  # no Langfuse: a no-op
    graph.invoke({"messages": [HumanMessage("charge it")]}, config)

    [pause] = graph.get_state(config).interrupts
    [request] = pause.value
    assert request["action_request"]["args"] == args
    shown = [request["description"], *request["trace"]["steps"]]
    assert "12.5" in request["description"]
    assert not [line for line in shown if card in line]
