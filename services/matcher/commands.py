"""The core's commands, importable here as before for users of the core as a library (docs/core.md).

They live in shared/commands.py: the contract between gateway, matcher and feeds, which shared/ keeps
without importing services/.
"""

from shared.commands import *  # noqa: F403
