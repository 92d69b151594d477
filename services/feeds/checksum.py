"""Kraken's WebSocket v2 book checksum over a book's top 10 levels per side. Pure: no I/O.

CRC32 (unsigned) of the concatenation, asks best (lowest) first then bids best (highest) first, of
each level's price string then its quantity string, each with the decimal point and then the leading
zeros removed. It is taken over the wire strings, so a client computes it from what it received.

services.feeds.views keeps each level's part until the level changes, and each side's top parts
joined until a change reaches them; the CRC runs on from the asks' bytes into the bids', so a message
that changed one side's top costs one join of 10 short byte strings and one short zlib.crc32.
"""

from __future__ import annotations

from typing import Final

DEPTH: Final = 10  # levels per side that the checksum covers


def level_part(price: str, qty: str) -> bytes:
    """One level's contribution: "45285.2", "0.00100000" -> b"452852100000"."""
    return (price.replace(".", "").lstrip("0") + qty.replace(".", "").lstrip("0")).encode()
