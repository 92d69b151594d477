"""Keep the cyclic garbage collector off the latency path of the asyncio services.

A full collection walks every tracked object; with the default thresholds it runs often enough to put
tens of milliseconds into the tail of order-to-report latency. asyncio and websockets do create
reference cycles (futures and callbacks, exceptions and tracebacks), so the collector stays on, but
what exists at start-up is frozen out of it and young collections run far less often.
(The matcher goes further and disables it: the matching core creates no cycles.)
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 100)


def quiet_gc() -> None:
    """Call once the service is started: its long-lived objects are then never scanned again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
