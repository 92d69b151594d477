"""Commands the core accepts. Plain NamedTuples: cheap to build, positional for the hot path.

Prices are integer ticks and quantities integer lots (see shared.instruments). Fields are not trusted:
the engine validates every one and answers a `rejected` event instead of raising.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

BUY: Final = "buy"
SELL: Final = "sell"
LIMIT: Final = "limit"
MARKET: Final = "market"
GTC: Final = "gtc"
IOC: Final = "ioc"
FOK: Final = "fok"
GTD: Final = "gtd"  # a limit that rests until expire_time (ms since epoch, compared with the command's ts)
# Stop orders rest outside the book until the symbol's last trade price reaches stop_price; they then
# become a LIMIT (stop_limit) or MARKET (stop_market) order.
STOP_LIMIT: Final = "stop_limit"
STOP_MARKET: Final = "stop_market"
# Self-trade prevention: what happens when an order would trade against its own account.
STP_CANCEL_TAKER: Final = "cancel_taker"  # default: cancel the incoming order's remainder
STP_CANCEL_MAKER: Final = "cancel_maker"  # cancel the resting order, keep matching
STP_CANCEL_BOTH: Final = "cancel_both"
STP_MODES: Final = frozenset((STP_CANCEL_TAKER, STP_CANCEL_MAKER, STP_CANCEL_BOTH))


class NewOrder(NamedTuple):
    symbol: str
    account: str
    side: str  # BUY | SELL
    type: str  # LIMIT | MARKET | STOP_LIMIT | STOP_MARKET
    tif: str  # GTC | IOC | FOK | GTD
    price: int | None  # ticks; None for market and stop_market orders
    quantity: int | None  # lots; None only for a market order that gives quote_quantity
    client_order_id: str | None = None
    post_only: bool = False
    stp: str = STP_CANCEL_TAKER
    stop_price: int | None = None  # ticks; stop orders only
    expire_time: int | None = None  # ms since epoch; GTD only
    display_quantity: int | None = None  # lots; an iceberg (a GTC or GTD limit) shows at most this much
    quote_quantity: int | None = None  # ticks x lots; a market order's budget instead of a quantity


# The fields after stp; a plain order has them all None, and its stream form leaves them out.
_PLAIN_FIELDS: Final = 10


class Cancel(NamedTuple):
    """Cancel by order_id or, if that is None, by client_order_id; only the owner may cancel."""

    symbol: str
    account: str
    order_id: int | None = None
    client_order_id: str | None = None


class Amend(NamedTuple):
    """Change a resting order. Quantity is the new total (filled part included), as Binance's amend.

    Quantity down at the same price keeps time priority; a price change or quantity up loses it.
    """

    symbol: str
    account: str
    order_id: int | None = None
    client_order_id: str | None = None
    price: int | None = None
    quantity: int | None = None


class Tick(NamedTuple):
    """Time passes on `symbol`: no order, only the command's ts. Expiries due by then fire (GTD)."""

    symbol: str


class CancelAll(NamedTuple):
    """Cancel every open order (untriggered stops included) of `account` on `symbol`, or on every
    symbol when it is None, oldest first. reason: user, disconnect or dead_man_switch (shared.codes)."""

    symbol: str | None
    account: str
    reason: str = "user"


class Deposit(NamedTuple):
    """Credit `amount` asset units (shared.instruments.asset_scales) to the account's available
    balance. Faucet grants are deposits too. request_id is echoed in the `funded` event."""

    account: str
    asset: str
    amount: int
    request_id: str | None = None


class Withdraw(NamedTuple):
    """Debit `amount` asset units from the account's available balance, or reject (INSUFFICIENT_FUNDS)."""

    account: str
    asset: str
    amount: int
    request_id: str | None = None


class Grant(NamedTuple):
    """The faucet: credit each (asset, units) of `amounts` to the account, once per account ever (a
    repeated grant does nothing), so a gateway may send it at every login of an open-mode account."""

    account: str
    amounts: tuple[tuple[str, int], ...] | list[list[Any]]


Command = (
    NewOrder | Cancel | Amend | CancelAll | Deposit | Withdraw | Grant
)  # what clients send (via a gateway)
CoreCommand = Command | Tick  # what Engine.apply takes: a Tick comes from the matcher, never a client


def command_to_list(cmd: CoreCommand) -> list[Any]:
    """A JSON-friendly form, tagged with the command's kind (used by the stream codec and tests)."""
    fields = list(cmd)
    if type(cmd) is NewOrder:  # keep a plain order's stream form as it was before the new fields
        while len(fields) > _PLAIN_FIELDS and fields[-1] is None:
            fields.pop()
    return [type(cmd).__name__, *fields]


def command_from_list(data: list[Any]) -> CoreCommand:
    kind, *fields = data
    cls: type[CoreCommand] = _KINDS[kind]
    return cls(*fields)


_KINDS: dict[str, type[CoreCommand]] = {
    cls.__name__: cls for cls in (NewOrder, Cancel, Amend, Tick, CancelAll, Deposit, Withdraw, Grant)
}
