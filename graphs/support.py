"""Support agent for a billing dispute: find the double charge, refund it, tell the customer.

Refunds and emails are irreversible: they are the actions a person reviews and the effect
ledger runs at most once. The payment processor and the mail server are simulated by a
`SupportWorld`, which records every refund and email it receives — so a duplicate is
visible, not hypothetical.

By default the agent is a scripted model (customer → invoices → refund + email in one turn
→ reply); any chat model works instead. Fault flags (`Faults`): ``empty_results`` (the first
customer lookup finds nobody), ``embedded_error`` (the first invoice listing "succeeds" with
``{"status": "failed", ...}``), ``out_of_range`` (the first invoice listing reports amounts in
cents — a $49 charge reads as $4,900), ``runaway``, ``crash_in`` / ``crash_at_turn``.

Example:
    ```python
    from langchain_core.messages import HumanMessage
    from langgraph.types import Command

    from graphs import support

    world = support.SupportWorld()
    graph = support.build_graph(world=world)
    config = {"configurable": {"thread_id": "ticket-1"}}
    paused = graph.invoke({"messages": [HumanMessage(support.DEFAULT_TASK)]}, config)
    refund, email = paused["__interrupt__"][0].value  # one review request per call
    assert refund["action_request"]["args"]["amount_usd"] == 49.0 and world.refunds == []
    graph.invoke(Command(resume={"type": "approve"}), config)
    assert [r["amount_usd"] for r in world.refunds] == [49.0]
    assert len(world.emails) == 1
    ```
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolRuntime

from checkpointers import AsyncBackend, Backend, open_backend
from graphs._common import (
    Faults,
    as_json,
    attempt_of,
    call,
    calls_by_id,
    data_text,
    failed_calls,
    first_human_text,
    scripted_policy_model,
)
from harness_nodes import (
    Envelope,
    ReviewPolicy,
    ToolContract,
    UnguardedEffect,
    build_harnessed_agent,
    current_effect,
    irreversible,
)

__all__ = [
    "CONTRACTS",
    "DEFAULT_BUDGET_USD",
    "DEFAULT_TASK",
    "IRREVERSIBLE_TOOLS",
    "REVIEW_POLICY",
    "SYSTEM_PROMPT",
    "TASK_TYPE",
    "SupportWorld",
    "build_graph",
    "graph",
    "make_tools",
    "scripted_model",
]

DEFAULT_BUDGET_USD = 0.05
"""The envelope's dollar limit when none is given (``harness run --budget``)."""

TASK_TYPE = "support"
"""The task type: selects the envelope, tags traces, groups the report."""

DEFAULT_TASK = (
    "Ticket from dana@example.com: I was charged twice for October. Please refund the "
    "duplicate charge and let me know."
)
"""The ticket ``harness demo`` and ``harness run support`` use by default."""

SYSTEM_PROMPT = (
    "You are a billing support agent. Look up the customer, list their invoices, refund a "
    "charge only when it is a clear duplicate, and email the customer what you did."
)

IRREVERSIBLE_TOOLS = ("issue_refund", "send_email")
"""Tools whose effects cannot be undone: reviewed, and run at most once per call."""


@dataclass
class SupportWorld:
    """The outside world the support tools act on: a payment processor and a mail server.

    It records every refund and email it receives (a duplicate shows up as two entries).
    With a *path*, effects are appended to a JSON-lines file, so they are visible across
    processes (a crash test counts them after the child process died).
    """

    path: Path | None = None
    """Optional JSON-lines file the effects are appended to."""
    _effects: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str, effect: dict[str, Any]) -> dict[str, Any]:
        """Record one effect (``"refund"`` or ``"email"``) and return it with its id."""
        with self._lock:
            n = sum(1 for e in self.effects if e["kind"] == kind) + 1
            entry = {"kind": kind, "id": f"{kind[:2]}_{n:04d}", **effect}
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            else:
                self._effects.append(entry)
        return entry

    @property
    def effects(self) -> list[dict[str, Any]]:
        """Every effect so far, in order."""
        if self.path is not None:
            if not self.path.exists():
                return []
            lines = self.path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        return list(self._effects)

    @property
    def refunds(self) -> list[dict[str, Any]]:
        """The refunds the payment processor executed."""
        return [e for e in self.effects if e["kind"] == "refund"]

    @property
    def emails(self) -> list[dict[str, Any]]:
        """The emails the mail server sent."""
        return [e for e in self.effects if e["kind"] == "email"]


def _customers() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(data_text("support", "customers.json"))
    return data


def _invoices() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(data_text("support", "invoices.json"))
    return data


def _effect_key() -> str | None:
    """The effect ledger's idempotency key, or None when the tool runs unguarded.

    A bare agent (no harness, no ledger: the baseline of ``bench/chaos.py``) runs the same
    tools; its effects are recorded without a key, exactly as an unguarded client would send.
    """
    try:
        return current_effect().idempotency_key
    except UnguardedEffect:
        return None


def _messages(runtime: ToolRuntime | None) -> list[BaseMessage]:
    if runtime is None or not isinstance(runtime.state, Mapping):
        return []
    return list(runtime.state.get("messages", []))


def make_tools(
    world: SupportWorld | None = None,
    faults: Faults | Mapping[str, Any] | None = None,
    *,
    guarded: bool = True,
) -> list[BaseTool]:
    """The four support tools acting on *world*, with *faults* injected.

    With ``guarded=False`` the refund and email tools are not marked `irreversible`: they run
    in a bare agent without an effect ledger (the baseline of ``bench/chaos.py``), and every
    call reaches the world.

    Example:
        ```python
        from graphs import support

        lookup, invoices, refund, email = support.make_tools()
        assert lookup.invoke({"email": "dana@example.com"})["customer_id"] == "cus_1001"
        ```
    """
    flags = Faults.parse(faults)
    world = world if world is not None else SupportWorld()
    customers = _customers()
    invoices = _invoices()

    def crash(name: str, runtime: ToolRuntime | None) -> None:
        if runtime is not None and flags.crash_in == name:
            # The process dies a moment into the call: sibling calls of the same turn
            # (already running in ToolNode's threads) have time to finish their effects.
            time.sleep(0.05)
            flags.crash_once(name)

    @tool
    def lookup_customer(email: str, runtime: ToolRuntime = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Find a customer by email; returns their id, name, plan and card."""
        messages = _messages(runtime)
        crash("lookup_customer", runtime)
        first = bool(messages) and attempt_of(messages, "lookup_customer", {"email": email}) == 1
        if flags.empty_results and first:
            return {}
        for c in customers:
            if c["email"].lower() == email.lower():
                return dict(c)
        return {}

    @tool
    def list_invoices(customer_id: str, runtime: ToolRuntime = None) -> Any:  # type: ignore[assignment]
        """List a customer's invoices (id, date, amount in USD, status, description)."""
        messages = _messages(runtime)
        crash("list_invoices", runtime)
        args = {"customer_id": customer_id}
        first = bool(messages) and attempt_of(messages, "list_invoices", args) == 1
        if flags.embedded_error and first:
            return {"status": "failed", "error": "billing service timeout (upstream 504)"}
        found = [dict(i) for i in invoices if i["customer_id"] == customer_id]
        if flags.out_of_range and first:
            # A units bug upstream: amounts in cents, labelled as dollars.
            found = [{**i, "amount_usd": i["amount_usd"] * 100} for i in found]
        return found

    @tool
    def issue_refund(
        invoice_id: str,
        amount_usd: float,
        reason: str,
        runtime: ToolRuntime = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Refund part or all of a paid invoice to the customer's card. Irreversible."""
        crash("issue_refund", runtime)
        entry = world.record(
            "refund",
            {
                "invoice_id": invoice_id,
                "amount_usd": amount_usd,
                "reason": reason,
                # what a payment API would de-duplicate on
                "idempotency_key": _effect_key(),
            },
        )
        return {"refund_id": entry["id"], "status": "succeeded", "amount_usd": amount_usd}

    @tool
    def send_email(to: str, subject: str, body: str, runtime: ToolRuntime = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Send an email to a customer. Irreversible."""
        crash("send_email", runtime)
        key = _effect_key()
        entry = world.record(
            "email", {"to": to, "subject": subject, "body": body, "idempotency_key": key}
        )
        return {"message_id": entry["id"], "status": "sent"}

    if guarded:
        issue_refund, send_email = irreversible(issue_refund), irreversible(send_email)
    return [lookup_customer, list_invoices, issue_refund, send_email]


def _amounts_plausible(invoices: Any) -> str | None:
    if not isinstance(invoices, list):
        return f"expected a list of invoices, got {type(invoices).__name__}"
    bad = [i.get("invoice_id") for i in invoices if not 0 < float(i.get("amount_usd", -1)) <= 1000]
    return f"invoice amounts outside (0, 1000] USD: {bad}" if bad else None


CONTRACTS = {
    "lookup_customer": ToolContract(required=("customer_id", "email")),
    "list_invoices": ToolContract(checks=(_amounts_plausible,)),
    "issue_refund": ToolContract(required=("refund_id",), side_effects=True),
    "send_email": ToolContract(required=("message_id",), side_effects=True),
}
"""What good support tool outputs look like. A failed refund or email is never retried
blindly (``side_effects=True``): it goes to a person."""


REVIEW_POLICY = ReviewPolicy(
    irreversible=IRREVERSIBLE_TOOLS, never=("lookup_customer", "list_invoices")
)
"""A person approves every refund and email before it goes out (lookups never wait)."""


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def _duplicate(invoices: list[dict[str, Any]]) -> dict[str, Any] | None:
    seen: dict[tuple[Any, Any], dict[str, Any]] = {}
    for inv in invoices:
        key = (inv.get("date"), inv.get("amount_usd"))
        if key in seen:
            return inv
        seen[key] = inv
    return None


def _policy(messages: list[BaseMessage]) -> AIMessage:
    retry = failed_calls(messages)
    if retry:
        return AIMessage(
            "Retrying the failed call.",
            tool_calls=[call(messages, c["name"], c["args"], i) for i, c in enumerate(retry)],
        )
    ticket = first_human_text(messages)
    calls = calls_by_id(messages)
    answers = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}

    def latest(name: str) -> Any:
        found = [
            as_json(answers[i].content)
            for i, c in calls.items()
            if c["name"] == name and i in answers
        ]
        return found[-1] if found else None

    if latest("issue_refund") is not None or latest("send_email") is not None:
        refund = latest("issue_refund")
        if not isinstance(refund, dict) or "refund_id" not in refund:
            return AIMessage("The refund was not approved, so no refund was issued.")
        email = latest("send_email")
        emailed = isinstance(email, dict) and email.get("status") == "sent"
        return AIMessage(
            f"Done: refunded ${refund.get('amount_usd', '?')} "
            f"(refund {refund.get('refund_id', '?')})"
            + (" and emailed the customer." if emailed else "; the customer was not emailed.")
        )
    customer = latest("lookup_customer")
    if customer is None:
        match = _EMAIL.search(ticket)
        email = match.group(0) if match else ""
        return AIMessage(
            "Looking up the customer.",
            tool_calls=[call(messages, "lookup_customer", {"email": email})],
        )
    if not isinstance(customer, dict) or "customer_id" not in customer:
        return AIMessage("I could not find a customer with that email address; no action taken.")
    invoices = latest("list_invoices")
    if invoices is None:
        return AIMessage(
            "Listing the invoices.",
            tool_calls=[call(messages, "list_invoices", {"customer_id": customer["customer_id"]})],
        )
    dup = _duplicate(invoices) if isinstance(invoices, list) else None
    if dup is None:
        return AIMessage("I found no duplicate charge on this account; no refund issued.")
    amount = dup["amount_usd"]
    body = (
        f"Hello {customer.get('name', '')},\n\nYou were charged twice on {dup['date']}. We have "
        f"refunded ${amount:.2f} (invoice {dup['invoice_id']}) to your card ending "
        f"{customer.get('card_last4', '')}. It will appear within 5 business days.\n\nBilling team"
    )
    return AIMessage(
        "Refunding the duplicate charge and emailing the customer.",
        tool_calls=[
            call(
                messages,
                "issue_refund",
                {
                    "invoice_id": dup["invoice_id"],
                    "amount_usd": amount,
                    "reason": "duplicate charge",
                },
                0,
            ),
            call(
                messages,
                "send_email",
                {"to": customer["email"], "subject": "Your refund", "body": body},
                1,
            ),
        ],
    )


def scripted_model(faults: Faults | Mapping[str, Any] | None = None) -> BaseChatModel:
    """The default model: a scripted "gpt-4o-mini" that works the ticket step by step."""
    return scripted_policy_model(_policy, model_name="gpt-4o-mini", faults=Faults.parse(faults))


def build_graph(
    model: BaseChatModel | None = None,
    *,
    backend: Backend | AsyncBackend | None = None,
    world: SupportWorld | None = None,
    faults: Faults | Mapping[str, Any] | None = None,
    budget_usd: float | None = DEFAULT_BUDGET_USD,
    review_policy: ReviewPolicy | None = REVIEW_POLICY,
    **compile_kwargs: Any,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Build the harnessed support agent.

    Args:
        model: Any chat model; defaults to the scripted one.
        backend: A `checkpointers.Backend` for checkpoints and the effect ledger (or an
            `AsyncBackend` to run the agent with ``ainvoke``/``astream``); without one both
            live in memory. Runs need a ``thread_id`` (the ledger keys on it).
        world: Where refunds and emails land; defaults to a fresh in-memory `SupportWorld`.
        faults: Fault-injection flags (`Faults` or a mapping).
        budget_usd: The task's dollar limit (outcome ``budget_exhausted`` when reached);
            ``None``: no cost envelope.
        review_policy: Which calls wait for a person (default `REVIEW_POLICY`; ``None``:
            only escalations).
        **compile_kwargs: Passed on to `build_harnessed_agent` (e.g. ``checkpointer=None``
            for a server that brings its own persistence).
    """
    flags = Faults.parse(faults)
    tools = make_tools(world, flags)
    return build_harnessed_agent(
        model or scripted_model(flags),
        tools,
        envelope=Envelope(max_usd=budget_usd) if budget_usd is not None else None,
        task_type=TASK_TYPE,
        contracts=CONTRACTS,
        review_policy=review_policy,
        system_prompt=SYSTEM_PROMPT,
        backend=backend or open_backend("memory://"),
        name=TASK_TYPE,
        **compile_kwargs,
    )


graph = build_graph(checkpointer=None)
"""The default support agent for ``langgraph.json``: the server brings the checkpointer (the
effect ledger lives in memory, beside it)."""
