"""Spot balances, holds and settlement, inside the pure core: the same commands give the same balances.

Per account and asset there is an ``available`` and a ``held`` amount, integers of the asset's unit
(10^-places, shared.instruments.asset_scales), so every notional and every fee is exact. The engine
(engine.py) calls the ledger at the few points where money moves:

- an order is accepted: it holds what it may need (``Market.hold_for``): a priced buy its price x
  quantity x (1 + the higher fee rate) of quote, a sell its quantity of base; a market buy holds
  nothing but must be able to pay the fills the book offers it (the engine walks the book);
- a fill settles within its command: the buyer's hold at its limit price is released and it pays
  notional + fee, the seller's held base goes to the buyer and it receives notional - fee, and the
  fees go to the venue's account ``_fees``. The maker's side settles at each fill (``Ledger.fill``),
  the taker's once for all its fills of the command (``Ledger.settle_taker``): its notional and fee
  are sums of price x lots, so one addition per fill gives them exactly;
- whatever ends an order without a fill (cancel, expiry, IOC remainder, self-trade prevention, mass
  cancel) releases what the rest still holds (``Ledger.release``).

So, per asset, the sum over all accounts of available + held equals deposits minus withdrawals after
every command, and each account's held is exactly what its open orders need.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared import codes
from shared.events import BALANCE, FUNDED, REJECTED, Event
from shared.ids import FEES_ACCOUNT, MAX_ACCOUNT, MAX_REQUEST_ID, RESERVED_PREFIX
from shared.instruments import FEE_DENOM, MAX_AMOUNT_UNITS, Instrument, asset_scales, scale_of


class Balance:
    """One account's amount of one asset: ``available`` to spend and ``held`` for open orders.
    ``seen`` is the ledger's command count when it was last recorded as touched, so a command lists
    each balance it changed once, in first-touch order, without a lookup; ``next`` links the
    command's list (Ledger._mark). A chain, not a list: a command's list is a few balances, and a
    list's buffer would be freed and allocated again on every command.

    ``held_box`` is ``held`` as the int object the last `balance` event from flush carried,
    ``held_boxed`` the value it holds, and the same for ``available``: a fill leaves the buyer's held
    base, the seller's available base and held quote and the fee account's held as they were, and
    the compiled build, which keeps the amounts unboxed, then gives the next event that object
    instead of allocating a new one (4 of the 10 amounts of a typical fill's 5 balances)."""

    __slots__ = (
        "account",
        "asset",
        "available",
        "available_box",
        "available_boxed",
        "held",
        "held_box",
        "held_boxed",
        "next",
        "seen",
    )

    def __init__(self, account: str, asset: str, available: int = 0, held: int = 0) -> None:
        self.account, self.asset = account, asset
        self.available, self.held = available, held
        self.available_box: object = available
        self.available_boxed = available
        self.held_box: object = held
        self.held_boxed = held
        self.seen = -1
        self.next: Balance | None = None


class Funds:
    """One account's two balances on one market, made once (Market.pairs) and kept by its orders
    (book.O_FUNDS): an object, not a tuple, as the compiled build would copy a tuple into a new one
    wherever it is stored."""

    __slots__ = ("base", "quote")

    def __init__(self, quote: Balance, base: Balance) -> None:
        self.quote, self.base = quote, base


class Market:
    """One instrument as the ledger sees it: its two assets and the factors from ticks and lots to
    asset units."""

    __slots__ = (
        "base",
        "bf",
        "buy_rate",
        "fee_balance",
        "fee_q",
        "maker_buys_net",
        "maker_q",
        "maker_sells_net",
        "max_lot_cost",
        "notional",
        "pairs",
        "quote",
        "taker_cost",
        "taker_q",
        "taker_sells_net",
    )

    def __init__(self, inst: Instrument, scales: dict[str, int]) -> None:
        if inst.maker_rate < 0 or inst.taker_rate < 0:
            raise ValueError(f"{inst.symbol}: balances need fee rates of at least 0")
        pm, pk = scale_of(inst.tick_size)
        qm, qk = scale_of(inst.lot_size)
        self.base, self.quote = inst.base_asset, inst.quote_asset
        self.bf = qm * _pow10(scales[self.base] - qk)  # base units per lot
        self.notional = pm * qm * _pow10(scales[self.quote] - pk - qk)  # quote units per tick x lot
        self.maker_q = _per_tick_lot(inst.maker_rate, self.notional)  # fees, the same
        self.taker_q = _per_tick_lot(inst.taker_rate, self.notional)
        # A resting buy may fill as maker or taker: it holds at the higher rate of the two.
        self.buy_rate = self.notional + max(self.maker_q, self.taker_q)
        # Per tick x lot of a fill, what each side's quote balance gains or pays; all at least 0, so
        # that the compiled build multiplies them natively (it takes the slow path for a negative).
        self.taker_cost = self.notional + self.taker_q  # a buying taker pays this
        self.taker_sells_net = self.notional - self.taker_q  # a selling taker receives this
        self.maker_buys_net = self.buy_rate - self.notional - self.maker_q  # a buying maker: freed - paid
        self.maker_sells_net = self.notional - self.maker_q
        self.fee_q = self.maker_q + self.taker_q  # the venue's, both sides
        self.max_lot_cost = inst.max_price_ticks * self.taker_cost  # a buying taker's most per lot
        # The ledger's own Balance objects, found once: per account that has traded here its Funds
        # (quote and base), and the venue's fee balance. A fill then needs no lookup at all for an
        # order that keeps its Funds, and one per side otherwise.
        self.pairs: dict[str, Funds] = {}
        self.fee_balance: Balance | None = None

    def hold_for(self, buy: bool, price: int | None, lots: int) -> int:
        """What an open order of `lots` needs held: in quote for a priced buy, in base for a sell,
        nothing for a market buy (it pays as it fills)."""
        if price is None:  # a market order
            return 0 if buy else lots * self.bf
        return self.hold_priced(buy, price, lots)

    def hold_priced(self, buy: bool, ticks: int, lots: int) -> int:
        """hold_for() of an order with a price, as a native int."""
        return ticks * (lots * self.buy_rate) if buy else lots * self.bf

    def asset_of(self, buy: bool) -> str:
        return self.quote if buy else self.base


class Ledger:
    """Every account's balances. Per command, the balances that changed are chained in first-touch
    order from ``head`` (a sentinel) to ``last``: the engine turns them into `balance` events
    (``flush``), which starts the next command's chain; ``touched`` says whether there is any."""

    __slots__ = (
        "accounts",
        "commands",
        "fee_market",
        "fees_due",
        "granted",
        "head",
        "last",
        "markets",
        "scales",
        "t_amount",
        "t_base",
        "t_quote",
        "touched",
    )

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        insts = list(instruments)
        self.scales = asset_scales(insts)
        self.markets = {inst.symbol: Market(inst, self.scales) for inst in insts}
        self.accounts: dict[str, dict[str, Balance]] = {}
        self.head = self.last = Balance("", "")
        self.touched = False  # whether the current command has changed any balance (head.next onwards)
        self.commands = 0  # flushes so far: the mark of this command's touched balances
        self.granted: set[str] = set()  # accounts the faucet has funded
        # The current command's fees, in quote units of the market its fills are on, not yet credited
        # (flush): one balance for all the fills.
        self.fee_market: Market | None = None
        self.fees_due = 0
        # The current taker's balances, found at its first fill, and what its fills so far owe it or
        # it owes in quote (fill, settle_taker).
        self.t_quote: Balance | None = None
        self.t_base: Balance | None = None
        self.t_amount = 0

    def balances(self) -> dict[str, dict[str, list[int]]]:
        """Every pair ever touched, as [available, held] (a snapshot's form)."""
        return {
            account: {asset: [bal.available, bal.held] for asset, bal in assets.items()}
            for account, assets in self.accounts.items()
        }

    def set_balances(self, balances: dict[str, dict[str, list[int]]]) -> None:
        """Replace every balance (a snapshot's restore); nothing is recorded as touched."""
        self.accounts = {
            account: {asset: Balance(account, asset, bal[0], bal[1]) for asset, bal in assets.items()}
            for account, assets in balances.items()
        }
        self._next_command()
        self.fee_market, self.fees_due = None, 0
        for m in self.markets.values():
            m.pairs.clear()
            m.fee_balance = None

    def available(self, account: str, asset: str) -> int:
        """Read only: an account that never had funds has none (and gets no record)."""
        bal = self.accounts.get(account, {}).get(asset)
        return 0 if bal is None else bal.available

    def _get(self, account: str, asset: str) -> Balance:
        """The pair's balance (created at zero), recorded as touched by this command."""
        bal = self._find(self._wallet(account), account, asset)
        self._mark(bal)
        return bal

    def _wallet(self, account: str) -> dict[str, Balance]:
        assets = self.accounts.get(account)
        if assets is None:
            assets = self.accounts[account] = {}
        return assets

    def _find(self, assets: dict[str, Balance], account: str, asset: str) -> Balance:
        """The pair's balance in the account's wallet `assets`, created at zero (not yet touched)."""
        bal = assets.get(asset)
        if bal is None:
            bal = assets[asset] = Balance(account, asset)
        return bal

    def _mark(self, bal: Balance) -> None:
        """Record `bal` as changed by this command, once, in first-touch order."""
        if bal.seen != self.commands:
            bal.seen = self.commands
            bal.next = None
            self.last.next = bal
            self.last = bal
            self.touched = True

    def hold(self, m: Market, account: str, buy: bool, amount: int, funds: Funds | None = None) -> bool:
        """Move `amount` of what an order on `m` pays with (quote for a buy, base for a sell) from
        available to held; False (and no change) if available is short. `funds`: the account's, if
        the caller has them (self.funds)."""
        if not amount:
            return True
        bal = self._payer(m, funds, account, buy)
        if bal is None or bal.available < amount:
            return False
        bal.available -= amount
        bal.held += amount
        self._mark(bal)
        return True

    def funds(self, m: Market, account: str) -> Funds | None:
        """The account's (quote, base) balances on `m`, None unless it has both; always None for the
        venue's own accounts (reserved names), which never trade. The engine looks them up once per
        order: the order's hold, its fills and its cancel use them (an order keeps them, see
        book.O_FUNDS)."""
        pair = m.pairs.get(account)
        return pair if pair is not None else self._funded_pair(m, account)

    def hold_single(
        self, m: Market, funds: Funds | None, account: str, buy: bool, ticks: int, lots: int, symbol: str
    ) -> Event | None:
        """hold() for a priced order of a command that changes no other balance (a limit order that
        joins the book): its `balance` event, with nothing recorded as touched; None (and no change)
        if available is short. `funds` is the account's (self.funds)."""
        amount = m.hold_priced(buy, ticks, lots)
        if funds is not None:  # _payer's first step written out: the path of most commands
            bal: Balance | None = funds.quote if buy else funds.base
        else:
            bal = self._payer(m, None, account, buy)
        if bal is None or bal.available < amount:
            return None
        available = bal.available = bal.available - amount
        held = bal.held = bal.held + amount
        return (BALANCE, symbol, account, bal.asset, available, held)

    def _payer(self, m: Market, funds: Funds | None, account: str, buy: bool) -> Balance | None:
        """The balance an order on `m` pays with (quote for a buy, base for a sell): from the
        account's `funds`, found if the caller has none, or None if the account has no such balance:
        an account is never given a record by a hold it cannot pay."""
        if funds is None:
            funds = self.funds(m, account)
        if funds is not None:
            return funds.quote if buy else funds.base
        wallet = self.accounts.get(account)  # an account without both assets
        return wallet.get(m.asset_of(buy)) if wallet is not None else None

    def release(self, m: Market, account: str, buy: bool, amount: int) -> None:
        """Give back `amount` that an order on `m` held (see hold)."""
        if not amount:
            return
        bal = self._holder(m, account, buy)
        bal.held -= amount
        bal.available += amount
        self._mark(bal)

    def release_single(
        self, m: Market, funds: Funds | None, account: str, buy: bool, ticks: int, lots: int, symbol: str
    ) -> Event:
        """release() of what `lots` of a resting order at `ticks` held, for a command that changes no
        other balance (a cancel): its `balance` event, with nothing recorded as touched. `funds` is
        what the order kept (book.O_FUNDS)."""
        if funds is not None:  # as in hold_single
            bal = funds.quote if buy else funds.base
        else:
            bal = self._holder(m, account, buy)
        amount = m.hold_priced(buy, ticks, lots)
        held = bal.held = bal.held - amount
        available = bal.available = bal.available + amount
        return (BALANCE, symbol, account, bal.asset, available, held)

    def _holder(self, m: Market, account: str, buy: bool) -> Balance:
        """The balance an order on `m` holds in (see _payer), for a release: it exists, since the
        hold made it."""
        pair = m.pairs.get(account)
        if pair is None:
            return self._find(self._wallet(account), account, m.asset_of(buy))
        return pair.quote if buy else pair.base

    def _funded_pair(self, m: Market, account: str) -> Funds | None:
        """The account's (quote, base) of `m` when it has both (kept for the next lookup), else None
        (and for a reserved name: Market.pairs never holds one, see funds)."""
        wallet = self.accounts.get(account)
        if wallet is None or account.startswith(RESERVED_PREFIX):
            return None
        quote, base = wallet.get(m.quote), wallet.get(m.base)
        if quote is None or base is None:
            return None
        pair = m.pairs[account] = Funds(quote, base)
        return pair

    def fill(
        self,
        m: Market,
        price: int,
        lots: int,
        maker: Funds,
        maker_buys: bool,
        taker: str,
        taker_funds: Funds | None,
    ) -> None:
        """Settle the maker's side of one fill of `lots` at `price` (`maker`: the maker's balances,
        see pair), and add the taker's quote amount and the venue's fees to what the command owes
        (``t_amount``, ``fees_due``), for settle_taker and flush. The taker's balances (its
        `taker_funds`, or found) are marked at its first fill, so that every fill marks the buyer's
        quote and base, then the seller's base and quote (the events' order). Every amount is price x
        lots times a per-market factor (Market), the small factors multiplied first: the compiled
        build multiplies natively only when both operands are below 2^30, and takes the Python-int
        path otherwise."""
        quote, base = maker.quote, maker.base
        if maker_buys:  # its hold at its own price, the trade's, is freed
            quote.held -= m.hold_priced(True, price, lots)
            quote.available += price * (lots * m.maker_buys_net)
            base.available += lots * m.bf
            self._mark(quote)
            self._mark(base)
            if self.t_base is None:
                self._taker(m, taker, taker_funds, False)
            self.t_amount += price * (lots * m.taker_sells_net)
        else:
            if self.t_base is None:
                self._taker(m, taker, taker_funds, True)
            base.held -= m.hold_priced(False, price, lots)
            quote.available += price * (lots * m.maker_sells_net)
            self._mark(base)
            self._mark(quote)
            self.t_amount += price * (lots * m.taker_cost)
        if m is not self.fee_market:
            self._fees_on(m)
        self.fees_due += price * (lots * m.fee_q)

    def _fees_on(self, m: Market) -> None:
        """Fees accrue on `m` from now on. The fills of a command are all on its own book, so the
        previous market's fees are credited here only by a command that trades on two (none does)."""
        if self.fee_market is not None:
            self._credit_fees(self.fee_market)
        self.fee_market = m

    def _credit_fees(self, m: Market) -> None:
        fees = m.fee_balance
        if fees is None:
            fees = m.fee_balance = self._get(FEES_ACCOUNT, m.quote)
        fees.available += self.fees_due
        self._mark(fees)
        self.fees_due = 0

    def _taker(self, m: Market, taker: str, funds: Funds | None, buys: bool) -> None:
        """Take the taker's balances at its first fill and mark them in its side's order (see fill)."""
        if funds is None:
            funds = self.pair(m, taker)
        quote, base = funds.quote, funds.base
        if buys:
            self._mark(quote)
            self._mark(base)
        else:
            self._mark(base)
            self._mark(quote)
        self.t_quote, self.t_base = quote, base

    def settle_taker(self, m: Market, buys: bool, limit: int | None, lots: int) -> None:
        """Settle the taker's side of its fills, `lots` in all: what fill added up in ``t_amount``
        (paid by a buyer, received by a seller), the base, and what those lots held at the taker's
        own `limit` (hold_for: nothing for a market buy, None) is freed."""
        quote, base = self.t_quote, self.t_base
        assert quote is not None and base is not None
        amount = self.t_amount
        self.t_quote = self.t_base = None
        self.t_amount = 0
        freed = m.hold_for(buys, limit, lots)
        if buys:
            quote.held -= freed
            quote.available += freed - amount
            base.available += lots * m.bf
        else:
            base.held -= freed
            quote.available += amount

    def pair(self, m: Market, account: str) -> Funds:
        """The account's (quote, base) balances of the market, created at zero, for a fill: it changes
        (and marks, in its own order) all four of its two sides'."""
        pair = m.pairs.get(account)
        if pair is not None:
            return pair
        wallet = self._wallet(account)
        quote, base = self._find(wallet, account, m.quote), self._find(wallet, account, m.base)
        pair = m.pairs[account] = Funds(quote, base)
        return pair

    # Funding ----------------------------------------------------------------------------------
    def fund(self, op: str, account: Any, asset: Any, amount: Any, request_id: Any) -> Event:
        """A deposit or withdrawal: its `funded` event, or the code it is rejected with."""
        if type(account) is not str or not 0 < len(account) <= MAX_ACCOUNT:
            return _refused(op, account, request_id, codes.INVALID_ACCOUNT)
        if account.startswith(RESERVED_PREFIX) and not (op == "withdraw" and account == FEES_ACCOUNT):
            return _refused(op, account, request_id, codes.INVALID_ACCOUNT)
        if request_id is not None and (
            type(request_id) is not str or not 0 < len(request_id) <= MAX_REQUEST_ID
        ):
            return _refused(op, account, None, codes.INVALID_MESSAGE)
        code = self._amount_code(asset, amount)
        if code is not None:
            return _refused(op, account, request_id, code)
        if op == "withdraw":
            if self.available(account, asset) < amount:
                return _refused(op, account, request_id, codes.INSUFFICIENT_FUNDS)
            self._get(account, asset).available -= amount
        else:
            self._get(account, asset).available += amount
        return (FUNDED, None, op, account, asset, amount, request_id)

    def _amount_code(self, asset: Any, amount: Any) -> str | None:
        """Why (asset, amount) cannot be funded, or None."""
        if type(asset) is not str or asset not in self.scales:
            return codes.UNKNOWN_ASSET
        if type(amount) is not int or not 0 < amount < MAX_AMOUNT_UNITS:
            return codes.INVALID_AMOUNT
        return None

    def grant(self, account: Any, amounts: Any) -> list[Event]:
        """The faucet's deposits (op "faucet"), the first time an account asks; later: nothing."""
        if (
            type(account) is not str
            or not 0 < len(account) <= MAX_ACCOUNT
            or account.startswith(RESERVED_PREFIX)
        ):
            return [_refused("faucet", account, None, codes.INVALID_ACCOUNT)]
        try:
            pairs = [(asset, amount) for asset, amount in amounts]
        except (TypeError, ValueError):
            return [_refused("faucet", account, None, codes.INVALID_MESSAGE)]
        for asset, amount in pairs:
            code = self._amount_code(asset, amount)
            if code is not None:
                return [_refused("faucet", account, None, code)]
        if account in self.granted:
            return []
        self.granted.add(account)
        out: list[Event] = []
        for asset, amount in pairs:
            self._get(account, asset).available += amount
            out.append((FUNDED, None, "faucet", account, asset, amount, None))
        return out

    def flush(self, symbol: str | None, out: list[Event]) -> None:
        """Credit the command's fees, append its `balance` events and start the next command's list."""
        if self.fee_market is not None:
            self._credit_fees(self.fee_market)
            self.fee_market = None
        bal = self.head.next
        while bal is not None:
            available, held = bal.available, bal.held
            if available != bal.available_boxed:
                bal.available_box, bal.available_boxed = available, available
            if held != bal.held_boxed:
                bal.held_box, bal.held_boxed = held, held
            out.append((BALANCE, symbol, bal.account, bal.asset, bal.available_box, bal.held_box))
            bal = bal.next
        self._next_command()

    def _next_command(self) -> None:
        """Empty the touched list; a new mark makes every balance's `seen` stale at once."""
        self.head.next = None
        self.last = self.head
        self.touched = False
        self.commands += 1


def _per_tick_lot(rate: int, notional: int) -> int:
    """A fee rate (over FEE_DENOM) as quote units per tick x lot: exact, as asset_scales makes it."""
    fee, rest = divmod(rate * notional, FEE_DENOM)
    if rest:
        raise ValueError("quote asset scale too coarse for the fee rates")
    return fee


def _pow10(places: int) -> int:
    if places < 0:  # asset_scales gives every asset at least the places its instruments need
        raise ValueError("asset scale finer than its instruments")
    return int(10**places)


def _refused(op: str, account: Any, request_id: Any, code: str) -> Event:
    """A funding command's `rejected` event; its request_id rides in the client_order_id slot."""
    return (
        REJECTED,
        None,
        op,
        None,
        account if type(account) is str else None,
        request_id if type(request_id) is str else None,
        code,
    )
