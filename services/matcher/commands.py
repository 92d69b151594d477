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
# Self-trade prevention: what happens when an order would trade against its own account.
STP_CANCEL_TAKER: Final = "cancel_taker"  # default: cancel the incoming order's remainder
STP_CANCEL_MAKER: Final = "cancel_maker"  # cancel the resting order, keep matching
STP_CANCEL_BOTH: Final = "cancel_both"
STP_MODES: Final = frozenset((STP_CANCEL_TAKER, STP_CANCEL_MAKER, STP_CANCEL_BOTH))


class NewOrder(NamedTuple):
    symbol: str
    account: str
    side: str  # BUY | SELL
    type: str  # LIMIT | MARKET
    tif: str  # GTC | IOC | FOK
    price: int | None  # ticks; None for market orders
    quantity: int  # lots
    client_order_id: str | None = None
    post_only: bool = False
    stp: str = STP_CANCEL_TAKER


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


Command = NewOrder | Cancel | Amend


def command_to_list(cmd: Command) -> list[Any]:
    """A JSON-friendly form, tagged with the command's kind (used by the stream codec and tests)."""
    return [type(cmd).__name__, *cmd]


def command_from_list(data: list[Any]) -> Command:
    kind, *fields = data
    cls: type[Command] = {"NewOrder": NewOrder, "Cancel": Cancel, "Amend": Amend}[kind]
    return cls(*fields)
