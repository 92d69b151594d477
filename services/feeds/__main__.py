"""`python -m services.feeds [flags]`: the same as `cme feeds [flags]`."""

from __future__ import annotations

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["feeds", *sys.argv[1:]]))
