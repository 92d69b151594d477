"""Session rules with injected time: auth (open and API-key modes), rate limit, bad-message counter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.gateway.sessions import (
    BAD_MESSAGES_REASON,
    Authenticator,
    Session,
    TokenBucket,
    load_api_keys,
)
from services.gateway.validation import decode
from services.matcher.commands import NewOrder
from shared import codes
from shared.instruments import default_instruments

INSTRUMENTS = default_instruments()
ORDER = {
    "op": "new",
    "symbol": "BTC-USDT",
    "side": "buy",
    "price": "10",
    "quantity": "1",
    "client_order_id": "o1",
}


def session(api_keys: dict[str, str] | None = None, rate: float = 0.0, **kw: Any) -> Session:
    return Session(Authenticator(api_keys), INSTRUMENTS, rate, now=0.0, **kw)


def send(s: Session, msg: Any, now: float = 0.0) -> Any:
    text = msg if isinstance(msg, str) else json.dumps(msg)
    return s.handle(decode(text), now)


def code(reply: Any) -> str:
    assert isinstance(reply, dict) and reply["type"] == "reject", reply
    return str(reply["code"])


# Token bucket ---------------------------------------------------------------------------------
def test_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=4, burst=5, now=100.0)  # binary-exact times: no rounding in the test
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(100.125)  # half a token
    assert bucket.take(100.25)  # one token after 0.25 s at 4/s
    assert not bucket.take(100.25)
    assert [bucket.take(200.0) for _ in range(6)] == [True] * 5 + [False]  # refill capped at burst


def test_bucket_default_burst_is_one_second() -> None:
    bucket = TokenBucket(rate=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_clock_stepping_back_adds_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_bucket_disabled() -> None:
    bucket = TokenBucket(rate=0)
    assert all(bucket.take(0.0) for _ in range(10_000))


def test_session_rate_limit_rejects_with_code_and_recovers() -> None:
    s = session(rate=2)
    assert send(s, {"op": "auth", "account": "alice"})["type"] == "authenticated"
    assert isinstance(send(s, ORDER), NewOrder)
    reply = send(s, ORDER)
    assert code(reply) == codes.RATE_LIMITED
    assert reply["client_order_id"] == "o1" and reply["op"] == "new"
    assert code(send(s, "garbage")) == codes.RATE_LIMITED  # counted before anything else
    assert s.bad == 0 and s.close_reason is None  # being throttled is not a protocol error
    assert isinstance(send(s, ORDER, now=0.5), NewOrder)


# Authentication -------------------------------------------------------------------------------
def test_open_mode_auth() -> None:
    s = session()
    assert code(send(s, ORDER)) == codes.UNAUTHENTICATED
    assert send(s, {"op": "auth", "account": "alice"}) == {"type": "authenticated", "account": "alice"}
    assert s.account == "alice"
    result = send(s, ORDER)
    assert isinstance(result, NewOrder) and result.account == "alice"


@pytest.mark.parametrize("account", ["", "has space", "x" * 65, 5, None, ["a"]])
def test_open_mode_refuses_bad_account_names(account: Any) -> None:
    s = session()
    reply = send(s, {"op": "auth", "account": account})
    assert code(reply) in (codes.INVALID_ACCOUNT, codes.UNAUTHENTICATED)
    assert s.account is None


def test_open_mode_without_account_is_unauthenticated() -> None:
    assert code(send(session(), {"op": "auth", "api_key": "k"})) == codes.UNAUTHENTICATED


def test_unauthenticated_cancel_and_amend() -> None:
    s = session()
    assert code(send(s, {"op": "cancel", "symbol": "BTC-USDT", "order_id": "1-0"})) == codes.UNAUTHENTICATED
    assert code(send(s, {"op": "amend", "symbol": "BTC-USDT", "order_id": "1-0", "price": "1"})) == (
        codes.UNAUTHENTICATED
    )


def test_api_key_mode() -> None:
    keys = {"key-a": "alice", "key-b": "bob"}
    s = session(keys)
    assert code(send(s, {"op": "auth", "account": "alice"})) == codes.UNAUTHENTICATED  # self-declared
    assert code(send(s, {"op": "auth", "api_key": "wrong"})) == codes.UNAUTHENTICATED
    assert code(send(s, {"op": "auth", "api_key": 123})) == codes.UNAUTHENTICATED
    assert s.account is None
    assert send(s, {"op": "auth", "api_key": "key-b"}) == {"type": "authenticated", "account": "bob"}
    assert s.account == "bob"


def test_api_key_accounts_must_be_valid() -> None:
    with pytest.raises(ValueError):
        Authenticator({"k": "bad name"})


def test_load_api_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"k1": "alice", "k2": "bob"}')
    assert load_api_keys(str(path)) == {"k1": "alice", "k2": "bob"}
    for bad in ('["k1"]', '{"k1": 5}', "{}"):
        path.write_text(bad)
        with pytest.raises(ValueError):
            load_api_keys(str(path))


# Ping and bad messages --------------------------------------------------------------------------
def test_ping() -> None:
    s = session()
    assert send(s, {"op": "ping"}) == {"type": "pong"}
    assert send(s, {"op": "ping", "id": 7}) == {"type": "pong", "id": 7}


def test_consecutive_bad_messages_close_the_session() -> None:
    s = session(max_bad=5)
    send(s, {"op": "auth", "account": "alice"})
    bad = ["{", "[]", {"no": "op"}, {"op": 5}, {"op": "dance"}]
    for i, msg in enumerate(bad[:4]):
        assert code(send(s, msg)) in (codes.INVALID_MESSAGE, codes.UNKNOWN_OP)
        assert s.bad == i + 1 and s.close_reason is None
    assert isinstance(send(s, ORDER), NewOrder)  # a good message resets the count
    assert s.bad == 0
    for msg in bad:
        send(s, msg)
    assert s.close_reason == BAD_MESSAGES_REASON


def test_business_rejects_do_not_count_as_bad() -> None:
    s = session(max_bad=3)
    send(s, {"op": "auth", "account": "alice"})
    for _ in range(10):
        assert code(send(s, {**ORDER, "price": "1.001"})) == codes.INVALID_PRICE
    assert s.close_reason is None


def test_failed_auth_counts_as_bad() -> None:
    s = session({"k": "alice"}, max_bad=3)
    for _ in range(3):
        send(s, {"op": "auth", "api_key": "guess"})
    assert s.close_reason == BAD_MESSAGES_REASON


def test_unknown_op_echoes_op() -> None:
    reply = send(session(), {"op": "subscribe", "client_order_id": "z"})
    assert reply == {
        "type": "reject",
        "op": "subscribe",
        "client_order_id": "z",
        "code": codes.UNKNOWN_OP,
        "reason": codes.reason_for(codes.UNKNOWN_OP),
    }
