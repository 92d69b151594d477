"""Stable reject codes and cancel reasons: part of the public wire contract (docs/protocol.md).

Codes are plain strings so they travel unchanged from the core through Redis to clients.
"""

from typing import Final

INVALID_MESSAGE: Final = "INVALID_MESSAGE"
UNKNOWN_OP: Final = "UNKNOWN_OP"
UNKNOWN_SYMBOL: Final = "UNKNOWN_SYMBOL"
INVALID_SIDE: Final = "INVALID_SIDE"
INVALID_TYPE: Final = "INVALID_TYPE"
INVALID_TIF: Final = "INVALID_TIF"
INVALID_PRICE: Final = "INVALID_PRICE"
INVALID_QUANTITY: Final = "INVALID_QUANTITY"
MIN_NOTIONAL: Final = "MIN_NOTIONAL"
WOULD_TAKE: Final = "WOULD_TAKE"
DUPLICATE_CLIENT_ORDER_ID: Final = "DUPLICATE_CLIENT_ORDER_ID"
UNKNOWN_ORDER: Final = "UNKNOWN_ORDER"
UNAUTHENTICATED: Final = "UNAUTHENTICATED"
RATE_LIMITED: Final = "RATE_LIMITED"
OVERLOADED: Final = "OVERLOADED"
# Extensions beyond the minimum list of the protocol.
INVALID_CLIENT_ORDER_ID: Final = "INVALID_CLIENT_ORDER_ID"
INVALID_STP: Final = "INVALID_STP"
INVALID_ACCOUNT: Final = "INVALID_ACCOUNT"
INTERNAL_ERROR: Final = "INTERNAL_ERROR"
# More order types (docs/protocol.md "More order types").
INVALID_STOP_PRICE: Final = "INVALID_STOP_PRICE"
INVALID_EXPIRE_TIME: Final = "INVALID_EXPIRE_TIME"
INVALID_DISPLAY_QUANTITY: Final = "INVALID_DISPLAY_QUANTITY"
NOT_AMENDABLE: Final = "NOT_AMENDABLE"
# Balances (docs/protocol.md "Accounts, balances and pre-trade risk").
INSUFFICIENT_FUNDS: Final = "INSUFFICIENT_FUNDS"
UNKNOWN_ASSET: Final = "UNKNOWN_ASSET"
INVALID_AMOUNT: Final = "INVALID_AMOUNT"
BALANCES_DISABLED: Final = "BALANCES_DISABLED"

REASONS: Final[dict[str, str]] = {
    INVALID_MESSAGE: "message is not a valid JSON object with the required fields",
    UNKNOWN_OP: "unknown op",
    UNKNOWN_SYMBOL: "unknown symbol",
    INVALID_SIDE: "side must be buy or sell",
    INVALID_TYPE: "type must be limit, market, stop_limit or stop_market (or the shorthand ioc / fok)",
    INVALID_TIF: (
        "tif must be gtc, ioc, fok or gtd; market and stop_market orders take ioc (a market order also "
        "fok, but not with quote_quantity); gtd needs a limit; post_only needs limit gtc"
    ),
    INVALID_PRICE: (
        "price is missing, not a decimal (a JSON number or a string of ASCII digits with an optional "
        "point: 123.45), off the tick grid, not positive or too large"
    ),
    INVALID_QUANTITY: (
        "quantity is missing, not a decimal (a JSON number or a string like 0.5), off the lot grid, "
        "below the minimum or above the maximum"
    ),
    MIN_NOTIONAL: "price x quantity is below the symbol's minimum notional",
    WOULD_TAKE: "post-only order (or amend) would take liquidity",
    DUPLICATE_CLIENT_ORDER_ID: "client_order_id is already used by an open order of this account",
    UNKNOWN_ORDER: "no open order with that id belongs to this account",
    UNAUTHENTICATED: "authenticate first (op auth)",
    RATE_LIMITED: "too many messages; slow down",
    OVERLOADED: "the matcher is behind; order not queued, retry later",
    INVALID_CLIENT_ORDER_ID: "client_order_id must be a string of 1 to 36 printable characters",
    INVALID_STP: "stp must be cancel_taker, cancel_maker or cancel_both",
    INVALID_ACCOUNT: "account must be a string of 1 to 64 characters",
    INTERNAL_ERROR: "internal error; the order was not queued",
    INVALID_STOP_PRICE: (
        "stop_price is missing (stop_limit and stop_market need it), given on another type, off the tick "
        "grid, not positive or too large"
    ),
    INVALID_EXPIRE_TIME: (
        "expire_time must be an integer of ms since the epoch, given only with tif gtd, and in the future"
    ),
    INVALID_DISPLAY_QUANTITY: (
        "display_quantity must be on the lot grid, at least the minimum quantity, below quantity, and "
        "only on a gtc or gtd limit"
    ),
    NOT_AMENDABLE: "an untriggered stop or an iceberg cannot be amended; cancel it and place a new one",
    INSUFFICIENT_FUNDS: "the account's available balance does not cover the order or withdrawal",
    UNKNOWN_ASSET: "asset is not the base or quote of any instrument",
    INVALID_AMOUNT: "amount must be a positive decimal on the asset's grid",
    BALANCES_DISABLED: "this venue runs without balances (risk off)",
}

# Why an order ended in "cancelled".
REASON_USER: Final = "user"
REASON_IOC: Final = "unfilled_ioc"
REASON_MARKET: Final = "unfilled_market"
REASON_FOK: Final = "fok_unfillable"
REASON_STP: Final = "self_trade_prevention"
REASON_EXPIRED: Final = "expired"
REASON_FUNDS: Final = "insufficient_funds"  # a stop_market whose account cannot pay when it triggers
REASON_DISCONNECT: Final = "disconnect"  # cancel on disconnect
REASON_DEAD_MAN: Final = "dead_man_switch"
MASS_CANCEL_REASONS: Final = frozenset((REASON_USER, REASON_DISCONNECT, REASON_DEAD_MAN))


def reason_for(code: str) -> str:
    return REASONS.get(code, code.lower().replace("_", " "))
