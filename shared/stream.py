"""The orders stream entry format: one field `d` holding orjson([command as list, recv_ns]).

recv_ns is the gateway's wall-clock receive time (for the order-to-publish latency metric and the
trade message's latency_us); it never reaches the core, which takes its time from the entry id.

Funding amounts (deposit, withdraw, faucet) are decimal strings in the entry ("1000.5"), not asset
units: an asset's places follow the instruments (tick, lot and fee rates, see
shared.instruments.asset_scales), so units written under one configuration would mean other amounts
under the next. The reader turns them into its own units (`decode(fields, scales)`). Entries written
before carry integers: units of the legacy scales (shared.instruments.LEGACY_FEE_PLACES).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from shared.commands import CoreCommand, command_from_list, command_to_list
from shared.decimals import units_to_amount
from shared.instruments import amount_to_units, rescale

FIELD = b"d"
_FUNDING: Final = frozenset(("Deposit", "Withdraw", "Grant"))  # the commands with amounts
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


def encode(cmd: CoreCommand, recv_ns: int, scales: Mapping[str, int] | None = None) -> bytes:
    """The entry's `d` value. A funding command's amounts (asset units) go as decimal strings, which
    needs the writer's asset places (`scales`); other commands need none."""
    data = command_to_list(cmd)
    if data[0] in _FUNDING:
        if scales is None:
            raise ValueError(f"{data[0]} needs the asset scales")
        _convert(data, lambda asset, units: units_to_amount(units, scales[asset]))
    return orjson.dumps([data, recv_ns])


def decode(
    fields: dict[Any, Any] | list[Any],
    scales: Mapping[str, int] | None = None,
    legacy: Mapping[str, int] | None = None,
) -> tuple[CoreCommand | None, int]:
    """(command, recv_ns) of an entry's fields (a dict from redis-py, or the flat [field, value, ...]
    list of a raw RESP reply); command is None for an entry that is not ours (it is then skipped).
    Funding amounts become units of `scales` (an integer amount: units of `legacy`); one that cannot
    (no scales, unknown asset, off the grid) stays text or becomes None, which the core refuses."""
    if isinstance(fields, list):
        if len(fields) == 2 and fields[0] == FIELD:  # every entry ours: no dict for it
            raw = fields[1]
        else:
            raw = dict(zip(fields[::2], fields[1::2], strict=False)).get(FIELD)
    else:
        raw = fields.get(FIELD, fields.get("d"))
    if raw is None:
        return None, 0
    try:
        data, recv_ns = orjson.loads(raw)
        if data[0] in _FUNDING:  # orjson reads integers beyond 64 bits (legacy units) as floats
            data, recv_ns = json.loads(raw)
            _convert(data, lambda asset, amount: _units(asset, amount, scales, legacy))
        return command_from_list(data), int(recv_ns)
    except (TypeError, ValueError, KeyError):  # JSONDecodeError is a ValueError
        return None, 0


def _convert(data: list[Any], amount: Any) -> None:
    """Replace, in a funding command's list form, each amount by amount(asset, value)."""
    if data[0] == "Grant":
        data[2] = [[asset, amount(asset, value)] for asset, value in data[2]]
    else:  # Deposit, Withdraw: [kind, account, asset, amount, request_id]
        data[3] = amount(data[2], data[3])


def _units(
    asset: Any, amount: Any, scales: Mapping[str, int] | None, legacy: Mapping[str, int] | None
) -> Any:
    places = scales.get(asset) if scales is not None and type(asset) is str else None
    if places is None:
        return amount
    if type(amount) is str:
        try:
            return amount_to_units(amount, places)
        except ValueError:
            return amount
    if type(amount) is int and legacy is not None and type(asset) is str:
        return rescale(amount, legacy.get(asset, places), places)
    return amount


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
