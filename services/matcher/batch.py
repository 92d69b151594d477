"""Apply a batch of commands and sample the core's per-command time: the matcher's inner loop.

`cme bench core --metrics` runs this same function, so the benchmark measures what the matcher pays
for its metrics. Timing every command costs about 10 % of the core's throughput (two clock reads
and an append per command); timing one command in SAMPLE_EVERY keeps the cost near 2 % and still
gives an unbiased latency distribution, because which command is timed does not depend on its kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from shared.commands import CoreCommand
from shared.events import Event

SAMPLE_EVERY = 8

Item = tuple[CoreCommand, int, int]  # (command, seq, ts)


def apply_batch(
    apply: Callable[[CoreCommand, int, int], list[Event]], items: Sequence[Item], samples: list[float]
) -> list[list[Event]]:
    """Events of each item, in order; appends sampled core times (seconds) to `samples`."""
    perf = time.perf_counter_ns
    out: list[list[Event]] = []
    append = out.append
    for i, (cmd, seq, ts) in enumerate(items):
        if i % SAMPLE_EVERY:
            append(apply(cmd, seq, ts))
        else:
            t0 = perf()
            append(apply(cmd, seq, ts))
            samples.append((perf() - t0) * 1e-9)
    return out
