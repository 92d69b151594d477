"""`cme bench core|matcher|e2e|feeds|peers` dispatch."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    if args.what == "core":
        from services.bench.core import run_from_args

        if args.commands is None:
            args.commands = 1_000_000
        return run_from_args(args)
    if args.what == "matcher":
        from services.bench.matcher import run_from_args as run_matcher

        return run_matcher(args)
    if args.what == "feeds":
        from services.bench.feeds import run_from_args as run_feeds

        return run_feeds(args)
    if args.what == "peers":
        from services.bench.peers import run_from_args as run_peers

        return run_peers(args)
    if getattr(args, "stack_risk", "on") == "both":
        from services.bench.e2e_risk import run_from_args as run_e2e_pairs

        return run_e2e_pairs(args)
    from services.bench.e2e import run_from_args as run_e2e

    return run_e2e(args)
