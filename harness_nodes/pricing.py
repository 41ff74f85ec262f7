"""What a model call costs: genai-prices' catalogue plus your own prices, never silently free.

`Pricing` answers two questions for the budget layer, in integer nano-dollars (1e-9 USD, so
limits compare exactly):

- **before a call**, the worst case: ``input tokens + max output tokens`` at the highest rate
  the model can charge (a tiered model is reserved at its top tier; one with off-peak hours or
  a price change announced for a later date, at the highest of the prices it can still charge;
  input that may be written to the provider's cache, at the cache-write rate when dearer);
- **after a call**, the actual cost of the reported usage (exact, tiers, cached input and
  cache writes included — genai-prices' `calc_price` for catalogue models, at the time of the
  call).

Prices come from your ``overrides`` first (a self-hosted model at a set price, a negotiated
rate), then from genai-prices, then from ``fallback`` if you declared one. A model found in
none of them is an `UnpricedModelError` naming it and saying how to price it.

Example:
    ```python
    from harness_nodes import ModelPrice, Pricing

    local = ModelPrice(input_per_mtok=0.1, output_per_mtok=0.2)
    pricing = Pricing(overrides={"llama-local": local})
    assert pricing.cost_nanos("llama-local", input_tokens=1_000_000, output_tokens=0) == 100_000_000
    assert pricing.cost_nanos("gpt-4o", input_tokens=1000, output_tokens=100) == 3_500_000
    ```
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from harness_nodes.errors import UnpricedModelError, UserError

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice as CataloguePrice

__all__ = ["ModelPrice", "Pricing", "Rates"]

log = logging.getLogger("harness_nodes.pricing")

NANOS_PER_USD = 1_000_000_000
_NANOS_PER_TOKEN_PER_USD_PER_MTOK = Decimal(NANOS_PER_USD) / Decimal(1_000_000)  # = 1000
# Big enough to land in any catalogue model's top price tier, so the derived rate is the
# highest the model can charge (the safe one to reserve at).
_TOP_TIER_TOKENS = 10_000_000


def _decimal(value: float | int | str | Decimal, what: str) -> Decimal:
    try:
        d = Decimal(str(value))
    except ArithmeticError:
        raise UserError(
            f"{what} must be a price: a number of USD per million tokens, got {value!r}"
        ) from None
    if not d.is_finite() or d < 0:
        raise UserError(f"{what} must be a finite, non-negative price, got {value!r}")
    return d


@dataclass(frozen=True)
class ModelPrice:
    """A price per million tokens, in USD: for a self-hosted model, an override, or a fallback.

    Example:
        ```python
        from harness_nodes import ModelPrice

        price = ModelPrice(
            input_per_mtok=3, output_per_mtok=15, cached_input_per_mtok=0.3, cache_write_per_mtok=6
        )
        assert price.rates().cache_write == 6000  # nano-dollars per token
        ```
    """

    input_per_mtok: float | int | str | Decimal
    """USD per million input (prompt) tokens."""
    output_per_mtok: float | int | str | Decimal
    """USD per million output tokens (reasoning tokens included, as providers bill them)."""
    cached_input_per_mtok: float | int | str | Decimal | None = None
    """USD per million input tokens served from the provider's cache (default: the input price)."""
    cache_write_per_mtok: float | int | str | Decimal | None = None
    """USD per million input tokens written to the provider's cache (Anthropic bills them above
    the input price: give the dearest cache lifetime you use). Default: the input price."""

    def __post_init__(self) -> None:
        _decimal(self.input_per_mtok, "input_per_mtok")
        _decimal(self.output_per_mtok, "output_per_mtok")
        if self.cached_input_per_mtok is not None:
            _decimal(self.cached_input_per_mtok, "cached_input_per_mtok")
        if self.cache_write_per_mtok is not None:
            _decimal(self.cache_write_per_mtok, "cache_write_per_mtok")

    def rates(self) -> Rates:
        """This price as nano-dollars per token."""
        k = _NANOS_PER_TOKEN_PER_USD_PER_MTOK
        inp = _decimal(self.input_per_mtok, "input_per_mtok") * k
        cached = (
            inp
            if self.cached_input_per_mtok is None
            else _decimal(self.cached_input_per_mtok, "cached_input_per_mtok") * k
        )
        written = (
            None
            if self.cache_write_per_mtok is None
            else _decimal(self.cache_write_per_mtok, "cache_write_per_mtok") * k
        )
        return Rates(
            input=inp,
            output=_decimal(self.output_per_mtok, "output_per_mtok") * k,
            cached_input=cached,
            cache_write=written,
        )


@dataclass(frozen=True)
class Rates:
    """Nano-dollars per token for one model (what `Pricing.rates` returns)."""

    input: Decimal
    """Nano-dollars per input token (at the model's highest tier and price)."""
    output: Decimal
    """Nano-dollars per output token (at the model's highest tier and price)."""
    cached_input: Decimal
    """Nano-dollars per cached input token."""
    source: str = "override"
    """Where the price came from: ``"override"``, ``"genai-prices"`` or ``"fallback"``."""
    cache_write: Decimal | None = None
    """Nano-dollars per input token written to the provider's cache, at the dearest cache
    lifetime (Anthropic's 1-hour cache; at the model's highest tier). None: the input rate."""

    @property
    def input_bound(self) -> Decimal:
        """The most one input token can cost: any of them may be written to the cache."""
        return self.input if self.cache_write is None else max(self.input, self.cache_write)

    def worst_case_nanos(self, input_tokens: int, output_tokens: int) -> int:
        """The most a call with these token counts can cost, rounded up to a whole nano-dollar."""
        return math.ceil(self.input_bound * input_tokens + self.output * output_tokens)

    def affordable_output_tokens(self, input_tokens: int, nanos: int) -> int:
        """How many output tokens fit in *nanos* after paying for *input_tokens* (>= 0)."""
        left = Decimal(nanos) - self.input_bound * input_tokens
        if left <= 0:
            return 0
        if self.output == 0:
            return 2**62
        return int(left / self.output)


# An Amazon Bedrock model id (``ChatBedrock``/``ChatBedrockConverse``'s ``model_id``): a
# vendor-prefixed name, maybe a cross-region inference profile's prefix (``us.``), and a
# version after a colon that is not a provider (``anthropic.claude-3-5-sonnet-20240620-v1:0``).
_BEDROCK_ID = re.compile(
    r"(?:(?:us|us-gov|eu|apac|jp|au|ca|global)\.)?"
    r"(?:anthropic|meta|amazon|mistral|cohere|ai21|deepseek|qwen|writer|openai)\.[\w.-]+(?::\d+)?"
)


def _split_provider(model: str) -> tuple[str | None, str]:
    # "openai:gpt-4o" (init_chat_model style) names the provider explicitly.
    if _BEDROCK_ID.fullmatch(model):
        return "aws", model  # genai-prices knows Bedrock's ids under its "aws" provider
    provider, sep, name = model.partition(":")
    if sep and provider and name and "/" not in provider:
        return provider, name
    return None, model


@dataclass(frozen=True)
class Pricing:
    """Where model prices come from: your overrides, then genai-prices, then a fallback.

    Example:
        ```python
        from harness_nodes import ModelPrice, Pricing, UnpricedModelError

        strict = Pricing()
        try:
            strict.rates("my-finetune")
        except UnpricedModelError as e:
            assert e.model == "my-finetune"

        lenient = Pricing(fallback=ModelPrice(input_per_mtok=5, output_per_mtok=20))
        assert lenient.rates("my-finetune").source == "fallback"
        ```
    """

    overrides: Mapping[str, ModelPrice] = field(default_factory=dict)
    """Model name → price. Wins over the catalogue (matched exactly, then case-insensitively)."""
    fallback: ModelPrice | None = None
    """Price for any model found nowhere else. Leave unset to fail on unknown models."""
    use_catalogue: bool = True
    """Look models up in genai-prices (set False to price only what you declare)."""

    _cache: dict[str, tuple[Rates, bool]] = field(  # model -> (rates, tiered)
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, Mapping):
            raise UserError(
                "Pricing.overrides must map model names to ModelPrice, "
                f"got {type(self.overrides).__name__}"
            )
        if self.fallback is not None and not isinstance(self.fallback, ModelPrice):
            raise UserError(
                f"Pricing.fallback must be a ModelPrice, got {type(self.fallback).__name__}"
            )
        for name, price in self.overrides.items():
            if not isinstance(price, ModelPrice):
                raise UserError(
                    f"Pricing.overrides[{name!r}] must be a ModelPrice, got {type(price).__name__}"
                )

    def __hash__(self) -> int:
        return id(self)

    def _override(self, model: str) -> ModelPrice | None:
        if model in self.overrides:
            return self.overrides[model]
        lowered = model.lower()
        for name, price in self.overrides.items():
            if name.lower() == lowered:
                return price
        return None

    def rates(self, model: str) -> Rates:
        """Nano-dollars per token for *model*, at the most it can charge (what reservations use).

        That is its top tier and, for a model with off-peak hours or a price change announced
        for a later date, the highest of the prices it can still charge.

        Raises:
            UnpricedModelError: the model is in no override, not in genai-prices, and no
                fallback price was declared.

        Example:
            ```python
            from harness_nodes import Pricing

            assert Pricing().rates("gpt-4o-mini").output == 600  # $0.60 per million tokens
            ```
        """
        with self._lock:
            hit = self._cache.get(model)
        if hit is None:
            if not isinstance(model, str):
                raise UserError(f"a model name must be a string, got {model!r}")
            hit = self._resolve(model)
            with self._lock:
                self._cache[model] = hit
        return hit[0]

    def tier_rates(self, model: str, service_tier: str) -> Rates:
        """`rates` for a call made at a provider's service tier (OpenAI's ``"priority"``).

        A catalogue model's tier prices where they are dearer (never below `rates`); a price
        you declared, as declared.

        Example:
            ```python
            from harness_nodes import Pricing

            pricing = Pricing()
            assert pricing.tier_rates("gpt-4o", "priority").input > pricing.rates("gpt-4o").input
            ```
        """
        base = self.rates(model)
        if base.source != "genai-prices":
            return base
        key = f"{model}\x00{service_tier}"
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            tier = _catalogue_rates(model, service_tier)
            rates = base
            if tier is not None:
                rates = replace(
                    base,
                    input=max(base.input, tier.input),
                    output=max(base.output, tier.output),
                    cached_input=max(base.cached_input, tier.cached_input),
                    cache_write=max(base.cache_write or base.input, tier.cache_write or tier.input),
                )
            hit = (rates, True)  # costed through calc_price, at the tier it answered at
            with self._lock:
                self._cache[key] = hit
        return hit[0]

    def is_priced(self, model: str) -> bool:
        """Whether *model* has a price of its own (an override or a catalogue entry).

        Example:
            ```python
            from harness_nodes import ModelPrice, Pricing

            pricing = Pricing(fallback=ModelPrice(input_per_mtok=1, output_per_mtok=1))
            assert pricing.is_priced("gpt-4o") and not pricing.is_priced("nobody-knows-me")
            ```
        """
        try:
            return self.rates(model).source != "fallback"
        except UnpricedModelError:
            return False

    def _resolve(self, model: str) -> tuple[Rates, bool]:
        override = self._override(model)
        if override is not None:
            return override.rates(), False
        if self.use_catalogue:
            found = _catalogue_rates(model)
            if found is not None:
                ahead = _prices_ahead(model)
                if len(ahead) > 1:
                    # Time-of-day or dated prices: reserve at the highest one that can still
                    # apply; cost each call through calc_price, at the time it is made.
                    return _highest(found, ahead), True
                # Flat-priced models are costed from their rates (exactly what calc_price
                # returns, without its ~60 µs); tiered ones go through calc_price per call.
                return found, not _is_flat(model, found)
        if self.fallback is not None:
            return replace(self.fallback.rates(), source="fallback"), False
        provider, _ = _split_provider(model)
        raise UnpricedModelError(model, provider)

    def cost_nanos(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        service_tier: str | None = None,
    ) -> int:
        """The actual cost of a call's usage, in nano-dollars (rounded up).

        *input_tokens* counts every prompt token, cached ones included (LangChain's
        ``usage_metadata`` convention); *cached_input_tokens* of them are billed at the cached rate,
        *cache_write_tokens* at the catalogue's cache-write rate (*cache_write_1h_tokens* of those
        at its 1-hour rate; a price you declared, at its ``cache_write_per_mtok``, else the input
        rate).
        *service_tier* is the tier the provider answered at (OpenAI's ``"priority"`` or
        ``"flex"``): a catalogue model is billed at that tier's prices, a price you declared
        as declared.
        A negative count counts as zero: a cost is never a credit.

        Example:
            ```python
            from harness_nodes import Pricing

            # gpt-4o: $2.50 in, $10 out per million tokens
            assert Pricing().cost_nanos("gpt-4o", 1_000_000, 0) == 2_500_000_000
            ```
        """
        rates = self.rates(model)  # raises UnpricedModelError first
        input_tokens, output_tokens = max(0, input_tokens), max(0, output_tokens)
        cached = max(0, min(cached_input_tokens, input_tokens))
        written = max(0, min(cache_write_tokens, input_tokens - cached))
        written_1h = max(0, min(cache_write_1h_tokens, written))
        with self._lock:
            tiered = self._cache[model][1]
        catalogue = rates.source == "genai-prices"
        if tiered or (catalogue and (written or service_tier)):
            exact = _catalogue_cost(
                model,
                input_tokens,
                output_tokens,
                cached,
                written,
                written_1h,
                service_tier if catalogue else None,
            )
            if exact is not None:
                return exact
        write_rate = rates.input if rates.cache_write is None else rates.cache_write
        return math.ceil(
            rates.input * (input_tokens - cached - written)
            + write_rate * written
            + rates.cached_input * cached
            + rates.output * output_tokens
        )


def _catalogue_usage(
    input_tokens: int, output_tokens: int, cached: int = 0, written: int = 0, written_1h: int = 0
) -> Any:
    from genai_prices import Usage

    extra = {
        "cache_read_tokens": cached,
        "cache_write_tokens": written,
        "cache_write_1h_tokens": written_1h,  # a part of cache_write_tokens
    }
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        **{k: v for k, v in extra.items() if v},
    )


def _catalogue_calc(model: str, usage: Any, service_tier: str | None = None) -> Any | None:
    from genai_prices import calc_price

    # The tier's prices where the catalogue has them (OpenAI's priority and flex), else the
    # standard ones. Passed only with a tier: older genai-prices have no price_context.
    extra: dict[str, Any] = (
        {"price_context": {"service_tier": service_tier}} if service_tier else {}
    )
    provider, name = _split_provider(model)
    try:
        if provider is not None:
            return calc_price(usage, name, provider_id=provider, **extra)
        return calc_price(usage, model, **extra)
    except LookupError:
        return None
    except TypeError:
        if not extra:
            raise
        log.warning(
            "this genai-prices has no service-tier prices: %s at tier %r is priced at its "
            "standard prices (upgrade genai-prices)",
            model,
            service_tier,
        )
        return _catalogue_calc(model, usage)


def _catalogue_rates(model: str, service_tier: str | None = None) -> Rates | None:
    n = _TOP_TIER_TOKENS
    both = _catalogue_calc(model, _catalogue_usage(n, n), service_tier)
    if both is None:
        return None
    cached = _catalogue_calc(model, _catalogue_usage(n, 0, cached=n), service_tier)
    written = _catalogue_calc(model, _catalogue_usage(n, 0, written=n, written_1h=n), service_tier)
    k = Decimal(NANOS_PER_USD) / n
    inp = Decimal(both.input_price) * k
    out = Decimal(both.output_price) * k
    cached_rate = Decimal(cached.input_price) * k if cached is not None else inp
    write_rate = Decimal(written.input_price) * k if written is not None else inp
    if inp == 0 and out == 0:
        # A catalogue entry with no token prices (an image or audio model) is not a price.
        return None
    return Rates(inp, out, cached_rate, source="genai-prices", cache_write=write_rate)


def _prices_ahead(model: str) -> list[CataloguePrice]:
    """The catalogue prices *model* may be billed at from now on (one for a fixed price).

    genai-prices picks the last of a model's `ConditionalPrice`s whose constraint holds at
    the request's time, else the first. A time-of-day price (DeepSeek's off-peak hours) holds
    on and off every day; a start date, once reached, holds for good, so the prices before it
    can no longer apply. Request-context variants (service tier, batch) are not chosen by a
    timestamp and stay out: calc_price is called without a price context.
    """
    from genai_prices import types
    from genai_prices.data_snapshot import get_snapshot

    provider, name = _split_provider(model)
    try:
        _, info = get_snapshot().find_provider_model(name, None, provider, None)
    except LookupError:
        return []
    if not isinstance(info.prices, list):
        return [info.prices]
    now = datetime.now(UTC)
    ahead: list[CataloguePrice] = []
    for conditional in reversed(info.prices):
        constraint = conditional.constraint
        _add_distinct(ahead, conditional.prices)
        if constraint is None or (
            isinstance(constraint, types.StartDateConstraint) and constraint.active(now)
        ):
            return ahead
    if info.prices:
        _add_distinct(ahead, info.prices[0].prices)  # the default when none holds
    return ahead


def _add_distinct(prices: list[CataloguePrice], price: CataloguePrice) -> None:
    if all(price != p for p in prices):
        prices.append(price)


def _highest(found: Rates, prices: list[CataloguePrice]) -> Rates:
    """Per-token rates no call can exceed: each rate at its highest over *prices*' top tiers."""
    n = _TOP_TIER_TOKENS
    k = Decimal(NANOS_PER_USD) / n
    inp, out, cached = found.input, found.output, found.cached_input
    written = found.cache_write
    for price in prices:
        both = price.calc_price(_catalogue_usage(n, n))
        hit = price.calc_price(_catalogue_usage(n, 0, cached=n))
        write = price.calc_price(_catalogue_usage(n, 0, written=n, written_1h=n))
        inp = max(inp, Decimal(both["input_price"]) * k)
        out = max(out, Decimal(both["output_price"]) * k)
        cached = max(cached, Decimal(hit["input_price"]) * k)
        write_rate = Decimal(write["input_price"]) * k
        written = write_rate if written is None else max(written, write_rate)
    return Rates(inp, out, cached, source="genai-prices", cache_write=written)


def _is_flat(model: str, top: Rates) -> bool:
    n = 1000
    small = _catalogue_calc(model, _catalogue_usage(n, n))
    small_cached = _catalogue_calc(model, _catalogue_usage(n, 0, cached=n))
    small_written = _catalogue_calc(model, _catalogue_usage(n, 0, written=n, written_1h=n))
    if small is None or small_cached is None or small_written is None:
        return False
    k = Decimal(NANOS_PER_USD) / n
    return (
        Decimal(small.input_price) * k == top.input
        and Decimal(small.output_price) * k == top.output
        and Decimal(small_cached.input_price) * k == top.cached_input
        and Decimal(small_written.input_price) * k == top.cache_write
    )


def _catalogue_cost(
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached: int,
    written: int,
    written_1h: int,
    service_tier: str | None = None,
) -> int | None:
    usage = _catalogue_usage(input_tokens, output_tokens, cached, written, written_1h)
    calc = _catalogue_calc(model, usage, service_tier)
    if calc is None:
        return None
    return math.ceil(Decimal(calc.total_price) * NANOS_PER_USD)
