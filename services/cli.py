"""`cme`: the command line of the exchange core.

Each subcommand lives in its own module and exposes `run(args) -> exit code`; this file only declares
the flags, so `cme --help` is the single place to read them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

DEFAULT_REDIS = None  # None: `cme up` starts an embedded redis-server


def _add_common(p: argparse.ArgumentParser, *, redis_required: bool = True) -> None:
    p.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS if not redis_required else "redis://127.0.0.1:6379/0",
        help="Redis to use" + ("" if redis_required else " (default: start an embedded redis-server)"),
    )
    p.add_argument(
        "--instruments", metavar="FILE", help="JSON list of instrument specs (default: BTC-USDT, ETH-USDT)"
    )
    p.add_argument("--metrics-port", type=int, default=9100, help="port of /metrics (0: any free port)")
    p.add_argument("--instance", help="instance name shown in metrics (default: service-host-pid)")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cme", description="crypto matching engine")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine (embedded Redis unless --redis-url)")
    _add_common(up, redis_required=False)
    up.add_argument("--gateway-port", type=int, default=8000)
    up.add_argument("--md-port", type=int, default=8001)
    up.add_argument("--trades-port", type=int, default=8002)
    up.add_argument("--data-dir", default="./var")
    up.add_argument("--feeds", type=int, default=1, help="feed processes (they share the ports)")
    up.add_argument("--gateways", type=int, default=1, help="gateway processes (they share the port)")
    up.add_argument("--api-keys", metavar="FILE", help="JSON object api_key -> account (default: open mode)")
    up.add_argument("--host", default="127.0.0.1", help="address the services listen on")
    up.set_defaults(module="services.supervisor")

    matcher = sub.add_parser("matcher", help="run the matcher (one per symbol stream)")
    _add_common(matcher)
    matcher.add_argument("--symbols", help="comma-separated symbols to match (default: all instruments)")
    matcher.add_argument("--data-dir", default="./var")
    matcher.add_argument("--checkpoint-every", type=int, default=100_000, help="entries between checkpoints")
    matcher.add_argument("--checkpoint-seconds", type=float, default=30.0, help="seconds between checkpoints")
    matcher.add_argument("--keep-checkpoints", type=int, default=3)
    matcher.add_argument("--batch", type=int, default=1000, help="most entries per read and commit")
    matcher.set_defaults(module="services.matcher.service")

    gateway = sub.add_parser("gateway", help="run an order gateway")
    _add_common(gateway)
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument(
        "--api-keys", metavar="FILE", help="JSON object api_key -> account (default: open mode)"
    )
    gateway.add_argument(
        "--max-lag", type=int, default=50_000, help="matcher lag (entries) before OVERLOADED"
    )
    gateway.add_argument(
        "--rate-limit", type=float, default=5_000.0, help="messages per second per connection"
    )
    gateway.add_argument("--max-frame", type=int, default=16_384, help="largest accepted frame in bytes")
    gateway.set_defaults(module="services.gateway.server")

    feeds = sub.add_parser("feeds", help="run the market-data and trade feeds")
    _add_common(feeds)
    feeds.add_argument("--host", default="127.0.0.1")
    feeds.add_argument("--md-port", type=int, default=8001)
    feeds.add_argument("--trades-port", type=int, default=8002)
    feeds.add_argument("--depth-interval", type=float, default=0.1, help="seconds between depth messages")
    feeds.add_argument(
        "--max-buffer", type=int, default=10_000, help="queued messages before a client is dropped"
    )
    feeds.set_defaults(module="services.feeds.server")

    demo = sub.add_parser("demo", help="play a short client scenario against a running stack")
    demo.add_argument("--gateway", default="ws://127.0.0.1:8000")
    demo.add_argument("--md", default="ws://127.0.0.1:8001")
    demo.add_argument("--trades", default="ws://127.0.0.1:8002")
    demo.add_argument("--symbol", default="BTC-USDT")
    demo.add_argument(
        "--data-dir", default="./var", help="the stack's data dir (its stack.json: restart check)"
    )
    demo.set_defaults(module="services.demo")

    bench = sub.add_parser("bench", help="run a benchmark: core (pure matching) or e2e (whole stack)")
    bench.add_argument("what", choices=["core", "e2e"])
    bench.add_argument("--commands", "-n", type=int, default=None, help="commands in the flow")
    bench.add_argument("--seed", type=int, default=42)
    bench.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress output")
    core = bench.add_argument_group("core")
    core.add_argument("--deep", action="store_true", help="only the deep-book variant")
    core.add_argument("--flat", action="store_true", help="only the default flow")
    core.add_argument("--memory-orders", type=int, default=1_000_000, help="resting orders for bytes/order")
    core.add_argument("--no-memory", action="store_true", help="skip the bytes-per-resting-order phase")
    core.add_argument("--metrics", action="store_true", help="record the matcher's metrics while timing")
    e2e = bench.add_argument_group("e2e")
    e2e.add_argument("--gateway", default=None, help="ws URL of a running gateway (default: start a stack)")
    e2e.add_argument("--clients", type=int, default=8)
    e2e.add_argument(
        "--rate", type=float, default=0.0, help="offered orders/s in total (0: as fast as possible)"
    )
    e2e.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    e2e.add_argument("--window", type=int, default=None, help="unanswered orders per client without --rate")
    e2e.add_argument("--procs", type=int, default=None, help="load-generating processes")
    bench.set_defaults(module="services.bench.runner")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args.module)
    code: int = module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
