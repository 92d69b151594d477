"""`cme`: the command line of the exchange core.

Each subcommand lives in its own module and exposes `run(args) -> exit code`; this file only declares
the flags, so `cme --help` is the single place to read them. Every flag has a help text and its
default is shown (tests/test_cli.py walks the whole tree).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_REDIS = None  # None: `cme up` starts an embedded redis-server

# Service tuning that `cme up` passes through: one default for both places it is declared.
RATE_LIMIT = 5_000.0
MAX_LAG = 50_000
DEPTH_INTERVAL = 0.1
CHECKPOINT_EVERY = 100_000
CHECKPOINT_SECONDS = 30.0
BATCH = 1000
SEED_SYMBOL = "BTC-USDT"  # what the seed's dialect trades and shows (docs/protocol.md)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the text already explains its default.

    Flags without a value (store_true) and flags whose default is None say in words what their absence
    means, so nothing is appended for them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0:
            return text
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class CommandsFormatter(HelpFormatter):
    """One line per command in `cme --help`: argparse measures the command names at one indent level
    less than it prints them, so a long name (redis-secrets) would push its help to the next line."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += self._indent_increment


def _parser(sub: Any, name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, formatter_class=HelpFormatter, **kwargs
    )
    return p


def _add_common(p: argparse.ArgumentParser, *, redis_required: bool = True) -> None:
    # A password in an argument shows in `ps`: the URL may come from the environment instead.
    from_env = os.environ.get("CME_REDIS_URL") or None
    p.add_argument(
        "--redis-url",
        default=from_env or (DEFAULT_REDIS if not redis_required else "redis://127.0.0.1:6379/0"),
        help="Redis to use: redis://[USER:PASSWORD@]HOST:PORT/DB or rediss:// (TLS); default $CME_REDIS_URL, "
        + ("else 127.0.0.1:6379" if redis_required else "else start an embedded redis-server with ACL users"),
    )
    p.add_argument(
        "--instruments", metavar="FILE", help="JSON list of instrument specs (default: BTC-USDT, ETH-USDT)"
    )
    p.add_argument("--metrics-port", type=int, default=9100, help="port of /metrics (0: any free port)")
    p.add_argument("--metrics-host", help="address of /metrics (default: --host, else 127.0.0.1)")
    p.add_argument("--instance", help="instance name in metrics and logs (default: service-host-pid)")
    _add_logging(p)


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR", type=str.upper)
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text: one line per record; json: one object per line (for log shippers)",
    )


def _add_limits(p: argparse.ArgumentParser) -> None:
    """Connection limits of a WebSocket server (shared/wsguard.py; docs/security.md)."""
    from shared import wsguard

    g = p.add_argument_group("connection limits")
    g.add_argument(
        "--max-connections",
        type=int,
        default=wsguard.MAX_CONNECTIONS,
        help="open connections per process (lowered to the open-files limit minus a reserve)",
    )
    g.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=wsguard.MAX_CONNECTIONS_PER_IP,
        help="open connections from one peer address",
    )
    g.add_argument(
        "--handshake-timeout",
        type=float,
        default=wsguard.HANDSHAKE_TIMEOUT,
        help="seconds for the HTTP upgrade",
    )
    g.add_argument(
        "--send-timeout",
        type=float,
        default=wsguard.SEND_TIMEOUT,
        help="seconds a client may leave its send buffer full before it is cut off (0: never)",
    )
    g.add_argument(
        "--max-queued-bytes",
        type=int,
        default=wsguard.MAX_QUEUED,
        help="bytes queued for one connection (control frames included) before it is cut off",
    )


def _add_gateway_tuning(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--max-lag", type=int, default=MAX_LAG, help="matcher lag (entries) before new orders get OVERLOADED"
    )
    p.add_argument("--rate-limit", type=float, default=RATE_LIMIT, help="messages per second per connection")


def _add_matcher_tuning(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--checkpoint-every", type=int, default=CHECKPOINT_EVERY, help="stream entries between checkpoints"
    )
    p.add_argument(
        "--checkpoint-seconds", type=float, default=CHECKPOINT_SECONDS, help="seconds between checkpoints"
    )
    p.add_argument("--batch", type=int, default=BATCH, help="most stream entries per read and commit")


def _add_seed_symbol(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed-symbol",
        default=SEED_SYMBOL,
        help="the symbol of the seed's dialect: its orders (they name none), L2_UPDATE and TRADE_REPORT",
    )


def _add_risk(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--risk",
        choices=["on", "off"],
        default="on",
        help="on (default): balances, pre-trade risk checks and funding; off: no balances (the matchers "
        "and gateways of one venue must agree)",
    )


def _add_funding(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin-keys",
        metavar="FILE",
        help="key file (the --api-keys format) of admin sessions, which fund accounts (default: none)",
    )
    p.add_argument(
        "--faucet",
        metavar="SPEC",
        help="starting balance of each account at its first login with --risk on, e.g. "
        '"USDT=1000000,BTC=100"; "none": off (default: USDT=1000000,BTC=100,ETH=1000 in open mode, '
        "none with --api-keys)",
    )


def _add_feeds_tuning(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--depth-interval", type=float, default=DEPTH_INTERVAL, help="seconds between depth messages"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cme",
        description="crypto matching engine",
        formatter_class=CommandsFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = _parser(sub, "up", "run the whole stack on this machine")
    _add_common(up, redis_required=False)
    up.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of `cme up` flags (keys as the flag names: rate-limit = 100); flags given on "
        "the command line win (default: none)",
    )
    up.add_argument("--gateway-port", type=int, default=8000, help="order gateway port (0: any free port)")
    up.add_argument("--md-port", type=int, default=8001, help="market-data feed port (0: any free port)")
    up.add_argument("--trades-port", type=int, default=8002, help="trade feed port (0: any free port)")
    up.add_argument("--web-port", type=int, default=8080, help="trading page (0: any free port, -1: none)")
    up.add_argument(
        "--data-dir", default="./var", help="Redis files, checkpoints, stack.json, Prometheus targets"
    )
    up.add_argument("--feeds", type=int, default=1, help="feed processes (they share the ports)")
    up.add_argument("--gateways", type=int, default=1, help="gateway processes (they share the port)")
    up.add_argument("--matchers", type=int, default=1, help="matcher processes (one active, others standby)")
    up.add_argument("--api-keys", metavar="FILE", help="JSON object api_key -> account (default: open mode)")
    _add_risk(up)
    _add_funding(up)
    up.add_argument("--host", default="127.0.0.1", help="address the services listen on")
    _add_seed_symbol(up)
    up.add_argument(
        "--log-file",
        metavar="FILE",
        help="append every process's log to FILE (default: the terminal's stderr)",
    )
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also start a local Prometheus (the one on PATH) scraping the stack, with the rules",
    )
    up.add_argument("--prometheus-port", type=int, default=9090, help="port of that Prometheus")
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for every service to be ready before saying it is not",
    )
    tuning = up.add_argument_group("service tuning (passed to every matcher, gateway or feed)")
    _add_gateway_tuning(tuning)
    _add_matcher_tuning(tuning)
    _add_feeds_tuning(tuning)
    up.set_defaults(module="services.supervisor")

    matcher = _parser(sub, "matcher", "run the matcher (one per symbol stream)")
    _add_common(matcher)
    matcher.add_argument("--symbols", help="comma-separated symbols to match (default: all instruments)")
    matcher.add_argument("--data-dir", default="./var", help="checkpoint files and their key")
    _add_risk(matcher)
    _add_matcher_tuning(matcher)
    matcher.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoint files kept per symbol")
    matcher.add_argument(
        "--checkpoint-key-file",
        help="HMAC key of checkpoints, created if missing (default: DATA_DIR/checkpoint.key); matchers on "
        "different hosts that share a Redis must share this file",
    )
    matcher.set_defaults(module="services.matcher.service")

    gateway = _parser(sub, "gateway", "run an order gateway")
    _add_common(gateway)
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on")
    gateway.add_argument("--port", type=int, default=8000, help="WebSocket port (0: any free port)")
    gateway.add_argument(
        "--api-keys", metavar="FILE", help="JSON object api_key -> account (default: open mode)"
    )
    _add_risk(gateway)
    _add_funding(gateway)
    _add_gateway_tuning(gateway)
    gateway.add_argument("--max-frame", type=int, default=16_384, help="largest accepted frame in bytes")
    gateway.add_argument(
        "--auth-timeout", type=float, default=10.0, help="seconds from connect to a successful auth (0: none)"
    )
    _add_seed_symbol(gateway)
    _add_limits(gateway)
    gateway.set_defaults(module="services.gateway.server")

    feeds = _parser(sub, "feeds", "run the market-data and trade feeds")
    _add_common(feeds)
    feeds.add_argument("--host", default="127.0.0.1", help="address to listen on")
    feeds.add_argument("--md-port", type=int, default=8001, help="market-data port (0: any free port)")
    feeds.add_argument("--trades-port", type=int, default=8002, help="trade feed port (0: any free port)")
    _add_feeds_tuning(feeds)
    feeds.add_argument(
        "--max-buffer", type=int, default=10_000, help="queued messages before a client is dropped"
    )
    feeds.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="seconds a connection may hold no subscription before it is closed (0: forever)",
    )
    _add_seed_symbol(feeds)
    _add_limits(feeds)
    feeds.set_defaults(module="services.feeds.server")

    stats = _parser(sub, "stats", "live latency table of every stage (p50/p99/p99.9)")
    stats.add_argument(
        "--data-dir", default="./var", help="find the services in this `cme up` data dir's stack.json"
    )
    stats.add_argument(
        "--metrics-port",
        type=int,
        help="instead of --data-dir: the first /metrics port; the following ones are read while they "
        "answer (default: none)",
    )
    stats.add_argument("--metrics-host", default="127.0.0.1", help="host of the /metrics ports")
    stats.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    stats.add_argument("--once", action="store_true", help="print one table (rates over --interval) and exit")
    stats.set_defaults(module="services.stats")

    keys_cmd = _parser(sub, "keys", "manage API keys (stored as SHA-256 digests)")
    keys_sub = keys_cmd.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_add = _parser(keys_sub, "add", "create a key for ACCOUNT, print it once, store its hash")
    keys_add.add_argument("account", metavar="ACCOUNT", help="account the key logs in as")
    keys_add.add_argument(
        "--api-keys", metavar="FILE", required=True, help="key file (created 0600; required)"
    )
    keys_add.set_defaults(module="services.keys_cli")

    for action, text in (
        ("deposit", "credit an account on a running venue"),
        ("withdraw", "debit an account on a running venue"),
        ("balances", "an account's balances on a running venue"),
        ("orders", "an account's open orders on a running venue"),
    ):
        p = _parser(sub, action, text)
        p.add_argument("account", help="the account")
        if action in ("deposit", "withdraw"):
            p.add_argument("asset", help="e.g. USDT")
            p.add_argument("amount", help="a decimal, e.g. 1000.5")
        if action == "orders":
            p.add_argument("--symbol", help="only this symbol (default: every symbol)")
        p.add_argument("--gateway", default="ws://127.0.0.1:8000", help="the gateway's URL")
        p.add_argument(
            "--admin-key", help="admin key (or env CME_ADMIN_KEY; default: none, open mode as the account)"
        )
        p.set_defaults(module="services.accounts_cli", action=action)

    secrets = _parser(sub, "redis-secrets", "Redis ACL file and service URLs for deploy/")
    secrets.add_argument("--out", default="deploy/secrets", help="directory to write (mode 0700)")
    secrets.add_argument("--redis-host", default="redis", help="Redis host name in the services' URLs")
    secrets.add_argument("--redis-port", type=int, default=6379, help="Redis port in the services' URLs")
    secrets.add_argument("--force", action="store_true", help="replace existing credentials (rotation)")
    secrets.set_defaults(module="shared.redis_acl")

    web = _parser(sub, "web", "serve the trading page")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on")
    web.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port)")
    web.add_argument("--gateway-url", default="ws://127.0.0.1:8000", help="order gateway the page uses")
    web.add_argument("--md-url", default="ws://127.0.0.1:8001", help="market-data feed the page uses")
    web.add_argument("--trades-url", default="ws://127.0.0.1:8002", help="trade feed the page uses")
    web.add_argument(
        "--metrics-url",
        action="append",
        help="a service's /metrics to read latency from (repeatable; default: none)",
    )
    web.add_argument("--auth", choices=["open", "api_key"], default="open", help="what the page asks for")
    web.add_argument(
        "--instruments", metavar="FILE", help="JSON list of instrument specs (default: BTC-USDT, ETH-USDT)"
    )
    web.add_argument("--metrics-port", type=int, default=9199, help="port of its own /metrics (0: any)")
    web.add_argument("--metrics-host", help="address of /metrics (default: --host)")
    web.add_argument("--instance", help="instance name in metrics and logs (default: service-host-pid)")
    _add_logging(web)
    web.set_defaults(module="services.web.server")

    demo = _parser(sub, "demo", "play a short client scenario against a running stack")
    demo.add_argument("--gateway", default="ws://127.0.0.1:8000", help="order gateway URL")
    demo.add_argument("--md", default="ws://127.0.0.1:8001", help="market-data feed URL")
    demo.add_argument("--trades", default="ws://127.0.0.1:8002", help="trade feed URL")
    demo.add_argument("--symbol", default="BTC-USDT", help="symbol to trade")
    demo.add_argument(
        "--data-dir", default="./var", help="the stack's data dir (its stack.json: for --restart-check)"
    )
    demo.add_argument(
        "--restart-check",
        action="store_true",
        help="also SIGKILL the stack's matcher and check the book survives its restart",
    )
    demo.set_defaults(module="services.demo")

    fuzz = _parser(sub, "fuzz", "hostile traffic against a gateway and a feed")
    fuzz.add_argument("--seed", type=int, default=1, help="seeds the generated messages")
    fuzz.add_argument("--messages", "-n", type=int, default=200_000, help="messages per server")
    fuzz.add_argument("--connections", type=int, default=2, help="fuzzing connections per server at a time")
    fuzz.add_argument("--gateway", help="ws URL of a running gateway (default: start a stack)")
    fuzz.add_argument("--md", help="ws URL of a running market-data feed (with --gateway; default: none)")
    fuzz.add_argument("--max-rss-mib", type=int, default=256, help="memory bound per service (own stack)")
    fuzz.set_defaults(module="services.fuzz")

    bench = _parser(sub, "bench", "run a benchmark: core, matcher, e2e, feeds or peers")
    bench.add_argument(
        "what",
        choices=["core", "matcher", "e2e", "feeds", "peers"],
        help="core: pure matching; matcher: the matcher service on Redis; e2e: the whole stack;"
        " feeds: the book checksum's share of a feed's CPU; peers: this core against other engines",
    )
    bench.add_argument(
        "--commands", "-n", type=int, default=None, help="commands in the flow (default: per benchmark)"
    )
    bench.add_argument("--seed", type=int, default=42, help="seeds the order flow")
    bench.add_argument("--json", metavar="FILE", help="write the figures as JSON (default: not written)")
    bench.add_argument("--quiet", action="store_true", help="no progress output")
    core = bench.add_argument_group("core")
    core.add_argument("--deep", action="store_true", help="only the deep-book variant")
    core.add_argument("--flat", action="store_true", help="only the default flow")
    core.add_argument("--memory-orders", type=int, default=1_000_000, help="resting orders for bytes/order")
    core.add_argument("--no-memory", action="store_true", help="skip the bytes-per-resting-order phase")
    core.add_argument("--metrics", action="store_true", help="record the matcher's metrics while timing")
    core.add_argument(
        "--order-types",
        choices=("plain", "all"),  # = services.bench.flow.ORDER_TYPES; the CLI imports no service module
        default="plain",
        help="all: also time a flow with stops, GTD, icebergs and quote-quantity orders",
    )
    fbench = bench.add_argument_group("feeds (also --order-types: the flow replayed)")
    fbench.add_argument("--subscribers", type=int, default=10, help="l2 and trades subscribers of the feed")
    fbench.add_argument("--per-payload", type=int, default=4, help="commands per matcher pub/sub payload")
    fbench.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="feeds: timed replays with and without the checksum (default 5); peers: runs per engine (3)",
    )
    pbench = bench.add_argument_group("peers (also --repeats)")
    pbench.add_argument("--prefill", type=int, default=0, help="far passive orders first: 20000 = deep book")
    pbench.add_argument("--engines", default=None, help="comma-separated engines to run (default: all)")
    core.add_argument(
        "--risk",
        choices=("off", "on", "both"),
        default=None,
        help="balances: core: both (default) times the default flow without and with them; matcher: on "
        "runs the venue matcher (balances on, funded accounts), off (default) the per-symbol matcher",
    )
    mbench = bench.add_argument_group("matcher")
    mbench.add_argument("--batch", type=int, default=BATCH, help="most stream entries per read and commit")
    e2e = bench.add_argument_group("e2e")
    e2e.add_argument("--gateway", default=None, help="ws URL of a running gateway (default: start a stack)")
    e2e.add_argument("--clients", type=int, default=8, help="client connections")
    e2e.add_argument(
        "--stack-risk",
        dest="stack_risk",
        choices=("on", "off", "both"),
        default="on",
        help="balances in the stack the bench starts (default: on, as cme up); both: two stacks, one"
        " without and one with, driven in turn with the same plan (--rounds), reporting on / off",
    )
    e2e.add_argument(
        "--rounds", type=int, default=6, help="with --stack-risk both: legs per stack, --duration each"
    )
    e2e.add_argument(
        "--rate", type=float, default=0.0, help="offered orders/s in total (0: as fast as possible)"
    )
    e2e.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    e2e.add_argument(
        "--window",
        type=int,
        default=None,
        help="unanswered orders per client without --rate (default: chosen from --clients)",
    )
    e2e.add_argument(
        "--procs", type=int, default=None, help="load-generating processes (default: from the cores)"
    )
    bench.set_defaults(module="services.bench.runner")

    chaos = _parser(sub, "chaos", "soak: kill, stall and restart processes under load")
    chaos.add_argument("--minutes", type=float, default=2.0, help="length of the soak")
    chaos.add_argument("--seed", type=int, default=1, help="seeds the order flow and the fault schedule")
    chaos.add_argument("--accounts", type=int, default=6, help="trading accounts (one connection each)")
    chaos.add_argument("--rate", type=float, default=300.0, help="order messages per second, all accounts")
    chaos.add_argument(
        "--data-dir",
        default=None,
        help="new or empty dir for logs and data (default: a temp dir, kept on failure)",
    )
    chaos.set_defaults(module="services.chaos.runner")
    return parser


class ConfigError(ValueError):
    """A `cme up --config` file that cannot be used: the message names the file and the key."""


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse offers no public accessor for its subcommands
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def config_defaults(path: Path, up: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags of a TOML config file as argparse defaults of `up` (dest -> value), type-checked."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    actions = {a.dest: a for a in up._actions if a.option_strings and a.dest not in ("help", "config")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"{path}: unknown key {key!r} (keys are `cme up` flags, e.g. rate-limit)")
        if action.nargs == 0:  # a switch: true or false
            ok = type(value) is bool
        elif action.type is int:
            ok = type(value) is int
        elif action.type is float:
            ok = type(value) in (int, float)
            value = float(value) if ok else value
        else:
            ok = type(value) is str
            value = action.type(value) if ok and callable(action.type) else value
        if not ok:
            if action.nargs == 0:
                kind = "true or false"
            else:
                kind = (
                    "an integer" if action.type is int else "a number" if action.type is float else "a string"
                )
            raise ConfigError(f"{path}: {key} must be {kind}")
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}")
        out[dest] = value
    return out


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = getattr(args, "config", None)
    if args.command == "up" and config:
        up = subparser(parser, "up")
        try:
            up.set_defaults(**config_defaults(Path(config), up))
        except ConfigError as exc:
            up.error(str(exc))
        args = parser.parse_args(argv)  # again, so the command line overrides the file
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if "metrics_host" in args and args.metrics_host is None:  # /metrics listens where the service does
        args.metrics_host = getattr(args, "host", None) or "127.0.0.1"
    module = importlib.import_module(args.module)
    code: int = module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
