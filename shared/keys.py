"""Every Redis key and channel name, in one place.

Per-symbol keys carry the symbol in a hash tag (`{BTC-USDT}`), so all of one symbol's keys live in one
Redis Cluster slot and the matcher's MULTI/EXEC over them stays legal on a cluster.
"""

from __future__ import annotations

PREFIX = "cme"


def orders(symbol: str) -> str:
    """Input stream: one entry per accepted command, appended by gateways, read by the matcher."""
    return f"{PREFIX}:{{{symbol}}}:orders"


def appended(symbol: str) -> str:
    """Counter of entries ever appended to the orders stream (INCRBY in the gateway's append batch)."""
    return f"{PREFIX}:{{{symbol}}}:appended"


def events(symbol: str) -> str:
    """Durable output stream: one entry per matcher batch with the core events of each command."""
    return f"{PREFIX}:{{{symbol}}}:events"


def progress(symbol: str) -> str:
    """Hash written with every batch commit: last_id, applied, book_seq, trade_seq, ts."""
    return f"{PREFIX}:{{{symbol}}}:progress"


def checkpoint(symbol: str) -> str:
    """The newest checkpoint blob (see services.matcher.checkpoint)."""
    return f"{PREFIX}:{{{symbol}}}:checkpoint"


def md_channel(symbol: str) -> str:
    """Pub/sub: NDJSON batches of l2_update (and l2_snapshot on request) messages."""
    return f"{PREFIX}:{{{symbol}}}:md"


def trades_channel(symbol: str) -> str:
    """Pub/sub: NDJSON batches of trade messages."""
    return f"{PREFIX}:{{{symbol}}}:trades"


def exec_channel(symbol: str) -> str:
    """Pub/sub: batches of lines `<account> <json>`: execution reports and matcher-side rejects."""
    return f"{PREFIX}:{{{symbol}}}:exec"


def snapshot_request_channel(symbol: str) -> str:
    """Pub/sub: a feed asks the matcher to publish a full l2_snapshot on the md channel."""
    return f"{PREFIX}:{{{symbol}}}:l2req"


def instances(service: str) -> str:
    """Hash instance -> metrics endpoint, for discovery and dashboards (not used for correctness)."""
    return f"{PREFIX}:instances:{service}"


def matcher_lease(symbol: str) -> str:
    """Who may consume the symbol's stream: exactly one matcher holds it, renewing it while alive."""
    return f"{PREFIX}:{{{symbol}}}:lease"
