"""Every Redis key and channel name, in one place.

Per-symbol keys carry the symbol in a hash tag (`{BTC-USDT}`), so all of one symbol's keys live in one
Redis Cluster slot and the matcher's commit scripts over them stay legal on a cluster.
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
    """Hash written with every batch commit: last_id, applied, book_seq, trade_seq, ts, and
    PROGRESS_EXEC_SEQ (the last exec_id published)."""
    return f"{PREFIX}:{{{symbol}}}:progress"


PROGRESS_EXEC_SEQ = "exec_seq"  # progress hash field: the last exec_id the matcher published


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


def epoch(symbol: str) -> str:
    """Fencing token: INCR'ed by each matcher that takes the lease. Every matcher write (batch commit,
    snapshot publish, checkpoint) runs in a script that first checks it still equals the writer's."""
    return f"{PREFIX}:{{{symbol}}}:epoch"


def exec_log(symbol: str) -> str:
    """Durable copy of the exec channel: one stream entry per matcher batch that published exec lines,
    written in the same fenced commit as the PUBLISH.

    Entry id `<last exec_id of the batch>-0` (explicit, so ids rise with exec ids), one field `d` = the
    exec payload exactly as published: header `#<publish ns> <first exec_id>`, then lines
    `<account> <json>`, line i having exec_id first + i (shared.wire.unframe_exec). So
    `XRANGE exec_log (N-0 +` returns every batch holding an exec_id > N, the first possibly starting
    at or below N. Capped with MAXLEN ~ 1_000_000 entries (batches)."""
    return f"{PREFIX}:{{{symbol}}}:execlog"


def matcher_lease(symbol: str) -> str:
    """Who may consume the symbol's stream: exactly one matcher holds it, renewing it while alive."""
    return f"{PREFIX}:{{{symbol}}}:lease"


def balances(account: str) -> str:
    """Read model: hash asset -> "<available> <held>" (asset units, shared.instruments.asset_scales),
    written by the matcher inside the commit that publishes the change, so a gateway reading it never
    answers older than a balance message the connection already got."""
    return f"{PREFIX}:balances:{account}"


def id_clock() -> str:
    """A one-entry stream whose XADD * ids are the venue clock: every orders-stream entry gets the next
    id of it (services.gateway.appender's script), so entry ids, and so order ids, are unique and rise
    across all symbols' streams and one matcher can apply them all in one order (balances)."""
    return f"{PREFIX}:idclock"


def disconnect_leases() -> str:
    """Sorted set: one member per live connection that asked for cancel on disconnect, scored by the
    ms its gateway's lease on it runs out; renewed by that gateway while it lives, swept by any."""
    return f"{PREFIX}:cod"


def dead_man_deadlines() -> str:
    """Sorted set: account -> the ms its dead man's switch fires unless renewed (cancel_all_after)."""
    return f"{PREFIX}:dms"


# Order read model (order_status, open_orders): written by the matcher inside the commit that publishes
# the reports, per symbol and account. An open order has two fields in open_orders: "<order id>:s", its
# static part (a JSON object: order_id, client_order_id, symbol, side, order_type, tif, price, quantity),
# "<order id>:d", its state (a JSON fragment: "status":..,"filled_quantity":..,"remaining_quantity":..,
# "ts":..). A closed order is one JSON object in closed_orders, its id in closed_list (newest first,
# capped). client_order_ids maps each client order id to the newest order id that used it.
def open_orders(symbol: str, account: str) -> str:
    return f"{PREFIX}:{{{symbol}}}:open:{account}"


def closed_orders(symbol: str, account: str) -> str:
    return f"{PREFIX}:{{{symbol}}}:closed:{account}"


def closed_list(symbol: str, account: str) -> str:
    return f"{PREFIX}:{{{symbol}}}:closedlist:{account}"


def client_order_ids(symbol: str, account: str) -> str:
    return f"{PREFIX}:{{{symbol}}}:cids:{account}"
