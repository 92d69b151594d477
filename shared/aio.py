"""Run a service's main coroutine on uvloop.

The services spend much of their CPU in the event loop and its socket transports (py-spy at 10k
orders/s: a fifth of the gateway's samples in asyncio's pure-Python transport write). uvloop is a
drop-in asyncio loop on libuv, in C; websockets and redis-py run on it unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
