"""What a model call cost, for traces: the harness's own `Pricing` (the budget layer's).

Tracing prices every generation itself so Langfuse shows a cost even for models it does not
know (fake, self-hosted): overrides, then genai-prices, then the declared fallback.
"""

from __future__ import annotations

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
