"""`cme`: the command line of the exchange core."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _bench(args: argparse.Namespace) -> int:
    if args.what == "core":
        from services.bench.core import run_from_args

        return run_from_args(args)
    print(f"unknown benchmark {args.what!r}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cme", description="crypto matching engine")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark (core)")
    bench.add_argument("what", choices=["core"])
    bench.add_argument("--commands", "-n", type=int, default=1_000_000, help="commands in the flow")
    bench.add_argument("--seed", type=int, default=42)
    bench.add_argument("--deep", action="store_true", help="only the deep-book variant")
    bench.add_argument("--flat", action="store_true", help="only the default flow")
    bench.add_argument("--memory-orders", type=int, default=1_000_000, help="resting orders for bytes/order")
    bench.add_argument("--no-memory", action="store_true", help="skip the bytes-per-resting-order phase")
    bench.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress output")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
