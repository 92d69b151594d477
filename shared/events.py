"""Events the core emits, as flat tuples (cheap to build, trivially serialisable, byte-stable).

Every event starts with its kind and the symbol. Prices are ticks, quantities lots, fees integer fee
units (shared.instruments.FEE_DENOM). One command yields its events in this order: accepted or
rejected, trades, cancelled/amended, and last one `book` event if any price level changed.
Two extensions (order types): the GTD orders that expire at the command's ts come first, as
`cancelled` events (reason `expired`) and their own `book` event; and stops triggered by the
command's trades follow it, each as `triggered` and then its own events (its own `book` event too).
So a command may carry several `book` events; book_seq still rises by one per book event.

accepted   (kind, symbol, order_id, account, client_order_id, side, type, tif, price|None, quantity)
rejected   (kind, symbol, op, order_id|None, account, client_order_id, code)
           op: new|cancel|amend|cancel_all|deposit|withdraw|faucet
trade      (kind, symbol, trade_id, price, quantity, aggressor_side,
            maker_order_id, maker_account, maker_client_order_id, maker_quantity, maker_leaves, maker_fee,
            taker_order_id, taker_account, taker_client_order_id, taker_price|None, taker_quantity,
            taker_leaves, taker_fee, ts)
           maker/taker_quantity is the order's total quantity, *_leaves what remains after this trade,
           so each trade also carries both orders' new state (filled when leaves == 0).
cancelled  (kind, symbol, order_id, account, client_order_id, side, price|None, quantity, leaves, reason)
amended    (kind, symbol, order_id, account, client_order_id, side, price, quantity, leaves)
triggered  (kind, symbol, order_id, account, client_order_id, side, type, tif, price|None, stop_price,
            quantity)  a stop order's condition was met: type is now limit or market, and the order's own
            events (trades, cancelled, book) follow at once, with no second `accepted`
funded     (kind, None, op, account, asset, amount, request_id)      op: deposit|withdraw|faucet
balance    (kind, symbol|None, account, asset, available, held)
           with balances on (Engine(risk=True)), one per (account, asset) the command touched, in the
           order first touched, after every other event of the command: the pair's state afterwards.
           Amounts are asset units (shared.instruments.asset_scales). symbol: the command's, None
           for funding.
book       (kind, symbol, book_seq, changes, bbo)
           changes: list of (side, price, new level total) per level the command touched, 0 = removed;
           bbo: (bid_price|None, bid_total, ask_price|None, ask_total) after the command.
           book_seq rises by exactly one per book event per symbol.
"""

from __future__ import annotations

from typing import Any, Final

ACCEPTED: Final = "accepted"
REJECTED: Final = "rejected"
TRADE: Final = "trade"
CANCELLED: Final = "cancelled"
AMENDED: Final = "amended"
BOOK: Final = "book"
TRIGGERED: Final = "triggered"
FUNDED: Final = "funded"
BALANCE: Final = "balance"

Event = tuple[Any, ...]

# Field positions, for readers of events (the codec, feeds, tests).
T_TRADE_ID, T_PRICE, T_QTY, T_AGGRESSOR = 2, 3, 4, 5
T_MAKER_OID, T_MAKER_ACCOUNT, T_MAKER_CID, T_MAKER_QTY, T_MAKER_LEAVES, T_MAKER_FEE = 6, 7, 8, 9, 10, 11
T_TAKER_OID, T_TAKER_ACCOUNT, T_TAKER_CID, T_TAKER_PRICE, T_TAKER_QTY, T_TAKER_LEAVES, T_TAKER_FEE = (
    12,
    13,
    14,
    15,
    16,
    17,
    18,
)
T_TS = 19
B_SEQ, B_CHANGES, B_BBO = 2, 3, 4
BAL_ACCOUNT, BAL_ASSET, BAL_AVAILABLE, BAL_HELD = 2, 3, 4, 5
