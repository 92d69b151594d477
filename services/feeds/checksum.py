"""Kraken's WebSocket v2 book checksum over a book's top 10 levels per side. Pure: no I/O.

CRC32 (unsigned) of the concatenation, asks best (lowest) first then bids best (highest) first, of
each level's price string then its quantity string, each with the decimal point and then the leading
zeros removed. It is taken over the wire strings, so a client computes it from what it received.

services.feeds.views keeps each side's top 10 parts, edited in place as changes reach them, and their
bytes joined until the next such change; the CRC runs on from the asks' bytes into the bids', so a
message that changed one side's top costs a part, one join of 10 short strings and a short zlib.crc32,
and one that changed nothing in the top 10 a comparison.
"""

from __future__ import annotations

from typing import Final

DEPTH: Final = 10  # levels per side that the checksum covers


def digits(field: str) -> str:
    """A price or quantity string as the checksum takes it: "0.00100000" -> "100000"."""
    return field.replace(".", "").lstrip("0")


def level_part(price: str, qty: str) -> bytes:
    """One level's contribution: "45285.2", "0.00100000" -> b"452852100000"."""
    return (digits(price) + digits(qty)).encode()
