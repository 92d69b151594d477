"""`cme keys add ACCOUNT --api-keys FILE`: a new API key for an account, printed once, stored hashed."""

from __future__ import annotations

import argparse
import sys

from services.gateway.apikeys import add_key


def run(args: argparse.Namespace) -> int:
    try:
        key = add_key(args.api_keys, args.account)
    except (OSError, ValueError) as exc:
        print(f"cme keys: {exc}", file=sys.stderr)
        return 2
    print(key)  # stdout holds only the key, for scripts; it cannot be shown again
    print(
        f"new API key of {args.account}: only its SHA-256 is stored in {args.api_keys}, "
        "so keep the key now, it cannot be shown again",
        file=sys.stderr,
    )
    return 0
