"""The core's events, importable here as before for users of the core as a library (docs/core.md).

They live in shared/events.py: the contract between gateway, matcher and feeds, which shared/ keeps
without importing services/.
"""

from shared.events import *  # noqa: F403
