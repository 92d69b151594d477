"""The order read model: what `order_status` and `open_orders` answer, kept in Redis by the matcher.

Every command's order events become records that the commit script applies in the same atomic call
that publishes the execution reports (shared.keys.open_orders and its neighbours say the layout), so
a gateway reading the model never answers older than a report its client already got.

Records (flat ARGV values, one op letter first):
  n  open-key oid static state cids-key cid    an order opened (cid '' when none)
  u  open-key oid state                        its state changed
  a  open-key oid price quantity state         amended: the static part's price and quantity change
  c  open-key oid state closed-key list-key    it closed: one JSON object in the closed hash
The static part is a JSON object, the state a JSON fragment (no braces), so the script joins them
without parsing JSON: a closed order is the static object with ",<state>" before its last brace.
"""

from __future__ import annotations

from typing import Final

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
      redis.call('LPUSH', ARGV[i + 5], ARGV[i + 2])
      if redis.call('LLEN', ARGV[i + 5]) > {CLOSED_KEPT} then
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


class Records:
    """Builds one commit's records; key names are made once per (symbol, account)."""

    __slots__ = ("_keys", "out")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self._keys: dict[tuple[str, str], tuple[bytes, bytes, bytes, bytes]] = {}

    def keys_of(self, symbol: str, account: str) -> tuple[bytes, bytes, bytes, bytes]:
        found = self._keys.get((symbol, account))
        if found is None:
            found = self._keys[symbol, account] = (
                keys.open_orders(symbol, account).encode(),
                keys.closed_orders(symbol, account).encode(),
                keys.closed_list(symbol, account).encode(),
                keys.client_order_ids(symbol, account).encode(),
            )
        return found

    def add(self, events: list[ev.Event], inst: Instrument, ts: int) -> None:
        """The records of one command's events."""
        q, p = inst.qty_str, inst.price_str
        for e in events:
            kind = e[0]
            if kind == ev.TRADE:
                symbol = e[1]
                for oid, account, qty, leaves in (
                    (e[ev.T_MAKER_OID], e[ev.T_MAKER_ACCOUNT], e[ev.T_MAKER_QTY], e[ev.T_MAKER_LEAVES]),
                    (e[ev.T_TAKER_OID], e[ev.T_TAKER_ACCOUNT], e[ev.T_TAKER_QTY], e[ev.T_TAKER_LEAVES]),
                ):
                    status = "filled" if leaves == 0 else "partially_filled"
                    self._change(
                        symbol, account, oid, _state(status, q(qty - leaves), q(leaves), ts), leaves == 0
                    )
            elif kind == ev.ACCEPTED:
                _, symbol, oid, account, cid, side, otype, tif, price, qty = e
                static = orjson.dumps({
                    "order_id": seq_to_entry(oid), "client_order_id": cid, "symbol": symbol, "side": side,
                    "order_type": otype, "tif": tif, "price": None if price is None else p(price),
                    "quantity": q(qty),
                })  # fmt: skip
                open_key, _, _, cids_key = self.keys_of(symbol, account)
                self.out += [b"n", open_key, seq_to_entry(oid).encode(), static,
                             _state("new", q(0), q(qty), ts), cids_key, (cid or "").encode()]  # fmt: skip
            elif kind == ev.CANCELLED:
                _, symbol, oid, account, _, _, _, qty, leaves, reason = e
                self._change(
                    symbol, account, oid, _state("cancelled", q(qty - leaves), q(0), ts, reason), True
                )
            elif kind == ev.AMENDED:
                _, symbol, oid, account, _, _, price, qty, leaves = e
                status = "new" if qty == leaves else "partially_filled"
                open_key = self.keys_of(symbol, account)[0]
                self.out += [b"a", open_key, seq_to_entry(oid).encode(), p(price).encode(), q(qty).encode(),
                             _state(status, q(qty - leaves), q(leaves), ts)]  # fmt: skip

    def _change(self, symbol: str, account: str, oid: int, state: bytes, closed: bool) -> None:
        open_key, closed_key, list_key, _ = self.keys_of(symbol, account)
        if closed:
            self.out += [b"c", open_key, seq_to_entry(oid).encode(), state, closed_key, list_key]
        else:
            self.out += [b"u", open_key, seq_to_entry(oid).encode(), state]
