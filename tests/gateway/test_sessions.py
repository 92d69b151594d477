"""Session rules with injected time: auth (open and API-key modes), login throttling, rate limit,
bad-message counter, executions queries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.gateway.sessions import (
    BAD_MESSAGES_REASON,
    FAILED_LOGINS_REASON,
    Authenticator,
    Backoff,
    LoginThrottle,
    Session,
    TokenBucket,
    load_api_keys,
    peer_key,
)
from services.gateway.validation import BalancesQuery, ExecutionsQuery, Submission, decode
from shared import codes
from shared.commands import CancelAll, Deposit, NewOrder, Withdraw
from shared.instruments import asset_scales, default_instruments

INSTRUMENTS = default_instruments()
ORDER = {
    "op": "new",
    "symbol": "BTC-USDT",
    "side": "buy",
    "price": "10",
    "quantity": "1",
    "client_order_id": "o1",
}


KEY_A = "key-a-0123456789abcdefghij"  # 26 characters: keys need at least 22 (128 bits)
KEY_B = "key-b-0123456789abcdefghij"
KEYS = {KEY_A: "alice", KEY_B: "bob"}
WRONG = "wrong-0123456789abcdefghij"


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
    s = session(KEYS)
    assert code(send(s, {"op": "auth", "account": "alice"})) == codes.UNAUTHENTICATED  # self-declared
    assert code(send(s, {"op": "auth", "api_key": WRONG})) == codes.UNAUTHENTICATED
    assert code(send(s, {"op": "auth", "api_key": 123})) == codes.UNAUTHENTICATED
    assert s.account is None
    assert send(s, {"op": "auth", "api_key": KEY_B}) == {"type": "authenticated", "account": "bob"}
    assert s.account == "bob"


def test_api_keys_are_held_as_digests() -> None:
    auth = Authenticator(KEYS)
    assert auth.keys is not None
    assert KEY_A not in repr(vars(auth)) and KEY_A not in repr(auth.keys._accounts)


def test_api_key_accounts_must_be_valid() -> None:
    with pytest.raises(ValueError):
        Authenticator({KEY_A: "bad name"})


@pytest.mark.parametrize("short", ["k", "s3cret", "x" * 21])
def test_short_api_keys_are_refused(short: str) -> None:
    with pytest.raises(ValueError, match="22"):
        Authenticator({short: "alice"})


def test_load_api_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    s = Session(Authenticator(load_api_keys(str(path))), INSTRUMENTS, 0.0, now=0.0)
    assert send(s, {"op": "auth", "api_key": KEY_A}) == {"type": "authenticated", "account": "alice"}
    for bad in ('["k1"]', '{"k1": 5}', "{}", '{"k1": "alice"}'):
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


# Failed logins (issue 13 finding 5) ------------------------------------------------------------------
def auth(s: Session, key: str, now: float) -> Any:
    return send(s, {"op": "auth", "api_key": key}, now)


def test_a_valid_message_does_not_reset_failed_logins() -> None:
    # The bypass: 19 wrong keys, a ping, repeated, made 2,000 guesses a second on one connection.
    s = session(KEYS, max_bad=20)
    for i in range(19):
        assert code(auth(s, WRONG, now=i * 100.0)) == codes.UNAUTHENTICATED
        assert send(s, {"op": "ping"}, now=i * 100.0 + 1) == {"type": "pong"}
    assert s.close_reason is None and s.bad == 0
    auth(s, WRONG, now=2000.0)
    assert s.close_reason == FAILED_LOGINS_REASON


def test_failed_logins_are_not_bad_messages() -> None:
    s = session(KEYS, max_bad=3)
    for i in range(4):
        auth(s, WRONG, now=i * 100.0)
    assert s.bad == 0 and s.close_reason is None
    assert code(send(s, "{", now=500.0)) == codes.INVALID_MESSAGE  # its own count still works
    assert s.bad == 1


def test_backoff_after_five_failures_doubles_up_to_the_cap() -> None:
    s = session(KEYS, max_failed_logins=1000)
    for _ in range(5):
        assert code(auth(s, WRONG, now=0.0)) == codes.UNAUTHENTICATED
    now = 0.0
    for delay in [0.5, 1, 2, 4, 8, 16, 30, 30]:
        # Inside the backoff even the right key is refused: the key is not looked at.
        refused = auth(s, KEY_A, now=now + delay - 0.01)
        assert code(refused) == codes.UNAUTHENTICATED and s.account is None
        assert "too many failed logins" in refused["reason"]
        assert 0 < refused["retry_after_ms"] <= 20
        now += delay
        assert "unknown api key" in auth(s, WRONG, now=now)["reason"]  # checked, and wrong again
    assert auth(s, KEY_A, now=now + 30.0) == {"type": "authenticated", "account": "alice"}


def test_refused_attempts_count_towards_closing() -> None:
    s = session(KEYS)
    for _ in range(5):
        auth(s, WRONG, now=0.0)
    for _ in range(14):
        assert code(auth(s, KEY_A, now=0.1)) == codes.UNAUTHENTICATED
    assert s.close_reason is None and s.failed_logins == 19
    auth(s, KEY_A, now=0.1)
    assert s.close_reason == FAILED_LOGINS_REASON


def test_success_does_not_clear_failures() -> None:
    # A valid key of one's own must not buy fresh guesses at other accounts' keys.
    s = session(KEYS)
    for _ in range(4):
        auth(s, WRONG, now=0.0)
    assert auth(s, KEY_A, now=0.0)["type"] == "authenticated"
    auth(s, WRONG, now=0.0)
    assert code(auth(s, KEY_A, now=0.1)) == codes.UNAUTHENTICATED  # the 5th failure started the backoff


def test_per_peer_backoff_spans_connections() -> None:
    throttle = LoginThrottle()
    auth_ = Authenticator(KEYS)
    for i in range(5):  # five connections from one address, one guess each
        s = Session(auth_, INSTRUMENTS, 0.0, now=0.0, throttle=throttle, peer="10.0.0.7")
        assert "unknown api key" in auth(s, WRONG, now=float(i))["reason"]
    fresh = Session(auth_, INSTRUMENTS, 0.0, now=4.0, throttle=throttle, peer="10.0.0.7")
    assert "too many failed logins" in auth(fresh, KEY_A, now=4.1)["reason"]
    other = Session(auth_, INSTRUMENTS, 0.0, now=4.0, throttle=throttle, peer="10.0.0.8")
    assert auth(other, KEY_A, now=4.1)["type"] == "authenticated"  # another address is not affected
    assert auth(fresh, KEY_A, now=4.5)["type"] == "authenticated"  # 0.5 s after the 5th failure


def test_peer_failures_are_forgotten_after_a_quiet_period() -> None:
    throttle = LoginThrottle(forget_after=600.0)
    conn = Backoff()
    for _ in range(5):
        throttle.failed(conn, "10.0.0.7", 0.0)
    assert throttle.retry_after(Backoff(), "10.0.0.7", 0.1) == pytest.approx(0.4)
    throttle.failed(Backoff(), "10.0.0.7", 601.0)  # the first failure of a new streak
    assert throttle.retry_after(Backoff(), "10.0.0.7", 601.0) == 0.0


def test_peer_records_are_bounded() -> None:
    throttle = LoginThrottle(max_peers=64)
    for i in range(1000):
        throttle.failed(Backoff(), f"10.0.{i // 256}.{i % 256}", 0.0)
        assert len(throttle.peers) <= 64
    assert "10.0.3.231" in throttle.peers  # the newest are kept


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("unix", "unix"),
    ],
)
def test_peer_key(ip: str, key: str) -> None:
    assert peer_key(ip) == key


# Executions queries -----------------------------------------------------------------------------
def test_executions_query_needs_auth() -> None:
    s = session()
    query = {"op": "executions", "symbol": "BTC-USDT", "after": 3}
    assert code(send(s, query)) == codes.UNAUTHENTICATED
    send(s, {"op": "auth", "account": "alice"})
    assert send(s, query) == ExecutionsQuery("BTC-USDT", "alice", 3, 1000)


def test_executions_rejects() -> None:
    s = session(max_bad=2)
    send(s, {"op": "auth", "account": "alice"})
    assert code(send(s, {"op": "executions", "symbol": "XRP-USDT", "after": 0})) == codes.UNKNOWN_SYMBOL
    assert code(send(s, {"op": "executions", "symbol": "BTC-USDT", "after": -1})) == codes.INVALID_MESSAGE
    assert s.bad == 1 and s.close_reason is None
    send(s, {"op": "executions", "symbol": "BTC-USDT", "after": 0, "limit": 0})
    assert s.close_reason == BAD_MESSAGES_REASON


def test_executions_are_rate_limited() -> None:
    s = session(rate=1)
    send(s, {"op": "auth", "account": "alice"})
    reply = send(s, {"op": "executions", "symbol": "BTC-USDT", "after": 0})
    assert code(reply) == codes.RATE_LIMITED and reply["op"] == "executions"


def test_unknown_op_echoes_op() -> None:
    reply = send(session(), {"op": "subscribe", "client_order_id": "z"})
    assert reply == {
        "type": "reject",
        "op": "subscribe",
        "client_order_id": "z",
        "code": codes.UNKNOWN_OP,
        "reason": codes.reason_for(codes.UNKNOWN_OP),
    }


# Funding, balances, cancel_all, admin sessions ------------------------------------------------------
SCALES = asset_scales(INSTRUMENTS.values())
ADMIN_KEY = "admin-0123456789abcdefghij"
ADMINS = {ADMIN_KEY: "ops"}
DEPOSIT = {"op": "deposit", "asset": "USDT", "amount": "10", "request_id": "r-1"}


def venue(api_keys: dict[str, str] | None = None, admin_keys: dict[str, str] | None = ADMINS) -> Session:
    """A session of a venue with balances (risk on)."""
    return Session(Authenticator(api_keys, admin_keys), INSTRUMENTS, 0.0, now=0.0, balances=SCALES)


def login(s: Session, account: str = "alice") -> None:
    assert send(s, {"op": "auth", "account": account}) == {"type": "authenticated", "account": account}


def admin(s: Session) -> None:
    assert send(s, {"op": "auth", "admin_key": ADMIN_KEY}) == {"type": "authenticated", "admin": True}


def entries(result: Any) -> tuple[tuple[str, Any], ...]:
    assert isinstance(result, Submission), result
    return result.entries


def test_risk_off_answers_balances_disabled_even_before_auth() -> None:
    s = session()
    for msg in (DEPOSIT, {**DEPOSIT, "op": "withdraw"}, {"op": "balances"}):
        reply = send(s, msg)
        assert code(reply) == codes.BALANCES_DISABLED
        assert ("request_id" in reply) == (msg["op"] != "balances")
    login(s)
    reply = send(s, DEPOSIT)
    assert code(reply) == codes.BALANCES_DISABLED and reply["request_id"] == "r-1"
    assert s.bad == 0


def test_funding_and_balances_need_a_session() -> None:
    s = venue()
    for op in ("deposit", "withdraw", "balances", "cancel_all"):
        assert code(send(s, {**DEPOSIT, "op": op})) == codes.UNAUTHENTICATED
    assert s.bad == 0


def test_open_mode_account_funds_itself() -> None:
    s = venue()
    login(s)
    assert entries(send(s, DEPOSIT)) == (("BTC-USDT", Deposit("alice", "USDT", 10 * 10**10, "r-1")),)
    assert entries(send(s, {**DEPOSIT, "op": "withdraw", "account": "alice"})) == (
        ("BTC-USDT", Withdraw("alice", "USDT", 10 * 10**10, "r-1")),
    )
    reply = send(s, {**DEPOSIT, "account": "bob"})
    assert code(reply) == codes.UNAUTHENTICATED and reply["request_id"] == "r-1"
    assert "admin" in reply["reason"]


def test_open_mode_reads_any_accounts_balances() -> None:
    s = venue()
    login(s)
    assert send(s, {"op": "balances"}) == BalancesQuery("alice")
    assert send(s, {"op": "balances", "account": "bob"}) == BalancesQuery("bob")
    assert send(s, {"op": "balances", "account": "_fees"}) == BalancesQuery("_fees")
    assert code(send(s, {"op": "balances", "account": "b ob"})) == codes.INVALID_ACCOUNT


def test_api_key_mode_only_an_admin_funds() -> None:
    s = venue(KEYS)
    assert send(s, {"op": "auth", "api_key": KEY_A}) == {"type": "authenticated", "account": "alice"}
    reply = send(s, DEPOSIT)
    assert code(reply) == codes.UNAUTHENTICATED and "admin" in reply["reason"]
    assert code(send(s, {**DEPOSIT, "op": "withdraw", "account": "alice"})) == codes.UNAUTHENTICATED
    assert send(s, {"op": "balances"}) == BalancesQuery("alice")
    assert send(s, {"op": "balances", "account": "alice"}) == BalancesQuery("alice")
    assert code(send(s, {"op": "balances", "account": "bob"})) == codes.UNAUTHENTICATED


def test_admin_session_names_the_account_and_places_no_orders() -> None:
    s = venue(KEYS)
    admin(s)
    assert s.admin == "ops" and s.account is None
    assert entries(send(s, {**DEPOSIT, "account": "bob"})) == (
        ("BTC-USDT", Deposit("bob", "USDT", 10 * 10**10, "r-1")),
    )
    reply = send(s, DEPOSIT)  # no account named
    assert code(reply) == codes.INVALID_ACCOUNT and reply["request_id"] == "r-1"
    assert code(send(s, {**DEPOSIT, "account": "_fees"})) == codes.INVALID_ACCOUNT
    assert code(send(s, {**DEPOSIT, "account": "_x", "op": "withdraw"})) == codes.INVALID_ACCOUNT
    assert entries(send(s, {**DEPOSIT, "account": "_fees", "op": "withdraw"})) == (
        ("BTC-USDT", Withdraw("_fees", "USDT", 10 * 10**10, "r-1")),
    )
    assert send(s, {"op": "balances", "account": "_fees"}) == BalancesQuery("_fees")
    assert code(send(s, {"op": "balances"})) == codes.INVALID_ACCOUNT
    for msg in (ORDER, {"op": "cancel", "symbol": "BTC-USDT", "order_id": "1-0"}, {"op": "cancel_all"}):
        reply = send(s, msg)
        assert code(reply) == codes.UNAUTHENTICATED and reply["reason"] == "an admin session places no orders"
    assert s.bad == 0


def test_admin_login_failures_are_failed_logins() -> None:
    s = venue(KEYS)
    reply = send(s, {"op": "auth", "admin_key": WRONG})
    assert code(reply) == codes.UNAUTHENTICATED and reply["reason"] == "unknown admin key"
    assert s.failed_logins == 1 and s.admin is None
    without = venue(admin_keys=None)
    reply = send(without, {"op": "auth", "admin_key": ADMIN_KEY})
    assert code(reply) == codes.UNAUTHENTICATED and reply["reason"] == "no admin keys are configured"


def test_logging_in_again_replaces_the_session() -> None:
    s = venue()
    admin(s)
    login(s, "carol")
    assert s.admin is None and s.account == "carol"
    assert entries(send(s, DEPOSIT))[0][1].account == "carol"
    admin(s)
    assert s.account is None and code(send(s, ORDER)) == codes.UNAUTHENTICATED


@pytest.mark.parametrize("account", ["_fees", "_x", "_"])
def test_reserved_accounts_cannot_log_in(account: str) -> None:
    assert code(send(venue(), {"op": "auth", "account": account})) == codes.INVALID_ACCOUNT
    with pytest.raises(ValueError, match="invalid account"):
        Authenticator({KEY_A: account})


def test_funding_rejects_of_the_parser_pass_through() -> None:
    s = venue()
    login(s)
    assert code(send(s, {**DEPOSIT, "asset": "DOGE"})) == codes.UNKNOWN_ASSET
    assert code(send(s, {**DEPOSIT, "amount": "-1"})) == codes.INVALID_AMOUNT
    assert s.bad == 0  # business refusals
    assert code(send(s, {**DEPOSIT, "request_id": "x" * 65})) == codes.INVALID_MESSAGE
    assert s.bad == 1  # a malformed message


def test_cancel_all_with_risk_on_or_off() -> None:
    for s in (session(), venue()):
        login(s)
        assert entries(send(s, {"op": "cancel_all", "symbol": "ETH-USDT"})) == (
            ("ETH-USDT", CancelAll("ETH-USDT", "alice", "user")),
        )
        assert len(entries(send(s, {"op": "cancel_all"}))) == len(INSTRUMENTS)
        assert code(send(s, {"op": "cancel_all", "symbol": "X"})) == codes.UNKNOWN_SYMBOL
