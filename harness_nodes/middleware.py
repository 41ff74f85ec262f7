"""The harness for ``create_agent`` users: LangChain v1 middleware over the same harness core.

Each middleware is a thin adapter: it calls the objects the harness nodes call, so a rule
lives in one place.

- `CostEnvelopeMiddleware`: wraps the agent's model with `budgeted` (the same reservation in
  the same spend ledger, keyed by task = thread id), and any model a middleware inside it
  swaps into the request (``ModelFallbackMiddleware``). Spend survives pauses, crashes and
  resumes, unlike ``ModelCallLimitMiddleware``'s run counters. A refused call, or an answer
  cut short at the output cap the budget lowered (kept, before the note), ends the agent
  with the `BudgetGuard` finish note (outcome ``budget_exhausted``), or raises
  `BudgetExceeded` with ``exit_behavior="error"``. New input after a finished task clears
  that task's outcome (a ``before_agent`` step, as with verification).
- `VerifyToolOutputsMiddleware`: `VerifyToolOutputs.wrap_tool_call` around each tool call
  (a bad output goes back to the model as a corrective error message; a tool with side
  effects is never re-run, it escalates), and `VerificationStop` before the next model call
  when a verdict says ``fail`` or an escalation has no reviewer (also after a ``return_direct``
  tool, whose refused output would otherwise end the run). New input after a finished task
  clears that task's outcome (a ``before_agent`` step).
- Each middleware above that keeps the harness records (`HarnessAgentState`) writes outcome
  ``completed`` when the model answers, as `build_harnessed_agent` does: the task reads the
  same in the state, `build_trace`, ``harness report`` and Langfuse whichever are listed.
- `EffectLedgerMiddleware`: tools marked `irreversible`/`effect` run through the
  `EffectLedger`: at most once per ``(thread_id, tool_call_id)``, replayed after a crash.
- `ReviewQueueMiddleware`: `HumanReview` after the model (flagged calls) and before the next
  model call (escalations). The pause is a LangGraph interrupt carrying `ReviewRequest`
  items, so `ReviewQueue` lists it and `ReviewQueue.decide` validates the decision
  (``approve | edit | reject | respond``) and resumes the run.

Example:
    ```python
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from checkpointers import open_backend
    from harness_nodes import CostEnvelopeMiddleware, Envelope, VerifyToolOutputsMiddleware
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
        ],
        model_name="gpt-4o-mini",
    )
    with open_backend("memory://") as backend:
        agent = create_agent(
            model,
            [search],
            middleware=[
                CostEnvelopeMiddleware(Envelope(max_usd=0.05), backend=backend),
                VerifyToolOutputsMiddleware(),
            ],
            checkpointer=backend.checkpointer,
        )
        out = agent.invoke(
            {"messages": [HumanMessage("find notes on storage")]},
            {"configurable": {"thread_id": "t1"}},
        )
    assert out["verdicts"][0]["action"] == "retry"  # the empty result went back to the model
    assert out["messages"][-1].content == "Found note-1."
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, NotRequired, cast

from langchain.agents.middleware.types import (
    AgentMiddleware,
    AgentState,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
    hook_config,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.config import get_config
from langgraph.graph import END
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command, Overwrite

from harness_nodes import _verify
from harness_nodes._events import aemit, emit
from harness_nodes.aio import AsyncEffectLedger
from harness_nodes.budget import (
    BudgetCallbackHandler,
    BudgetedChatModel,
    BudgetGuard,
    Envelope,
    Envelopes,
    ExitBehavior,
    _check_lease,
    _ends_on_budget,
    _is_stop_message,
    _last_model,
    budgeted,
)
from harness_nodes.effects import EffectLedger
from harness_nodes.errors import UserError
from harness_nodes.pricing import Pricing
from harness_nodes.review import HumanReview, ReviewPolicy
from harness_nodes.state import (
    MessagesAndOutcome,
    Outcome,
    ReviewRecord,
    Spend,
    Verdict,
    keep_first_outcome,
    merge_spend,
    replace_outcome,
)
from harness_nodes.verify import (
    ToolContract,
    VerificationStop,
    VerifyToolOutputs,
    _answer_invalid_calls,
    route_after_verify,
)

__all__ = [
    "CostEnvelopeMiddleware",
    "EffectLedgerMiddleware",
    "HarnessAgentState",
    "ReviewQueueMiddleware",
    "VerifyToolOutputsMiddleware",
]


class HarnessAgentState(AgentState[Any]):
    """``create_agent``'s state plus the harness records (the keys of `HarnessState`).

    The harness middleware declare it, so ``create_agent`` keeps verdicts, the spend mirror
    and the outcome in the agent's state, as a `build_harnessed_agent` graph does.

    Example:
        ```python
        from langchain.agents import create_agent
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool

        from harness_nodes import HarnessAgentState, VerifyToolOutputsMiddleware
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @tool
        def search(query: str) -> list[str]:
            "Search the notes."
            return ["note-1"]


        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("search", {"query": "storage"})]), ai("Found note-1.")]
        )
        agent = create_agent(model, [search], middleware=[VerifyToolOutputsMiddleware()])
        out: HarnessAgentState = agent.invoke({"messages": [HumanMessage("notes on storage?")]})
        assert [(v["tool"], v["ok"]) for v in out["verdicts"]] == [("search", True)]
        ```
    """

    verdicts: NotRequired[Annotated[list[Verdict], operator.add]]
    """Verification records, appended."""
    reviews: NotRequired[Annotated[list[ReviewRecord], operator.add]]
    """Review records, appended."""
    spend: NotRequired[Annotated[Spend, merge_spend]]
    """Checkpointed mirror of the task's spend (written when the budget stops the agent)."""
    outcome: NotRequired[Annotated[Outcome | None, keep_first_outcome]]
    """How the task ended: ``completed`` on the model's answer, or the stop a harness layer
    made (as in a `build_harnessed_agent` graph)."""


log = logging.getLogger(__name__)

ModelHandler = Callable[[ModelRequest[Any]], ModelResponse[Any]]
ToolHandler = Callable[[ToolCallRequest], ToolMessage | Command[Any]]
AsyncToolHandler = Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]]


def _config() -> RunnableConfig:
    return get_config()


def _stop_update(update: dict[str, Any]) -> dict[str, Any]:
    return {**update, "jump_to": "end"}


def _mark_structured_end(response: ModelResponse[Any]) -> ModelResponse[Any]:
    """Mark the message a structured response ends the task on, when it is not an answer.

    With ``ToolStrategy`` the model's answer is a call of the response-format tool, and
    ``create_agent`` ends the run on that tool's message (made in the model node): the mark
    tells `_verify.current_task` that the user's next message opens a new task.
    """
    if response.structured_response is None or not response.result:
        return response
    last = response.result[-1]
    if not isinstance(last, ToolMessage) or _verify.harness_meta(last).get(_verify.TASK_END):
        return response  # an answer without tool calls ends a task anyway
    harness = {**_verify.harness_meta(last), _verify.TASK_END: "structured_response"}
    marked = last.model_copy(
        update={"additional_kwargs": {**last.additional_kwargs, _verify.HARNESS_KEY: harness}}
    )
    return ModelResponse(
        result=[*response.result[:-1], marked],
        structured_response=response.structured_response,
    )


def _new_task(state: HarnessAgentState) -> dict[str, Any] | None:
    # New input after a finished task starts a new task: the previous task's outcome (a
    # budget or verification stop, an answer) is not this one's. A paused task resumed has
    # no outcome, and its run does not start with this step.
    if cast(Any, state).get("outcome") is None:
        return None
    messages = _verify.messages_of(state)
    start = _verify.current_task(messages, ()).first
    return {"outcome": Overwrite(None)} if 0 < start < len(messages) else None


def _completed(
    response: ModelResponse[Any], state: Any, *, replace: bool = True
) -> ExtendedModelResponse[Any]:
    """The model's response, with outcome ``completed`` when it answers (as `ModelNode`).

    An answer without tool calls completes the task (unless it is an inner middleware's stop
    note, which carries its own outcome). So does a structured response (``response_format``),
    which is the task's result; with ``ToolStrategy`` the run ends on a tool message. Every
    middleware that declares the ``outcome`` key writes it, so a completed task is reported
    completed whichever of them the agent lists.

    With *replace* an outcome already in the state (an earlier task's) is replaced
    (``Overwrite``); only `CostEnvelopeMiddleware` does that, because LangGraph takes one
    ``Overwrite`` per step and the others' writes land in the same step. Without it the
    outcome is written only where there is none: their ``before_agent`` step already cleared
    an earlier task's, so one still there is this task's, and the first outcome stands.
    """
    update: dict[str, Any] = {}
    response = _mark_structured_end(response)
    last = response.result[-1] if response.result else None
    outcome: Outcome | None = None
    if response.structured_response is not None:
        outcome = Outcome(status="completed", partial_result=response.structured_response)
    elif (
        isinstance(last, AIMessage)
        and not last.tool_calls
        and not last.invalid_tool_calls  # malformed calls: no answer (see the verifier)
        and "outcome" not in _verify.harness_meta(last)
    ):
        outcome = Outcome(status="completed", partial_result=last.text)
    if outcome is not None and replace:
        update["outcome"] = replace_outcome(state, outcome)
    elif outcome is not None and cast(Any, state).get("outcome") is None:
        update["outcome"] = outcome
    return ExtendedModelResponse(response, Command(update=update) if update else None)


class _BudgetedRequest(ModelRequest[Any]):
    """A model request whose model stays budgeted when an inner middleware swaps it.

    `CostEnvelopeMiddleware` hands the middleware inside it a request of this class (one
    subclass per middleware instance, naming it in `budget`). ``ModelRequest.override``
    builds its new request with ``dataclasses.replace``, i.e. through this ``__init__``, so a
    model swapped in there (``ModelFallbackMiddleware``'s fallback, a router's choice) is
    wrapped in the same envelope before anything calls it: whatever the order the middleware
    are listed in, no call inside the cost middleware goes unreserved.
    """

    budget: ClassVar[CostEnvelopeMiddleware]

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        object.__setattr__(self, "model", self.budget._budgeted(self.model))

    def __setattr__(self, name: str, value: Any) -> None:
        # Direct assignment is deprecated by LangChain but still works: budget it too.
        if name == "model":
            value = self.budget._budgeted(value)
        super().__setattr__(name, value)


class _BoundBudget(RunnableBinding[Any, Any]):
    """A binding over a model `CostEnvelopeMiddleware` put in place of the one it bound.

    ``model.bind(temperature=0)`` swapped into a request is budgeted inside: the binding is
    rebuilt around the `budgeted` model, with its kwargs and config. ``create_agent`` then
    calls ``bind_tools`` on it, which a plain ``RunnableBinding`` hands to the model inside,
    dropping its own kwargs; here they are applied again on top of the tools.
    """

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[Any, Any]:
        """The model inside bound to *tools*, with this binding's kwargs and config."""
        return _BoundBudget(
            bound=cast(Any, self.bound).bind_tools(tools, **kwargs),
            kwargs=self.kwargs,
            config=self.config,
            config_factories=self.config_factories,
        )


def _budgeted_inside(model: Any) -> BudgetedChatModel | None:
    while isinstance(model, RunnableBinding):
        model = model.bound
    return model if isinstance(model, BudgetedChatModel) else None


class _OutcomePerTask(AgentMiddleware[HarnessAgentState, Any, Any]):
    """A ``before_agent`` step for the middleware that write ``outcome``: one task's each.

    ``create_agent`` keeps a thread's state across runs, and `keep_first_outcome` keeps an
    outcome once written, so new input after a finished task would show (and keep) that task's
    outcome. Each middleware writing one clears it first; the first such step to run does,
    the others find nothing left to clear.
    """

    def before_agent(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Clear the previous task's outcome when new input starts a new task on the thread."""
        return _new_task(state)

    async def abefore_agent(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async `before_agent`."""
        return _new_task(state)


class CostEnvelopeMiddleware(_OutcomePerTask):
    """A task's cost envelope for ``create_agent``: every model call goes through `budgeted`.

    Before each call the worst case is reserved in the backend's spend ledger, keyed by task
    (``configurable["task_id"]``, else the thread id), ``max_tokens`` is capped to what
    remains, the model steps down the ladder (``fallbacks``) when the next call would not
    fit, and when nothing fits the agent ends with outcome ``budget_exhausted``
    (``exit_behavior="end"``, the envelope's) or `BudgetExceeded` is raised (``"error"``).
    So does an answer cut short at the output cap the budget lowered (finish reason
    ``length``/``max_tokens``: its tool call or the rest of its text lost for want of budget),
    which stays in the messages, marked ``truncated`` in its budget record.
    Spend is read back from the ledger, so it survives resume — in another process too.
    A model that a middleware listed after this one swaps into the request
    (``ModelFallbackMiddleware``'s fallback, a router's choice: ``request.override(model=...)``)
    is wrapped the same way before it is called, so the order does not matter; a binding of
    one (``backup.bind(temperature=0)``) is rebuilt around the wrapped model, its kwargs kept.
    A Runnable that is no chat model (``init_chat_model`` with configurable fields) cannot be
    wrapped: it runs, with a warning, and its calls are recorded in the ledger after the fact,
    as `BudgetCallbackHandler` records them (on a sync `Backend`; on an `AsyncBackend` they
    are not recorded). A middleware
    that calls a model of its own outside the request (a summarizer, a tool selector given its
    own model) is not: account those calls with `BudgetCallbackHandler`.
    A run that brings new input after a finished task first clears that task's ``outcome``
    (a ``before_agent`` step), so the new task does not show it while it runs.

    Args:
        envelope: One `Envelope` for every task, or `Envelopes` by task type.
        backend: The `Backend` (or `AsyncBackend`) whose spend ledger records the task.
        fallbacks: Cheaper models to degrade to, most capable first (after the agent's own).
        pricing: Where prices come from (default genai-prices).
        task_type: Task type when the run's config gives none.
        token_counter: How prompts are counted before a call (see `BudgetedChatModel`).
        sync_commit: Postgres: wait for each reservation to reach disk (see `budgeted`).
        lease: Postgres: book room for up to this many calls at once (see `budgeted`).

    Example:
        ```python
        from langchain.agents import create_agent
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool

        from checkpointers import open_backend
        from harness_nodes import CostEnvelopeMiddleware, Envelope
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @tool
        def ping() -> str:
            \"\"\"Ping.\"\"\"
            return "pong"


        runaway = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("ping", {})])], loop=True, model_name="gpt-4o-mini"
        )
        with open_backend("memory://") as backend:
            budget = CostEnvelopeMiddleware(Envelope(max_calls=3), backend=backend)
            agent = create_agent(runaway, [ping], middleware=[budget],
                                 checkpointer=backend.checkpointer)
            out = agent.invoke({"messages": [HumanMessage("hi")]},
                               {"configurable": {"thread_id": "t1"}})
        assert out["outcome"]["status"] == "budget_exhausted"
        ```
    """

    state_schema = HarnessAgentState

    def __init__(
        self,
        envelope: Envelope | Envelopes,
        *,
        backend: Any,
        fallbacks: Sequence[BaseChatModel] = (),
        pricing: Pricing | None = None,
        task_type: str = "default",
        token_counter: Literal["auto", "bytes"] | Callable[..., int] = "auto",
        sync_commit: bool = True,
        lease: int = 1,
    ) -> None:
        super().__init__()
        _check_lease(lease)
        if backend is None:
            raise UserError(
                "CostEnvelopeMiddleware needs backend=open_backend(url): the spend ledger is "
                "what makes the budget survive resume"
            )
        if not isinstance(envelope, (Envelope, Envelopes)):
            raise UserError(f"envelope must be an Envelope or Envelopes, got {envelope!r}")
        self.envelope = envelope
        self.backend = backend
        self.fallbacks = tuple(fallbacks)
        self.pricing = pricing or Pricing()
        self.task_type = task_type
        self.token_counter = token_counter
        self.sync_commit = sync_commit
        self.lease = lease
        self._wrapped: dict[int, tuple[BaseChatModel, BudgetedChatModel]] = {}
        self._handler: BudgetCallbackHandler | None = None
        self._warned: set[type[Any]] = set()
        self._lock = threading.Lock()
        self._request_type = cast(
            type[_BudgetedRequest],
            type("BudgetedModelRequest", (_BudgetedRequest,), {"budget": self}),
        )
        for m in self.fallbacks:  # fail fast on an unpriced or non-chat fallback
            budgeted(m, envelope=envelope, pricing=self.pricing)

    def budgeted_model(self, model: BaseChatModel) -> BudgetedChatModel:
        """The `budgeted` wrapper this middleware puts around *model* (built once per model).

        Raises:
            UnpricedModelError: the model has no price.
        """
        if isinstance(model, BudgetedChatModel):
            return model
        with self._lock:
            hit = self._wrapped.get(id(model))
            if hit is not None and hit[0] is model:
                return hit[1]
        wrapped = budgeted(
            [model, *self.fallbacks],
            envelope=self.envelope,
            backend=self.backend,
            pricing=self.pricing,
            task_type=self.task_type,
            token_counter=self.token_counter,
            sync_commit=self.sync_commit,
            lease=self.lease,
        )
        with self._lock:
            self._wrapped[id(model)] = (model, wrapped)
        return wrapped

    def _budgeted(self, model: Any) -> Any:
        """*model* as the request calls it: budgeted, or (if it cannot be) accounted.

        A request's model may be any Runnable a middleware put there, so nothing here raises
        (it runs mid-run): a chat model is wrapped, a binding over one is rebuilt around the
        wrapper, and anything else runs with its calls recorded after the fact.
        """
        if isinstance(model, BaseChatModel):
            return self.budgeted_model(model)
        if isinstance(model, _BoundBudget):
            return model  # already this middleware's (a request rebuilt by ``override``)
        if isinstance(model, RunnableBinding):
            return _BoundBudget(
                bound=self._budgeted(model.bound),
                kwargs=model.kwargs,
                config=model.config,
                config_factories=model.config_factories,
                custom_input_type=model.custom_input_type,
                custom_output_type=model.custom_output_type,
            )
        return self._accounted(model)

    def _accounted(self, model: Any) -> Any:
        """A model the wrapper cannot go around, accounted after the fact.

        ``init_chat_model`` with configurable fields picks its model per call: its calls are
        recorded through the ledger, as `BudgetCallbackHandler` records them, and cannot be
        refused beforehand.
        """
        from checkpointers import Backend

        with self._lock:
            first = type(model) not in self._warned  # once per kind, however many instances
            self._warned.add(type(model))
            if isinstance(self.backend, Backend) and self._handler is None:
                self._handler = BudgetCallbackHandler(
                    self.backend, self.pricing, envelopes=self.envelope, task_type=self.task_type
                )
            handler = self._handler
        if handler is None:  # an AsyncBackend: the handler writes through a sync Backend
            if first:
                log.warning(
                    "CostEnvelopeMiddleware cannot wrap %s (not a chat model, nor a binding "
                    "of one), and on an AsyncBackend cannot record its calls: they are not "
                    "budgeted; pass a chat model",
                    type(model).__name__,
                )
            return model
        if first:
            log.warning(
                "CostEnvelopeMiddleware cannot wrap %s (not a chat model, nor a binding of "
                "one): its calls are recorded in the ledger after the fact "
                "(BudgetCallbackHandler), with no reservation and no refusal beforehand",
                type(model).__name__,
            )
        return _BoundBudget(bound=model, kwargs={}, config={"callbacks": [handler]})

    def _guard(self, model: Any) -> BudgetGuard:
        """The guard that finishes a stopped task.

        Over the request's budgeted model, else any this middleware built (all share its
        envelope, backend and pricing; a stop message comes only from one of them).
        """
        inside = _budgeted_inside(model)
        if inside is None:
            with self._lock:
                inside = next(iter(self._wrapped.values()))[1]
        return BudgetGuard(inside)

    def _request(self, request: ModelRequest[Any]) -> tuple[ModelRequest[Any], Any]:
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        budgeted_request = self._request_type(**fields)
        return budgeted_request, budgeted_request.model

    @staticmethod
    def _stopped(response: ModelResponse[Any]) -> bool:
        # A refusal, or an answer cut at the output cap the budget lowered (its tool call or
        # the rest of its text lost for want of budget): a budget stop, not a completion.
        return any(_ends_on_budget(m) for m in response.result)

    @staticmethod
    def _ended(request: ModelRequest[Any], response: ModelResponse[Any]) -> MessagesAndOutcome:
        # The stop message (or the answer cut short) last, so `BudgetGuard.finish` reports
        # the limit that refused (or cut it).
        stop = [m for m in response.result if isinstance(m, AIMessage) and _ends_on_budget(m)]
        return {"messages": [*request.messages, *stop[-1:]]}

    @staticmethod
    def _finished(
        response: ModelResponse[Any], update: dict[str, Any]
    ) -> ExtendedModelResponse[Any]:
        # An answer cut short stays in the messages, before the finish note: it is the
        # model's (billed) work, and the trace shows why the task stopped there. A refusal's
        # stop message gives way to the note.
        cut = [m for m in response.result if not _is_stop_message(m)]
        result: ModelResponse[Any] = ModelResponse(result=[*cut, *update["messages"]])
        rest = {"outcome": update["outcome"], "spend": update["spend"]}
        return ExtendedModelResponse(result, Command(update=rest))

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ExtendedModelResponse[Any]:
        """Call the model through the budget; a refusal ends the task (`BudgetGuard.finish`)."""
        budgeted_request, model = self._request(request)
        response = handler(budgeted_request)
        if not self._stopped(response):
            done = _completed(response, request.state)
            if _completes(done) and isinstance(model, BudgetedChatModel):
                _with_spend(done, model.spend(_config(), model=_last_model(response.result)))
            return done
        guard = self._guard(model)
        return self._finished(response, guard.finish(self._ended(request, response), _config()))

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ExtendedModelResponse[Any]:
        """Async `wrap_model_call`."""
        budgeted_request, model = self._request(request)
        response = await handler(budgeted_request)
        if not self._stopped(response):
            done = _completed(response, request.state)
            if _completes(done) and isinstance(model, BudgetedChatModel):
                spend = await model.aspend(_config(), model=_last_model(response.result))
                _with_spend(done, spend)
            return done
        update = await self._guard(model).afinish(self._ended(request, response), _config())
        return self._finished(response, update)


def _completes(response: ExtendedModelResponse[Any]) -> bool:
    """The response completes the task (see `ModelNode`: the spend mirror goes with it)."""
    command = response.command
    update = command.update if command is not None else None
    outcome = update.get("outcome") if isinstance(update, dict) else None
    return isinstance(outcome, Mapping) and outcome.get("status") == "completed"


def _with_spend(response: ExtendedModelResponse[Any], spend: Spend) -> None:
    """Write the task's spend mirror with the update that completes it."""
    assert response.command is not None and isinstance(response.command.update, dict)
    response.command.update["spend"] = spend


class VerifyToolOutputsMiddleware(_OutcomePerTask):
    """Tool contracts for ``create_agent``: `VerifyToolOutputs` at the tool boundary.

    Each tool call's output is checked against its `ToolContract` inside ``wrap_tool_call``
    (no extra step). A bad output is replaced by an error message that tells the model what
    was wrong, and the model tries again (``on_fail="retry"``, up to ``max_retries``). A
    tool marked `irreversible`/`effect` or ``side_effects=True`` is never re-run: its failure
    escalates to review (add `ReviewQueueMiddleware`). When a verdict says ``fail``, or an
    escalation finds no reviewer (no `ReviewQueueMiddleware`, as `add_harness` without a
    review policy), the agent ends before the next model call with outcome
    ``verification_failed`` and the verdicts' reasons (`VerificationStop`), or raises
    `VerificationFailed` with ``exit_behavior="error"``. ``create_agent`` ends the run after a
    ``return_direct`` tool; when verification refused its output, an ``after_agent`` step (one
    per run) sends the run back into the loop, so the verdict is honoured as in the graph form.
    A model answer with malformed tool calls (arguments that are not valid JSON, in
    ``invalid_tool_calls``; every call of an answer cut off at its output cap, finish reason
    ``length``/``max_tokens``/``MAX_TOKENS``, none of which runs) is not a final answer: an
    ``after_model`` step answers each with an error message and sends the agent back to the
    model, within the tool's ``max_retries``; then the task ends ``verification_failed`` (as
    `ModelNode` does in the graph form).

    A contract naming a tool the agent does not have (a misspelt name would leave the real
    tool on the default contract) raises `UserError` at the first tool call, before any tool
    runs: the middleware meets the agent's tools only there.

    List it before LangChain's ``ToolRetryMiddleware`` (``middleware=[verify, retry]``): a
    tool's exception becomes a failed verdict here, so a retry middleware listed first (outer)
    never sees the exception and never retries; listed after it (inner), it retries, and
    verification judges what it ends with.

    Args:
        contracts: Tool name → `ToolContract`, or a ready `VerifyToolOutputs`; ``None``: the
            default contract (error signals, empty results) on every tool.
        exit_behavior: ``"end"`` or ``"error"`` when verification fails for good.

    Example:
        ```python
        from langchain.agents import create_agent
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool

        from harness_nodes import ToolContract, VerifyToolOutputsMiddleware
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @tool
        def lookup(key: str) -> dict:
            \"\"\"Look a key up.\"\"\"
            return {"error": "upstream 503"}


        model = ScriptedChatModel(script=[ai(tool_calls=[tool_call("lookup", {"key": "k"})])])
        verify = VerifyToolOutputsMiddleware({"lookup": ToolContract(max_retries=0)})
        agent = create_agent(model, [lookup], middleware=[verify])
        out = agent.invoke({"messages": [HumanMessage("look k up")]})
        assert out["outcome"]["status"] == "verification_failed"
        ```
    """

    state_schema = HarnessAgentState

    def __init__(
        self,
        contracts: Mapping[str, ToolContract] | VerifyToolOutputs | None = None,
        *,
        exit_behavior: ExitBehavior = "end",
    ) -> None:
        super().__init__()
        if contracts is None:
            self.verify = VerifyToolOutputs()
        elif isinstance(contracts, VerifyToolOutputs):
            self.verify = contracts
        elif isinstance(contracts, Mapping):
            self.verify = VerifyToolOutputs(dict(contracts))
        else:
            raise UserError(
                "contracts must map tool names to ToolContract, or be a VerifyToolOutputs, "
                f"got {type(contracts).__name__}"
            )
        self.stop = VerificationStop(exit_behavior)
        self.exit_behavior = exit_behavior

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: ToolHandler
    ) -> ToolMessage | Command[Any]:
        """Run the tool, then check its output (`VerifyToolOutputs.wrap_tool_call`).

        Raises:
            UserError: a contract names a tool the agent does not have (before any tool runs).
        """
        self._check_tool_names(request)
        return self.verify.wrap_tool_call(request, handler)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: AsyncToolHandler
    ) -> ToolMessage | Command[Any]:
        """Async `wrap_tool_call`."""
        self._check_tool_names(request)
        return await self.verify.awrap_tool_call(request, handler)

    def _check_tool_names(self, request: ToolCallRequest) -> None:
        # The agent's tools are known here first: the tool node hands each call all of them.
        # A model call's ``request.tools`` is not enough: an outer middleware may have
        # narrowed it to the tools picked for that call (LLMToolSelectorMiddleware).
        tools = getattr(request.runtime, "tools", None)
        if not tools:
            return
        names = {t.name for t in tools}
        unknown = sorted(set(self.verify.contracts) - names)
        if unknown:
            raise UserError(
                "VerifyToolOutputsMiddleware: contracts name tools the agent does not have: "
                f"{', '.join(unknown)} (tools: {', '.join(sorted(names))})"
            )

    def _before(self, state: HarnessAgentState) -> dict[str, Any] | None:
        if route_after_verify(state) != "fail":
            return None
        return _stop_update(self.stop(cast(Any, state)))

    @staticmethod
    def _after(state: HarnessAgentState) -> dict[str, Any] | None:
        # ``create_agent`` ends the run after a ``return_direct`` tool, refused output or not.
        messages = _verify.messages_of(state)
        if not messages or not isinstance(messages[-1], ToolMessage):
            return None
        if route_after_verify(state) == "ok":
            return None
        return {"jump_to": "model"}  # through the before_model hooks: retry, stop or review

    @hook_config(can_jump_to=["model"])
    def after_agent(self, state: HarnessAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Back into the loop when the agent ended on a refused output (``return_direct``)."""
        return self._after(state)

    @hook_config(can_jump_to=["model"])
    async def aafter_agent(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async `after_agent`."""
        return self._after(state)

    def _unreviewed_stop(self, request: ModelRequest[Any]) -> ExtendedModelResponse[Any] | None:
        # By the model call every before_model hook has run, so `ReviewQueueMiddleware`,
        # wherever it is listed, has paused on an escalation and recorded its review.
        state = cast(Any, request.state)
        if not _verify.unreviewed_escalations(_verify.messages_of(state)):
            return None
        update = self.stop(state)
        response: ModelResponse[Any] = ModelResponse(result=list(update["messages"]))
        return ExtendedModelResponse(response, Command(update={"outcome": update["outcome"]}))

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ModelResponse[Any] | ExtendedModelResponse[Any]:
        """Call the model, unless an escalation found no reviewer: then end the task.

        With no `ReviewQueueMiddleware` nobody takes the escalation, so `VerificationStop`
        ends the task, as `add_harness` without a review policy does. An answer (or a
        structured response) completes the task: outcome ``completed``, as in the graph
        form. A structured response given through the response-format tool (``ToolStrategy``)
        marks that tool's message as the end of the task, so the user's next question gets
        its own retries.
        """
        return self._unreviewed_stop(request) or _completed(
            handler(request), request.state, replace=False
        )

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | ExtendedModelResponse[Any]:
        """Async `wrap_model_call`."""
        return self._unreviewed_stop(request) or _completed(
            await handler(request), request.state, replace=False
        )

    def _malformed(self, state: HarnessAgentState) -> dict[str, Any] | None:
        messages = _verify.messages_of(state)
        reply = messages[-1] if messages else None
        if not isinstance(reply, AIMessage) or _ends_on_budget(reply):
            return None
        earlier = {**cast(Mapping[str, Any], state), "messages": messages[:-1]}
        answers, verdicts = _answer_invalid_calls(self.verify, earlier, reply)
        if not verdicts:
            return None
        update: dict[str, Any] = {"messages": answers, "verdicts": verdicts}
        answered = {m.tool_call_id for m in answers}
        if all(c["id"] in answered for c in reply.tool_calls):
            # No call left for the tools node: ``create_agent`` would end the run here. Back
            # to the model, through `before_model`, which stops on a ``fail`` verdict.
            update["jump_to"] = "model"
        return update

    @hook_config(can_jump_to=["model"])
    def after_model(self, state: HarnessAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Answer malformed tool calls with corrective errors and go back to the model."""
        update = self._malformed(state)
        for verdict in (update or {}).get("verdicts", ()):
            emit("verdict", dict(verdict), _config())
        return update

    @hook_config(can_jump_to=["model"])
    async def aafter_model(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async `after_model`."""
        update = self._malformed(state)
        for verdict in (update or {}).get("verdicts", ()):
            await aemit("verdict", dict(verdict), _config())
        return update

    @hook_config(can_jump_to=["end"])
    def before_model(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """End the task (`VerificationStop`) when the last tool outputs failed for good."""
        return self._before(state)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async `before_model`."""
        return self._before(state)


class EffectLedgerMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """At-most-once tool effects for ``create_agent``: marked tools run through `EffectLedger`.

    A tool marked `irreversible` (or `effect`) runs at most once per
    ``(thread_id, tool_call_id)``: its intent is recorded, it runs with an idempotency key,
    its result is recorded, and a resumed run gets the stored result instead of a second
    effect. An intent with no result (a crash inside the call) escalates to review.

    List it after `VerifyToolOutputsMiddleware` (the first middleware is the outermost), so
    verification judges what the tool really returned, replayed or fresh.

    Args:
        backend: The `Backend` (or `AsyncBackend`, for ``ainvoke``) holding the effect ledger,
            in the same database as the checkpoints.
        on_unknown: A call that started and never finished (crash inside it): ``"escalate"``
            to review (default) or ``"raise"`` `EffectOutcomeUnknown`.

    Example:
        ```python
        from langchain.agents import create_agent
        from langchain_core.messages import HumanMessage

        from checkpointers import open_backend
        from harness_nodes import EffectLedger, EffectLedgerMiddleware, irreversible
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @irreversible
        def send_email(to: str) -> str:
            \"\"\"Send an email.\"\"\"
            return f"sent to {to}"


        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("send_email", {"to": "a@b.c"})]), ai("Sent.")]
        )
        with open_backend("memory://") as backend:
            agent = create_agent(model, [send_email],
                                 middleware=[EffectLedgerMiddleware(backend)],
                                 checkpointer=backend.checkpointer)
            agent.invoke({"messages": [HumanMessage("mail a")]},
                         {"configurable": {"thread_id": "t1"}})
            assert [r.status for r in EffectLedger(backend).list("t1")] == ["done"]
        ```
    """

    def __init__(
        self, backend: Any, *, on_unknown: Literal["escalate", "raise"] = "escalate"
    ) -> None:
        super().__init__()
        from checkpointers import AsyncBackend

        self.ledger: EffectLedger | AsyncEffectLedger
        if isinstance(backend, AsyncBackend):
            self.ledger = AsyncEffectLedger(backend, on_unknown=on_unknown)
        else:
            self.ledger = EffectLedger(backend, on_unknown=on_unknown)

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: ToolHandler
    ) -> ToolMessage | Command[Any]:
        """`EffectLedger.wrap_tool_call` (unmarked tools just run).

        Raises:
            UserError: the middleware was built on an `AsyncBackend` (run with ``ainvoke``).
        """
        if not isinstance(self.ledger, EffectLedger):
            raise UserError(
                "EffectLedgerMiddleware on an AsyncBackend runs with ainvoke/astream; "
                "for invoke build it on a Backend (open_backend)"
            )
        return self.ledger.wrap_tool_call(request, handler)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: AsyncToolHandler
    ) -> ToolMessage | Command[Any]:
        """Async `wrap_tool_call` (`AsyncEffectLedger` on an `AsyncBackend`)."""
        return await self.ledger.awrap_tool_call(request, handler)


_JUMPS = {"model": "model", END: "end"}


class ReviewQueueMiddleware(_OutcomePerTask):
    """Human review for ``create_agent``, through the same `HumanReview` and `ReviewQueue`.

    After the model answers, calls the `ReviewPolicy` flags pause the run with an interrupt
    of `ReviewRequest` items (Agent Inbox shape); before the next model call, escalations
    (verification exhausted on a tool with side effects, an effect whose outcome is
    unknown) pause it too. Run the agent through ``ReviewQueue(backend, agent)``: the pause
    is listed by `ReviewQueue.pending`, and `ReviewQueue.decide` validates the decision
    (``approve | edit | reject | respond``, LangChain's words) and resumes the run. Approved
    and edited calls run; rejected and answered ones go back to the model. The model's
    answer completes the task (outcome ``completed``); new input after a finished task
    clears that task's outcome first (a ``before_agent`` step).

    Args:
        policy: Which calls need review.
        tools: The agent's tools, so edited arguments are validated against their schemas.

    Example:
        ```python
        from langchain.agents import create_agent
        from langchain_core.messages import HumanMessage

        from checkpointers import open_backend
        from harness_nodes import (
            EffectLedgerMiddleware,
            ReviewPolicy,
            ReviewQueue,
            ReviewQueueMiddleware,
            irreversible,
        )
        from harness_nodes.testing import ScriptedChatModel, ai, tool_call


        @irreversible
        def refund(order: str, amount: float) -> str:
            \"\"\"Refund an order.\"\"\"
            return f"refunded {amount} on {order}"


        model = ScriptedChatModel(
            script=[ai(tool_calls=[tool_call("refund", {"order": "A1", "amount": 5})]),
                    ai("Refunded.")]
        )
        review = ReviewQueueMiddleware(ReviewPolicy(irreversible=["refund"]), tools=[refund])
        with open_backend("memory://") as backend:
            ledger = EffectLedgerMiddleware(backend)
            agent = create_agent(model, [refund], middleware=[review, ledger],
                                 checkpointer=backend.checkpointer)
            queue = ReviewQueue(backend, agent)
            queue.invoke({"messages": [HumanMessage("refund A1")]}, thread_id="t1")
            (item,) = queue.pending()
            out = queue.decide(item.id, {"type": "approve"}, reviewer="ana")
        assert out["messages"][-1].content == "Refunded."
        ```
    """

    state_schema = HarnessAgentState

    def __init__(
        self, policy: ReviewPolicy | None = None, *, tools: Sequence[BaseTool] = ()
    ) -> None:
        super().__init__()
        self.review = HumanReview(
            policy if policy is not None else ReviewPolicy(),
            tools=tuple(tools),
            tools_node="tools",
            model_node="model",
            node=self.name,
        )

    def _pause(self, state: HarnessAgentState) -> dict[str, Any] | None:
        if self.review.route(state) != self.review.node:
            return None
        command = self.review(cast(Any, state), _config())
        update: dict[str, Any] = dict(cast(Mapping[str, Any], command.update or {}))
        goto = command.goto
        # The agent's own edge sends the calls still unanswered to the tools node (as many
        # Sends as calls), so only "back to the model" and "the end" need a jump.
        if isinstance(goto, str) and goto in _JUMPS:
            update["jump_to"] = _JUMPS[goto]
        return update or None

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ExtendedModelResponse[Any]:
        """Call the model; an answer completes the task (outcome ``completed``)."""
        return _completed(handler(request), request.state, replace=False)

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ExtendedModelResponse[Any]:
        """Async `wrap_model_call`."""
        return _completed(await handler(request), request.state, replace=False)

    @hook_config(can_jump_to=["model", "end"])
    def after_model(self, state: HarnessAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Pause for review of the calls the policy flags; apply the decision."""
        return self._pause(state)

    @hook_config(can_jump_to=["model", "end"])
    async def aafter_model(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async `after_model`."""
        return self._pause(state)

    @hook_config(can_jump_to=["end"])
    def before_model(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Pause for review of escalations raised by the tools; apply the decision."""
        return self._escalations(state)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(
        self, state: HarnessAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async `before_model`."""
        return self._escalations(state)

    def _escalations(self, state: HarnessAgentState) -> dict[str, Any] | None:
        messages = list(state.get("messages") or [])
        if not messages or not isinstance(messages[-1], ToolMessage):
            return None
        update = self._pause(state)
        if update is not None and update.get("jump_to") == "model":
            del update["jump_to"]  # already on the way to the model
        return update
