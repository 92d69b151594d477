"""Client message -> core command, or a reject with the protocol's stable code. Pure: no I/O, no clock.

Every check the matcher repeats (services.matcher.engine) is done here first, so that a bad order is
answered at once and never reaches the stream. Numbers are read exactly (shared.instruments): off-grid,
non-positive, non-finite or too large values are rejected, never rounded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from services.matcher.commands import (
    BUY,
    FOK,
    GTC,
    IOC,
    LIMIT,
    MARKET,
    SELL,
    STP_CANCEL_TAKER,
    STP_MODES,
    Amend,
    Cancel,
    Command,
    NewOrder,
)
from shared import codes
from shared.ids import parse_order_id
from shared.instruments import Instrument, OffGrid, scale_of

Message = dict[str, Any]
Reject = dict[str, Any]

NEW: Final = "new"
CANCEL: Final = "cancel"
AMEND: Final = "amend"
ORDER_OPS: Final = frozenset((NEW, CANCEL, AMEND))

MAX_CLIENT_ORDER_ID: Final = 36
# No spaces: the exec channel frames a line as "<account> <json>" (shared.wire).
_ACCOUNT_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_SIDES: Final = frozenset((BUY, SELL))
_TIFS: Final = frozenset((GTC, IOC, FOK))
_MAX_ECHO: Final = 64  # longest op / order id echoed back in a reject
_POW10: Final = tuple(10**i for i in range(64))


class JsonNumber(str):
    """The exact source text of a JSON number, from the exact re-parse (see decode).

    A str subclass so that shared.instruments.to_decimal reads it as a decimal string; fields that
    must be real strings (symbol, client_order_id ...) are checked with `type(v) is str`, so a
    number never passes for one.
    """

    __slots__ = ()


def _exact_loads(data: str | bytes) -> Any:
    # Numbers keep their text (big ints, 1e400, 1e-400, 0.1000000000000000001 stay what the client
    # wrote); NaN / Infinity literals become numbers that the field checks then refuse.
    return json.loads(data, parse_float=JsonNumber, parse_int=JsonNumber, parse_constant=JsonNumber)


def decode(data: str | bytes) -> Message | None:
    """A text frame as a JSON object, or None if it is not one.

    orjson is the fast path. Binary floats are not exact, and orjson turns integers beyond 64 bits
    into floats and refuses 1e400 and NaN, so when a price or quantity arrives as a float, or orjson
    refuses the text, the frame is parsed again with the exact (slower) decoder.
    """
    try:
        msg = orjson.loads(data)
        exact = type(msg) is dict and (type(msg.get("price")) is float or type(msg.get("quantity")) is float)
    except orjson.JSONDecodeError:
        exact = True
    if exact:
        try:
            msg = _exact_loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return None
    return msg if type(msg) is dict else None


def valid_account(value: object) -> bool:
    return type(value) is str and _ACCOUNT_RE.fullmatch(value) is not None


def valid_client_order_id(value: object) -> bool:
    """1..36 printable ASCII characters (ASCII: its length is its size everywhere downstream)."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_CLIENT_ORDER_ID
        and value.isascii()
        and value.isprintable()
    )


def reject(code: str, op: object = None, client_order_id: object = None, reason: str | None = None) -> Reject:
    """The protocol's reject message. Only well-formed values are echoed back."""
    return {
        "type": "reject",
        "op": op if type(op) is str and len(op) <= _MAX_ECHO else None,
        "client_order_id": client_order_id if valid_client_order_id(client_order_id) else None,
        "code": code,
        "reason": reason or codes.reason_for(code),
    }


def parse_order(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> Command | Reject:
    """A new / cancel / amend message of an authenticated account -> Command or reject."""
    op = msg.get("op")
    if op == NEW:
        return parse_new(msg, account, instruments)
    if op == CANCEL:
        return parse_cancel(msg, account, instruments)
    if op == AMEND:
        return parse_amend(msg, account, instruments)
    return reject(codes.UNKNOWN_OP, op, msg.get("client_order_id"))


def parse_new(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> NewOrder | Reject:
    get = msg.get
    cid = get("client_order_id")
    inst = _instrument(get("symbol"), instruments)
    if inst is None:
        return reject(codes.UNKNOWN_SYMBOL, NEW, cid)
    side = get("side")
    if type(side) is not str or side not in _SIDES:
        return reject(codes.INVALID_SIDE, NEW, cid)

    otype, tif = get("type", LIMIT), get("tif")
    if otype in (IOC, FOK):  # the seed's shorthand: a limit order with that tif
        if tif is not None and tif != otype:
            return reject(codes.INVALID_TIF, NEW, cid)
        otype, tif = LIMIT, otype
    elif otype != LIMIT and otype != MARKET:
        return reject(codes.INVALID_TYPE, NEW, cid)
    if tif is None:
        tif = GTC if otype == LIMIT else IOC
    elif type(tif) is not str or tif not in _TIFS or (otype == MARKET and tif == GTC):
        return reject(codes.INVALID_TIF, NEW, cid)

    price_value = get("price")
    price: int | None = None
    if otype == LIMIT:
        if price_value is None:
            return reject(codes.INVALID_PRICE, NEW, cid)
        price = _ticks(inst, price_value)
        if price is None:
            return reject(codes.INVALID_PRICE, NEW, cid)
    elif price_value is not None:
        return reject(codes.INVALID_PRICE, NEW, cid)

    qty = _lots(inst, get("quantity"))
    if qty is None:
        return reject(codes.INVALID_QUANTITY, NEW, cid)
    if price is not None and price * qty < inst.min_notional_units:
        return reject(codes.MIN_NOTIONAL, NEW, cid)

    if cid is not None and not valid_client_order_id(cid):
        return reject(codes.INVALID_CLIENT_ORDER_ID, NEW)
    post_only = get("post_only", False)
    if post_only is None:
        post_only = False
    elif type(post_only) is not bool:
        return reject(codes.INVALID_MESSAGE, NEW, cid, "post_only must be true or false")
    if post_only and (otype != LIMIT or tif != GTC):
        return reject(codes.INVALID_TIF, NEW, cid)
    stp = get("stp")
    if stp is None:
        stp = STP_CANCEL_TAKER
    elif type(stp) is not str or stp not in STP_MODES:
        return reject(codes.INVALID_STP, NEW, cid)
    return NewOrder(inst.symbol, account, side, otype, tif, price, qty, cid, post_only, stp)


def parse_cancel(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> Cancel | Reject:
    target = _target(CANCEL, msg, instruments)
    if isinstance(target, dict):
        return target
    symbol, order_id, cid = target
    return Cancel(symbol, account, order_id, cid)


def parse_amend(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> Amend | Reject:
    target = _target(AMEND, msg, instruments)
    if isinstance(target, dict):
        return target
    symbol, order_id, cid = target
    inst = instruments[symbol]
    price_value, qty_value = msg.get("price"), msg.get("quantity")
    if price_value is None and qty_value is None:
        return reject(codes.INVALID_MESSAGE, AMEND, cid, "amend needs a new price, a new quantity or both")
    price = qty = None
    if price_value is not None:
        price = _ticks(inst, price_value)
        if price is None:
            return reject(codes.INVALID_PRICE, AMEND, cid)
    if qty_value is not None:
        qty = _lots(inst, qty_value)
        if qty is None:
            return reject(codes.INVALID_QUANTITY, AMEND, cid)
    # With only one of them the matcher checks the notional against the order's other value.
    if price is not None and qty is not None and price * qty < inst.min_notional_units:
        return reject(codes.MIN_NOTIONAL, AMEND, cid)
    return Amend(symbol, account, order_id, cid, price, qty)


def _target(
    op: str, msg: Mapping[str, Any], instruments: Mapping[str, Instrument]
) -> tuple[str, int | None, str | None] | Reject:
    """(symbol, order_id, client_order_id) of a cancel or amend; order_id wins when both are given."""
    cid = msg.get("client_order_id")
    inst = _instrument(msg.get("symbol"), instruments)
    if inst is None:
        return reject(codes.UNKNOWN_SYMBOL, op, cid)
    raw_id = msg.get("order_id")
    if raw_id is not None:
        order_id = parse_order_id(raw_id)
        if order_id is None:  # cannot name any order of ours
            return reject(codes.UNKNOWN_ORDER, op, cid)
        return inst.symbol, order_id, cid if valid_client_order_id(cid) else None
    if cid is None:
        return reject(codes.INVALID_MESSAGE, op, None, "order_id or client_order_id is required")
    if not valid_client_order_id(cid):
        return reject(codes.INVALID_CLIENT_ORDER_ID, op)
    return inst.symbol, None, cid


def _instrument(symbol: object, instruments: Mapping[str, Instrument]) -> Instrument | None:
    return instruments.get(symbol) if type(symbol) is str else None


def _ticks(inst: Instrument, value: object) -> int | None:
    """Price in ticks, or None (off grid, not positive, not finite, too large, not a number)."""
    grid = _grid(inst)
    ticks = _fast_units(value, grid[0], grid[1], inst.max_price_ticks)
    if ticks is not None:
        return ticks
    try:
        return inst.price_to_ticks(value)
    except (OffGrid, ArithmeticError):  # decimal.InvalidOperation beyond 60 digits of ticks
        return None


def _lots(inst: Instrument, value: object) -> int | None:
    """Quantity in lots within [min, max], or None (missing, off grid, out of range)."""
    if value is None:
        return None
    grid = _grid(inst)
    lots = _fast_units(value, grid[2], grid[3], inst.max_qty_lots)
    if lots is None:
        try:
            lots = inst.qty_to_lots(value)
        except (OffGrid, ArithmeticError):
            return None
    return lots if lots >= inst.min_qty_lots else None


_GRIDS: dict[str, tuple[Instrument, tuple[int, int, int, int]]] = {}


def _grid(inst: Instrument) -> tuple[int, int, int, int]:
    """(tick m, tick k, lot m, lot k) with increment = m x 10^-k, cached per instrument."""
    cached = _GRIDS.get(inst.symbol)
    if cached is None or cached[0] is not inst:
        cached = _GRIDS[inst.symbol] = (inst, (*scale_of(inst.tick_size), *scale_of(inst.lot_size)))
    return cached[1]


def _fast_units(value: object, m: int, k: int, max_units: int) -> int | None:
    """A plain decimal string ("100.50") that is on the grid and in (0, max_units], as units; None for
    anything else, which then takes the exact Decimal path of shared.instruments (the single authority
    on what is rejected). Integer arithmetic only: about a third of the Decimal path's cost."""
    if type(value) is not str or not value.isascii() or len(value) > 40 or k > 60:
        return None
    whole, dot, frac = value.partition(".")
    if not whole.isdigit():  # ASCII digits only (checked above); no sign, exponent or underscore
        return None
    if dot:
        if not frac.isdigit():
            return None
        if len(frac) > k:
            if frac[k:].strip("0"):
                return None  # finer than the grid: the slow path rejects it
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
