"""`cme deposit | withdraw | balances | orders`: an operator's view of accounts on a running venue.

They talk to a gateway like any client (the cme_client library): with --admin-key (or CME_ADMIN_KEY)
as the venue's admin, naming the account; without one, in open mode, as the account itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from cme_client import Client, ClientError, Rejected

ADMIN_KEY_ENV = "CME_ADMIN_KEY"  # keeps the key out of `ps` and shell history


def _client(args: argparse.Namespace) -> tuple[Client, str | None]:
    """The session, and the account to name in requests (None: the session's own)."""
    key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if key:
        return Client(args.gateway, admin_key=key, reconnect=False), args.account
    return Client(args.gateway, account=args.account, reconnect=False), None


async def _run(args: argparse.Namespace) -> int:
    client, named = _client(args)
    async with client:
        if args.action in ("deposit", "withdraw"):
            request = client.deposit if args.action == "deposit" else client.withdraw
            ack = await request(args.asset, args.amount, account=named)
            print(f"{args.action} of {ack['amount']} {ack['asset']} to {ack['account']} queued")
            return 0
        if args.action == "balances":
            balances = await client.balances(named)
            print(f"{'asset':<8} {'available':>28} {'held':>28}")
            for asset, amounts in sorted(balances.items()):
                print(f"{asset:<8} {amounts['available']:>28} {amounts['held']:>28}")
            return 0
        orders: list[dict[str, Any]] = await client.open_orders(args.symbol, account=named)
        print(
            f"{'order_id':<20} {'symbol':<10} {'side':<5} {'type':<11} {'price':>14} {'remaining':>14} status"
        )
        for o in orders:
            price = o["price"] if o["price"] is not None else "-"
            print(f"{o['order_id']:<20} {o['symbol']:<10} {o['side']:<5} {o['order_type']:<11} {price:>14} "
                  f"{o['remaining_quantity']:>14} {o['status']}")  # fmt: skip
        return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except Rejected as exc:
        print(f"cme {args.action}: refused: {exc}", file=sys.stderr)
        return 1
    except (ClientError, OSError, TimeoutError) as exc:
        print(f"cme {args.action}: {exc}", file=sys.stderr)
        return 2
