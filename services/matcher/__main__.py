"""`python -m services.matcher [flags]`: the same as `cme matcher [flags]`."""

from __future__ import annotations

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["matcher", *sys.argv[1:]]))
