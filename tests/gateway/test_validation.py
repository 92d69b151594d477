"""Gateway validation: every reject code, exact number handling, and the exact commands produced."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway import validation
from services.gateway.validation import Reject, decode, parse_order, valid_account, valid_client_order_id
from services.matcher.commands import Amend, Cancel, Command, NewOrder
from shared import codes
from shared.ids import entry_to_seq
from shared.instruments import Instrument, OffGrid, default_instruments

INSTRUMENTS = default_instruments()  # tick 0.01, lot 0.00001, min qty 0.00001, max 10000, min notional 0.01

BASE: dict[str, Any] = {
    "op": "new",
    "symbol": "BTC-USDT",
    "side": "buy",
    "type": "limit",
    "price": "100.50",
    "quantity": "2",
    "client_order_id": "c-1",
}


def run(message: str | bytes | dict[str, Any], account: str = "alice") -> Command | Reject | None:
    """Decode (from text, as the server does) and parse; None if the frame is not a JSON object."""
    text = message if isinstance(message, str | bytes) else json.dumps(message)  # big ints too
    msg = decode(text)
    if msg is None:
        return None
    return parse_order(msg, account, INSTRUMENTS)


def new(**changes: Any) -> Command | Reject | None:
    msg = {**BASE, **changes}
    return run({k: v for k, v in msg.items() if v is not _DROP})


_DROP = object()


def code_of(result: Command | Reject | None) -> str:
    assert isinstance(result, dict), f"expected a reject, got {result!r}"
    assert result["type"] == "reject"
    assert result["reason"]
    return str(result["code"])


# Decoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["", "{", "not json", "[1,2]", '"op"', "42", "null", "true", '{"op":"new"', b"\xff\xfe", "{}garbage"],
)
def test_not_a_json_object_is_not_decoded(text: str | bytes) -> None:
    assert decode(text) is None


def test_decode_keeps_exact_number_text_when_floats_appear() -> None:
    msg = decode('{"op":"new","price":0.1000000000000000001,"quantity":1e400}')
    assert msg is not None
    assert msg["price"] == "0.1000000000000000001" and isinstance(msg["price"], validation.JsonNumber)
    assert msg["quantity"] == "1e400"


def test_decode_fast_path_for_strings_and_ints() -> None:
    msg = decode('{"op":"new","price":"1.5","quantity":3}')
    assert msg == {"op": "new", "price": "1.5", "quantity": 3}
    assert type(msg["quantity"]) is int


# New orders: accepted --------------------------------------------------------------------------
def test_limit_order_maps_to_exact_command() -> None:
    assert new() == NewOrder(
        "BTC-USDT", "alice", "buy", "limit", "gtc", 10050, 200000, "c-1", False, "cancel_taker"
    )


def test_market_order_defaults_to_ioc() -> None:
    assert new(type="market", price=_DROP, side="sell", quantity="0.5") == NewOrder(
        "BTC-USDT", "alice", "sell", "market", "ioc", None, 50000, "c-1", False, "cancel_taker"
    )


def test_market_fok_and_null_price() -> None:
    assert new(type="market", tif="fok", price=None) == NewOrder(
        "BTC-USDT", "alice", "buy", "market", "fok", None, 200000, "c-1"
    )


@pytest.mark.parametrize("shorthand", ["ioc", "fok"])
def test_shorthand_type_is_limit_with_that_tif(shorthand: str) -> None:
    result = new(type=shorthand)
    assert isinstance(result, NewOrder)
    assert (result.type, result.tif, result.price) == ("limit", shorthand, 10050)
    assert new(type=shorthand, tif=shorthand) == result


def test_type_defaults_to_limit() -> None:
    assert new(type=_DROP) == new()


@pytest.mark.parametrize(
    ("price", "ticks"),
    [
        ("100.50", 10050),
        (100, 10000),
        (0.1, 10),
        (100.5, 10050),
        ("1e2", 10000),
        ("0.01", 1),
        ("10000000", 1_000_000_000),
        (" 5.00 ", 500),
        (1e-2, 1),
    ],
)
def test_price_forms_read_exactly(price: Any, ticks: int) -> None:
    result = new(price=price, quantity="10")
    assert isinstance(result, NewOrder)
    assert result.price == ticks


@pytest.mark.parametrize(
    ("qty", "lots"), [("2", 200000), (1, 100000), ("0.00001", 1), (1e-05, 1), ("10000", 10**9)]
)
def test_quantity_forms_read_exactly(qty: Any, lots: int) -> None:
    result = new(quantity=qty, price="1000")
    assert isinstance(result, NewOrder)
    assert result.quantity == lots


def test_optional_fields() -> None:
    result = new(client_order_id=_DROP, post_only=True, stp="cancel_both")
    assert result == NewOrder(
        "BTC-USDT", "alice", "buy", "limit", "gtc", 10050, 200000, None, True, "cancel_both"
    )
    assert new(client_order_id=None, post_only=None, stp=None) == NewOrder(
        "BTC-USDT", "alice", "buy", "limit", "gtc", 10050, 200000, None, False, "cancel_taker"
    )
    assert isinstance(new(stp="cancel_maker"), NewOrder)
    assert isinstance(new(extra_field="ignored"), NewOrder)


def test_min_notional_boundary_is_accepted() -> None:
    # 1.00 x 0.01 = 0.01 exactly the minimum notional
    assert isinstance(new(price="1.00", quantity="0.01"), NewOrder)


# New orders: rejects ---------------------------------------------------------------------------
@pytest.mark.parametrize("symbol", ["XRP-USDT", "", None, 1, ["BTC-USDT"], "btc-usdt", _DROP])
def test_unknown_symbol(symbol: Any) -> None:
    assert code_of(new(symbol=symbol)) == codes.UNKNOWN_SYMBOL


@pytest.mark.parametrize("side", ["BUY", "long", "", None, 1, True, ["buy"], _DROP])
def test_invalid_side(side: Any) -> None:
    assert code_of(new(side=side)) == codes.INVALID_SIDE


@pytest.mark.parametrize("otype", ["stop", "LIMIT", "", None, 1, ["limit"], {"a": 1}, "gtc"])
def test_invalid_type(otype: Any) -> None:
    assert code_of(new(type=otype)) == codes.INVALID_TYPE


@pytest.mark.parametrize(
    "changes",
    [
        {"tif": "day"},
        {"tif": "GTC"},
        {"tif": 1},
        {"tif": ["gtc"]},
        {"type": "market", "price": _DROP, "tif": "gtc"},
        {"type": "ioc", "tif": "fok"},
        {"type": "fok", "tif": "gtc"},
        {"post_only": True, "tif": "ioc"},
        {"post_only": True, "type": "fok"},
        {"post_only": True, "type": "market", "price": _DROP},
    ],
)
def test_invalid_tif(changes: dict[str, Any]) -> None:
    assert code_of(new(**changes)) == codes.INVALID_TIF


@pytest.mark.parametrize(
    "price",
    [
        _DROP,
        None,
        "",
        "abc",
        "100.505",
        "100.001",
        100.505,
        "0",
        0,
        "-1",
        -1,
        "-0.01",
        "0.00",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "inf",
        "sNaN",
        True,
        False,
        [1],
        {"p": 1},
        "10000000.01",
        10000001,
        "1e400",
        "1e-400",
        "1" * 65,
        "0." + "0" * 70 + "1",
        2**64,
        10**30,
        "1E+10",
        "0x10",
        "1,5",
    ],
)
def test_invalid_price(price: Any) -> None:
    assert code_of(new(price=price)) == codes.INVALID_PRICE


@pytest.mark.parametrize(
    "raw",
    [
        '"price":NaN',
        '"price":Infinity',
        '"price":-Infinity',
        '"price":1e400',
        '"price":-1e400',
        '"price":1e-400',
        '"price":18446744073709551616',
        '"price":123456789012345678901234567890',
        '"price":100.5000000000000000001',
        '"price":100.505',
        '"price":-100.5',
        '"price":0.0',
    ],
)
def test_invalid_price_literals(raw: str) -> None:
    text = '{"op":"new","symbol":"BTC-USDT","side":"buy","quantity":"1","client_order_id":"c-9",' + raw + "}"
    result = run(text)
    assert code_of(result) == codes.INVALID_PRICE
    assert isinstance(result, dict) and result["client_order_id"] == "c-9"


def test_price_present_on_market_order() -> None:
    assert code_of(new(type="market")) == codes.INVALID_PRICE


@pytest.mark.parametrize(
    "qty",
    [
        _DROP,
        None,
        "",
        "0",
        0,
        "-1",
        "0.000001",
        "0.000015",
        0.000015,
        "10000.00001",
        "20000",
        10001,
        "NaN",
        "Infinity",
        True,
        [1],
        "1e400",
        2**64,
        "1" * 65,
    ],
)
def test_invalid_quantity(qty: Any) -> None:
    assert code_of(new(quantity=qty)) == codes.INVALID_QUANTITY


@pytest.mark.parametrize(
    "raw",
    [
        '"quantity":NaN',
        '"quantity":1e400',
        '"quantity":1.0000000000000000001',
        '"quantity":99999999999999999999999',
    ],
)
def test_invalid_quantity_literals(raw: str) -> None:
    text = '{"op":"new","symbol":"BTC-USDT","side":"buy","price":"100",' + raw + "}"
    assert code_of(run(text)) == codes.INVALID_QUANTITY


def test_quantity_below_min_qty_of_instrument() -> None:
    inst = Instrument("X-Y", lot_size="0.001", min_qty="0.01")
    msg = decode(orjson.dumps({**BASE, "symbol": "X-Y", "quantity": "0.005"}))
    assert msg is not None
    assert code_of(parse_order(msg, "alice", {"X-Y": inst})) == codes.INVALID_QUANTITY


@pytest.mark.parametrize(("price", "qty"), [("0.01", "0.00001"), ("1.00", "0.00999"), ("0.99", "0.01")])
def test_min_notional(price: str, qty: str) -> None:
    assert code_of(new(price=price, quantity=qty)) == codes.MIN_NOTIONAL


def test_market_orders_have_no_min_notional() -> None:
    assert isinstance(new(type="market", price=_DROP, quantity="0.00001"), NewOrder)


@pytest.mark.parametrize(
    "cid", ["", "x" * 37, 1, 1.5, True, ["c"], {"c": 1}, "tab\there", "naïve", "new\nline"]
)
def test_invalid_client_order_id(cid: Any) -> None:
    result = new(client_order_id=cid)
    assert code_of(result) == codes.INVALID_CLIENT_ORDER_ID
    assert isinstance(result, dict) and result["client_order_id"] is None  # never echo a bad one


def test_client_order_id_limits_accepted() -> None:
    assert isinstance(new(client_order_id="x" * 36), NewOrder)
    assert isinstance(new(client_order_id="a b~!@#"), NewOrder)


def test_number_never_passes_for_a_client_order_id() -> None:
    # the exact re-parse (forced by the float price) turns numbers into str subclasses
    text = '{"op":"new","symbol":"BTC-USDT","side":"buy","price":100.5,"quantity":"1","client_order_id":123}'
    assert code_of(run(text)) == codes.INVALID_CLIENT_ORDER_ID


@pytest.mark.parametrize("post_only", [1, 0, "true", "yes", [True]])
def test_post_only_must_be_bool(post_only: Any) -> None:
    assert code_of(new(post_only=post_only)) == codes.INVALID_MESSAGE


@pytest.mark.parametrize("stp", ["none", "CANCEL_TAKER", "", 1, True, ["cancel_taker"]])
def test_invalid_stp(stp: Any) -> None:
    assert code_of(new(stp=stp)) == codes.INVALID_STP


def test_reject_shape_echoes_op_and_client_order_id() -> None:
    assert new(side="up") == {
        "type": "reject",
        "op": "new",
        "client_order_id": "c-1",
        "code": "INVALID_SIDE",
        "reason": codes.reason_for("INVALID_SIDE"),
    }


def test_unknown_op() -> None:
    assert code_of(run({"op": "replace"})) == codes.UNKNOWN_OP


# Cancel ---------------------------------------------------------------------------------------
def test_cancel_by_order_id() -> None:
    assert run({"op": "cancel", "symbol": "ETH-USDT", "order_id": "1732500000000-3"}) == Cancel(
        "ETH-USDT", "alice", entry_to_seq("1732500000000-3"), None
    )


def test_cancel_by_client_order_id() -> None:
    assert run({"op": "cancel", "symbol": "BTC-USDT", "client_order_id": "c-1"}) == Cancel(
        "BTC-USDT", "alice", None, "c-1"
    )


def test_cancel_order_id_wins() -> None:
    result = run({"op": "cancel", "symbol": "BTC-USDT", "order_id": "5-0", "client_order_id": "c-1"})
    assert result == Cancel("BTC-USDT", "alice", entry_to_seq("5-0"), "c-1")


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"symbol": "DOGE-USDT", "order_id": "1-0"}, codes.UNKNOWN_SYMBOL),
        ({"order_id": "1-0"}, codes.UNKNOWN_SYMBOL),
        ({"symbol": "BTC-USDT", "order_id": "abc"}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT", "order_id": "1-"}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT", "order_id": "-1-0"}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT", "order_id": 12345}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT", "order_id": "1-99999999"}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT", "order_id": "1" * 50 + "-0"}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT"}, codes.INVALID_MESSAGE),
        ({"symbol": "BTC-USDT", "client_order_id": ""}, codes.INVALID_CLIENT_ORDER_ID),
        ({"symbol": "BTC-USDT", "client_order_id": 7}, codes.INVALID_CLIENT_ORDER_ID),
    ],
)
def test_cancel_rejects(msg: dict[str, Any], code: str) -> None:
    result = run({"op": "cancel", **msg})
    assert code_of(result) == code
    assert isinstance(result, dict) and result["op"] == "cancel"


# Amend ----------------------------------------------------------------------------------------
def test_amend_price_and_quantity() -> None:
    result = run(
        {"op": "amend", "symbol": "BTC-USDT", "order_id": "7-1", "price": "100.40", "quantity": "1.5"}
    )
    assert result == Amend("BTC-USDT", "alice", entry_to_seq("7-1"), None, 10040, 150000)


def test_amend_one_field_by_client_order_id() -> None:
    assert run({"op": "amend", "symbol": "BTC-USDT", "client_order_id": "c-1", "quantity": 1}) == Amend(
        "BTC-USDT", "alice", None, "c-1", None, 100000
    )
    assert run({"op": "amend", "symbol": "BTC-USDT", "client_order_id": "c-1", "price": 99}) == Amend(
        "BTC-USDT", "alice", None, "c-1", 9900, None
    )


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"symbol": "NOPE", "order_id": "1-0", "price": "1"}, codes.UNKNOWN_SYMBOL),
        ({"symbol": "BTC-USDT", "order_id": "x", "price": "1"}, codes.UNKNOWN_ORDER),
        ({"symbol": "BTC-USDT", "order_id": "1-0"}, codes.INVALID_MESSAGE),
        ({"symbol": "BTC-USDT", "price": "1"}, codes.INVALID_MESSAGE),
        ({"symbol": "BTC-USDT", "order_id": "1-0", "price": "1.001"}, codes.INVALID_PRICE),
        ({"symbol": "BTC-USDT", "order_id": "1-0", "price": "-1"}, codes.INVALID_PRICE),
        ({"symbol": "BTC-USDT", "order_id": "1-0", "price": "NaN"}, codes.INVALID_PRICE),
        ({"symbol": "BTC-USDT", "order_id": "1-0", "quantity": "0"}, codes.INVALID_QUANTITY),
        ({"symbol": "BTC-USDT", "order_id": "1-0", "quantity": "0.000001"}, codes.INVALID_QUANTITY),
        ({"symbol": "BTC-USDT", "order_id": "1-0", "quantity": True}, codes.INVALID_QUANTITY),
        (
            {"symbol": "BTC-USDT", "order_id": "1-0", "price": "0.01", "quantity": "0.00001"},
            codes.MIN_NOTIONAL,
        ),
        ({"symbol": "BTC-USDT", "client_order_id": "x" * 40, "price": "1"}, codes.INVALID_CLIENT_ORDER_ID),
    ],
)
def test_amend_rejects(msg: dict[str, Any], code: str) -> None:
    result = run({"op": "amend", **msg})
    assert code_of(result) == code
    assert isinstance(result, dict) and result["op"] == "amend"


def test_amend_literal_nan() -> None:
    assert (
        code_of(run('{"op":"amend","symbol":"BTC-USDT","order_id":"1-0","price":NaN}')) == codes.INVALID_PRICE
    )


# Accounts and client order ids -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alice", "a", "A_b.c@d-e", "x" * 64, "0123456789"])
def test_valid_accounts(name: str) -> None:
    assert valid_account(name)


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "al ice", "bob\n", "eve\t", "mal/lory", "émile", 7, None, ["a"]]
)
def test_invalid_accounts(name: Any) -> None:
    assert not valid_account(name)


def test_client_order_id_rule() -> None:
    assert valid_client_order_id("c-1") and valid_client_order_id("~" * 36)
    assert not valid_client_order_id("") and not valid_client_order_id("\x7f")


# The integer fast path agrees with the exact Decimal path ----------------------------------------
GRIDS = [
    Instrument("A-B"),
    Instrument("C-D", tick_size="0.05", lot_size="0.001", min_qty="0.001", max_qty="500", max_price="1000"),
    Instrument("E-F", tick_size="5", lot_size="10", min_qty="10", max_qty="100000", max_price="100000"),
    Instrument("G-H", tick_size="0.00000001", lot_size="1", min_qty="1", max_qty="1000000", max_price="0.5"),
]


def slow(convert: Any, value: Any) -> int | None:
    try:
        return int(convert(value))
    except OffGrid:
        return None


@given(
    whole=st.text("0123456789", min_size=0, max_size=22),
    frac=st.none() | st.text("0123456789", min_size=0, max_size=22),
    inst=st.sampled_from(GRIDS),
)
@settings(max_examples=3000, deadline=None)
def test_fast_units_match_the_decimal_path(whole: str, frac: str | None, inst: Instrument) -> None:
    text = whole if frac is None else f"{whole}.{frac}"
    expected = slow(inst.price_to_ticks, text)
    assert validation._ticks(inst, text) == expected, text
    lots = slow(inst.qty_to_lots, text)
    expected_lots = lots if lots is not None and lots >= inst.min_qty_lots else None
    assert validation._lots(inst, text) == expected_lots, text


@given(units=st.integers(min_value=-5, max_value=10**12), inst=st.sampled_from(GRIDS))
@settings(max_examples=1000, deadline=None)
def test_fast_units_round_trip(units: int, inst: Instrument) -> None:
    text = inst.price_str(units)
    expected = units if 0 < units <= inst.max_price_ticks else None
    assert validation._ticks(inst, text) == expected


@given(text=st.text("0123456789.+-e_ x\u0660\u00b2", max_size=30), inst=st.sampled_from(GRIDS))
@settings(max_examples=3000, deadline=None)
def test_fast_units_agree_on_arbitrary_text(text: str, inst: Instrument) -> None:
    assert validation._ticks(inst, text) == slow(inst.price_to_ticks, text), text


def test_tiny_increments_take_the_exact_path() -> None:
    inst = Instrument("T-Y", tick_size="1e-61", max_price="0.001")
    assert validation._ticks(inst, "0.00001") == 10**56
    assert validation._ticks(inst, "1E-61") == 1
    assert validation._ticks(inst, "1") is None  # too large
    huge = Instrument("T-Z", tick_size="1e-70", max_price="1")
    assert validation._ticks(huge, "1") is None  # beyond the exact path's 60 digits: refused, not raised
