"""shared.instruments: exact wire decimal <-> integer tick/lot conversion, rendering, instrument specs."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.instruments import (
    FEE_DENOM,
    LEGACY_FEE_PLACES,
    Instrument,
    JsonNumber,
    OffGrid,
    asset_scales,
    default_instruments,
    load_instruments,
    plain_units,
    rate_places,
    rescale,
    scale_of,
    to_decimal,
    to_units,
    units_to_str,
)

BTC = default_instruments()["BTC-USDT"]


def test_default_instruments() -> None:
    insts = default_instruments()
    assert sorted(insts) == ["BTC-USDT", "ETH-USDT"]
    for inst in insts.values():
        assert inst.tick_size == Decimal("0.01") and inst.lot_size == Decimal("0.00001")
        assert inst.min_qty_lots == 1
        assert inst.max_qty_lots == 1_000_000_000  # 10000 BTC
        assert inst.max_price_ticks == 1_000_000_000  # 10 000 000.00
        assert inst.min_notional_units == 100_000  # 0.01 USDT / (0.01 x 0.00001)
        assert inst.maker_rate == 100_000 and inst.taker_rate == 200_000
        assert FEE_DENOM == 10**8


# Parsing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "ticks"),
    [
        ("0.01", 1),
        ("0.1", 10),
        (0.1, 10),  # float: read through its shortest repr, "0.1"
        (0.3, 30),
        ("30000.50", 3_000_050),
        (30000.5, 3_000_050),
        ("30000.5", 3_000_050),
        (42, 4_200),
        ("0042.00", 4_200),
        (JsonNumber("1e2"), 10_000),  # a JSON number literal keeps the JSON grammar
        (JsonNumber("4.2E+1"), 4_200),
        (JsonNumber("42"), 4_200),
        ("10000000", 1_000_000_000),  # the maximum price
        ("10000000.00", 1_000_000_000),
        (1e7, 1_000_000_000),
        ("0.0100000000000000000000000000000000000000000000000000000000", 1),  # 60 chars, exact
    ],
)
def test_price_to_ticks_exact(value: Any, ticks: int) -> None:
    assert BTC.price_to_ticks(value) == ticks


@pytest.mark.parametrize(
    ("value", "lots"),
    [
        ("0.00001", 1),
        (1e-05, 1),
        (3e-05, 3),
        ("1", 100_000),
        (0.12345, 12_345),
        ("10000", 10**9),
        (10_000, 10**9),
    ],
)
def test_qty_to_lots_exact(value: Any, lots: int) -> None:
    assert BTC.qty_to_lots(value) == lots


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        True,
        False,
        None,
        [],
        {},
        [1],
        b"1",
        Decimal("1"),  # not a wire type
        "",
        "   ",
        "abc",
        "1,5",
        "0x10",
        "1.2.3",
        0,
        "0",
        "0.00",
        "-0",
        -1,
        "-0.01",
        -0.01,
        "0.001",  # off the tick grid
        "0.015",
        0.1 + 0.2,  # 0.30000000000000004
        1e-3,
        "10000000.01",  # above the maximum
        10_000_001,
        1e300,
        "1e400",
        10**100,
        "9" * 65,  # too long
        "0." + "0" * 62 + "1",  # too many digits (and too long)
        "0.01" + "0" * 59 + "1",  # too many digits
        JsonNumber("NaN"),
        JsonNumber("-Infinity"),
        JsonNumber("1e400"),
        JsonNumber("9" * 65),
    ],
)
def test_price_to_ticks_rejects(value: Any) -> None:
    with pytest.raises(OffGrid):
        BTC.price_to_ticks(value)


@pytest.mark.parametrize(
    "value",
    [
        "0.000001",
        1e-06,
        0.000015,
        "10000.00001",
        10_001,
        "0",
        0,
        -1,
        "-0.00001",
        True,
        None,
        "nan",
        float("nan"),
    ],
)
def test_qty_to_lots_rejects(value: Any) -> None:
    with pytest.raises(OffGrid):
        BTC.qty_to_lots(value)


def test_offgrid_is_a_value_error() -> None:
    assert issubclass(OffGrid, ValueError)


@pytest.mark.parametrize("value", ["1e-1000059", "1e-999999999", "5E-1000100"])
def test_tiny_exponents_are_off_grid(value: str) -> None:
    with pytest.raises(OffGrid):
        BTC.price_to_ticks(JsonNumber(value))


# Issue 13 finding 7: every one of these read as 10 (or 10.00) before.
@pytest.mark.parametrize(
    "text",
    [
        "\u0661\u0660",  # Arabic-Indic
        "\u06f1\u06f0",  # extended Arabic-Indic
        "\u0967\u0966",  # Devanagari
        "\uff11\uff10",  # full-width
        "+10",
        " 10.00 ",
        "10\n",
        "\u200910",  # thin space
        "1e1",
        "1E1",
        "10.",
        ".5",
        "10.0.0",
        "--10",
        "- 10",
        "1_0",
        "Infinity",
        "10\x00",
    ],
)
def test_decimal_strings_are_strict(text: str) -> None:
    with pytest.raises(OffGrid):
        to_decimal(text)
    with pytest.raises(OffGrid):
        BTC.price_to_ticks(text)
    with pytest.raises(OffGrid):
        BTC.qty_to_lots(text)


@pytest.mark.parametrize("text", ["10", "10.00", "-10", "-0.5", "0", "007", "1.000000"])
def test_decimal_string_grammar(text: str) -> None:
    assert to_decimal(text) == Decimal(text)


def test_only_plain_str_and_json_numbers_are_text() -> None:
    class Other(str):
        pass

    with pytest.raises(OffGrid):
        to_decimal(Other("10"))
    assert to_decimal(JsonNumber("1e1")) == 10


# The integer fast path agrees with the exact Decimal path -------------------------------------------
GRIDS = [
    Instrument("A-B"),
    Instrument("C-D", tick_size="0.05", lot_size="0.001", min_qty="0.001", max_qty="500", max_price="1000"),
    Instrument("E-F", tick_size="5", lot_size="10", min_qty="10", max_qty="100000", max_price="100000"),
    Instrument("G-H", tick_size="0.00000001", lot_size="1", min_qty="1", max_qty="1000000", max_price="0.5"),
]


def exact_ticks(inst: Instrument, value: Any) -> int | None:
    try:
        return to_units(value, inst.tick_size, inst.max_price)
    except (OffGrid, ArithmeticError):
        return None


def fast_ticks(inst: Instrument, value: Any) -> int | None:
    return plain_units(value, *scale_of(inst.tick_size), inst.max_price_ticks)


@given(
    whole=st.text("0123456789", min_size=0, max_size=22),
    frac=st.none() | st.text("0123456789", min_size=0, max_size=22),
    inst=st.sampled_from(GRIDS),
)
@settings(max_examples=2000, deadline=None, database=None)
def test_fast_units_match_the_decimal_path(whole: str, frac: str | None, inst: Instrument) -> None:
    text = whole if frac is None else f"{whole}.{frac}"
    fast = fast_ticks(inst, text)
    exact = exact_ticks(inst, text)
    assert fast is None or fast == exact, text  # a fast answer is the exact one
    assert exact is None or len(text) > 40 or fast == exact, text  # and it has one for plain text
    lots = plain_units(text, *scale_of(inst.lot_size), inst.max_qty_lots)
    try:
        exact_lots: int | None = to_units(text, inst.lot_size, inst.max_qty)
    except OffGrid:
        exact_lots = None
    assert lots is None or lots == exact_lots, text


@given(units=st.integers(min_value=-5, max_value=10**12), inst=st.sampled_from(GRIDS))
@settings(max_examples=1000, deadline=None, database=None)
def test_fast_units_round_trip(units: int, inst: Instrument) -> None:
    text = inst.price_str(units)
    expected = units if 0 < units <= inst.max_price_ticks else None
    assert fast_ticks(inst, text) == expected


@given(text=st.text("0123456789.+-e_ x\u0660\u00b2\uff10", max_size=30), inst=st.sampled_from(GRIDS))
@settings(max_examples=3000, deadline=None, database=None)
def test_fast_units_agree_on_arbitrary_text(text: str, inst: Instrument) -> None:
    fast = fast_ticks(inst, text)
    assert fast is None or fast == exact_ticks(inst, text), text
    try:
        via_instrument: int | None = inst.price_to_ticks(text)
    except OffGrid:
        via_instrument = None
    assert via_instrument == exact_ticks(inst, text), text


def test_to_decimal_is_exact() -> None:
    assert to_decimal("0.1") == Decimal("0.1")
    assert to_decimal(0.1) == Decimal("0.1")  # not 0.1000000000000000055511151231257827...
    assert to_decimal(7) == Decimal(7)
    assert to_decimal(10**30) == Decimal(10**30)


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(1, 10**9))
def test_ticks_roundtrip_through_strings(ticks: int) -> None:
    text = BTC.price_str(ticks)
    assert BTC.price_to_ticks(text) == ticks
    assert Decimal(text) == Decimal(ticks) / 100


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(1, 10**9))
def test_lots_roundtrip_through_strings_and_floats(lots: int) -> None:
    text = BTC.qty_str(lots)
    assert BTC.qty_to_lots(text) == lots
    assert BTC.qty_to_lots(float(text)) == lots  # a JSON float that the client wrote as `text`


# Rendering --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("units", "increment", "text"),
    [
        (3_000_050, "0.01", "30000.50"),
        (1, "0.01", "0.01"),
        (0, "0.01", "0.00"),
        (100, "0.01", "1.00"),
        (1, "0.00001", "0.00001"),
        (10**9, "0.00001", "10000.00000"),
        (7, "1", "7"),
        (7, "5", "35"),
        (3, "0.5", "1.5"),
        (10**30, "0.01", "1" + "0" * 28 + ".00"),
    ],
)
def test_units_to_str(units: int, increment: str, text: str) -> None:
    assert units_to_str(units, Decimal(increment)) == text


def test_price_and_qty_strings() -> None:
    assert BTC.price_str(1) == "0.01"
    assert BTC.price_str(1_000_000_000) == "10000000.00"
    assert BTC.qty_str(1) == "0.00001"
    assert BTC.qty_str(12_345) == "0.12345"


@pytest.mark.parametrize(
    ("fee_units", "text"),
    [
        (0, "0.00"),
        (1, "0.000000000000001"),  # 1 tick x 1 lot x 1e-8 = 1e-15 USDT
        (10_000 * 10 * 100_000, "0.00001"),  # 100.00 x 0.0001 x 0.1 %
        (100 * 100_000 * 200_000, "0.002"),  # 1.00 x 1 BTC x 0.2 %: more places than the tick when needed
        (3_000_050 * 100_000 * 100_000, "30.0005"),  # 30000.50 x 1 BTC x 0.1 %
        (3_000_050 * 3 * 200_000, "0.00180003"),  # 30000.50 x 0.00003 x 0.2 %
        (2 * 10**19, "20000.00"),  # 100000.00 x 100 BTC x 0.2 %
        (-100_000, "-0.0000000001"),  # a maker rebate renders exactly too
    ],
)
def test_fee_str_is_exact(fee_units: int, text: str) -> None:
    assert BTC.fee_str(fee_units) == text
    assert Decimal(text) == Decimal(fee_units) * BTC.tick_size * BTC.lot_size / FEE_DENOM


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(1, 10**9), st.integers(1, 10**9))
def test_fee_str_of_any_trade_is_the_exact_rate_times_notional(price: int, qty: int) -> None:
    notional = Decimal(BTC.price_str(price)) * Decimal(BTC.qty_str(qty))
    assert Decimal(BTC.notional_str(price, qty)) == notional
    assert Decimal(BTC.fee_str(price * qty * BTC.maker_rate)) == notional * BTC.maker_fee
    assert Decimal(BTC.fee_str(price * qty * BTC.taker_rate)) == notional * BTC.taker_fee
    # At least the price's two decimals, never a rounded digit.
    assert len(BTC.fee_str(price * qty * BTC.taker_rate).split(".")[1]) >= 2


def test_notional_str() -> None:
    assert BTC.notional_str(3_000_050, 100_000) == "30000.50"
    assert BTC.notional_str(1, 1) == "0.0000001"
    assert BTC.notional_str(10_000, 10) == "0.01"  # exactly the minimum notional


# Instrument specs ---------------------------------------------------------------------------------
def test_custom_instrument_derives_integer_parameters() -> None:
    inst = Instrument(
        "SOL-USDT",
        tick_size=Decimal("0.001"),
        lot_size=Decimal("0.01"),
        min_qty=Decimal("0.1"),
        max_qty=Decimal("5000"),
        min_notional=Decimal("5"),
        max_price=Decimal("100000"),
        maker_fee=Decimal("0.00015"),
        taker_fee=Decimal("0.0004"),
    )
    assert inst.min_qty_lots == 10
    assert inst.max_qty_lots == 500_000
    assert inst.max_price_ticks == 100_000_000
    assert inst.min_notional_units == 500_000  # 5 / (0.001 x 0.01)
    assert inst.maker_rate == 15_000 and inst.taker_rate == 40_000
    assert inst.price_to_ticks("12.345") == 12_345
    with pytest.raises(OffGrid):
        inst.qty_to_lots("0.005")


def test_min_notional_rounds_up_to_whole_units() -> None:
    inst = Instrument(
        "X",
        tick_size=Decimal("0.1"),
        lot_size=Decimal("0.1"),
        min_qty=Decimal("0.1"),
        min_notional=Decimal("0.015"),
    )
    assert inst.min_notional_units == 2  # 1.5 units of 0.01: at least 2


def test_spec_roundtrip_and_from_spec_accepts_strings_and_numbers() -> None:
    assert Instrument.from_spec(BTC.spec()) == BTC
    inst = Instrument.from_spec(
        {"symbol": "ETH-USDT", "tick_size": 0.01, "lot_size": "0.0001", "min_qty": 0.0001, "maker_fee": 0}
    )
    assert inst.tick_size == Decimal("0.01") and inst.lot_size == Decimal("0.0001") and inst.maker_rate == 0


def test_non_decimal_fields_are_converted() -> None:
    inst = Instrument("X", tick_size=0.5, maker_fee="0.001")  # type: ignore[arg-type]
    assert inst.tick_size == Decimal("0.5") and inst.maker_rate == 100_000


def test_load_instruments(tmp_path: Any) -> None:
    assert load_instruments(None) == default_instruments()
    path = tmp_path / "instruments.json"
    path.write_text('[{"symbol": "SOL-USDT", "tick_size": "0.001", "lot_size": "0.01", "min_qty": "0.01"}]')
    insts = load_instruments(str(path))
    assert list(insts) == ["SOL-USDT"] and insts["SOL-USDT"].min_qty_lots == 1


@pytest.mark.parametrize(
    "spec",
    [
        {"tick_size": "0"},
        {"tick_size": "-0.01"},
        {"lot_size": "0"},
        {"lot_size": "-1"},
        {"min_qty": "0.000001"},  # not a multiple of the lot
        {"max_qty": "0.000015"},
        {"max_price": "0.015"},  # not a multiple of the tick
        {"min_qty": "2", "max_qty": "1"},
        {"min_qty": "0"},
        {"min_qty": "-0.00001"},
        {"maker_fee": "0.000000001"},  # not a multiple of 1e-8
        {"taker_fee": "0.123456789"},
    ],
)
def test_invalid_instrument_specs_raise_value_error(spec: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Instrument.from_spec({"symbol": "X", **spec})


@pytest.mark.parametrize(
    "spec",
    [
        {"tick_size": "NaN"},
        {"tick_size": "abc"},
        {"tick_size": "Infinity"},
        {"lot_size": "Infinity"},
        {"max_qty": "Infinity"},
        {"max_price": "Infinity"},
        {"min_notional": "NaN"},
        {"min_notional": "Infinity"},
        {"taker_fee": "NaN"},
    ],
)
def test_non_finite_instrument_specs_raise(spec: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Instrument.from_spec({"symbol": "X", **spec})


@pytest.mark.parametrize("spec", [{"max_price": "0"}, {"max_price": "-1"}])
def test_instrument_without_any_valid_price_is_rejected(spec: dict[str, str]) -> None:
    with pytest.raises((ValueError, ArithmeticError)):
        Instrument.from_spec({"symbol": "X", **spec})


def test_to_units_directly() -> None:
    assert to_units("1.5", Decimal("0.5"), Decimal("10")) == 3
    with pytest.raises(OffGrid):
        to_units("1.25", Decimal("0.5"), Decimal("10"))
    with pytest.raises(OffGrid):
        to_units("10.5", Decimal("0.5"), Decimal("10"))


# Asset scales -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rates", "places"),
    [((100_000, 200_000), 3), ((0, 200_000), 3), ((0, 0), 0), ((15_000,), 5), ((1,), 8), ((10**8,), 0)],
)
def test_rate_places_are_the_fewest_that_make_every_rate_whole(rates: tuple[int, ...], places: int) -> None:
    assert rate_places(*rates) == places
    assert all(rate * 10**places % FEE_DENOM == 0 for rate in rates)


def test_asset_scales_follow_tick_lot_and_fee_rates() -> None:
    """A quote asset gets tick + lot + fee-rate places (the finest instrument decides), a base asset
    its lot's places; the legacy scales counted 8 places of fees whatever the rates."""
    assert asset_scales(default_instruments().values()) == {"BTC": 5, "USDT": 10, "ETH": 5}
    sol = Instrument(
        "SOL-USDT",
        tick_size=Decimal("0.0001"),
        lot_size=Decimal("0.01"),
        min_qty=Decimal("0.01"),
        taker_fee=Decimal("0.00015"),
    )
    assert asset_scales([Instrument("BTC-USDT"), sol]) == {"BTC": 5, "USDT": 11, "SOL": 2}  # 4 + 2 + 5
    free = Instrument("BTC-USDT", maker_fee=Decimal("0"), taker_fee=Decimal("0"))
    assert asset_scales([free]) == {"BTC": 5, "USDT": 7}
    assert asset_scales(default_instruments().values(), LEGACY_FEE_PLACES)["USDT"] == 15


@given(st.integers(0, 10**30), st.integers(0, 20), st.integers(0, 20))
def test_rescale_is_exact_or_refuses(units: int, a: int, b: int) -> None:
    got = rescale(units, a, b)
    if got is None:
        assert b < a and units % 10 ** (a - b)
    else:
        assert Decimal(got).scaleb(-b) == Decimal(units).scaleb(-a)
