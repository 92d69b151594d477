"""Ids: Redis stream entry ids <-> the core's integer seq (which is also the order id), and the rules
for account names and request ids, which the gateway's checks and the core's share.

An entry id "1732500000000-3" (milliseconds, sequence within the millisecond) becomes
(1732500000000 << 20) | 3: ordering is preserved, so the matcher's seq rises with the stream, and the
order id shown to clients is the entry id string itself.
"""

from __future__ import annotations

from typing import Final

MAX_ACCOUNT: Final = 64  # characters of an account name
MAX_REQUEST_ID: Final = 64  # characters of a funding request's id
RESERVED_PREFIX: Final = "_"  # the venue's own accounts: no orders, no deposits, no logins
FEES_ACCOUNT: Final = "_fees"  # where the fees go; only an admin's withdrawal may name it

SEQ_BITS = 20
MAX_SEQ = 1 << 63
_SEQ_MASK = (1 << SEQ_BITS) - 1


def entry_to_seq(entry_id: str | bytes) -> int:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, n = entry_id.partition("-")
    part = int(n or 0)
    if part > _SEQ_MASK:
        raise ValueError(f"entry id {entry_id} has a sequence part too large for a seq")
    return (int(ms) << SEQ_BITS) | part


def seq_to_entry(seq: int) -> str:
    return f"{seq >> SEQ_BITS}-{seq & _SEQ_MASK}"


def seq_ms(seq: int) -> int:
    """The millisecond timestamp Redis gave the entry: the order's time."""
    return seq >> SEQ_BITS


def parse_order_id(value: object) -> int | None:
    """A client-supplied order id ("1732500000000-3") as a seq, or None if it is not one."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    ms, sep, n = value.partition("-")
    if not sep or not ms.isdigit() or not n.isdigit():
        return None
    try:
        seq = entry_to_seq(value)
    except ValueError:
        return None
    # Order ids are 64-bit in the core and on the stream; a larger one cannot name any order.
    return seq if seq < MAX_SEQ else None
