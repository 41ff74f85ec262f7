"""What a model call cost, for traces: the harness's own `Pricing` (the budget layer's).

Tracing prices every generation itself so Langfuse shows a cost even for models it does not
know (fake, self-hosted): overrides, then genai-prices, then the declared fallback.
"""

from __future__ import annotations

from typing import Any

from harness_nodes.errors import UnpricedModelError
from harness_nodes.pricing import Pricing

_DEFAULT = Pricing()


def call_cost(
    pricing: Pricing | None, model: str, input_tokens: int, output_tokens: int
) -> tuple[float, float] | None:
    """``(input_usd, output_usd)`` of one call, or None when *pricing* has no price for it."""
    pricing = pricing or _DEFAULT
    if not model:
        return None
    try:
        rates = pricing.rates(model)
        total = pricing.cost_nanos(model, input_tokens, output_tokens) / 1e9
    except UnpricedModelError:
        return None
    input_usd = min(total, float(rates.input * input_tokens) / 1e9)
    return input_usd, total - input_usd


def answer_cost(
    pricing: Pricing | None, model: str, usage: Any
) -> tuple[int, int, tuple[float, float] | None]:
    """``(input_tokens, output_tokens, (input_usd, output_usd) or None)`` of an answer.

    *usage* is its ``usage_metadata``: cache reads and writes are priced at their rates, as
    the budget settles them. No usage counts as none (zero tokens); malformed usage (negative,
    NaN, text) is shown unpriced with zero tokens rather than as a credit.
    """
    from harness_nodes.budget import _reported_usage, _usage_cost

    if not usage:
        return 0, 0, call_cost(pricing, model, 0, 0)
    reported = _reported_usage(usage)
    if isinstance(reported, str):
        return 0, 0, None
    inp, out = reported.input, reported.output
    if not model:
        return inp, out, None
    pricing = pricing or _DEFAULT
    try:
        rates = pricing.rates(model)
        total = _usage_cost(pricing, model, reported) / 1e9
    except UnpricedModelError:
        return inp, out, None
    output_usd = min(total, float(rates.output * out) / 1e9)
    return inp, out, (total - output_usd, output_usd)
