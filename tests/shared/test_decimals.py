"""shared.decimals: integers as exact plain decimal strings (run against both builds: `make test`)."""

from __future__ import annotations

from decimal import Context, Decimal

from hypothesis import given
from hypothesis import strategies as st

from shared.decimals import fmt_fixed, fmt_trimmed, units_to_amount


@given(
    st.integers(min_value=-(10**32), max_value=10**32),
    st.sampled_from([0, 1, 2, 5, 8, 15, 18]),
    st.integers(min_value=0, max_value=8),
)
def test_fmt_trimmed_is_exact_and_trimmed(units: int, places: int, min_places: int) -> None:
    """Digits and slices (balances, fees): exact, no trailing zero beyond min_places, never fewer."""
    text = fmt_trimmed(units, places, min_places)
    assert Decimal(text).scaleb(places, Context(prec=100)) == units
    decimals = text.partition(".")[2]
    assert len(decimals) >= min(min_places, places)
    assert len(decimals) <= max(min_places, 0) or not decimals.endswith("0")
    if places <= min_places:
        assert len(decimals) == places


def test_units_to_amount_edges() -> None:
    assert [units_to_amount(u, 15) for u in (0, 1, 10**15, 10**15 + 1, 5 * 10**14)] == [
        "0", "0.000000000000001", "1", "1.000000000000001", "0.5",
    ]  # fmt: skip
    assert units_to_amount(-25, 1) == "-2.5" and units_to_amount(1200, 0) == "1200"


@given(st.integers(min_value=-(10**32), max_value=10**32), st.sampled_from([0, 1, 2, 8, 15]))
def test_fmt_fixed_has_exactly_the_places(units: int, places: int) -> None:
    text = fmt_fixed(units, places)
    assert Decimal(text).scaleb(places, Context(prec=100)) == units
    assert len(text.partition(".")[2]) == places
