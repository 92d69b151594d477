"""Run a service's main coroutine on uvloop.

The services spend much of their CPU in the event loop and its socket transports (py-spy at 10k
orders/s: a fifth of the gateway's samples in asyncio's pure-Python transport write). uvloop is a
drop-in asyncio loop on libuv, in C; websockets and redis-py run on it unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until all have ended, cancelling again each still running half a
    second later: redis-py 8.1 can swallow a cancel that lands during a command or its blocking
    pub/sub read (the task then simply goes on). Their outcomes are retrieved, not raised."""
    tasks = list(tasks)
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)
