"""Instrument specifications and the fixed-point conversion between wire decimals and integer ticks/lots.

Inside the core a price is an integer number of ticks and a quantity an integer number of lots.
Fee rates become integers over FEE_DENOM, so a fee is exactly price_ticks * qty_lots * rate_num
"fee units" of (tick * lot / FEE_DENOM) quote currency.  Decimals appear only here, at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

FEE_DENOM = 10**8  # fee rates are exact multiples of 1e-8
_EXACT_PREC = 60  # enough digits for any value we accept; bounds are checked before arithmetic


class OffGrid(ValueError):
    """A wire value is not a positive, finite, in-range multiple of its increment."""


def to_decimal(value: Any) -> Decimal:
    """Read a wire number exactly: a decimal string, a JSON int, or a float whose shortest repr is exact.

    Raises OffGrid for anything else (bool, NaN, infinities, garbage).
    """
    if isinstance(value, bool):
        raise OffGrid("boolean is not a number")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        # repr() is the shortest string that round-trips, i.e. what the client wrote in JSON ("0.1").
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            raise OffGrid("not a decimal string")
    else:
        raise OffGrid("not a number")
    try:
        d = Decimal(text)
    except InvalidOperation as exc:
        raise OffGrid("not a decimal") from exc
    if not d.is_finite():
        raise OffGrid("not finite")
    return d


def to_units(value: Any, increment: Decimal, maximum: Decimal) -> int:
    """Convert a wire number to an integer count of `increment`, rejecting instead of rounding."""
    d = to_decimal(value)
    if d <= 0:
        raise OffGrid("not positive")
    if d > maximum:
        raise OffGrid("too large")
    with localcontext() as ctx:
        ctx.prec = _EXACT_PREC
        if d % increment != 0:
            raise OffGrid("off grid")
        return int(d / increment)


def units_to_str(units: int, increment: Decimal) -> str:
    """Render an integer count of `increment` as a plain decimal string ("30000.50")."""
    with localcontext() as ctx:
        ctx.prec = _EXACT_PREC
        return _plain(Decimal(units) * increment, increment)


def _plain(d: Decimal, increment: Decimal) -> str:
    places = max(0, -increment.as_tuple().exponent)  # type: ignore[operator]
    return f"{d:.{places}f}"


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

    def __post_init__(self) -> None:
        for name in ("tick_size", "lot_size", "min_qty", "max_qty", "min_notional", "max_price"):
            v = getattr(self, name)
            if not isinstance(v, Decimal):
                object.__setattr__(self, name, Decimal(str(v)))
        for name in ("maker_fee", "taker_fee"):
            v = getattr(self, name)
            if not isinstance(v, Decimal):
                object.__setattr__(self, name, Decimal(str(v)))
        if self.tick_size <= 0 or self.lot_size <= 0:
            raise ValueError(f"{self.symbol}: tick and lot sizes must be positive")
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

    # Edge conversions -------------------------------------------------------------------------
    def price_to_ticks(self, value: Any) -> int:
        return to_units(value, self.tick_size, self.max_price)

    def qty_to_lots(self, value: Any) -> int:
        return to_units(value, self.lot_size, self.max_qty)

    def price_str(self, ticks: int) -> str:
        return units_to_str(ticks, self.tick_size)

    def qty_str(self, lots: int) -> str:
        return units_to_str(lots, self.lot_size)

    def fee_str(self, fee_units: int) -> str:
        """Exact fee in quote currency: fee_units x tick x lot / FEE_DENOM, no rounding."""
        with localcontext() as ctx:
            ctx.prec = _EXACT_PREC
            return self._quote_str(Decimal(fee_units) * self.tick_size * self.lot_size / FEE_DENOM)

    def notional_str(self, price_ticks: int, qty_lots: int) -> str:
        with localcontext() as ctx:
            ctx.prec = _EXACT_PREC
            return self._quote_str(Decimal(price_ticks * qty_lots) * self.tick_size * self.lot_size)

    def _quote_str(self, d: Decimal) -> str:
        """An exact quote amount: all significant digits, and at least the price's decimal places."""
        places = max(-self.tick_size.as_tuple().exponent, -d.normalize().as_tuple().exponent, 0)  # type: ignore[operator]
        return f"{d:.{places}f}"

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
        known = {k: Decimal(str(v)) for k, v in spec.items() if k != "symbol"}
        return cls(symbol=str(spec["symbol"]), **known)


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
