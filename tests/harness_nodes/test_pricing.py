from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import genai_prices.data_snapshot as snapshot
import pytest
from genai_prices import Usage, calc_price
from genai_prices import types as catalogue

from harness_nodes import ModelPrice, Pricing, UnpricedModelError, UserError
from harness_nodes.pricing import Rates

NANOS = 1_000_000_000
# deepseek-chat/-reasoner: full price 00:30-16:30 UTC, half price (off-peak) otherwise.
PEAK = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
OFF_PEAK = dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.UTC)


def test_catalogue_prices_match_genai_prices() -> None:
    from genai_prices import Usage, calc_price

    pricing = Pricing()
    expected = calc_price(Usage(input_tokens=12_345, output_tokens=678), "gpt-4o").total_price
    assert pricing.cost_nanos("gpt-4o", 12_345, 678) == int(expected * 1_000_000_000)
    assert pricing.rates("gpt-4o-mini").source == "genai-prices"


def test_cached_input_is_billed_at_the_cached_rate() -> None:
    pricing = Pricing()
    full = pricing.cost_nanos("gpt-4o", 1_000_000, 0)
    half_cached = pricing.cost_nanos("gpt-4o", 1_000_000, 0, cached_input_tokens=500_000)
    assert full == 2_500_000_000
    assert half_cached == 1_875_000_000  # 0.5M at $2.50 + 0.5M at $1.25


def test_tiered_model_is_reserved_at_its_top_tier() -> None:
    pricing = Pricing()
    rates = pricing.rates("claude-sonnet-4-5")  # $3 → $6 input above 200k tokens
    assert rates.input == 6000
    small_call = pricing.cost_nanos("claude-sonnet-4-5", 1000, 0)
    assert small_call == 3_000_000  # the actual cost uses the real tier
    assert rates.worst_case_nanos(1000, 0) >= small_call


def test_override_wins_over_the_catalogue_and_self_hosted_models_are_priced() -> None:
    pricing = Pricing(
        overrides={
            "gpt-4o": ModelPrice(input_per_mtok=1, output_per_mtok=2),
            "llama-local": ModelPrice(input_per_mtok="0.05", output_per_mtok=0),
        }
    )
    assert pricing.cost_nanos("gpt-4o", 1_000_000, 1_000_000) == 3_000_000_000
    assert pricing.cost_nanos("LLAMA-LOCAL", 2_000_000, 5) == 100_000_000
    assert pricing.rates("llama-local").affordable_output_tokens(10, 1_000) == 2**62


def test_unknown_model_without_fallback_names_the_model_and_the_fix() -> None:
    with pytest.raises(UnpricedModelError, match=re.escape("'acme-7b'")) as info:
        Pricing().rates("acme-7b")
    assert info.value.model == "acme-7b"
    message = str(info.value)
    assert "Pricing(overrides={'acme-7b': ModelPrice(input_per_mtok=" in message
    assert "Pricing(fallback=ModelPrice(" in message


def test_fallback_prices_unknown_models_but_never_as_free() -> None:
    pricing = Pricing(fallback=ModelPrice(input_per_mtok=10, output_per_mtok=30))
    assert pricing.cost_nanos("acme-7b", 1000, 1000) == 40_000_000
    assert not pricing.is_priced("acme-7b") and pricing.is_priced("gpt-4o")


def test_provider_prefixed_names_are_understood() -> None:
    pricing = Pricing()
    assert pricing.rates("openai:gpt-4o") == pricing.rates("gpt-4o")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"input_per_mtok": -1, "output_per_mtok": 1}, id="negative"),
        pytest.param({"input_per_mtok": "abc", "output_per_mtok": 1}, id="not-a-number"),
        pytest.param({"input_per_mtok": float("inf"), "output_per_mtok": 1}, id="infinite"),
    ],
)
def test_bad_prices_are_wiring_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(UserError, match="price"):
        ModelPrice(**kwargs)  # type: ignore[arg-type]


def test_a_declared_cache_write_price_is_billed_and_reserved() -> None:
    # A negotiated Claude rate: input $3, cache writes $6 (1-hour lifetime), reads $0.30.
    price = ModelPrice(
        input_per_mtok=3, output_per_mtok=15, cached_input_per_mtok="0.3", cache_write_per_mtok=6
    )
    pricing = Pricing(overrides={"claude-negotiated": price}, fallback=price)
    cost = pricing.cost_nanos(
        "claude-negotiated", 1_000_000, 0, cached_input_tokens=200_000, cache_write_tokens=500_000
    )
    # 300k plain input at $3, 500k written at $6, 200k read at $0.30 (per million).
    assert cost == 900_000_000 + 3_000_000_000 + 60_000_000
    # The reservation bounds a prompt written to the cache whole.
    rates = pricing.rates("claude-negotiated")
    assert rates.worst_case_nanos(1_000_000, 0) == 6 * NANOS
    # The fallback price keeps it too.
    assert pricing.rates("nobody-knows-me").cache_write == rates.cache_write == 6000
    assert pricing.cost_nanos("nobody-knows-me", 1_000_000, 0, cache_write_tokens=1_000_000) == (
        6 * NANOS
    )
    # Without one, writes cost the input price, as before.
    plain = Pricing(overrides={"m": ModelPrice(input_per_mtok=3, output_per_mtok=15)})
    assert plain.cost_nanos("m", 1_000_000, 0, cache_write_tokens=500_000) == 3 * NANOS
    with pytest.raises(UserError, match="cache_write_per_mtok"):
        ModelPrice(input_per_mtok=3, output_per_mtok=15, cache_write_per_mtok=-1)


def test_pricing_arguments_of_the_wrong_kind_are_refused_at_construction() -> None:
    with pytest.raises(UserError, match="fallback must be a ModelPrice"):
        Pricing(fallback={"input_per_mtok": 1, "output_per_mtok": 1})  # type: ignore[arg-type]
    with pytest.raises(UserError, match="overrides must map model names"):
        Pricing(overrides="gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="a model name must be a string"):
        Pricing().rates(None)  # type: ignore[arg-type]


def test_affordable_output_tokens_never_overspends() -> None:
    rates = Pricing().rates("gpt-4o")
    for budget in (0, 1, 9_999, 10_000, 2_500_123, 10**9):
        n = rates.affordable_output_tokens(100, budget)
        assert n >= 0
        if n:
            assert rates.worst_case_nanos(100, n) <= budget
        assert rates.worst_case_nanos(100, n + 1) > budget or budget < 250_000


def _genai_clock(monkeypatch: pytest.MonkeyPatch, at: dt.datetime) -> None:
    """Set the clock genai-prices reads when a call gives no timestamp."""

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Clock:
            return cls.fromtimestamp(at.timestamp(), tz)

    monkeypatch.setattr(snapshot, "datetime", Clock)


@pytest.mark.parametrize(
    ("model", "peak"),
    [
        pytest.param("deepseek-chat", Rates(Decimal(270), Decimal(1100), Decimal(70)), id="chat"),
        pytest.param(
            "deepseek-reasoner", Rates(Decimal(550), Decimal(2190), Decimal(140)), id="reasoner"
        ),
    ],
)
@pytest.mark.parametrize("first_seen", [OFF_PEAK, PEAK], ids=["first-seen-off-peak", "at-peak"])
def test_time_of_day_prices_cost_each_call_at_its_time_and_reserve_the_peak(
    monkeypatch: pytest.MonkeyPatch, model: str, peak: Rates, first_seen: dt.datetime
) -> None:
    pricing = Pricing()
    _genai_clock(monkeypatch, first_seen)
    rates = pricing.rates(model)  # a process that first priced the model at this hour
    assert (rates.input, rates.output, rates.cached_input, rates.input_bound) == (
        peak.input,
        peak.output,
        peak.cached_input,
        peak.input,  # no cache-write price: writes cost the input rate
    )
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=200_000)
    for at in (PEAK, OFF_PEAK, PEAK):  # ...keeps running through the day
        _genai_clock(monkeypatch, at)
        truth = calc_price(usage, model, genai_request_timestamp=at).total_price * NANOS
        cost = pricing.cost_nanos(model, 1_000_000, 1_000_000, cached_input_tokens=200_000)
        assert cost == truth
        assert pricing.rates(model).worst_case_nanos(1_000_000, 1_000_000) >= cost


def _catalogue_with(monkeypatch: pytest.MonkeyPatch, *prices: catalogue.ConditionalPrice) -> None:
    """A genai-prices catalogue of one model, "acme-1", with these dated prices."""
    model = catalogue.ModelInfo(
        id="acme-1", match=catalogue.ClauseEquals(equals="acme-1"), prices=list(prices)
    )
    provider = catalogue.Provider(
        id="acme",
        name="Acme",
        api_pattern=r"https://api\.acme\.test",
        model_match=catalogue.ClauseStartsWith(starts_with="acme"),
        models=[model],
    )
    custom = snapshot.DataSnapshot(providers=[provider], from_auto_update=False)
    monkeypatch.setattr(snapshot, "_custom_snapshot", custom)


def _price(
    usd_in: int, usd_out: int, days_from_today: int | None = None
) -> catalogue.ConditionalPrice:
    start = None
    if days_from_today is not None:
        day = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days_from_today)
        start = catalogue.StartDateConstraint(start_date=day)
    price = catalogue.ModelPrice(input_mtok=Decimal(usd_in), output_mtok=Decimal(usd_out))
    return catalogue.ConditionalPrice(constraint=start, prices=price)


def test_a_price_rise_on_a_later_date_is_reserved_already(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _catalogue_with(monkeypatch, _price(1, 2), _price(3, 6, days_from_today=30))
    pricing = Pricing()
    rates = pricing.rates("acme-1")  # a worker may well run past the date
    assert (rates.input, rates.output) == (3000, 6000)
    assert pricing.cost_nanos("acme-1", 1_000_000, 1_000_000) == 3 * NANOS  # today's $1 + $2


def test_a_price_replaced_on_a_past_date_no_longer_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _catalogue_with(monkeypatch, _price(5, 10), _price(1, 2, days_from_today=-30))
    pricing = Pricing()
    rates = pricing.rates("acme-1")
    assert (rates.input, rates.output) == (1000, 2000)
    assert pricing.cost_nanos("acme-1", 1_000_000, 1_000_000) == 3 * NANOS


def test_a_negative_token_count_is_never_a_credit() -> None:
    pricing = Pricing()
    assert pricing.cost_nanos("gpt-4o", 1000, -5_000_000) == pricing.cost_nanos("gpt-4o", 1000, 0)
    tiered = pricing.cost_nanos("claude-sonnet-4-5", -1000, 10, cached_input_tokens=-5)
    assert tiered == pricing.cost_nanos("claude-sonnet-4-5", 0, 10)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("claude-3-5-sonnet-20241022", id="flat"),
        pytest.param("claude-sonnet-4-5", id="tiered"),
        pytest.param("gpt-4o", id="no-cache-write-price"),
    ],
)
def test_cache_writes_are_billed_and_reserved_at_the_cache_write_rate(model: str) -> None:
    from genai_prices import Usage, calc_price

    pricing = Pricing()
    usage = Usage(input_tokens=100_000, cache_write_tokens=90_000, output_tokens=100)
    expected = calc_price(usage, model).total_price
    assert pricing.cost_nanos(model, 100_000, 100, cache_write_tokens=90_000) == int(
        expected * 1_000_000_000
    )
    one_hour = Usage(input_tokens=100_000, cache_write_tokens=90_000, cache_write_1h_tokens=9_000)
    expected = calc_price(one_hour, model).total_price
    assert pricing.cost_nanos(
        model, 100_000, 0, cache_write_tokens=90_000, cache_write_1h_tokens=9_000
    ) == int(expected * 1_000_000_000)
    # The reservation is a bound even when the whole prompt is written to the cache for an hour.
    written = pricing.cost_nanos(
        model, 300_000, 0, cache_write_tokens=300_000, cache_write_1h_tokens=300_000
    )
    assert pricing.rates(model).worst_case_nanos(300_000, 0) >= written


def test_a_service_tier_on_a_genai_prices_without_tier_prices_is_priced_standard(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # genai-prices before price contexts: calc_price takes no price_context. A call at a
    # tier is priced at the standard prices, with a warning, not failed with a TypeError.
    import logging

    import genai_prices

    real = genai_prices.calc_price

    def calc_price(usage: Any, model_ref: str, *, provider_id: Any = None) -> Any:
        return real(usage, model_ref, provider_id=provider_id)

    monkeypatch.setattr(genai_prices, "calc_price", calc_price)
    pricing = Pricing()
    standard = pricing.cost_nanos("gpt-4o", 10_000, 500, 6_000)
    with caplog.at_level(logging.WARNING, "harness_nodes.pricing"):
        assert pricing.cost_nanos("gpt-4o", 10_000, 500, 6_000, service_tier="priority") == standard
    assert "no service-tier prices" in caplog.text


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-3-5-sonnet-20240620-v1:0",  # ChatBedrock's model_id
        "us.anthropic.claude-3-5-sonnet-20240620-v1:0",  # a cross-region inference profile
        "meta.llama3-70b-instruct-v1:0",
    ],
)
def test_a_bedrock_model_id_is_priced_as_bedrock_prices_it(model_id: str) -> None:
    # Its version suffix read as "provider:model": provider 'anthropic.claude-...-v1', model
    # '0', an UnpricedModelError naming that provider, though the catalogue prices it.
    expected = calc_price(Usage(input_tokens=1000, output_tokens=100), model_id, provider_id="aws")
    cost = Pricing().cost_nanos(model_id, 1000, 100)
    assert cost == int(Decimal(expected.total_price) * 1_000_000_000)
    with pytest.raises(UnpricedModelError, match="provider 'aws'"):
        Pricing().rates("anthropic.claude-unknown-v9:0")
