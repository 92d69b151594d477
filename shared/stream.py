"""The orders stream entry format: one field `d` holding orjson([command as list, recv_ns]).

recv_ns is the gateway's wall-clock receive time (for the order-to-publish latency metric and the
trade message's latency_us); it never reaches the core, which takes its time from the entry id.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Final

import orjson

from services.matcher.commands import CoreCommand, command_from_list, command_to_list

FIELD = b"d"
_FUNDING: Final = frozenset(("Deposit", "Withdraw", "Grant"))  # the commands with amounts in asset units
_LONG_NUMBER: Final = re.compile(rb"[0-9]{19}")

# Append entries under the venue clock's next ids (shared.keys.id_clock): with balances on, one
# matcher applies every symbol's stream in entry-id order, so ids must be unique and rise across all
# streams, and every append after another must get a larger id whatever stream it goes to. One call
# appends a whole batch: the clock gives the first id (XADD *), the next entries take the following
# sequence numbers of that millisecond, and the clock is moved to the last id given. The clock stream
# keeps only its newest entry. An orders stream whose top is ahead of the clock (an entry appended
# with XADD * directly) gets the entry under its own next id, and the clock follows.
# Measured on this machine, 100k entries in batches of 500: Redis spends 2.3-2.4 us per entry this
# way, against 6.3-8.0 us with one script call per entry (plain XADD: 1.5-2.5).
# KEYS: clock, then the orders streams. ARGV: per entry, the index of its stream in KEYS and its `d`
# value. Returns one reply per entry: its id, or the error that refused it.
APPEND_SCRIPT: Final = """
local clock = redis.call('XADD', KEYS[1], 'MAXLEN', '1', '*', 'c', '')
local ms, seq = string.match(clock, '^(%d+)-(%d+)$')
seq = tonumber(seq)
local out, last = {}, clock
for i = 1, #ARGV, 2 do
  local key = KEYS[tonumber(ARGV[i])]
  local added = redis.pcall('XADD', key, ms .. '-' .. seq, 'd', ARGV[i + 1])
  if type(added) == 'table' and added.err then
    added = redis.pcall('XADD', key, '*', 'd', ARGV[i + 1])
    if type(added) ~= 'table' then
      ms, seq = string.match(added, '^(%d+)-(%d+)$')
      seq = tonumber(seq)
    end
  end
  out[#out + 1] = added
  if type(added) ~= 'table' then last = added end
  seq = seq + 1
end
if last ~= clock then redis.call('XADD', KEYS[1], 'MAXLEN', '1', last, 'c', '') end
return out
"""
APPEND_SHA: Final = hashlib.sha1(APPEND_SCRIPT.encode()).hexdigest().encode()


def encode(cmd: CoreCommand, recv_ns: int) -> bytes:
    """Funding amounts are asset units (USDT has 15 places), often beyond the 64 bits orjson takes:
    those rare entries fall back to the stdlib encoder (same JSON), as encode_events does."""
    data = [command_to_list(cmd), recv_ns]
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data, separators=(",", ":")).encode()


def decode(fields: dict[Any, Any] | list[Any]) -> tuple[CoreCommand | None, int]:
    """(command, recv_ns) of an entry's fields (a dict from redis-py, or the flat [field, value, ...]
    list of a raw RESP reply); command is None for an entry that is not ours (it is then skipped)."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    raw = fields.get(FIELD, fields.get("d"))
    if raw is None:
        return None, 0
    try:
        data, recv_ns = orjson.loads(raw)
        if data[0] in _FUNDING:  # orjson reads integers beyond 64 bits as floats: read those exactly
            data, recv_ns = json.loads(raw)
        return command_from_list(data), int(recv_ns)
    except (TypeError, ValueError, KeyError):  # JSONDecodeError is a ValueError
        return None, 0


def encode_events(obj: Any) -> bytes:
    """JSON for the durable events stream. Fee units of large trades can exceed 64 bits, which orjson
    refuses; those rare batches fall back to the stdlib encoder (same JSON, slower)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def decode_events(data: bytes) -> Any:
    """orjson reads an integer beyond 64 bits as a float, silently: a payload with a run of 19 or more
    digits (balances, funding, the fee units of a huge trade) is read by the stdlib instead."""
    if _LONG_NUMBER.search(data) is not None:
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
