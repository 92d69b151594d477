"""The orders stream entry format: one field `d` holding orjson([command as list, recv_ns]).

recv_ns is the gateway's wall-clock receive time (for the order-to-publish latency metric and the
trade message's latency_us); it never reaches the core, which takes its time from the entry id.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.matcher.commands import Command, command_from_list, command_to_list

FIELD = b"d"


def encode(cmd: Command, recv_ns: int) -> bytes:
    return orjson.dumps([command_to_list(cmd), recv_ns])


def decode(fields: dict[Any, Any]) -> tuple[Command | None, int]:
    """(command, recv_ns); command is None for an entry that is not ours (it is then skipped)."""
    raw = fields.get(FIELD, fields.get("d"))
    try:
        data, recv_ns = orjson.loads(raw)
        return command_from_list(data), int(recv_ns)
    except (TypeError, ValueError, KeyError, orjson.JSONDecodeError):
        return None, 0
