"""One-call wiring: a harnessed agent from a model and tools, or harness nodes added to a graph.

`build_harnessed_agent` builds the whole shape of a harnessed agent and compiles it;
`add_harness` inserts the same pieces into a ``StateGraph`` builder you already have, around
your own model and tool nodes (named by you), without touching those nodes.

The common path adds no superstep to the bare ``agent → tools → agent`` loop: verification
runs inside the tool node (``ToolNode(wrap_tool_call=...)``) and its routing is an edge;
a node is entered only when something has to happen (a verification failure that ends the
task).

Each piece has both paths: run the agent with ``invoke``/``stream`` on a `Backend`
(``open_backend``), or with ``ainvoke``/``astream`` on an `AsyncBackend` (``aopen_backend``),
where the model, the budget and the effect ledger are awaited.

Example:
    ```python
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from harness_nodes import ToolContract, build_harnessed_agent
    from harness_nodes.testing import ScriptedChatModel, ai, tool_call


    @tool
    def search(query: str) -> list[str]:
        \"\"\"Search the notes.\"\"\"
        return [] if query == "typo" else ["note-1"]


    model = ScriptedChatModel(
        script=[
            ai(tool_calls=[tool_call("search", {"query": "typo"})]),
            ai(tool_calls=[tool_call("search", {"query": "storage"})]),
            ai("Found note-1."),
        ]
    )
    agent = build_harnessed_agent(model, [search], contracts={"search": ToolContract()})
    out = agent.invoke({"messages": [HumanMessage("find notes on storage")]})
    assert out["verdicts"][0]["action"] == "retry"  # the empty result went back to the model
    assert out["outcome"]["status"] == "completed"
    ```
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, ensure_config
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, Send

from harness_nodes import _verify
from harness_nodes._events import aemit, emit
from harness_nodes.aio import AsyncEffectLedger
from harness_nodes.budget import (
    BudgetedChatModel,
    BudgetGuard,
    Envelope,
    Envelopes,
    _ends_on_budget,
    _last_model,
    budgeted,
)
from harness_nodes.effects import EffectLedger, effect_kind
from harness_nodes.errors import UserError
from harness_nodes.pricing import Pricing
from harness_nodes.review import HumanReview, ReviewPolicy
from harness_nodes.state import (
    HarnessState,
    MessagesAndOutcome,
    MessagesAndVerdicts,
    MessagesOnly,
    Outcome,
    Verdict,
    replace_outcome,
)
from harness_nodes.verify import (
    ToolContract,
    VerificationStop,
    VerifyToolOutputs,
    _answer_invalid_calls,
    route_after_verify,
)

if TYPE_CHECKING:
    from checkpointers import AsyncBackend, Backend

__all__ = ["ModelNode", "add_harness", "build_harnessed_agent"]

Contracts = Mapping[str, ToolContract] | VerifyToolOutputs | None
"""Tool contracts: a mapping of tool name → `ToolContract`, a ready `VerifyToolOutputs`, or
``None`` for the default contract on every tool (error signals and empty results)."""

AGENT = "agent"
TOOLS = "tools"
VERIFY = "verify"
STOP = "verification_stop"
REVIEW = "review"
BUDGET_STOP = "budget_exhausted"
REROUTE = "reroute_after_"
"""Prefix of the node that takes over a router that raised (`_Rerouting`): + the source node."""

logger = logging.getLogger(__name__)


def _verifier(contracts: Contracts) -> VerifyToolOutputs:
    if contracts is None:
        return VerifyToolOutputs()
    if isinstance(contracts, VerifyToolOutputs):
        return contracts
    if isinstance(contracts, Mapping):
        return VerifyToolOutputs(dict(contracts))
    raise UserError(
        "contracts must map tool names to ToolContract, or be a VerifyToolOutputs, "
        f"got {type(contracts).__name__}"
    )


class _ModelInput(MessagesAndOutcome, total=False):
    """What `ModelNode` reads: the messages, the outcome, and the verdicts (retry counts)."""

    verdicts: Annotated[list[Verdict], operator.add]


@dataclass(frozen=True)
class ModelNode(Runnable[MessagesAndOutcome, dict[str, Any]]):
    """The model call of a harnessed agent: prompt → the model → one AI message.

    When the model answers without tool calls the task is done: the node also writes
    ``outcome = {"status": "completed", "partial_result": <answer>}`` (kept where the state
    has an ``outcome`` key), so finishing costs no extra superstep. A budget stop is no
    answer: neither a budgeted model's refusal nor an answer cut short at the output cap the
    budget lowered completes the task (the graph goes on to its budget stop). Nor does an
    answer with malformed tool calls (arguments that are not valid JSON, which LangChain puts
    in ``invalid_tool_calls``, or any call in a reply cut off at its output cap — finish
    reason ``length``/``max_tokens``/``MAX_TOKENS`` — whose arguments streaming may have
    repaired into truncated ones): each is answered by an error ``ToolMessage`` that tells the
    model what was wrong, with a failed verdict counted against the tool's ``max_retries``
    (from `verify`); once they are spent the verdict is ``fail``, which `route_after_verify`
    reads.

    The node is a ``Runnable`` with both paths: under ``invoke``/``stream`` it calls
    ``model.invoke``, under ``ainvoke``/``astream`` it awaits ``model.ainvoke`` (a model
    budgeted on an `AsyncBackend` has only that path).

    Example:
        ```python
        from langchain_core.messages import HumanMessage

        from harness_nodes import ModelNode
        from harness_nodes.testing import ScriptedChatModel

        node = ModelNode(ScriptedChatModel(script=["Hello."]), system_prompt="Be brief.")
        update = node({"messages": [HumanMessage("hi")]})
        assert update["outcome"] == {"status": "completed", "partial_result": "Hello."}
        ```
    """

    model: Runnable[LanguageModelInput, BaseMessage]
    """The chat model, with its tools bound."""
    system_prompt: str | None = None
    """Prepended to every call (not stored in the state)."""
    verify: VerifyToolOutputs | None = None
    """Whose contracts bound the retries of malformed tool calls (``None``: the default
    `ToolContract`'s)."""

    def __call__(self, state: _ModelInput) -> dict[str, Any]:
        """Call the model on the conversation (the run's config comes from LangChain's context).

        LangGraph reads the node's input schema from this signature (messages, outcome and
        verdicts).
        """
        return self.invoke(state)

    def invoke(
        self, input: MessagesAndOutcome, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Call the model on the conversation; the update for the state."""
        reply = self.model.invoke(self._prompt(input), config)
        update = self._update(input, reply)
        for verdict in update.get("verdicts", ()):
            emit("verdict", dict(verdict), config)
        if _completes(update) and isinstance(self.model, BudgetedChatModel):
            update["spend"] = self.model.spend(config, model=_last_model([reply]))
        return update

    async def ainvoke(
        self, input: MessagesAndOutcome, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Async `invoke`: awaits ``model.ainvoke``."""
        reply = await self.model.ainvoke(self._prompt(input), config)
        update = self._update(input, reply)
        for verdict in update.get("verdicts", ()):
            await aemit("verdict", dict(verdict), config)
        if _completes(update) and isinstance(self.model, BudgetedChatModel):
            update["spend"] = await self.model.aspend(config, model=_last_model([reply]))
        return update

    def _prompt(self, state: MessagesAndOutcome) -> list[BaseMessage]:
        messages: list[BaseMessage] = list(state["messages"])
        if self.system_prompt:
            messages = [SystemMessage(self.system_prompt), *messages]
        return messages

    def _update(self, state: MessagesAndOutcome, reply: BaseMessage) -> dict[str, Any]:
        update: dict[str, Any] = {"messages": [reply]}
        outcome: Outcome | None = None
        if isinstance(reply, AIMessage) and not _budget_stopped(reply):
            if _verify.malformed_calls(reply):
                answers, verdicts = _answer_invalid_calls(self.verify, state, reply)
                update = {"messages": [reply, *answers], "verdicts": verdicts}
            elif not reply.tool_calls:
                outcome = Outcome(status="completed", partial_result=reply.text)
        if outcome is not None or state.get("outcome") is not None:
            # The model runs once an outcome is set only on new input: a new task's turn.
            update["outcome"] = replace_outcome(state, outcome)
        return update


def _completes(update: Mapping[str, Any]) -> bool:
    """The update completes the task: the spend mirror is written with it.

    A budget stop writes it (`BudgetGuard.finish`); in between, the guard on the edge into
    the model cannot write state, so without this the mirror stayed empty on a task that
    ended well. One read of the ledger per task.
    """
    outcome = update.get("outcome")
    return isinstance(outcome, Mapping) and outcome.get("status") == "completed"


def _budget_stopped(message: BaseMessage) -> bool:
    """The task ends on the budget: a refusal, or an answer the budget cut short.

    A budgeted model's refusal carries ``budget.stopped``; an answer cut at the output cap
    the budget lowered carries ``budget.truncated``.
    """
    return _ends_on_budget(message)


class _FromBackend:
    """Default for ``checkpointer``: the backend's saver."""

    def __repr__(self) -> str:
        return "<the backend's saver>"


FROM_BACKEND: Any = _FromBackend()


def _sync_refused(needs: str) -> UserError:
    return UserError(
        f"this agent keeps its {needs} in an AsyncBackend: run it with ainvoke() or astream(), "
        "or build it on open_backend(url) to run it with invoke() or stream()"
    )


@dataclass(frozen=True)
class _ToolHooks:
    """Verification around the effect ledger, as one ``ToolNode`` hook pair.

    The ledger sits innermost: it records what the tool really returned (and replays it);
    verification then judges that output, replayed or fresh, the same way.
    """

    verify: VerifyToolOutputs
    ledger: EffectLedger | AsyncEffectLedger | None
    async_needs: str | None = None
    """What of the agent lives in an `AsyncBackend` (see `_IntoModel.async_needs`)."""

    def wrap(
        self, request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]
    ) -> ToolMessage | Command[Any]:
        if self.async_needs is not None:
            # A run resumed with invoke() can start here (after a review): refuse every call,
            # effectful or not, before any tool runs (the budget check after the tools would
            # refuse only once they had run).
            raise _sync_refused(self.async_needs)
        ledger = self.ledger
        if ledger is None:
            return self.verify.wrap_tool_call(request, execute)
        assert isinstance(ledger, EffectLedger)
        return self.verify.wrap_tool_call(request, lambda r: ledger.wrap_tool_call(r, execute))

    async def awrap(
        self, request: ToolCallRequest, execute: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> ToolMessage | Command[Any]:
        ledger = self.ledger
        if ledger is None:
            return await self.verify.awrap_tool_call(request, execute)

        async def inner(r: ToolCallRequest) -> ToolMessage | Command[Any]:
            assert ledger is not None
            return await ledger.awrap_tool_call(r, execute)

        return await self.verify.awrap_tool_call(request, inner)


@dataclass(frozen=True)
class _IntoModel:
    """The edge into the model: the budget check, when there is an envelope (no node)."""

    guard: BudgetGuard | None
    async_needs: str | None = None
    """What of this agent lives in an `AsyncBackend` (the budget, the effect ledger): then
    ``invoke`` cannot run it, and is refused here, on the edge every new input takes."""

    def route(self, state: MessagesOnly, config: RunnableConfig) -> str:
        if self.async_needs is not None:
            raise _sync_refused(self.async_needs)
        if self.guard is not None and self.guard.route(state, config) == "stop":
            return BUDGET_STOP
        return AGENT

    async def aroute(self, state: MessagesOnly, config: RunnableConfig) -> str:
        if self.guard is not None and await self.guard.aroute(state, config) == "stop":
            return BUDGET_STOP
        return AGENT

    def runnable(self) -> Runnable[Any, str]:
        """The router to add: `route` under ``invoke``, `aroute` under ``ainvoke``."""
        return RunnableLambda(self.route, afunc=self.aroute, name=type(self).__name__)


@dataclass(frozen=True)
class _AfterModel:
    """Out of the model: review when flagged, else the tools, else the end (or a budget stop).

    An answer with malformed tool calls is followed by the model node's error messages for
    them: its well-formed calls (if any) go on to review or the tools, else the graph goes
    back to the model (through the budget check), or to the stop once the retries are spent.
    """

    review: HumanReview
    into_model: _IntoModel

    def _route(self, state: MessagesOnly) -> str | None:
        """Where to go; ``None``: back into the model."""
        messages = state["messages"]
        if messages and _budget_stopped(messages[-1]):
            return BUDGET_STOP  # the wrapper refused a call the edge check let through
        if not messages or not isinstance(messages[-1], ToolMessage):
            return self.review.route(state)
        verified = _verified_route(state)
        if verified is not None:
            return verified
        i = _verify.last_ai_index(messages)
        reply = messages[i]
        if isinstance(reply, AIMessage) and _verify.runnable_calls(reply):
            return self.review.route({"messages": messages[: i + 1]})
        return None

    def route(self, state: MessagesOnly, config: RunnableConfig) -> str:
        return self._route(state) or self.into_model.route(state, config)

    async def aroute(self, state: MessagesOnly, config: RunnableConfig) -> str:
        return self._route(state) or await self.into_model.aroute(state, config)


@dataclass(frozen=True)
class _AfterTools:
    """Out of the tool node: back to the model (through the budget check), review, or stop."""

    into_model: _IntoModel

    def route(self, state: MessagesOnly, config: RunnableConfig) -> str:
        return _verified_route(state) or self.into_model.route(state, config)

    async def aroute(self, state: MessagesOnly, config: RunnableConfig) -> str:
        return _verified_route(state) or await self.into_model.aroute(state, config)


def _verified_route(state: MessagesOnly) -> str | None:
    """Review or stop after a verdict that says so; ``None``: on to the model."""
    route = route_after_verify(state)
    if route == "escalate":
        return REVIEW
    if route == "fail":
        return STOP
    return None


@dataclass(frozen=True)
class _BudgetStop(Runnable[MessagesAndOutcome, dict[str, Any]]):
    """The node a budget stop leads to: `BudgetGuard.finish`, or `afinish` under ``ainvoke``.

    A ``Runnable`` of its own (not a ``RunnableLambda``) so that, like any node function, it
    adds no run to traces.
    """

    guard: BudgetGuard

    def invoke(
        self, input: MessagesAndOutcome, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self.guard.finish(input, ensure_config(config))

    async def ainvoke(
        self, input: MessagesAndOutcome, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return await self.guard.afinish(input, ensure_config(config))


Route = Callable[[Any, RunnableConfig], Any]
"""A router's sync path: ``(state, config) -> destination``."""
ARoute = Callable[[Any, RunnableConfig], Awaitable[Any]]
"""A router's async path."""


@dataclass(frozen=True)
class _Rerouting:
    """A harness router that never raises past the node it leaves: its error goes to a node.

    LangGraph runs the router of a conditional edge inside the task of the node it leaves,
    after that node's writes (``graph/state.py`` appends the branch to the node's writers).
    When the router raises, the task fails with its writes recorded
    (``PregelRunner.commit``), and LangGraph counts a failed task with writes as finished
    (``pregel/_task_status.py``): a resume applies them, but no branch was written, so no
    node is scheduled and the run ends, e.g. with the model's tool call neither reviewed
    nor run. So an error here routes to `_Reroute`, which routes again as a node: a
    passing error is gone; a lasting one fails that node, whose writes LangGraph then
    keeps pending, so a resume (or the runner's next attempt) routes again — nothing is
    skipped and nothing runs without the review the policy asks for.
    """

    route: Route
    aroute: ARoute
    node: str
    """The `_Reroute` node an error routes to."""

    def _fallback(self) -> str:
        logger.warning("a router raised; the run routes again in node %r", self.node, exc_info=True)
        return self.node

    def _route(self, state: Any, config: RunnableConfig) -> Any:
        try:
            return self.route(state, config)
        except GraphBubbleUp:
            raise
        except Exception:
            return self._fallback()

    async def _aroute(self, state: Any, config: RunnableConfig) -> Any:
        try:
            return await self.aroute(state, config)
        except GraphBubbleUp:
            raise
        except Exception:
            return self._fallback()

    def runnable(self, name: str) -> Runnable[Any, Any]:
        """The router to add: `route` under ``invoke``, `aroute` under ``ainvoke``."""
        return RunnableLambda(self._route, afunc=self._aroute, name=name)


@dataclass(frozen=True)
class _Reroute(Runnable[Any, Command[Any]]):
    """The node a router's error leads to: the same routing, as a node (see `_Rerouting`).

    Its error fails this node (the task stays at it, to be carried on); its answer goes on
    as a ``Command``, through the edge's path map as the edge would have.
    """

    route: Route
    aroute: ARoute
    ends: Mapping[Any, str] | None

    def invoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Command[Any]:
        return self._goto(self.route(input, ensure_config(config)))

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Command[Any]:
        return self._goto(await self.aroute(input, ensure_config(config)))

    def _goto(self, destination: Any) -> Command[Any]:
        items = list(destination) if isinstance(destination, list | tuple) else [destination]
        goto = [d if isinstance(d, Send) or self.ends is None else self.ends[d] for d in items]
        return Command(goto=goto[0] if len(goto) == 1 else goto)


def _add_router(
    builder: StateGraph[Any],
    source: str,
    route: Route,
    aroute: ARoute,
    ends: Mapping[Any, str] | None,
    name: str,
) -> None:
    """Add the edge out of *source* with a harness router that never raises (`_Rerouting`)."""
    node = REROUTE + source
    destinations = tuple(dict.fromkeys(ends.values())) if ends is not None else None
    builder.add_node(node, _Reroute(route, aroute, ends), destinations=destinations)
    path_map = {**ends, node: node} if ends is not None else None
    router = _Rerouting(route, aroute, node).runnable(name)
    builder.add_conditional_edges(source, router, cast(Any, path_map))


def build_harnessed_agent(
    model: BaseChatModel | Sequence[BaseChatModel],
    tools: Sequence[BaseTool | Callable[..., Any]],
    *,
    envelope: Envelope | Envelopes | None = None,
    contracts: Contracts = None,
    review_policy: ReviewPolicy | None = None,
    system_prompt: str | None = None,
    state_schema: type[Any] = HarnessState,
    backend: Backend | AsyncBackend | None = None,
    checkpointer: BaseCheckpointSaver[Any] | None = FROM_BACKEND,
    pricing: Pricing | None = None,
    task_type: str = "default",
    name: str | None = None,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Build and compile the full harnessed agent of DESIGN.md around *model* and *tools*.

    Args:
        model: Any chat model (``init_chat_model("provider:model")`` or a scripted one), or a
            ladder of them, most capable first, to degrade down when the budget runs low; or
            a model you already wrapped with `budgeted` (its envelope and options — ``lease``,
            ``sync_commit``, pricing — apply, and the guard is wired as with *envelope*).
        tools: The agent's tools.
        envelope: The task's cost envelope (`Envelope`, or `Envelopes` by task type): the
            model is wrapped with `budgeted` and a `BudgetGuard` checks the budget on every
            edge into the model. ``None``: no budget.
        contracts: What a good output of each tool looks like (see `Contracts`).
        review_policy: Which calls a person approves first (`ReviewPolicy`). Escalations
            (verification exhausted, an effect's outcome unknown) always go to review.
        system_prompt: Prepended to every model call.
        state_schema: The state; `HarnessState` or a subclass of it (a state with no
            ``messages`` key raises `UserError`).
        backend: A `checkpointers.Backend` (``open_backend``: run the agent with ``invoke``
            or ``stream``) or `AsyncBackend` (``aopen_backend``: with ``ainvoke`` or
            ``astream``, where the model, the budget and the effect ledger are awaited;
            ``invoke`` is refused when the budget or the effect ledger lives there). The
            spend ledger for *envelope*, the effect ledger for tools marked `irreversible`
            or `effect`, and by default the checkpoints live there.
        checkpointer: Where checkpoints go; defaults to *backend*'s saver. Pass ``None`` to
            compile without one (a server such as ``langgraph dev`` brings its own).
        pricing: Prices for the budget (default: genai-prices, no fallback).
        task_type: The task type for `Envelopes` when the run's config names none.
        name: The compiled graph's name.

    Raises:
        UserError: for contracts that name no tool of *tools*, effectful tools without a
            backend, a *backend* that is neither a `Backend` nor an `AsyncBackend`, a model
            ladder without an envelope, or a bad argument.
        UnpricedModelError: with an envelope, for a model without a known price.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool
        from langgraph.types import Command

        from checkpointers import open_backend
        from harness_nodes import Envelope, ReviewPolicy, ToolContract, build_harnessed_agent
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @tool
        def refund(order: str, amount: float) -> dict:
            "Refund an order."
            return {"refund_id": "r-1", "order": order, "amount": amount}


        model = ScriptedChatModel(  # any chat model: init_chat_model("openai:gpt-4o-mini")
            script=[ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 250})]), ai("OK")],
            model_name="gpt-4o-mini",
        )
        with open_backend("memory://") as backend:
            agent = build_harnessed_agent(
                model,
                [refund],
                envelope=Envelope(max_usd=0.50),  # cost envelope per task
                contracts={"refund": ToolContract(required=("refund_id",))},  # verified outputs
                review_policy=ReviewPolicy(rules={"refund": lambda a: a["amount"] > 100}),
                backend=backend,  # checkpoints (and the effect ledger) live here
            )
            config = {"configurable": {"thread_id": "ticket-1"}}
            paused = agent.invoke({"messages": [HumanMessage("Refund order A1")]}, config)
            assert paused["__interrupt__"]  # a refund over $100 waits for a person
            done = agent.invoke(Command(resume={"type": "approve"}), config)
        assert done["outcome"] == {"status": "completed", "partial_result": "OK"}
        assert [v["ok"] for v in done["verdicts"]] == [True]
        assert any('"refund_id": "r-1"' in str(m.content) for m in done["messages"])  # it ran
        ```
    """
    builder = _agent_builder(
        model,
        tools,
        envelope=envelope,
        pricing=pricing,
        task_type=task_type,
        contracts=contracts,
        review_policy=review_policy,
        system_prompt=system_prompt,
        state_schema=state_schema,
        backend=backend,
    )
    if checkpointer is FROM_BACKEND:
        checkpointer = backend.checkpointer if backend is not None else None
    return builder.compile(checkpointer=checkpointer, name=name)


def _agent_builder(
    model: BaseChatModel | Sequence[BaseChatModel],
    tools: Sequence[BaseTool | Callable[..., Any]],
    *,
    envelope: Envelope | Envelopes | None = None,
    pricing: Pricing | None = None,
    task_type: str = "default",
    contracts: Contracts = None,
    review_policy: ReviewPolicy | None = None,
    system_prompt: str | None = None,
    state_schema: type[Any] = HarnessState,
    backend: Backend | AsyncBackend | None = None,
) -> StateGraph[Any]:
    """The uncompiled `StateGraph` behind `build_harnessed_agent` (same arguments)."""
    from checkpointers import AsyncBackend, Backend

    if backend is not None and not isinstance(backend, Backend | AsyncBackend):
        raise UserError(
            "backend must be a checkpointers.Backend (open_backend) or AsyncBackend "
            f"(aopen_backend), got {type(backend).__name__}"
        )
    tool_node_probe = ToolNode(list(tools))
    tool_names = set(tool_node_probe.tools_by_name)
    effectful = sorted(n for n, t in tool_node_probe.tools_by_name.items() if effect_kind(t))
    if effectful and backend is None:
        raise UserError(
            f"tools {', '.join(effectful)} have side effects (irreversible/effect): pass "
            "backend=open_backend(url) (aopen_backend(url) for ainvoke) so the effect ledger "
            "can run them at most once"
        )
    verify = _verifier(contracts)
    ledger: EffectLedger | AsyncEffectLedger | None = None
    if effectful and isinstance(backend, AsyncBackend):
        ledger = AsyncEffectLedger(backend)
    elif effectful and isinstance(backend, Backend):
        ledger = EffectLedger(backend)
    unknown = sorted(set(verify.contracts) - tool_names)
    if unknown:
        raise UserError(
            f"contracts name tools the agent does not have: {', '.join(unknown)} "
            f"(tools: {', '.join(sorted(tool_names))})"
        )
    base_tools = list(tool_node_probe.tools_by_name.values())
    review = HumanReview(
        review_policy if review_policy is not None else ReviewPolicy(),
        tools=base_tools,
        tools_node=TOOLS,
        model_node=AGENT,
        node=REVIEW,
    )
    llm: Runnable[LanguageModelInput, BaseMessage]
    guard: BudgetGuard | None = None
    if isinstance(model, BudgetedChatModel):
        if envelope is not None:
            raise UserError(
                "model is already budgeted(...), with its own envelope: pass envelope=None"
            )
        budgeted_model = model.bind_tools(base_tools)
        guard = BudgetGuard(budgeted_model, system_prompt=system_prompt)
        llm = budgeted_model
    elif envelope is not None:
        budgeted_model = budgeted(
            model, envelope=envelope, backend=backend, pricing=pricing, task_type=task_type
        ).bind_tools(base_tools)
        guard = BudgetGuard(budgeted_model, system_prompt=system_prompt)
        llm = budgeted_model
    elif isinstance(model, BaseChatModel):
        llm = model.bind_tools(base_tools)
    else:
        raise UserError("a model ladder needs an envelope (the budget decides when to step down)")
    on_async: list[str] = []  # what only ainvoke() can reach: invoke() is refused up front
    if guard is not None and isinstance(guard.model.backend, AsyncBackend):
        on_async.append("budget")
    if isinstance(ledger, AsyncEffectLedger):
        on_async.append("effect ledger")
    into_model = _IntoModel(guard, " and ".join(on_async) or None)
    hooks = _ToolHooks(verify, ledger, into_model.async_needs)
    builder: StateGraph[Any] = StateGraph(state_schema)
    if "messages" not in builder.channels:
        raise UserError(
            f"state_schema {getattr(state_schema, '__name__', state_schema)} has no 'messages' "
            "key: extend HarnessState (or MessagesState) with your own keys"
        )
    builder.add_node(AGENT, ModelNode(llm, system_prompt, verify))
    builder.add_node(
        TOOLS,
        ToolNode(list(tools), wrap_tool_call=hooks.wrap, awrap_tool_call=hooks.awrap),
    )
    builder.add_node(REVIEW, review, destinations=(TOOLS, AGENT, END))
    builder.add_node(STOP, VerificationStop())
    into = {AGENT: AGENT}
    if guard is not None:
        builder.add_node(BUDGET_STOP, _BudgetStop(guard), input_schema=MessagesAndOutcome)
        builder.add_edge(BUDGET_STOP, END)
        into[BUDGET_STOP] = BUDGET_STOP
    builder.add_conditional_edges(START, into_model.runnable(), cast(Any, into))
    # Review when the policy flags a call, else the tools, else the end.
    after_model = {REVIEW: REVIEW, TOOLS: TOOLS, AGENT: AGENT, END: END, STOP: STOP}
    if guard is not None:
        after_model[BUDGET_STOP] = BUDGET_STOP
    after_agent = _AfterModel(review, into_model)
    _add_router(builder, AGENT, after_agent.route, after_agent.aroute, after_model, "_AfterModel")
    after_tools = {**into, REVIEW: REVIEW, STOP: STOP}
    out_of_tools = _AfterTools(into_model)
    _add_router(builder, TOOLS, out_of_tools.route, out_of_tools.aroute, after_tools, "_AfterTools")
    builder.add_edge(STOP, END)
    return builder


@dataclass(frozen=True)
class _AfterVerify:
    """Route out of the inserted verify node: on to where the tools went, or elsewhere."""

    ok: str
    model_node: str
    stop: str
    review: str | None

    def route(self, state: MessagesOnly, config: RunnableConfig) -> str:
        return self(state)

    async def aroute(self, state: MessagesOnly, config: RunnableConfig) -> str:
        return self(state)

    def __call__(self, state: MessagesOnly) -> str:
        route = route_after_verify(state)
        if route == "ok":
            return self.ok
        if route == "retry":
            return self.model_node
        if route == "escalate" and self.review is not None:
            return self.review
        return self.stop


@dataclass(frozen=True)
class _ModelDetours:
    """The user's own router out of the model node, with the harness's detours first.

    A reply with only malformed tool calls (``invalid_tool_calls``, or any call of a reply cut
    off at its output cap) goes to the verify node,
    which answers them: the user's router reads ``tool_calls`` alone (``tools_condition``
    does) and would end the run on it. With a review policy, a flagged call goes to review.
    Both paths, as the user's router may have only one: LangGraph's async templates route
    with an ``async def``, which ``invoke`` refuses (``No synchronous function provided``).
    """

    original: Runnable[Any, Any]
    verify_node: str
    review: HumanReview | None = None

    def _detour(self, state: Any) -> str | None:
        messages = _verify.messages_of(state)
        last = messages[-1] if messages else None
        if (
            isinstance(last, AIMessage)
            and _verify.malformed_calls(last)
            and not _verify.runnable_calls(last)
            and not _budget_stopped(last)
        ):
            return self.verify_node
        if self.review is not None and self.review.route(state) == self.review.node:
            return self.review.node
        return None

    def route(self, state: Any, config: RunnableConfig) -> Any:
        return self._detour(state) or self.original.invoke(state, config)

    async def aroute(self, state: Any, config: RunnableConfig) -> Any:
        return self._detour(state) or await self.original.ainvoke(state, config)


@dataclass(frozen=True)
class _VerifyAndAnswerMalformed:
    """The verify node `add_harness` inserts: `VerifyToolOutputs`, then the malformed calls.

    The user's model node keeps a reply's malformed tool calls as they are; such a reply
    reaches this node straight from the model (`_ModelDetours`), or after the tools ran its
    well-formed calls. Each malformed call not answered yet is answered as `ModelNode`
    answers it: an error message and a failed verdict, counted against the tool's
    ``max_retries``.
    """

    verify: VerifyToolOutputs

    def __call__(self, state: MessagesAndVerdicts) -> dict[str, Any]:
        """Check the tool outputs, and answer the last reply's unanswered malformed calls."""
        update = self.verify(state)
        messages = _verify.messages_of(state)
        i = _verify.last_ai_index(messages)
        reply = messages[i] if i >= 0 else None
        if not isinstance(reply, AIMessage) or _budget_stopped(reply):
            return update
        answered = {m.tool_call_id for m in messages[i + 1 :] if isinstance(m, ToolMessage)}
        before = {"messages": messages[:i], "verdicts": _verify.verdicts_of(state)}
        answers, verdicts = _answer_invalid_calls(self.verify, before, reply)
        # On a "fail" verdict the good calls are answered "not run": those the tools ran keep
        # their own answers.
        answers = [a for a in answers if a.tool_call_id not in answered]
        ids = {a.tool_call_id for a in answers}
        verdicts = [v for v in verdicts if v["tool_call_id"] in ids]
        if not verdicts:
            return update
        for verdict in verdicts:
            emit("verdict", dict(verdict))
        return {
            "messages": [*update.get("messages", ()), *answers],
            "verdicts": [*update.get("verdicts", ()), *verdicts],
        }


_NO_HOOK_SEEN = object()


def _unguarded_effects(node: Any) -> list[str]:
    """The tools marked `irreversible`/`effect` that *node* certainly runs without the ledger.

    Only what is certain is reported: a LangGraph ``ToolNode`` (not a subclass) whose hooks
    are none, or only `VerifyToolOutputs`'s (which runs the tool as it is). Any other hook
    (the ledger's, or a function that may call it inside) or tool node (the user's own
    function) may run them through the ledger, so nothing is reported for it.
    """
    if type(node) is not ToolNode:
        return []
    for hook in (
        getattr(node, "_wrap_tool_call", _NO_HOOK_SEEN),
        getattr(node, "_awrap_tool_call", _NO_HOOK_SEEN),
    ):
        if hook is not None and type(getattr(hook, "__self__", None)) is not VerifyToolOutputs:
            return []
    return sorted(name for name, t in node.tools_by_name.items() if effect_kind(t))


def add_harness(
    builder: StateGraph[Any],
    *,
    model_node: str,
    tools_node: str,
    contracts: Contracts = None,
    review_policy: ReviewPolicy | None = None,
    tools: Sequence[BaseTool] = (),
    verify_node: str = VERIFY,
    review_node: str = REVIEW,
    stop_node: str = STOP,
) -> StateGraph[Any]:
    """Insert harness nodes into an existing builder around its model and tool nodes.

    Your nodes are not touched. The edge that leaves *tools_node* is re-routed through a
    `VerifyToolOutputs` node (``verify_node``), which goes on to where your tools went when
    the outputs are good, back to *model_node* to retry, to review when it escalates, or to
    a `VerificationStop`. With a *review_policy*, your router out of *model_node* is wrapped
    so that flagged calls go to a `HumanReview` node (``review_node``) first, which then
    sends them on to *tools_node* (or the reviewer's answer back to *model_node*).

    A model reply with malformed tool calls (arguments that are not valid JSON, which
    LangChain puts in ``invalid_tool_calls``; every call of a reply cut off at its output cap,
    finish reason ``length``/``max_tokens``/``MAX_TOKENS``, whose arguments streaming may
    have repaired into valid but truncated ones) is no final answer: when *model_node* leaves
    by one router, a reply with only such calls goes to the verify node (not to the tools),
    which answers each with a corrective error message and a failed verdict, back to
    *model_node* within the tool's ``max_retries``, then to the `VerificationStop`; the
    malformed siblings of good calls are answered there after the tools ran.

    A tool that returns ``Command(goto=...)`` starts its target beside the verification
    node, with the output unchecked: give such tools' ``ToolNode`` the verification hook
    (``wrap_tool_call=verify.wrap_tool_call``, as `build_harnessed_agent` does), which sends
    a refused output where its verdict says instead. The outputs checked are the tool
    messages after the last AI message: a *tools_node* that adds an AI message of its own
    after them (a sub-agent summing up) would hide them, and the verify node raises
    `UserError` instead; keep such a step out of the tool node.

    Args:
        builder: The (uncompiled) ``StateGraph``.
        model_node: The name of your node that calls the model.
        tools_node: The name of your node that runs the tool calls.
        contracts: What a good output of each tool looks like (see `Contracts`).
        review_policy: Which calls a person approves first; ``None``: no review node.
        tools: Your tools, so reviewers' edited arguments are validated against them, and
            the names in *contracts* are checked when *tools_node* is not a ``ToolNode``.
        verify_node: Name for the inserted verification node.
        review_node: Name for the inserted review node.
        stop_node: Name for the inserted node that ends a task whose verification failed.

    Returns:
        The same builder, for chaining into ``.compile(...)``.

    Raises:
        UserError: when the state keeps its messages under a key other than ``messages``
            (``ToolNode(messages_key=...)``: use the `VerifyToolOutputs` hook and
            `route_after_verify` with that key instead), a named node is missing,
            *tools_node* does not leave by one plain edge, (with a review policy)
            *model_node* does not leave by one router, or *contracts* name a tool that
            neither *tools* nor a ``ToolNode`` at *tools_node* has. With neither (your own
            function as *tools_node* and no *tools*) the names cannot be checked: pass
            *tools* to have them checked.
            Also when a ``ToolNode`` at *tools_node* has a tool marked `irreversible`/`effect`
            and no hook but `VerifyToolOutputs`'s (none at all, or only the verification's):
            the tool would raise `UnguardedEffect` at its first call, after any review. A
            hook of your own, or your own function as *tools_node*, is not inspected.

    Example:
        ```python
        from langchain_core.messages import HumanMessage, ToolMessage
        from langgraph.graph import END, START, MessagesState, StateGraph

        from harness_nodes import ToolContract, add_harness
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call

        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("lookup", {"id": 1})]), ai("Done.")]
        )


        def call_model(state: MessagesState) -> dict:
            return {"messages": [model.invoke(state["messages"])]}


        def run_tools(state: MessagesState) -> dict:
            call = state["messages"][-1].tool_calls[0]
            return {"messages": [ToolMessage('{"error": "503"}', tool_call_id=call["id"])]}


        builder = StateGraph(MessagesState)
        builder.add_node("llm", call_model)
        builder.add_node("tool_node", run_tools)
        builder.add_edge(START, "llm")
        builder.add_conditional_edges(
            "llm", lambda s: "tool_node" if s["messages"][-1].tool_calls else END
        )
        builder.add_edge("tool_node", "llm")
        contracts = {"lookup": ToolContract(max_retries=0)}
        graph = add_harness(
            builder, model_node="llm", tools_node="tool_node", contracts=contracts
        ).compile()
        out = graph.invoke({"messages": [HumanMessage("look up 1")]})
        assert out["messages"][-1].content.startswith("I stopped: a tool output failed")
        ```
    """
    for role, node in (("model_node", model_node), ("tools_node", tools_node)):
        if node not in builder.nodes:
            raise UserError(
                f"add_harness: {role}={node!r} is not a node of this graph "
                f"(nodes: {', '.join(sorted(builder.nodes))})"
            )
    node_key = getattr(builder.nodes[tools_node].runnable, "_messages_key", "messages")
    if node_key != "messages" or "messages" not in builder.channels:
        # Its nodes and routers read the conversation from "messages": elsewhere they would
        # see no tool output at all, and every bad one would reach the model as data.
        where = repr(node_key) if node_key != "messages" else "another key"
        raise UserError(
            f"add_harness: this graph keeps its messages under {where} "
            f"(state keys: {', '.join(sorted(builder.channels))}); the harness nodes read "
            "them from 'messages' (MessagesState, HarnessState): rename the key, or put "
            "VerifyToolOutputs on your ToolNode yourself (wrap_tool_call=verify.wrap_tool_call, "
            "then route_after_verify(state, messages_key=...))"
        )
    unguarded = _unguarded_effects(builder.nodes[tools_node].runnable)
    if unguarded:
        names = ", ".join(repr(n) for n in unguarded)
        when = " (after a reviewer approved it)" if review_policy is not None else ""
        raise UserError(
            f"add_harness: {names} {'is' if len(unguarded) == 1 else 'are'} marked "
            f"irreversible/effect, but the ToolNode at {tools_node!r} runs it without the "
            f"effect ledger: it would raise UnguardedEffect at its first call{when}. Give the "
            "ToolNode the ledger's hooks: ToolNode(tools, wrap_tool_call=ledger.wrap_tool_call, "
            "awrap_tool_call=ledger.awrap_tool_call) with ledger = EffectLedger(backend) "
            "(with verification too, call one hook inside the other in your own)"
        )
    verifier = _verifier(contracts)
    known = {t.name for t in tools}
    node_tools = getattr(builder.nodes[tools_node].runnable, "tools_by_name", None)
    if isinstance(node_tools, Mapping):
        known |= set(node_tools)
    unknown = sorted(set(verifier.contracts) - known)
    # A misspelt name would leave the real tool on the default contract. With no tools to
    # compare with (a function tool node, no tools=) nothing can be checked; refusing would
    # refuse every contract of such a graph, so the docstring states the limit instead.
    if known and unknown:
        raise UserError(
            f"add_harness: contracts name tools the graph does not have: {', '.join(unknown)} "
            f"(tools: {', '.join(sorted(known))})"
        )
    model_branches = dict(builder.branches.get(model_node) or {})
    added = [verify_node, stop_node, REROUTE + verify_node]
    if review_policy is not None:
        added.append(review_node)
    if len(model_branches) == 1:
        added.append(REROUTE + model_node)
    for new in added:
        if new in builder.nodes:
            raise UserError(f"add_harness: the graph already has a node named {new!r}")
    out_edges = [(s, e) for (s, e) in builder.edges if s == tools_node]
    if builder.branches.get(tools_node) or len(out_edges) != 1:
        raise UserError(
            f"add_harness: {tools_node!r} must leave by exactly one plain edge "
            "(add_edge(tools_node, model_node)); route it yourself with VerifyToolOutputs "
            "and route_after_verify otherwise"
        )
    if review_policy is not None and len(model_branches) != 1:
        raise UserError(
            f"add_harness: with a review_policy, {model_node!r} must leave by exactly one "
            "router (add_conditional_edges(model_node, should_continue, ...))"
        )
    review: HumanReview | None = None
    if review_policy is not None:
        review = HumanReview(
            review_policy,
            tools=tuple(tools),
            tools_node=tools_node,
            model_node=model_node,
            node=review_node,
        )
        builder.add_node(review_node, review, destinations=(tools_node, model_node, END))
    if len(model_branches) == 1:
        # Without one router out of the model (a plain edge to the tools, several routers)
        # there is no end a malformed-only reply could take to detour from.
        (branch_name, branch), *_ = model_branches.items()
        del builder.branches[model_node][branch_name]
        ends: dict[Hashable, str] | None = None
        if branch.ends is not None:
            ends = {**branch.ends, verify_node: verify_node}
            if review is not None:
                ends[review_node] = review_node
        first = _ModelDetours(branch.path, verify_node, review)
        _add_router(builder, model_node, first.route, first.aroute, ends, "model_detours")
    _, after_tools = out_edges[0]
    builder.edges.discard(out_edges[0])
    builder.add_node(verify_node, _VerifyAndAnswerMalformed(verifier))
    builder.add_node(stop_node, VerificationStop())
    builder.add_edge(tools_node, verify_node)
    router = _AfterVerify(
        ok=after_tools,
        model_node=model_node,
        stop=stop_node,
        review=review_node if review is not None else None,
    )
    verify_ends: dict[Hashable, str] = {after_tools: after_tools, model_node: model_node}
    verify_ends[stop_node] = stop_node
    if review is not None:
        verify_ends[review_node] = review_node
    _add_router(builder, verify_node, router.route, router.aroute, verify_ends, "_AfterVerify")
    builder.add_edge(stop_node, END)
    return builder
