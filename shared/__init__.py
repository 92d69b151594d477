"""The ground floor every service stands on; it imports nothing from services/.

wire.py, the matcher's renderer, and decimals.py, whose formatting it calls, have a compiled build too
(setup.py); ``BUILD`` says whether this process got it (shared.build).
"""

from __future__ import annotations

import os
from typing import Final

from shared.build import select

# Lazily: the core imports shared (commands, events) and must not pull in the renderer's orjson.
BUILD: Final = select(__name__, os.path.dirname(os.path.abspath(__file__)), ("decimals", "wire"), lazy=True)
