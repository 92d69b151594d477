"""The orders stream entry format: one field `d` holding orjson([command as list, recv_ns]).

recv_ns is the gateway's wall-clock receive time (for the order-to-publish latency metric and the
trade message's latency_us); it never reaches the core, which takes its time from the entry id.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from services.matcher.commands import CoreCommand, command_from_list, command_to_list

FIELD = b"d"


def encode(cmd: CoreCommand, recv_ns: int) -> bytes:
    return orjson.dumps([command_to_list(cmd), recv_ns])


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
        return command_from_list(data), int(recv_ns)
    except (TypeError, ValueError, KeyError, orjson.JSONDecodeError):
        return None, 0


def encode_events(obj: Any) -> bytes:
    """JSON for the durable events stream. Fee units of large trades can exceed 64 bits, which orjson
    refuses; those rare batches fall back to the stdlib encoder (same JSON, slower)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def decode_events(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
