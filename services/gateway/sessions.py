"""Per-connection session logic: authentication, login throttling, rate limit, bad messages. Pure.

The server decodes a frame (validation.decode) and hands the result here with the current time; the
answer is either an order's command to append, a Submission (commands to append, then an ack), an
ExecutionsQuery or BalancesQuery to answer, or a message to send back. Nothing here does I/O or reads
a clock, so every rule is testable with injected time.

Who may do what with balances (docs/protocol.md "Balances and funding (gateway)"): in open mode an
account funds itself and may read any account's balances; with API keys only an admin session
(`{"op":"auth","admin_key":...}`) funds, naming the account, and an account reads only its own. An
admin session places no orders.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, Final

from services.gateway import validation
from services.gateway.apikeys import KeyStore
from services.gateway.apikeys import load_api_keys as load_api_keys  # the server's import
from services.gateway.validation import (
    BalancesQuery,
    DeadManRequest,
    ExecutionsQuery,
    Message,
    OpenOrdersQuery,
    OrderCommand,
    OrderStatusQuery,
    Reject,
    Submission,
)
from shared import codes
from shared.instruments import Instrument

AUTH: Final = "auth"
PING: Final = "ping"
MAX_BAD_MESSAGES: Final = 20  # consecutive; then the connection is closed (1008)
BAD_MESSAGES_REASON: Final = "too many invalid messages"
# Failed logins are counted apart from bad messages: nothing but time clears them (a ping, a valid
# order or even a successful login does not), so guessing keys costs the backoff below.
MAX_FAILED_LOGINS: Final = 20  # per connection, refused attempts included; then closed (1008)
FAILED_LOGINS_REASON: Final = "too many failed logins"
LOGIN_FREE_FAILURES: Final = 5  # failures before the backoff starts (per connection and per peer)
LOGIN_BACKOFF: Final = 0.5  # seconds after the 5th failure, doubling with each further one ...
LOGIN_BACKOFF_MAX: Final = 30.0  # ... up to this
LOGIN_FORGET_SECONDS: Final = 600.0  # a peer without a failure for this long starts afresh
MAX_TRACKED_PEERS: Final = 65_536  # bounded memory whatever the number of source addresses
# Rejects that mean the client speaks the protocol wrong (not a business refusal like MIN_NOTIONAL).
_BAD_CODES: Final = frozenset((codes.INVALID_MESSAGE, codes.UNKNOWN_OP))


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. rate <= 0 disables the limit."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.tokens = self.burst
        self.last = now

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        elapsed = now - self.last
        if elapsed > 0:  # a clock that steps back never adds tokens
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Authenticator:
    """Open mode (self-declared accounts) without API keys; otherwise the key names the account.

    api_keys, admin_keys: a KeyStore (load_api_keys), or a mapping plain key -> name (hashed at once).
    An admin key names the admin (for logs), not an account.
    """

    def __init__(
        self,
        api_keys: KeyStore | Mapping[str, str] | None = None,
        admin_keys: KeyStore | Mapping[str, str] | None = None,
    ) -> None:
        self.keys = _store(api_keys)
        self.admin_keys = _store(admin_keys)

    @property
    def open_mode(self) -> bool:
        return self.keys is None

    def authenticate(self, msg: Mapping[str, Any]) -> str | Reject:
        """The account of an auth message, or a reject."""
        if self.keys is None:
            account = msg.get("account")
            if account is None:
                return validation.reject(
                    codes.UNAUTHENTICATED, AUTH, reason='open mode: declare an account ("account")'
                )
            if not validation.valid_account(account):
                return validation.reject(codes.INVALID_ACCOUNT, AUTH)
            return account
        key = msg.get("api_key")
        found = self.keys.account_for(key)
        if found is None:
            reason = "unknown api key" if key is not None else 'api key required ("api_key")'
            return validation.reject(codes.UNAUTHENTICATED, AUTH, reason=reason)
        return found

    def authenticate_admin(self, key: object) -> str | Reject:
        """The admin an admin_key names, or a reject."""
        found = self.admin_keys.account_for(key) if self.admin_keys is not None else None
        if found is None:
            reason = "unknown admin key" if self.admin_keys is not None else "no admin keys are configured"
            return validation.reject(codes.UNAUTHENTICATED, AUTH, reason=reason)
        return found


def _store(keys: KeyStore | Mapping[str, str] | None) -> KeyStore | None:
    return keys if keys is None or isinstance(keys, KeyStore) else KeyStore(keys)


class Backoff:
    """Failed logins of one connection or one peer, and until when attempts are refused."""

    __slots__ = ("failures", "last", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.last = float("-inf")  # time of the last failure
        self.until = float("-inf")  # attempts before this are refused unchecked


def peer_key(ip: str) -> str:
    """What a peer is counted under: its IPv4 address, or its IPv6 /64 (one host's usual share)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class LoginThrottle:
    """Exponential login backoff, per connection (the Session's Backoff) and per peer address.

    One per process, shared by every Session, so that opening new connections does not reset a
    peer's backoff. After `free` failures each failure refuses further attempts for
    base x 2^(failures - free) seconds, at most `cap`; refused attempts are answered without looking
    at the key and do not lengthen the backoff. A peer's record is dropped after `forget_after`
    seconds without a failure, or when `max_peers` records exist (oldest first).
    """

    __slots__ = ("base", "cap", "forget_after", "free", "max_peers", "peers")

    def __init__(
        self,
        free: int = LOGIN_FREE_FAILURES,
        base: float = LOGIN_BACKOFF,
        cap: float = LOGIN_BACKOFF_MAX,
        forget_after: float = LOGIN_FORGET_SECONDS,
        max_peers: int = MAX_TRACKED_PEERS,
    ) -> None:
        self.free, self.base, self.cap = free, base, cap
        self.forget_after, self.max_peers = forget_after, max_peers
        self.peers: dict[str, Backoff] = {}  # insertion order = order of first failure

    def retry_after(self, conn: Backoff, peer: str | None, now: float) -> float:
        """Seconds until an auth attempt may be checked (0: now)."""
        wait = conn.until - now
        state = self.peers.get(peer) if peer is not None else None
        if state is not None:
            wait = max(wait, state.until - now)
        return max(0.0, wait)

    def failed(self, conn: Backoff, peer: str | None, now: float) -> None:
        """Record one checked, failed login."""
        self._fail(conn, now)
        if peer is not None:
            state = self.peers.get(peer)
            if state is None:
                self._make_room(now)
                state = self.peers[peer] = Backoff()
            self._fail(state, now)

    def _fail(self, state: Backoff, now: float) -> None:
        if now - state.last > self.forget_after:
            state.failures = 0
        state.failures += 1
        state.last = now
        over = state.failures - self.free
        if over >= 0:
            state.until = now + min(self.cap, self.base * 2.0 ** min(over, 64))

    def _make_room(self, now: float) -> None:
        peers = self.peers
        if len(peers) < self.max_peers:
            return
        for key in [k for k, v in peers.items() if now - v.last > self.forget_after]:
            del peers[key]
        # Then the oldest, an eighth at a time: at most one sweep per max_peers / 8 new peers.
        while len(peers) > self.max_peers - max(1, self.max_peers // 8):
            del peers[next(iter(peers))]


class Session:
    """One connection's state. `handle` turns a decoded message into a command, a query or a reply.

    throttle: the process's LoginThrottle (a private one if not given: per-connection backoff only);
    peer: the client's IP address, for the per-peer backoff (None: not counted per peer);
    balances: each asset's decimal places (shared.instruments.asset_scales) when the venue keeps
    balances (risk on); None: deposit, withdraw and balances are answered BALANCES_DISABLED.
    """

    __slots__ = (
        "account",
        "admin",
        "auth",
        "bad",
        "balances",
        "bucket",
        "close_reason",
        "failed_logins",
        "instruments",
        "login",
        "max_bad",
        "max_failed_logins",
        "peer",
        "throttle",
    )

    def __init__(
        self,
        auth: Authenticator,
        instruments: Mapping[str, Instrument],
        rate: float,
        now: float,
        burst: float | None = None,
        max_bad: int = MAX_BAD_MESSAGES,
        *,
        throttle: LoginThrottle | None = None,
        peer: str | None = None,
        max_failed_logins: int = MAX_FAILED_LOGINS,
        balances: Mapping[str, int] | None = None,
    ) -> None:
        self.auth = auth
        self.instruments = instruments
        self.balances = balances
        self.account: str | None = None
        self.admin: str | None = None  # the admin's name once authenticated with an admin key
        self.bucket = TokenBucket(rate, burst, now)
        self.bad = 0  # consecutive bad messages
        self.max_bad = max_bad
        self.throttle = throttle if throttle is not None else LoginThrottle()
        self.peer = peer_key(peer) if peer is not None else None
        self.login = Backoff()  # this connection's checked failures
        self.failed_logins = 0  # every auth attempt refused on this connection
        self.max_failed_logins = max_failed_logins
        self.close_reason: str | None = None  # set when the connection must be closed (1008)

    def handle(
        self, msg: Message | None, now: float
    ) -> (
        OrderCommand
        | Submission
        | ExecutionsQuery
        | BalancesQuery
        | OrderStatusQuery
        | OpenOrdersQuery
        | DeadManRequest
        | Message
    ):
        """msg: the decoded frame (None if it is not a JSON object)."""
        if not self.bucket.take(now):
            op, cid = (msg.get("op"), msg.get("client_order_id")) if msg is not None else (None, None)
            return validation.reject(codes.RATE_LIMITED, op, cid)
        if msg is None:
            return self._bad(validation.reject(codes.INVALID_MESSAGE))
        op = msg.get("op")
        if type(op) is not str:
            return self._bad(validation.reject(codes.INVALID_MESSAGE))
        if op in validation.ORDER_OPS:
            if self.account is None:
                self.bad = 0
                return validation.reject(
                    codes.UNAUTHENTICATED, op, msg.get("client_order_id"), self._no_account_reason()
                )
            result = validation.parse_order(msg, self.account, self.instruments)
            if type(result) is dict:
                return self._bad(result) if result["code"] in _BAD_CODES else self._good(result)
            self.bad = 0
            return result
        if op == AUTH:
            return self._auth(msg, now)
        if op == PING:
            pong: Message = {"type": "pong"}
            if type(msg.get("id")) in (str, int):  # lets a client match pongs to pings
                pong["id"] = msg["id"]
            return self._good(pong)
        if op == validation.EXECUTIONS:
            if self.account is None:
                self.bad = 0
                return validation.reject(codes.UNAUTHENTICATED, op)
            query = validation.parse_executions(msg, self.account, self.instruments)
            if type(query) is dict:
                return self._bad(query) if query["code"] in _BAD_CODES else self._good(query)
            self.bad = 0
            return query
        if op == validation.CANCEL_ALL_AFTER:
            if self.account is None:
                self.bad = 0
                return validation.reject(codes.UNAUTHENTICATED, op, reason=self._no_account_reason())
            armed = validation.parse_cancel_all_after(msg, self.account)
            if type(armed) is dict:
                return self._bad(armed)
            self.bad = 0
            return armed
        if op in validation.ACCOUNT_OPS:
            return self._account_op(op, msg)
        if op in validation.ORDER_QUERIES:
            return self._order_query(op, msg)
        return self._bad(validation.reject(codes.UNKNOWN_OP, op, msg.get("client_order_id")))

    def _account_op(self, op: str, msg: Message) -> Submission | BalancesQuery | Message:
        """cancel_all, deposit, withdraw, balances."""
        if op == validation.CANCEL_ALL:
            if self.account is None:
                self.bad = 0
                return validation.reject(codes.UNAUTHENTICATED, op, reason=self._no_account_reason())
            return self._parsed(validation.parse_cancel_all(msg, self.account, self.instruments))
        scales = self.balances
        if scales is None:
            refusal = validation.reject(codes.BALANCES_DISABLED, op)
        elif self.account is None and self.admin is None:
            self.bad = 0
            refusal = validation.reject(codes.UNAUTHENTICATED, op)
        else:
            target = self._target(op, msg.get("account"))
            if type(target) is not dict:
                if op == validation.BALANCES:
                    return self._parsed(validation.parse_balances(target))
                return self._parsed(validation.parse_funding(op, msg, target, self.instruments, scales))
            refusal = target
        if op != validation.BALANCES:  # a funding reject echoes the request_id, as the matcher's do
            rid = msg.get("request_id")
            refusal["request_id"] = rid if validation.valid_request_id(rid) else None
        return self._good(refusal)

    def _order_query(self, op: str, msg: Message) -> OrderStatusQuery | OpenOrdersQuery | Message:
        """order_status and open_orders: the session's own account, or the one an admin names."""
        account = self.account
        named = msg.get("account")
        if self.admin is not None:
            if not validation.valid_account_name(named):
                return self._bad(
                    validation.reject(
                        codes.INVALID_ACCOUNT, op, reason='an admin names the account ("account")'
                    )
                )
            account = str(named)
        elif account is None:
            self.bad = 0
            return validation.reject(codes.UNAUTHENTICATED, op, reason=self._no_account_reason())
        elif named is not None and named != account:
            return self._good(
                validation.reject(
                    codes.UNKNOWN_ORDER if op == validation.ORDER_STATUS else codes.INVALID_ACCOUNT, op
                )
            )
        if op == validation.ORDER_STATUS:
            result: OrderStatusQuery | OpenOrdersQuery | Reject = validation.parse_order_status(
                msg, account, self.instruments
            )
        else:
            result = validation.parse_open_orders(msg, account, self.instruments)
        if type(result) is dict:
            return self._bad(result) if result["code"] in _BAD_CODES else self._good(result)
        self.bad = 0
        return result

    def _parsed(self, result: Submission | BalancesQuery | Reject) -> Submission | BalancesQuery | Message:
        if type(result) is dict:
            return self._bad(result) if result["code"] in _BAD_CODES else self._good(result)
        self.bad = 0
        return result

    def _target(self, op: str, named: object) -> object:
        """Whose balance a deposit / withdraw / balances request is about, or a reject (a dict). The
        name itself is checked by the parser (validation.parse_funding / parse_balances)."""
        if self.admin is not None:
            if named is None:
                return validation.reject(
                    codes.INVALID_ACCOUNT, op, reason='an admin session names the account ("account")'
                )
            return named
        if named is None or named == self.account:
            if op != validation.BALANCES and not self.auth.open_mode:
                return validation.reject(
                    codes.UNAUTHENTICATED, op, reason="with API keys only an admin session funds accounts"
                )
            return self.account
        if op == validation.BALANCES:
            if self.auth.open_mode:
                return named
            return validation.reject(
                codes.UNAUTHENTICATED, op, reason="only an admin session reads another account's balances"
            )
        return validation.reject(
            codes.UNAUTHENTICATED, op, reason="only an admin session funds another account"
        )

    def _no_account_reason(self) -> str | None:
        return "an admin session places no orders" if self.admin is not None else None

    def _auth(self, msg: Message, now: float) -> Message:
        wait = self.throttle.retry_after(self.login, self.peer, now)
        if wait > 0:  # refused without looking at the key: a guess made now is never checked
            reply = validation.reject(
                codes.UNAUTHENTICATED, AUTH, reason=f"too many failed logins: retry in {wait:.1f} s"
            )
            reply["retry_after_ms"] = int(wait * 1000) + 1
            return self._failed_login(reply)
        cancel_on_disconnect = validation.parse_cancel_on_disconnect(msg)
        if type(cancel_on_disconnect) is dict:  # a malformed message, not a failed login
            return self._bad(cancel_on_disconnect)
        admin = "admin_key" in msg
        account = self.auth.authenticate_admin(msg["admin_key"]) if admin else self.auth.authenticate(msg)
        if not isinstance(account, str):
            self.throttle.failed(self.login, self.peer, now)
            return self._failed_login(account)
        if admin:
            self.account, self.admin = None, account
            return self._good({"type": "authenticated", "admin": True})
        self.account, self.admin = account, None
        answer: Message = {"type": "authenticated", "account": account}
        if cancel_on_disconnect is True:  # echoed: the server leases the connection before answering
            answer[validation.CANCEL_ON_DISCONNECT] = True
        return self._good(answer)

    def _failed_login(self, reply: Message) -> Message:
        # Not a bad message (and no reset of that count either): logins have their own limit.
        self.failed_logins += 1
        if self.failed_logins >= self.max_failed_logins:
            self.close_reason = FAILED_LOGINS_REASON
        return reply

    def _good(self, reply: Message) -> Message:
        self.bad = 0
        return reply

    def _bad(self, reply: Message) -> Message:
        self.bad += 1
        if self.bad >= self.max_bad:
            self.close_reason = BAD_MESSAGES_REASON
        return reply
