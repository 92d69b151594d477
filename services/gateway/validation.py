"""Client message -> core command, or a reject with the protocol's stable code. Pure: no I/O, no clock.

Every check the matcher repeats (services.matcher.engine) is done here first, so that a bad order is
answered at once and never reaches the stream. Numbers are read exactly (shared.instruments): off-grid,
non-positive, non-finite or too large values are rejected, never rounded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import orjson

from shared import codes
from shared.commands import (
    BUY,
    FOK,
    GTC,
    GTD,
    IOC,
    LIMIT,
    MARKET,
    SELL,
    STOP_LIMIT,
    STOP_MARKET,
    STP_CANCEL_TAKER,
    STP_MODES,
    Amend,
    Cancel,
    CancelAll,
    Command,
    Deposit,
    NewOrder,
    Withdraw,
)
from shared.decimals import units_to_amount
from shared.ids import (
    FEES_ACCOUNT,
    MAX_ACCOUNT,
    MAX_REQUEST_ID,
    RESERVED_PREFIX,
    parse_order_id,
    seq_to_entry,
)
from shared.instruments import (
    Instrument,
    JsonNumber,
    OffGrid,
    amount_to_units,
    funding_symbol,
    to_units,
)

Message = dict[str, Any]
Reject = dict[str, Any]
OrderCommand = NewOrder | Cancel | Amend  # what an order op (new / cancel / amend) becomes

NEW: Final = "new"
CANCEL: Final = "cancel"
AMEND: Final = "amend"
ORDER_OPS: Final = frozenset((NEW, CANCEL, AMEND))
EXECUTIONS: Final = "executions"
DEFAULT_EXECUTIONS_LIMIT: Final = 1000
MAX_EXECUTIONS_LIMIT: Final = 5000
MAX_EXEC_ID: Final = (1 << 63) - 1  # exec ids are 64-bit signed everywhere downstream (Redis, the core)
DEPOSIT: Final = "deposit"
WITHDRAW: Final = "withdraw"
BALANCES: Final = "balances"
CANCEL_ALL: Final = "cancel_all"
ACCOUNT_OPS: Final = frozenset((DEPOSIT, WITHDRAW, BALANCES, CANCEL_ALL))
ORDER_STATUS: Final = "order_status"
OPEN_ORDERS: Final = "open_orders"
ORDER_QUERIES: Final = frozenset((ORDER_STATUS, OPEN_ORDERS))
# Every open-mode account's starting balance (`--faucet`); assets no instrument trades are left out.
DEFAULT_FAUCET: Final = "USDT=1000000,BTC=100,ETH=1000"

MAX_CLIENT_ORDER_ID: Final = 36
# No spaces: the exec channel frames a line as "<account> <json>" (shared.wire).
_ACCOUNT_RE: Final = re.compile(rf"[A-Za-z0-9_.@-]{{1,{MAX_ACCOUNT}}}")
_SIDES: Final = frozenset((BUY, SELL))
# The tifs of each order type (the core checks the same); the first is the default.
_TIFS: Final[dict[str, tuple[str, ...]]] = {
    LIMIT: (GTC, IOC, FOK, GTD),
    MARKET: (IOC, FOK),
    STOP_LIMIT: (GTC, IOC, FOK),
    STOP_MARKET: (IOC,),
}
_MAX_MS: Final = (1 << 63) - 1
_MAX_ECHO: Final = 64  # longest op / order id echoed back in a reject
_DIGITS: Final = re.compile(r"[0-9]{1,19}")  # ASCII only, unlike str.isdigit


@dataclass(frozen=True, slots=True)
class ExecutionsQuery:
    """{"op":"executions"} of an authenticated account: its reports on `symbol` with exec_id > after,
    oldest first, at most `limit` (the server reads them from the durable events stream)."""

    symbol: str
    account: str
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class BalancesQuery:
    """{"op":"balances"}: the account's balances (the server reads them from the matcher's read model)."""

    account: str


@dataclass(frozen=True, slots=True)
class OrderStatusQuery:
    """{"op":"order_status"}: one order of the account by id or client order id (from the read model)."""

    symbol: str
    account: str
    order_id: str | None
    client_order_id: str | None


@dataclass(frozen=True, slots=True)
class OpenOrdersQuery:
    """{"op":"open_orders"}: the account's open orders on these symbols (from the read model)."""

    symbols: tuple[str, ...]
    account: str


@dataclass(frozen=True, slots=True)
class Submission:
    """A request that appends commands (deposit, withdraw, cancel_all): each (symbol, command) goes to
    that symbol's stream, in this order, and `ack` is sent once every one is appended."""

    op: str
    entries: tuple[tuple[str, Command], ...]
    ack: dict[str, Any]


class DuplicateKey(ValueError):
    """A JSON object names the same key twice (orjson would silently keep the last one)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKey("duplicate key")
    return obj


def _exact_loads(data: str | bytes) -> Any:
    # Numbers keep their text (big ints, 1e400, 1e-400, 0.1000000000000000001 stay what the client
    # wrote); NaN / Infinity literals become numbers that the field checks then refuse.
    if not isinstance(data, str):
        data = data.decode()  # UTF-8 only: json.loads would guess UTF-16 / UTF-32 from bytes
    return json.loads(
        data,
        parse_float=JsonNumber,
        parse_int=JsonNumber,
        parse_constant=JsonNumber,
        object_pairs_hook=_unique_object,
    )


def decode(data: str | bytes) -> Message | None:
    """A text frame as a JSON object, or None if it is not one (never raises).

    orjson is the fast path. The exact (slower) decoder reads the frame again when orjson refuses it
    (integers beyond 64 bits, 1e400, NaN; also lone surrogates, which are then refused) or when a
    price or quantity arrives as a binary float (not exact). Duplicate keys (at any depth) are
    refused: the gateway and a client would otherwise disagree on which value counts. orjson keeps
    the last silently, so when two cheap scans cannot rule one out, json.loads checks.
    """
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _exact_decode(data)
    if type(msg) is not dict:
        return None
    if type(msg.get("price")) is float or type(msg.get("quantity")) is float:
        return _exact_decode(data)
    if (  # the other order types' decimals, and funding amounts
        type(msg.get("stop_price")) is float
        or type(msg.get("display_quantity")) is float
        or type(msg.get("quote_quantity")) is float
        or type(msg.get("amount")) is float
    ):
        return _exact_decode(data)
    # Proof of no duplicate key in two C-level scans, which a typical order passes (inline: a call
    # costs a third of them). Every key in the text is followed by one structural colon, so
    # colons >= keys written; when the only "{" is the first character there is no nested object,
    # so keys written >= len(msg), equal only without duplicates. Hence colons == len(msg) proves
    # it; otherwise (a colon in a string, nesting, a duplicate) json.loads has to tell.
    if isinstance(data, str):
        clear = data.count(":") == len(msg) and data.rfind("{") == 0
    else:
        clear = data.count(b":") == len(msg) and data.rfind(b"{") == 0
    return msg if clear or not _has_duplicate_key(data) else None


def _has_duplicate_key(data: str | bytes) -> bool:
    # Only the answer is used, not the objects: the message keeps orjson's types (ints stay ints).
    try:
        json.loads(data, object_pairs_hook=_unique_object)
    except (ValueError, RecursionError):  # DuplicateKey; or nesting json cannot follow: refused too
        return True
    return False


def _exact_decode(data: str | bytes) -> Message | None:
    try:
        msg = _exact_loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, DuplicateKey
        return None
    if type(msg) is not dict:
        return None
    # json.loads accepts lone surrogates ("\ud800"), which no UTF-8 encoder (orjson's included) can
    # write: a message we cannot echo back is not a message.
    try:
        orjson.dumps(msg)
    except orjson.JSONEncodeError:
        return None
    return msg


def valid_account_name(value: object) -> TypeGuard[str]:
    """A well-formed name, the venue's own ("_fees") included."""
    return type(value) is str and _ACCOUNT_RE.fullmatch(value) is not None


def valid_account(value: object) -> TypeGuard[str]:
    """A name a client may log in as, trade as or fund: well formed and not reserved ("_...")."""
    return (
        type(value) is str
        and _ACCOUNT_RE.fullmatch(value) is not None
        and not value.startswith(RESERVED_PREFIX)
    )


def valid_request_id(value: object) -> bool:
    """1..64 printable ASCII characters."""
    return type(value) is str and 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable()


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
) -> OrderCommand | Reject:
    """A new / cancel / amend message of an authenticated account -> its command or a reject."""
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
    elif type(otype) is not str or otype not in _TIFS:
        return reject(codes.INVALID_TYPE, NEW, cid)
    tifs = _TIFS[otype]
    if tif is None:
        tif = tifs[0]
    elif type(tif) is not str or tif not in tifs:
        return reject(codes.INVALID_TIF, NEW, cid)

    price_value = get("price")
    price: int | None = None
    if otype in (LIMIT, STOP_LIMIT):
        if price_value is None:
            return reject(codes.INVALID_PRICE, NEW, cid)
        price = _ticks(inst, price_value)
        if price is None:
            return reject(codes.INVALID_PRICE, NEW, cid)
    elif price_value is not None:
        return reject(codes.INVALID_PRICE, NEW, cid)

    quote_value = get("quote_quantity")
    qty: int | None = None
    quote: int | None = None
    if quote_value is not None:  # a market order's budget instead of a quantity
        if otype != MARKET or get("quantity") is not None:
            return reject(
                codes.INVALID_QUANTITY, NEW, cid, "quote_quantity replaces quantity on a market order"
            )
        if tif != IOC:
            return reject(codes.INVALID_TIF, NEW, cid)
        quote = _notional(inst, quote_value)
        if quote is None:
            return reject(codes.INVALID_QUANTITY, NEW, cid)
        if quote < inst.min_notional_units:
            return reject(codes.MIN_NOTIONAL, NEW, cid)
    else:
        qty = _lots(inst, get("quantity"))
        if qty is None:
            return reject(codes.INVALID_QUANTITY, NEW, cid)
        if price is not None and price * qty < inst.min_notional_units:
            return reject(codes.MIN_NOTIONAL, NEW, cid)
    extra = _more_fields(msg, inst, otype, tif, qty, cid)
    if isinstance(extra, dict):
        return extra
    stop_price, expire_time, display = extra

    if cid is not None and not valid_client_order_id(cid):
        return reject(codes.INVALID_CLIENT_ORDER_ID, NEW)
    post_only = get("post_only", False)
    if post_only is None:
        post_only = False
    elif type(post_only) is not bool:
        return reject(codes.INVALID_MESSAGE, NEW, cid, "post_only must be true or false")
    if post_only and (otype != LIMIT or (tif != GTC and tif != GTD)):
        return reject(codes.INVALID_TIF, NEW, cid)
    stp = get("stp")
    if stp is None:
        stp = STP_CANCEL_TAKER
    elif type(stp) is not str or stp not in STP_MODES:
        return reject(codes.INVALID_STP, NEW, cid)
    return NewOrder(
        inst.symbol,
        account,
        side,
        otype,
        tif,
        price,
        qty,
        cid,
        post_only,
        stp,
        stop_price,
        expire_time,
        display,
        quote,
    )


def _more_fields(
    msg: Mapping[str, Any], inst: Instrument, otype: str, tif: str, qty: int | None, cid: object
) -> tuple[int | None, int | None, int | None] | Reject:
    """(stop_price, expire_time, display_quantity) of a new order, or a reject. The expiry is checked
    for its form only: whether it lies in the future is the core's call, against the command's ts."""
    get = msg.get
    stop_value, expire_value, display_value = get("stop_price"), get("expire_time"), get("display_quantity")
    stop_price = expire_time = display = None
    if otype in (STOP_LIMIT, STOP_MARKET):
        stop_price = None if stop_value is None else _ticks(inst, stop_value)
        if stop_price is None:
            return reject(codes.INVALID_STOP_PRICE, NEW, cid)
    elif stop_value is not None:
        return reject(codes.INVALID_STOP_PRICE, NEW, cid)
    if tif == GTD:
        expire_time = _ms(expire_value)
        if expire_time is None:
            return reject(codes.INVALID_EXPIRE_TIME, NEW, cid)
    elif expire_value is not None:
        return reject(codes.INVALID_EXPIRE_TIME, NEW, cid)
    if display_value is not None:
        display = _lots(inst, display_value)
        if display is None or otype != LIMIT or (tif != GTC and tif != GTD) or qty is None or display >= qty:
            return reject(codes.INVALID_DISPLAY_QUANTITY, NEW, cid)
    return stop_price, expire_time, display


def _ms(value: object) -> int | None:
    """A positive 64-bit count of ms since the epoch: a JSON integer or a string of ASCII digits."""
    if type(value) is int:
        n = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value) is not None:
        n = int(value)
    else:
        return None
    return n if 0 < n <= _MAX_MS else None


def _notional(inst: Instrument, value: object) -> int | None:
    """A quote amount in ticks x lots (the core's notional unit), or None (off that grid, out of range)."""
    try:
        return to_units(value, inst.tick_size * inst.lot_size, inst.max_price * inst.max_qty)
    except (OffGrid, ArithmeticError):
        return None


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


def parse_executions(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> ExecutionsQuery | Reject:
    """{"op":"executions","symbol":S,"after":N[,"limit":L]} -> ExecutionsQuery or reject."""
    inst = _instrument(msg.get("symbol"), instruments)
    if inst is None:
        return reject(codes.UNKNOWN_SYMBOL, EXECUTIONS)
    after = _count(msg.get("after"))
    if after is None:
        return reject(
            codes.INVALID_MESSAGE,
            EXECUTIONS,
            reason="after must be a non-negative integer exec_id (a JSON integer or a string of digits)",
        )
    raw_limit = msg.get("limit")
    limit = DEFAULT_EXECUTIONS_LIMIT if raw_limit is None else _count(raw_limit)
    if limit is None or not 1 <= limit <= MAX_EXECUTIONS_LIMIT:
        return reject(
            codes.INVALID_MESSAGE,
            EXECUTIONS,
            reason=f"limit must be an integer from 1 to {MAX_EXECUTIONS_LIMIT}",
        )
    return ExecutionsQuery(inst.symbol, account, after, limit)


# Cancel on disconnect and the dead man's switch (services.gateway.safety) -------------------------
CANCEL_ALL_AFTER: Final = "cancel_all_after"
CANCEL_ON_DISCONNECT: Final = "cancel_on_disconnect"  # the auth message's flag
MIN_DEAD_MAN_MS: Final = 1_000
MAX_DEAD_MAN_MS: Final = 600_000


@dataclass(frozen=True, slots=True)
class DeadManRequest:
    """{"op":"cancel_all_after","timeout_ms":N}: arm the account's dead man's switch N ms from now,
    or turn it off (0)."""

    account: str
    timeout_ms: int


def parse_cancel_all_after(msg: Mapping[str, Any], account: str) -> DeadManRequest | Reject:
    timeout = msg.get("timeout_ms")
    if type(timeout) is not int or not (timeout == 0 or MIN_DEAD_MAN_MS <= timeout <= MAX_DEAD_MAN_MS):
        return reject(
            codes.INVALID_MESSAGE,
            CANCEL_ALL_AFTER,
            reason=f"timeout_ms must be 0 (off) or an integer from {MIN_DEAD_MAN_MS} to {MAX_DEAD_MAN_MS}",
        )
    return DeadManRequest(account, timeout)


def parse_cancel_on_disconnect(msg: Mapping[str, Any]) -> bool | Reject:
    """The auth message's optional "cancel_on_disconnect" (default false)."""
    flag = msg.get(CANCEL_ON_DISCONNECT, False)
    if type(flag) is not bool:
        return reject(codes.INVALID_MESSAGE, "auth", reason="cancel_on_disconnect must be true or false")
    return flag


_RESERVED_REASON: Final = (
    f"account must be 1 to {MAX_ACCOUNT} of A-Z a-z 0-9 _ . @ - and not start with {RESERVED_PREFIX!r} "
    f"(reserved; an admin may withdraw from {FEES_ACCOUNT})"
)


def funding_reject(code: str, op: str, request_id: object, reason: str | None = None) -> Reject:
    """A deposit / withdraw reject; a well-formed request_id is echoed, as the matcher's rejects do."""
    reply = reject(code, op, reason=reason)
    reply["request_id"] = request_id if valid_request_id(request_id) else None
    return reply


def parse_funding(
    op: str,
    msg: Mapping[str, Any],
    account: object,
    instruments: Mapping[str, Instrument],
    scales: Mapping[str, int],
) -> Submission | Reject:
    """{"op":"deposit"|"withdraw","asset","amount"[,"request_id"]} for `account` (the session chose it)
    -> a Submission of one Deposit / Withdraw on the stream that carries the asset's funding.

    The checks are the core's (services.matcher.balances.Ledger.fund), so what passes here is
    applied: an account not reserved ("_fees" may only withdraw), a known asset, an amount on the
    asset's grid, positive and below 2^96 units.
    """
    rid = msg.get("request_id")
    if not valid_account_name(account) or (
        account.startswith(RESERVED_PREFIX) and not (op == WITHDRAW and account == FEES_ACCOUNT)
    ):
        return funding_reject(codes.INVALID_ACCOUNT, op, rid, _RESERVED_REASON)
    if rid is not None and not valid_request_id(rid):
        return funding_reject(
            codes.INVALID_MESSAGE,
            op,
            None,
            f"request_id must be 1 to {MAX_REQUEST_ID} printable ASCII characters",
        )
    raw_asset = msg.get("asset")
    asset = raw_asset if type(raw_asset) is str else ""  # no asset is called ""
    symbol = funding_symbol(instruments.values(), asset)
    places = scales.get(asset)
    if symbol is None or places is None:
        return funding_reject(codes.UNKNOWN_ASSET, op, rid)
    try:
        units = amount_to_units(msg.get("amount"), places)
    except (OffGrid, ArithmeticError):  # decimal overflow of an exponent like 1e999999
        return funding_reject(codes.INVALID_AMOUNT, op, rid)
    cmd: Command = (
        Deposit(account, asset, units, rid) if op == DEPOSIT else Withdraw(account, asset, units, rid)
    )
    ack = {
        "type": "ack",
        "op": op,
        "request_id": rid,
        "account": account,
        "asset": asset,
        "amount": units_to_amount(units, places),
    }
    return Submission(op, ((symbol, cmd),), ack)


def parse_balances(account: object) -> BalancesQuery | Reject:
    """The account whose balances a session may read (the session chose it); "_fees" is readable."""
    if not valid_account_name(account):
        return reject(codes.INVALID_ACCOUNT, BALANCES)
    return BalancesQuery(account)


def balances_reply(
    account: str, stored: Mapping[bytes | str, bytes | str], scales: Mapping[str, int]
) -> Message:
    """The balances answer from the read model (shared.keys.balances: asset -> b"<available> <held>"
    in asset units), amounts as decimal strings, assets sorted. An asset the account never had is
    absent; one no instrument trades any more is left out. ValueError if a value is malformed."""
    out: dict[str, dict[str, str]] = {}
    for raw_asset, value in stored.items():
        asset = raw_asset.decode() if isinstance(raw_asset, bytes) else raw_asset
        places = scales.get(asset)
        if places is None:
            continue
        available, held = value.split()  # bytes or str: int() takes both
        out[asset] = {
            "available": units_to_amount(int(available), places),
            "held": units_to_amount(int(held), places),
        }
    return {"type": "balances", "account": account, "balances": dict(sorted(out.items()))}


def parse_cancel_all(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> Submission | Reject:
    """{"op":"cancel_all"[,"symbol"]} -> one CancelAll (reason user) on the symbol's stream, or one
    per symbol: each matcher only sees its own streams, so each symbol gets its own command."""
    raw = msg.get("symbol")
    if raw is None:
        symbols = list(instruments)
    else:
        inst = _instrument(raw, instruments)
        if inst is None:
            return reject(codes.UNKNOWN_SYMBOL, CANCEL_ALL)
        symbols = [inst.symbol]
    entries = tuple((s, CancelAll(s, account, codes.REASON_USER)) for s in symbols)
    return Submission(CANCEL_ALL, entries, {"type": "ack", "op": CANCEL_ALL, "symbol": raw})


def parse_faucet(spec: str, scales: Mapping[str, int], *, strict: bool = True) -> list[tuple[str, int]]:
    """`--faucet "USDT=1000000,BTC=100"` -> [(asset, units), ...]; "none" -> [] (no faucet).

    strict: an asset no instrument trades is an error; otherwise it is left out (the default names
    BTC and ETH whatever the instruments are). ValueError for anything malformed.
    """
    if spec.strip().lower() == "none":
        return []
    out: list[tuple[str, int]] = []
    for part in spec.split(","):
        name, sep, amount = part.partition("=")
        asset, amount = name.strip(), amount.strip()
        if not sep or not asset:
            raise ValueError(f"--faucet: expected ASSET=AMOUNT[,ASSET=AMOUNT...] or none, got {part!r}")
        if any(asset == seen for seen, _ in out):
            raise ValueError(f"--faucet: {asset} is named twice")
        places = scales.get(asset)
        if places is None:
            if strict:
                raise ValueError(f"--faucet: {asset} is not the base or quote of any instrument")
            continue
        try:
            out.append((asset, amount_to_units(amount, places)))
        except (OffGrid, ArithmeticError):
            raise ValueError(
                f"--faucet: {asset}={amount!r}: the amount must be a positive decimal with at most "
                f"{places} decimal places"
            ) from None
    return out


def _count(value: object) -> int | None:
    """A non-negative 64-bit integer given as a JSON integer or a string of ASCII digits, else None."""
    if type(value) is int:  # exact type: not a bool
        n = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value) is not None:  # str or JsonNumber
        n = int(value)
    else:
        return None  # 1.0, 1e3, -1, "+1", " 1", Arabic-Indic digits, true, null ...
    return n if 0 <= n <= MAX_EXEC_ID else None


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
    try:
        return inst.price_to_ticks(value)
    except (OffGrid, ArithmeticError):  # decimal.InvalidOperation beyond 60 digits of ticks
        return None


def _lots(inst: Instrument, value: object) -> int | None:
    """Quantity in lots within [min, max], or None (missing, off grid, out of range)."""
    if value is None:
        return None
    try:
        lots = inst.qty_to_lots(value)
    except (OffGrid, ArithmeticError):
        return None
    return lots if lots >= inst.min_qty_lots else None


def parse_order_status(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> OrderStatusQuery | Reject:
    """{"op":"order_status","symbol",("order_id"|"client_order_id")}; an order id that names no order
    of ours is UNKNOWN_ORDER at once, as for a cancel."""
    target = _target(ORDER_STATUS, msg, instruments)
    if isinstance(target, dict):
        return target
    symbol, order_id, cid = target
    if order_id is not None:
        return OrderStatusQuery(symbol, account, seq_to_entry(order_id), None)
    return OrderStatusQuery(symbol, account, None, cid)


def parse_open_orders(
    msg: Mapping[str, Any], account: str, instruments: Mapping[str, Instrument]
) -> OpenOrdersQuery | Reject:
    """{"op":"open_orders"[,"symbol"]}: on one symbol, or on every one."""
    symbol = msg.get("symbol")
    if symbol is None:
        return OpenOrdersQuery(tuple(instruments), account)
    inst = _instrument(symbol, instruments)
    if inst is None:
        return reject(codes.UNKNOWN_SYMBOL, OPEN_ORDERS)
    return OpenOrdersQuery((inst.symbol,), account)
