"""`python -m services.gateway [flags]`: the same as `cme gateway [flags]`."""

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["gateway", *sys.argv[1:]]))
