"""Per-connection session logic: authentication, rate limit, tolerance for bad messages. Pure.

The server decodes a frame (validation.decode) and hands the result here with the current time; the
answer is either a Command to append or a message to send back. Nothing here does I/O or reads a clock,
so every rule is testable with injected time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from services.gateway import validation
from services.gateway.validation import Message, Reject
from services.matcher.commands import Command
from shared import codes
from shared.instruments import Instrument

AUTH: Final = "auth"
PING: Final = "ping"
MAX_BAD_MESSAGES: Final = 20  # consecutive; then the connection is closed (1008)
BAD_MESSAGES_REASON: Final = "too many invalid messages"
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
    """Open mode (self-declared accounts) without API keys; otherwise the key names the account."""

    def __init__(self, api_keys: Mapping[str, str] | None = None) -> None:
        self.api_keys = dict(api_keys) if api_keys is not None else None
        for account in (self.api_keys or {}).values():
            if not validation.valid_account(account):
                raise ValueError(f"API key file: invalid account name {account!r}")

    @property
    def open_mode(self) -> bool:
        return self.api_keys is None

    def authenticate(self, msg: Mapping[str, Any]) -> str | Reject:
        """The account of an auth message, or a reject."""
        if self.api_keys is None:
            account = msg.get("account")
            if account is None:
                return validation.reject(
                    codes.UNAUTHENTICATED, AUTH, reason='open mode: declare an account ("account")'
                )
            if not validation.valid_account(account):
                return validation.reject(codes.INVALID_ACCOUNT, AUTH)
            return str(account)
        key = msg.get("api_key")
        found = self.api_keys.get(key) if type(key) is str else None
        if found is None:
            reason = "unknown api key" if key is not None else 'api key required ("api_key")'
            return validation.reject(codes.UNAUTHENTICATED, AUTH, reason=reason)
        return found


def load_api_keys(path: str) -> dict[str, str]:
    """An API key file: a JSON object api_key -> account."""
    with open(path, "rb") as f:
        data = orjson.loads(f.read())
    if type(data) is not dict or not all(type(k) is str and type(v) is str for k, v in data.items()):
        raise ValueError(f"{path}: expected a JSON object of api_key -> account strings")
    if not data:
        raise ValueError(f"{path}: no API keys")
    return data


class Session:
    """One connection's state. `handle` turns a decoded message into a Command or a reply."""

    __slots__ = ("account", "auth", "bad", "bucket", "close_reason", "instruments", "max_bad")

    def __init__(
        self,
        auth: Authenticator,
        instruments: Mapping[str, Instrument],
        rate: float,
        now: float,
        burst: float | None = None,
        max_bad: int = MAX_BAD_MESSAGES,
    ) -> None:
        self.auth = auth
        self.instruments = instruments
        self.account: str | None = None
        self.bucket = TokenBucket(rate, burst, now)
        self.bad = 0  # consecutive bad messages
        self.max_bad = max_bad
        self.close_reason: str | None = None  # set when the connection must be closed (1008)

    def handle(self, msg: Message | None, now: float) -> Command | Message:
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
                return validation.reject(codes.UNAUTHENTICATED, op, msg.get("client_order_id"))
            result = validation.parse_order(msg, self.account, self.instruments)
            if type(result) is dict:
                return self._bad(result) if result["code"] in _BAD_CODES else self._good(result)
            self.bad = 0
            return result
        if op == AUTH:
            account = self.auth.authenticate(msg)
            if not isinstance(account, str):
                return self._bad(account)  # repeated failures close the connection (key guessing)
            self.account = account
            return self._good({"type": "authenticated", "account": account})
        if op == PING:
            pong: Message = {"type": "pong"}
            if type(msg.get("id")) in (str, int):  # lets a client match pongs to pings
                pong["id"] = msg["id"]
            return self._good(pong)
        return self._bad(validation.reject(codes.UNKNOWN_OP, op, msg.get("client_order_id")))

    def _good(self, reply: Message) -> Message:
        self.bad = 0
        return reply

    def _bad(self, reply: Message) -> Message:
        self.bad += 1
        if self.bad >= self.max_bad:
            self.close_reason = BAD_MESSAGES_REASON
        return reply
