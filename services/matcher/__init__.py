"""The matcher: the pure core (engine, book, balances, snapshot; its commands and events are the
contract in shared/) and the service around it.

The core's rules live in one source, engine.py, book.py and balances.py. An install that finds a C
compiler also builds them with mypyc (setup.py); shared.build picks the compiled modules or the
sources, never a stale build. ``BUILD`` says which one this process got.
"""

from __future__ import annotations

import os
from typing import Final

from shared.build import select

BUILD: Final = select(__name__, os.path.dirname(os.path.abspath(__file__)), ("book", "balances", "engine"))
