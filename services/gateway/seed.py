"""The seed's dialect on the order gateway (docs/protocol.md, "The seed's dialect"). Pure: no I/O.

The system this project grew from had its own client, and it keeps working unchanged. Its order
`{"user_id":901,"order_type":"LIMIT","side":"BUY","price":98.0,"quantity":10.0}` is rewritten into
the `{"op":"new",...}` message it means and checked by the same code as every other order
(validation.parse_new), so the two dialects cannot disagree on what a valid order is. Only the
answers are the seed's: `{"status":"ACCEPTED","order_id":...}` once the order is durably on the
stream (when the normal ack would be sent), or `{"status":"REJECTED","code":...,"reason":...}`.

The seed has no session: each order names its account (`user_id`, as text) and trades the default
symbol. With API keys configured an order is accepted only from a connection that authenticated as
that account, since a self-declared account would bypass the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from services.gateway import validation
from services.gateway.sessions import Session
from services.gateway.validation import Reject
from shared import codes
from shared.commands import BUY, FOK, GTC, IOC, LIMIT, MARKET, SELL, NewOrder
from shared.instruments import Instrument, JsonNumber

SUBPROTOCOL: Final = "order-submission"
DEFAULT_SYMBOL: Final = "BTC-USDT"
ORDER_TYPE: Final = "order_type"  # the key that marks a message without "op" as a seed order

# order_type -> (type, tif) of the normal protocol. MARKET is a market IOC.
_TYPES: Final = {"LIMIT": (LIMIT, GTC), "MARKET": (MARKET, IOC), "IOC": (LIMIT, IOC), "FOK": (LIMIT, FOK)}
_SIDES: Final = {"BUY": BUY, "SELL": SELL}
_INTEGER: Final = re.compile(r"-?[0-9]+")
# The normal protocol's reasons name its own fields and values; these name the seed's.
_REASONS: Final = {
    codes.INVALID_SIDE: "side must be BUY or SELL",
    codes.INVALID_TYPE: "order_type must be LIMIT, MARKET, IOC or FOK",
    codes.INVALID_ACCOUNT: "user_id must be an integer (or an account name of 1 to 64 characters)",
}


def is_seed(msg: Mapping[str, Any]) -> bool:
    """A decoded message the seed's client sent: it has "order_type" and no "op"."""
    return ORDER_TYPE in msg and "op" not in msg


def select_subprotocol(_request: object, offered: Sequence[str]) -> str | None:
    """The subprotocol choice (shared/wsserver.py): the seed's when offered; a client offering none
    (or only others) still connects, without one."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def account_of(user_id: object) -> str | None:
    """The account a user_id names: an integer as its decimal text, or an account name as it is."""
    if type(user_id) is int:  # exact type: true / false are no user ids
        text = str(user_id)
    elif type(user_id) is JsonNumber:  # the exact decoder's integer text ("901"), never "901.0"
        if _INTEGER.fullmatch(user_id) is None:
            return None
        text = str.__str__(user_id)  # a plain str: the account travels on as a str everywhere
    elif type(user_id) is str:
        text = user_id
    else:
        return None
    return text if validation.valid_account(text) else None


def parse(
    msg: Mapping[str, Any],
    symbol: str,
    instruments: Mapping[str, Instrument],
    *,
    open_mode: bool = True,
    session_account: str | None = None,
) -> NewOrder | Reject:
    """A seed order -> the NewOrder the normal path builds for the same order, or its reject."""
    account = account_of(msg.get("user_id"))
    if account is None:
        return validation.reject(codes.INVALID_ACCOUNT, validation.NEW)
    if not open_mode and account != session_account:
        return validation.reject(
            codes.UNAUTHENTICATED,
            validation.NEW,
            reason="API keys are configured: authenticate (op auth) as this user_id's account first",
        )
    raw_type, raw_side = msg.get(ORDER_TYPE), msg.get("side")
    # Unknown values map to None, which validation refuses with its code (INVALID_TYPE / _SIDE).
    otype, tif = _TYPES.get(raw_type, (None, None)) if type(raw_type) is str else (None, None)
    side = _SIDES.get(raw_side) if type(raw_side) is str else None
    order: dict[str, Any] = {
        "op": validation.NEW,
        "symbol": symbol,
        "side": side,
        "type": otype,
        "tif": tif,
        "quantity": msg.get("quantity"),
    }
    # The seed's client sends a price with every order; a market order's is meaningless and ignored
    # (the normal protocol refuses a price on a market order, which would make seed market orders fail).
    if otype != MARKET:
        order["price"] = msg.get("price")
    return validation.parse_new(order, account, instruments)


def handle(session: Session, msg: Mapping[str, Any], symbol: str, now: float) -> NewOrder | Reject:
    """A seed order on a connection: the session's rate limit applies, as to any message; a seed
    order is a well-formed message (it resets the count of consecutive bad ones) whatever its values."""
    if not session.bucket.take(now):
        return validation.reject(codes.RATE_LIMITED, validation.NEW)
    session.bad = 0
    return parse(
        msg, symbol, session.instruments, open_mode=session.auth.open_mode, session_account=session.account
    )


def label(msg: Mapping[str, Any]) -> str:
    """The bounded order-type label of a seed order for the order metrics (as accepted ones count)."""
    raw = msg.get(ORDER_TYPE)
    found = _TYPES.get(raw) if type(raw) is str else None
    return "invalid" if found is None else found[0]


def accepted(order_id: str) -> bytes:
    return orjson.dumps({"status": "ACCEPTED", "order_id": order_id})


def rejected(reply: Reject) -> bytes:
    """A normal reject in the seed's words; the stable code rides along (an extension)."""
    code = reply["code"]
    reason = reply["reason"]
    if reason == codes.reason_for(code):
        reason = _REASONS.get(code, reason)
    return orjson.dumps({"status": "REJECTED", "code": code, "reason": reason})
