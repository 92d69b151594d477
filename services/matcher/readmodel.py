"""The order read model: what `order_status` and `open_orders` answer, kept in Redis by the matcher.

Every command's order events become records that the commit script applies in the same atomic call
that publishes the execution reports (shared.keys.open_orders and its neighbours say the layout), so
a gateway reading the model never answers older than a report its client already got.

Records (flat ARGV values, one op letter first):
  n  open-key oid static state cids-key cid    an order opened (cid '' when none)
  u  open-key oid state                        its state changed
  a  open-key oid price quantity state         amended: the static part's price and quantity change
  c  open-key oid state closed-key list-key    it closed: one JSON object in the closed hash
  x  closed-key list-key oid object cids-key cid  it opened and closed within this commit
Each commit folds every event of an order into one record, so Redis is written once per order.
The static part is a JSON object, the state a JSON fragment (no braces), so the script joins them
without parsing JSON: a closed order is the static object with ",<state>" before its last brace.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from services.matcher import events as ev
from shared import keys
from shared.ids import seq_to_entry
from shared.instruments import Instrument

CLOSED_KEPT: Final = 10_000  # closed orders kept per account and symbol, newest first

# The script part that applies the records from ARGV[i] on (`i` must be set before it).
APPLY_LUA: Final = f"""
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'n' then
    redis.call('HSET', ARGV[i + 1], ARGV[i + 2] .. ':s', ARGV[i + 3], ARGV[i + 2] .. ':d', ARGV[i + 4])
    if ARGV[i + 6] ~= '' then redis.call('HSET', ARGV[i + 5], ARGV[i + 6], ARGV[i + 2]) end
    i = i + 7
  elseif op == 'x' then
    redis.call('HSET', ARGV[i + 1], ARGV[i + 3], ARGV[i + 4])
    if redis.call('LPUSH', ARGV[i + 2], ARGV[i + 3]) > {CLOSED_KEPT} then
      redis.call('HDEL', ARGV[i + 1], redis.call('RPOP', ARGV[i + 2]))
    end
    if ARGV[i + 6] ~= '' then redis.call('HSET', ARGV[i + 5], ARGV[i + 6], ARGV[i + 3]) end
    i = i + 7
  elseif op == 'u' then
    redis.call('HSET', ARGV[i + 1], ARGV[i + 2] .. ':d', ARGV[i + 3])
    i = i + 4
  elseif op == 'a' then
    local s = redis.call('HGET', ARGV[i + 1], ARGV[i + 2] .. ':s')
    if s then
      s = string.gsub(s, '"price":"[^"]*"', '"price":"' .. ARGV[i + 3] .. '"', 1)
      s = string.gsub(s, '"quantity":"[^"]*"', '"quantity":"' .. ARGV[i + 4] .. '"', 1)
      redis.call('HSET', ARGV[i + 1], ARGV[i + 2] .. ':s', s, ARGV[i + 2] .. ':d', ARGV[i + 5])
    end
    i = i + 6
  else
    local s = redis.call('HGET', ARGV[i + 1], ARGV[i + 2] .. ':s')
    if s then
      redis.call('HDEL', ARGV[i + 1], ARGV[i + 2] .. ':s', ARGV[i + 2] .. ':d')
      redis.call('HSET', ARGV[i + 4], ARGV[i + 2], string.sub(s, 1, -2) .. ',' .. ARGV[i + 3] .. '}}')
      if redis.call('LPUSH', ARGV[i + 5], ARGV[i + 2]) > {CLOSED_KEPT} then
        redis.call('HDEL', ARGV[i + 4], redis.call('RPOP', ARGV[i + 5]))
      end
    end
    i = i + 6
  end
end
"""


def _state(status: str, filled: str, remaining: str, ts: int, reason: str | None = None) -> bytes:
    tail = b',"reason":%s' % orjson.dumps(reason) if reason is not None else b""
    return b'"status":"%s","filled_quantity":"%s","remaining_quantity":"%s","ts":%d%s' % (
        status.encode(),
        filled.encode(),
        remaining.encode(),
        ts,
        tail,
    )


class _Order:
    """What one commit does to one order: collapsed, so Redis is written once per order and commit."""

    __slots__ = ("account", "amend", "closed", "fields", "oid", "state", "symbol")

    def __init__(self, symbol: str, account: str, oid: int) -> None:
        self.symbol, self.account, self.oid = symbol, account, oid
        self.fields: dict[str, Any] | None = None  # the static part, when it opened in this commit
        self.amend: tuple[str, str] | None = None  # (price, quantity) of an order opened before
        self.state = b""
        self.closed = False


class Records:
    """One commit's records: every event of its commands is folded into one change per order, so an
    order opened and closed within the commit (an IOC, a cancel soon after) costs one write."""

    __slots__ = ("_keys", "_orders")

    def __init__(self) -> None:
        self._orders: dict[tuple[str, int], _Order] = {}  # first touch order
        self._keys: dict[tuple[str, str], tuple[bytes, bytes, bytes, bytes]] = {}

    def _keys_of(self, symbol: str, account: str) -> tuple[bytes, bytes, bytes, bytes]:
        found = self._keys.get((symbol, account))
        if found is None:
            found = self._keys[symbol, account] = (
                keys.open_orders(symbol, account).encode(),
                keys.closed_orders(symbol, account).encode(),
                keys.closed_list(symbol, account).encode(),
                keys.client_order_ids(symbol, account).encode(),
            )
        return found

    def _order(self, symbol: str, account: str, oid: int) -> _Order:
        order = self._orders.get((symbol, oid))
        if order is None:
            order = self._orders[symbol, oid] = _Order(symbol, account, oid)
        return order

    def add(self, events: list[ev.Event], inst: Instrument, ts: int) -> None:
        """Fold one command's events in."""
        q, p = inst.qty_str, inst.price_str
        for e in events:
            kind = e[0]
            if kind == ev.TRADE:
                symbol = e[1]
                for oid, account, qty, leaves in (
                    (e[ev.T_MAKER_OID], e[ev.T_MAKER_ACCOUNT], e[ev.T_MAKER_QTY], e[ev.T_MAKER_LEAVES]),
                    (e[ev.T_TAKER_OID], e[ev.T_TAKER_ACCOUNT], e[ev.T_TAKER_QTY], e[ev.T_TAKER_LEAVES]),
                ):
                    order = self._order(symbol, account, oid)
                    status = "filled" if leaves == 0 else "partially_filled"
                    order.state = _state(status, q(qty - leaves), q(leaves), ts)
                    order.closed = leaves == 0
            elif kind == ev.ACCEPTED:
                _, symbol, oid, account, cid, side, otype, tif, price, qty = e
                order = self._order(symbol, account, oid)
                order.fields = {
                    "order_id": seq_to_entry(oid), "client_order_id": cid, "symbol": symbol, "side": side,
                    "order_type": otype, "tif": tif, "price": None if price is None else p(price),
                    "quantity": q(qty),
                }  # fmt: skip
                order.state = _state("new", q(0), q(qty), ts)
            elif kind == ev.CANCELLED:
                _, symbol, oid, account, _, _, _, qty, leaves, reason = e
                order = self._order(symbol, account, oid)
                order.state = _state("cancelled", q(qty - leaves), q(0), ts, reason)
                order.closed = True
            elif kind == ev.AMENDED:
                _, symbol, oid, account, _, _, price, qty, leaves = e
                order = self._order(symbol, account, oid)
                if order.fields is not None:
                    order.fields["price"], order.fields["quantity"] = p(price), q(qty)
                else:
                    order.amend = (p(price), q(qty))
                status = "new" if qty == leaves else "partially_filled"
                order.state = _state(status, q(qty - leaves), q(leaves), ts)

    def records(self) -> list[bytes]:
        """The flat ARGV values of every record (see the module docstring)."""
        out: list[bytes] = []
        for order in self._orders.values():
            open_key, closed_key, list_key, cids_key = self._keys_of(order.symbol, order.account)
            oid = seq_to_entry(order.oid).encode()
            fields = order.fields
            if fields is not None:
                static = orjson.dumps(fields)
                cid = (fields["client_order_id"] or "").encode()
                if order.closed:
                    out += [
                        b"x",
                        closed_key,
                        list_key,
                        oid,
                        static[:-1] + b"," + order.state + b"}",
                        cids_key,
                        cid,
                    ]
                else:
                    out += [b"n", open_key, oid, static, order.state, cids_key, cid]
            elif order.closed:
                out += [b"c", open_key, oid, order.state, closed_key, list_key]
            elif order.amend is not None:
                out += [b"a", open_key, oid, order.amend[0].encode(), order.amend[1].encode(), order.state]
            elif order.state:
                out += [b"u", open_key, oid, order.state]
        return out
