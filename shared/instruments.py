"""Instrument specifications and the fixed-point conversion between wire decimals and integer ticks/lots.

Inside the core a price is an integer number of ticks and a quantity an integer number of lots.
Fee rates become integers over FEE_DENOM, so a fee is exactly price_ticks * qty_lots * rate_num
"fee units" of (tick * lot / FEE_DENOM) quote currency.  Decimals appear only here, at the edge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any, Final

from shared.decimals import fmt_fixed, fmt_trimmed

FEE_DENOM: Final = 100_000_000  # fee rates are exact multiples of 1e-8 (a literal: compiled code inlines it)
_EXACT_PREC = 60  # enough digits for any value we accept; bounds are checked before arithmetic


class OffGrid(ValueError):
    """A wire value is not a positive, finite, in-range multiple of its increment."""


class JsonNumber(str):
    """The exact source text of a JSON number (the gateway's exact decoder makes these).

    A JSON number keeps the full JSON grammar (exponents included: 1e2 is a number the client wrote);
    a JSON string must be a plain decimal. Fields that must be real strings (symbol, client_order_id
    ...) are checked with `type(v) is str`, so a number never passes for one.
    """

    __slots__ = ()


# The wire grammar of a decimal string: ASCII digits only (re's [0-9] is ASCII; str.isdigit and Decimal
# take Arabic-Indic or full-width digits), no sign but "-", no exponent, no spaces, digits on both
# sides of the point.
_DECIMAL_STRING: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
MAX_NUMBER_TEXT: Final = 64  # characters; longer values cannot be on any grid we accept


def to_decimal(value: Any) -> Decimal:
    """Read a wire number exactly; the single authority on what is a number (gateway and core).

    Accepted: a decimal string matching -?[0-9]+(.[0-9]+)?, a JSON number (int, JsonNumber, or a
    float whose shortest repr is what the client wrote). Raises OffGrid for anything else (bool,
    NaN, infinities, "+1", " 1", "1e1" as a string, non-ASCII digits, garbage).
    """
    kind = type(value)
    if kind is str:
        if len(value) > MAX_NUMBER_TEXT or _DECIMAL_STRING.fullmatch(value) is None:
            raise OffGrid("not a decimal string")
        text = value
    elif kind is JsonNumber:
        # The JSON decoder checked the grammar; NaN / Infinity literals are refused as not finite.
        if len(value) > MAX_NUMBER_TEXT:
            raise OffGrid("number too long")
        text = value
    elif kind is int:  # exact type: True / False are not numbers
        return Decimal(value)
    elif kind is float:
        # repr() is the shortest string that round-trips, i.e. what the client wrote in JSON ("0.1").
        text = repr(value)
    else:
        raise OffGrid("not a number")
    try:
        d = Decimal(text)
    except InvalidOperation as exc:
        raise OffGrid("not a decimal") from exc
    if not d.is_finite():
        raise OffGrid("not finite")
    return d


_POW10: Final = tuple(10**i for i in range(61))


def plain_units(value: object, m: int, k: int, max_units: int) -> int | None:
    """The integer fast path of to_units for an unsigned decimal string ("100.50") on the grid
    m x 10^-k and in (0, max_units]; None for anything else, which then takes the exact Decimal path
    (the one that decides what is rejected). About a third of the Decimal path's cost.

    What it accepts is a subset of _DECIMAL_STRING: ASCII (checked first) digits, an optional point
    with digits after it; no sign, exponent or underscore.
    """
    if type(value) is not str or not value.isascii() or len(value) > 40 or k > 60:
        return None
    whole, dot, frac = value.partition(".")
    if not whole.isdigit():
        return None
    if dot:
        if not frac.isdigit():
            return None
        if len(frac) > k:
            if frac[k:].strip("0"):
                return None  # finer than the grid: the exact path rejects it
            scaled = int(whole + frac[:k])
        else:
            scaled = int(whole + frac) * _POW10[k - len(frac)]
    else:
        scaled = int(whole) * _POW10[k]
    if m != 1:  # the increment is m x 10^-k
        scaled, rest = divmod(scaled, m)
        if rest:
            return None
    return scaled if 0 < scaled <= max_units else None


def to_units(value: Any, increment: Decimal, maximum: Decimal) -> int:
    """Convert a wire number to an integer count of `increment`, rejecting instead of rounding."""
    d = to_decimal(value)
    if d <= 0:
        raise OffGrid("not positive")
    if d > maximum:
        raise OffGrid("too large")
    if d < increment:  # also keeps the remainder below from underflowing for exponents like 1e-1000059
        raise OffGrid("off grid")
    with localcontext() as ctx:
        ctx.prec = _EXACT_PREC
        try:
            if d % increment != 0:
                raise OffGrid("off grid")
            return int(d / increment)
        except ArithmeticError as exc:  # more digits than any grid here allows
            raise OffGrid("off grid") from exc


def scale_of(increment: Decimal) -> tuple[int, int]:
    """(m, k) with increment == m x 10^-k exactly: lets us format with integer arithmetic only."""
    _sign, digits, exp = increment.as_tuple()
    m = int("".join(map(str, digits)))
    if not isinstance(exp, int):
        raise ValueError("increment must be finite")
    return (m * 10**exp, 0) if exp >= 0 else (m, -exp)


def units_to_str(units: int, increment: Decimal) -> str:
    """Render an integer count of `increment` as a plain decimal string ("30000.50")."""
    m, k = scale_of(increment)
    return fmt_fixed(units * m, k)


MEMO_MAX = 100_000


class Memo(dict[Any, str]):
    """Texts by value, made on first use by `make`: a hit is one dict lookup, no Python call. Bounded
    (cleared when full at MEMO_MAX): prices near the top of book, common sizes and names repeat
    constantly."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[Any], str]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> str:
        if len(self) >= MEMO_MAX:
            self.clear()
        text = self[key] = self.make(key)
        return text


_DECIMAL_FIELDS = (
    "tick_size",
    "lot_size",
    "min_qty",
    "max_qty",
    "min_notional",
    "max_price",
    "maker_fee",
    "taker_fee",
)


@dataclass(frozen=True)
class Instrument:
    """One tradable symbol. Decimal fields are the human spec; the int fields are what the core uses."""

    symbol: str
    tick_size: Decimal = Decimal("0.01")
    lot_size: Decimal = Decimal("0.00001")
    min_qty: Decimal = Decimal("0.00001")
    max_qty: Decimal = Decimal("10000")
    min_notional: Decimal = Decimal("0.01")
    max_price: Decimal = Decimal("10000000")
    maker_fee: Decimal = Decimal("0.0010")
    taker_fee: Decimal = Decimal("0.0020")
    # Derived integer parameters (filled in __post_init__).
    min_qty_lots: int = field(init=False)
    max_qty_lots: int = field(init=False)
    max_price_ticks: int = field(init=False)
    min_notional_units: int = field(init=False)  # in ticks x lots
    maker_rate: int = field(init=False)  # over FEE_DENOM
    taker_rate: int = field(init=False)
    # Integer formatting parameters: value = units x mult x 10^-places.
    _price_fmt: tuple[int, int] = field(init=False, repr=False)
    _qty_fmt: tuple[int, int] = field(init=False, repr=False)
    _quote_fmt: tuple[int, int] = field(init=False, repr=False)  # ticks x lots
    # Rendered strings by value (price_str, qty_str): a dict hit costs a tenth of formatting.
    prices: Memo = field(init=False, repr=False, compare=False)
    quantities: Memo = field(init=False, repr=False, compare=False)
    zero_fee: str = field(init=False, repr=False, compare=False)  # "0.00": every non-trade report

    def __post_init__(self) -> None:
        for name in _DECIMAL_FIELDS:
            v = getattr(self, name)
            try:
                d = v if isinstance(v, Decimal) else Decimal(str(v))
            except ArithmeticError as exc:
                raise ValueError(f"{self.symbol}: {name} is not a decimal: {v!r}") from exc
            if not d.is_finite():
                raise ValueError(f"{self.symbol}: {name} must be finite")
            object.__setattr__(self, name, d)
        if self.tick_size <= 0 or self.lot_size <= 0:
            raise ValueError(f"{self.symbol}: tick and lot sizes must be positive")
        if self.max_price < self.tick_size:
            raise ValueError(f"{self.symbol}: max price must be at least one tick")
        if self.min_notional < 0:
            raise ValueError(f"{self.symbol}: min notional must not be negative")
        with localcontext() as ctx:
            ctx.prec = _EXACT_PREC
            min_lots = self.min_qty / self.lot_size
            max_lots = self.max_qty / self.lot_size
            max_ticks = self.max_price / self.tick_size
            if min_lots != min_lots.to_integral_value() or max_lots != max_lots.to_integral_value():
                raise ValueError(f"{self.symbol}: min/max quantity must be multiples of the lot size")
            if max_ticks != max_ticks.to_integral_value():
                raise ValueError(f"{self.symbol}: max price must be a multiple of the tick size")
            if not 0 < min_lots <= max_lots:
                raise ValueError(f"{self.symbol}: need 0 < min quantity <= max quantity")
            notional_units = (self.min_notional / (self.tick_size * self.lot_size)).to_integral_value(
                rounding="ROUND_CEILING"
            )
            rates = []
            for rate in (self.maker_fee, self.taker_fee):
                scaled = rate * FEE_DENOM
                if scaled != scaled.to_integral_value():
                    raise ValueError(f"{self.symbol}: fee rates must be multiples of 1e-8")
                rates.append(int(scaled))
        object.__setattr__(self, "min_qty_lots", int(min_lots))
        object.__setattr__(self, "max_qty_lots", int(max_lots))
        object.__setattr__(self, "max_price_ticks", int(max_ticks))
        object.__setattr__(self, "min_notional_units", max(0, int(notional_units)))
        object.__setattr__(self, "maker_rate", rates[0])
        object.__setattr__(self, "taker_rate", rates[1])
        pm, pk = scale_of(self.tick_size)
        qm, qk = scale_of(self.lot_size)
        object.__setattr__(self, "_price_fmt", (pm, pk))
        object.__setattr__(self, "_qty_fmt", (qm, qk))
        object.__setattr__(self, "_quote_fmt", (pm * qm, pk + qk))
        object.__setattr__(self, "zero_fee", self.fee_str(0))
        object.__setattr__(self, "prices", Memo(lambda t: fmt_fixed(t * pm, pk)))
        object.__setattr__(self, "quantities", Memo(lambda q: fmt_fixed(q * qm, qk)))

    # Edge conversions -------------------------------------------------------------------------
    # Indexing, not *unpacking, the grid: the star call costs as much as the rest of the fast path.
    def price_to_ticks(self, value: Any) -> int:
        grid = self._price_fmt
        ticks = plain_units(value, grid[0], grid[1], self.max_price_ticks)
        return ticks if ticks is not None else to_units(value, self.tick_size, self.max_price)

    def qty_to_lots(self, value: Any) -> int:
        grid = self._qty_fmt
        lots = plain_units(value, grid[0], grid[1], self.max_qty_lots)
        return lots if lots is not None else to_units(value, self.lot_size, self.max_qty)

    def price_str(self, ticks: int) -> str:
        return self.prices[ticks]

    def qty_str(self, lots: int) -> str:
        return self.quantities[lots]

    def fee_str(self, fee_units: int) -> str:
        """Exact fee in quote currency (fee_units x tick x lot / FEE_DENOM): all significant digits,
        at least the price's decimal places, never rounded."""
        m, k = self._quote_fmt
        return fmt_trimmed(fee_units * m * 100_000_000 // FEE_DENOM, k + 8, self._price_fmt[1])

    def notional_str(self, price_ticks: int, qty_lots: int) -> str:
        m, k = self._quote_fmt
        return fmt_trimmed(price_ticks * qty_lots * m, k, self._price_fmt[1])

    @property
    def base_asset(self) -> str:
        """BTC of BTC-USDT: what the quantity counts."""
        return self.symbol.split("-", 1)[0]

    @property
    def quote_asset(self) -> str:
        """USDT of BTC-USDT: what prices, notionals and fees are in."""
        return self.symbol.split("-", 1)[-1]

    def spec(self) -> dict[str, str]:
        return {
            "symbol": self.symbol,
            "tick_size": str(self.tick_size),
            "lot_size": str(self.lot_size),
            "min_qty": str(self.min_qty),
            "max_qty": str(self.max_qty),
            "min_notional": str(self.min_notional),
            "max_price": str(self.max_price),
            "maker_fee": str(self.maker_fee),
            "taker_fee": str(self.taker_fee),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Instrument:
        unknown = set(spec) - {"symbol", *_DECIMAL_FIELDS}
        if unknown:
            raise ValueError(f"unknown instrument fields: {sorted(unknown)}")
        return cls(symbol=str(spec["symbol"]), **{k: v for k, v in spec.items() if k != "symbol"})


MAX_AMOUNT_UNITS: Final = 1 << 96  # a deposit or withdrawal below 2^96 units: far beyond any real sum


def asset_scales(instruments: Iterable[Instrument], fee_places: int | None = None) -> dict[str, int]:
    """Decimal places of each asset's balance unit: fine enough for every instrument that trades it.

    A base asset counts lots; a quote asset pays notional plus fees exactly, so its unit is at most
    tick x lot x 10^-(the places its fee rates need): USDT 2 + 5 + 3 = 10 with the default instruments
    (0.1 % and 0.2 %), which keeps balances far beyond any real sum below 2^62, where the compiled
    core does integer arithmetic natively. Balances are integers of 10^-places of the asset.
    `fee_places` overrides the rates' places: LEGACY_FEE_PLACES gives the scales that stream entries
    and snapshots written before the scales followed the rates used.
    """
    scales: dict[str, int] = {}
    for inst in instruments:
        lot_places, tick_places = inst._qty_fmt[1], inst._price_fmt[1]
        base, quote = inst.base_asset, inst.quote_asset
        fees = rate_places(inst.maker_rate, inst.taker_rate) if fee_places is None else fee_places
        scales[base] = max(scales.get(base, 0), lot_places)
        scales[quote] = max(scales.get(quote, 0), tick_places + lot_places + fees)
    return scales


LEGACY_FEE_PLACES: Final = 8  # a quote unit was one fee unit (tick x lot / FEE_DENOM), whatever the rates


def rate_places(*rates: int) -> int:
    """The fewest decimal places that makes every rate (an integer over FEE_DENOM) a whole number:
    3 for 0.1 % and 0.2 %, 8 for 0.00000001."""
    places = len(str(FEE_DENOM)) - 1
    while places and all(rate % 10 ** (len(str(FEE_DENOM)) - places) == 0 for rate in rates):
        places -= 1
    return places


def rescale(units: int, from_places: int, to_places: int) -> int | None:
    """`units` of 10^-from_places as units of 10^-to_places; None if the amount is finer than that."""
    if to_places >= from_places:
        return units * int(10 ** (to_places - from_places))
    whole, rest = divmod(units, int(10 ** (from_places - to_places)))
    return None if rest else whole


def funding_symbol(instruments: Iterable[Instrument], asset: str) -> str | None:
    """Whose orders stream carries the deposits and withdrawals of `asset`: the first instrument (in
    configuration order) that trades it; None for an asset no instrument trades. The matcher applies
    every stream in one order, so which one it is changes nothing but the exec channel."""
    for inst in instruments:
        if asset in (inst.base_asset, inst.quote_asset):
            return inst.symbol
    return None


def amount_to_units(value: Any, places: int) -> int:
    """A deposit or withdrawal amount as asset units; ValueError if it is not positive or off grid."""
    d = to_decimal(value)
    with localcontext() as ctx:
        ctx.prec = _EXACT_PREC
        units = d.scaleb(places)
        if units != units.to_integral_value() or not 0 < units < MAX_AMOUNT_UNITS:
            raise OffGrid("amount off the asset's grid")
    return int(units)


def default_instruments() -> dict[str, Instrument]:
    """The protocol's defaults when no config is given: BTC-USDT and ETH-USDT."""
    return {s: Instrument(s) for s in ("BTC-USDT", "ETH-USDT")}


def load_instruments(path: str | None) -> dict[str, Instrument]:
    """Instruments from a JSON file (a list of specs), or the defaults."""
    if not path:
        return default_instruments()
    import orjson

    with open(path, "rb") as f:
        specs = orjson.loads(f.read())
    return {i.symbol: i for i in (Instrument.from_spec(s) for s in specs)}
