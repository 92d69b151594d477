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

Folding keeps each order's last state as numbers and renders it once, when the records are built:
a resting order filled by several trades of one commit is formatted once, not once per trade.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from shared import events as ev
from shared import keys
from shared.ids import seq_to_entry
from shared.instruments import Instrument

CLOSED_KEPT: Final = 10_000  # closed orders kept per account and symbol, newest first
_KEYS_MAX: Final = 100_000  # (symbol, account) key sets remembered across commits
_NEW, _PARTIAL, _FILLED, _CANCELLED = "new", "partially_filled", "filled", "cancelled"

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


# An order's latest state: (instrument, status, filled lots, remaining lots, ts, reason | None).
_State = tuple[Instrument, str, int, int, int, "str | None"]
# What one commit does to one order, under (symbol, order id): [account, latest _State, (instrument,
# accepted event) when it opened in this commit, (instrument, price, quantity) of its last amend].
# A list, not an instance: setdefault builds one per touch, and a list costs a fifth of an instance.
_Order = list[Any]
_STATE, _AMEND = 1, 3
# The key bytes of one (symbol, account): open hash, closed hash, closed list, client ids hash;
# then the symbol as a JSON string (an instrument's name is configuration, so it is escaped once).
_Keys = tuple[bytes, bytes, bytes, bytes, str]
_keys_cache: dict[tuple[str, str], _Keys] = {}  # kept across commits: the same accounts trade again


def _keys_of(symbol: str, account: str) -> _Keys:
    if len(_keys_cache) >= _KEYS_MAX:
        _keys_cache.clear()
    found = _keys_cache[symbol, account] = (
        keys.open_orders(symbol, account).encode(),
        keys.closed_orders(symbol, account).encode(),
        keys.closed_list(symbol, account).encode(),
        keys.client_order_ids(symbol, account).encode(),
        orjson.dumps(symbol).decode(),
    )
    return found


class Records:
    """One commit's records: every event of its commands is folded into one change per order, so an
    order opened and closed within the commit (an IOC, a cancel soon after) costs one write."""

    __slots__ = ("_orders",)

    def __init__(self) -> None:
        self._orders: dict[tuple[str, int], _Order] = {}  # first touch order

    def add(self, events: list[ev.Event], inst: Instrument, ts: int) -> None:
        """Fold one command's events in."""
        orders = self._orders
        touch = orders.setdefault  # an order's first event decides its place
        for e in events:
            kind = e[0]
            if kind == ev.TRADE:
                (
                    _, symbol, _, _, _, _,
                    m_oid, m_account, _, m_qty, m_leaves, _,
                    t_oid, t_account, _, _, t_qty, t_leaves, _, _,
                ) = e  # fmt: skip
                touch((symbol, m_oid), [m_account, None, None, None])[_STATE] = (
                    (inst, _PARTIAL, m_qty - m_leaves, m_leaves, ts, None)
                    if m_leaves
                    else (inst, _FILLED, m_qty, 0, ts, None)
                )
                touch((symbol, t_oid), [t_account, None, None, None])[_STATE] = (
                    (inst, _PARTIAL, t_qty - t_leaves, t_leaves, ts, None)
                    if t_leaves
                    else (inst, _FILLED, t_qty, 0, ts, None)
                )
            elif kind == ev.ACCEPTED:
                # An order's first event ever: it cannot have been touched yet.
                orders[e[1], e[2]] = [e[3], (inst, _NEW, 0, e[9], ts, None), (inst, e), None]
            elif kind == ev.CANCELLED:
                _, symbol, oid, account, _, _, _, qty, leaves, reason = e
                order = touch((symbol, oid), [account, None, None, None])
                order[_STATE] = (inst, _CANCELLED, qty - leaves, 0, ts, reason)
            elif kind == ev.AMENDED:
                _, symbol, oid, account, _, _, price, qty, leaves = e
                order = touch((symbol, oid), [account, None, None, None])
                status = _NEW if qty == leaves else _PARTIAL
                order[_STATE] = (inst, status, qty - leaves, leaves, ts, None)
                order[_AMEND] = (inst, price, qty)

    def records(self) -> list[bytes]:
        """The flat ARGV values of every record (see the module docstring)."""
        out: list[bytes] = []
        cached = _keys_cache.get
        for (symbol, order_seq), (account, state, accepted, amend) in self._orders.items():
            keyset = cached((symbol, account)) or _keys_of(symbol, account)
            open_key, closed_key, list_key, cids_key, symbol_json = keyset
            order_id = seq_to_entry(order_seq)
            oid = order_id.encode()
            inst, status, filled, remaining, ts, reason = state
            # Nothing follows an order's end (it leaves the book), so its last status says if it closed.
            closed = status is _FILLED or status is _CANCELLED
            q = inst.qty_str
            fragment = (
                f'"status":"{status}","filled_quantity":"{q(filled)}",'
                f'"remaining_quantity":"{q(remaining)}","ts":{ts}'
            )
            if reason is not None:
                fragment = f'{fragment},"reason":{orjson.dumps(reason).decode()}'
            if accepted is not None:
                inst, (_, _, _, _, cid, side, otype, tif, price, qty) = accepted
                if amend is not None:
                    inst, price, qty = amend
                price_json = "null" if price is None else f'"{inst.price_str(price)}"'
                # side, type and tif are the engine's own vocabulary (it rejects any other), so they
                # need no escaping; the client's id may hold anything and is escaped by orjson.
                # A closed order is one object (the static part and its state), an open one two.
                tail = f",{fragment}}}" if closed else "}"
                value = (
                    f'{{"order_id":"{order_id}","client_order_id":{orjson.dumps(cid).decode()},'
                    f'"symbol":{symbol_json},"side":"{side}","order_type":"{otype}","tif":"{tif}",'
                    f'"price":{price_json},"quantity":"{inst.qty_str(qty)}"{tail}'
                ).encode()
                cid_bytes = b"" if cid is None else cid.encode()
                if closed:
                    out += (b"x", closed_key, list_key, oid, value, cids_key, cid_bytes)
                else:
                    out += (b"n", open_key, oid, value, fragment.encode(), cids_key, cid_bytes)
            elif closed:
                out += (b"c", open_key, oid, fragment.encode(), closed_key, list_key)
            elif amend is not None:
                inst, price, qty = amend
                out += (
                    b"a",
                    open_key,
                    oid,
                    inst.price_str(price).encode(),
                    inst.qty_str(qty).encode(),
                    fragment.encode(),
                )
            else:
                out += (b"u", open_key, oid, fragment.encode())
        return out
