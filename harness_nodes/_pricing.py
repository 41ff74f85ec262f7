"""What a model call cost, for traces: the harness's price lookup (genai-prices).

Tracing needs a price even for models Langfuse does not know (fake, self-hosted), so it
prices every generation itself. Until the budget layer's `Pricing` is on main this uses
genai-prices' `calc_price` directly; callers may pass their own `PriceFn`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

PriceFn = Callable[[str, int, int], tuple[float, float] | None]
"""``(model, input_tokens, output_tokens) -> (input_usd, output_usd)``, or None if unpriced."""


@lru_cache(maxsize=256)
def _known(model: str) -> bool:
    from genai_prices import Usage, calc_price

    try:
        calc_price(Usage(input_tokens=1, output_tokens=1), model_ref=model)
    except LookupError:
        return False
    return True


def default_price(model: str, input_tokens: int, output_tokens: int) -> tuple[float, float] | None:
    """Price a call with genai-prices; None when the model is unknown to it."""
    if not model or not _known(model):
        return None
    from genai_prices import Usage, calc_price

    p = calc_price(Usage(input_tokens=input_tokens, output_tokens=output_tokens), model_ref=model)
    return float(p.input_price), float(p.output_price)
