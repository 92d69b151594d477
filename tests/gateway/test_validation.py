"""Gateway validation: every reject code, exact number handling, and the exact commands produced."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from services.gateway import validation
from services.gateway.validation import (
    ExecutionsQuery,
    Reject,
    decode,
    parse_executions,
    parse_order,
    valid_account,
    valid_client_order_id,
)
from shared import codes
from shared.commands import Amend, Cancel, CancelAll, Command, Deposit, NewOrder, Withdraw
from shared.decimals import units_to_amount
from shared.ids import entry_to_seq
from shared.instruments import Instrument, JsonNumber, asset_scales, default_instruments

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


def code_of(result: object) -> str:
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
    assert msg["price"] == "0.1000000000000000001" and isinstance(msg["price"], JsonNumber)
    assert msg["quantity"] == "1e400"


def test_decode_fast_path_for_strings_and_ints() -> None:
    msg = decode('{"op":"new","price":"1.5","quantity":3}')
    assert msg == {"op": "new", "price": "1.5", "quantity": 3}
    assert type(msg["quantity"]) is int


@pytest.mark.parametrize(
    "text",
    [
        '{"op":"new","price":"1","price":"2"}',
        '{"op":"new","op":"cancel"}',
        b'{"op":"new","quantity":1,"quantity":2}',
        '{"op":"new","client_order_id":"a:b","op":"x"}',  # a colon in a string: the scan cannot tell
        '{"op":"new","price":1.5,"price":2.5}',  # floats: the exact path checks too
        '{"op":"new","x":{"a":1,"a":2}}',  # nested
        '{"op":"new","x":[{"a":1},{"b":1,"b":2}]}',
        '{"op":"new","op":"new"}',  # even when both values agree
        '{"op":"new","\\u006fp":"x"}',  # the same key, escaped
    ],
)
def test_duplicate_keys_are_refused(text: str | bytes) -> None:
    assert decode(text) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"op":"new","client_order_id":"a:b:c"}',
        '{"op":"new","x":{"a":1,"b":2},"y":{"a":1}}',  # ints stay ints on this path
        '{"op":"new","quantity":3,"client_order_id":"a:b"}',
        '{"op":"new","x":"{"}',
        '{"op":"new","x":[]}',
    ],
)
def test_same_key_in_different_objects_is_fine(text: str) -> None:
    assert decode(text) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"op":"\\ud800"}',
        '{"op":"new","client_order_id":"\\udfff"}',
        '{"op":"new","\\ud83d":1}',  # in a key
        '{"op":"new","x":["\\ud800"]}',
        '{"op":"new","price":1.5,"client_order_id":"\\ud800"}',  # on the exact path
        '{"op":"\ud800"}',  # a str that holds the surrogate itself
    ],
)
def test_unencodable_text_is_not_a_message(text: str) -> None:
    # Finding 6 of issue 13: json.loads accepted these and the reject echoing them crashed orjson.dumps.
    assert decode(text) is None


def test_surrogate_pairs_are_fine() -> None:
    msg = decode('{"op":"\\ud83d\\ude00"}')
    assert msg == {"op": "\U0001f600"}
    orjson.dumps(validation.reject(codes.UNKNOWN_OP, msg["op"]))


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
        ("0.01", 1),
        ("0100.5", 10050),
        ("10000000", 1_000_000_000),
        (1e-2, 1),
    ],
)
def test_price_forms_read_exactly(price: Any, ticks: int) -> None:
    result = new(price=price, quantity="10")
    assert isinstance(result, NewOrder)
    assert result.price == ticks


@pytest.mark.parametrize(
    ("literal", "ticks"), [("1e2", 10000), ("1E+2", 10000), ("10050e-2", 10050), ("100.500", 10050)]
)
def test_json_numbers_keep_their_full_grammar(literal: str, ticks: int) -> None:
    # A number literal is what the client wrote: exponents are fine there, only strings are strict.
    text = '{"op":"new","symbol":"BTC-USDT","side":"buy","quantity":"1","price":' + literal + "}"
    result = run(text)
    assert isinstance(result, NewOrder) and result.price == ticks


# Finding 7 of issue 13: these strings all read as 10.00 before.
LENIENT_NUMBER_STRINGS = [
    "\u0661\u0660",  # Arabic-Indic digits
    "\uff11\uff10",  # full-width digits
    "+10",
    " 10.00 ",
    "10 ",
    "\t10",
    "10\n",
    "1e1",
    "1E1",
    "10.",
    ".5",
    "-.5",
    "1_0",
    "10.0\u0660",
    "\u00b9\u2070",  # superscripts
]


@pytest.mark.parametrize("text", LENIENT_NUMBER_STRINGS)
def test_number_strings_are_strict_for_price(text: str) -> None:
    assert code_of(new(price=text)) == codes.INVALID_PRICE
    assert code_of(run({"op": "amend", "symbol": "BTC-USDT", "order_id": "1-0", "price": text})) == (
        codes.INVALID_PRICE
    )


@pytest.mark.parametrize("text", LENIENT_NUMBER_STRINGS)
def test_number_strings_are_strict_for_quantity(text: str) -> None:
    assert code_of(new(quantity=text)) == codes.INVALID_QUANTITY
    assert code_of(run({"op": "amend", "symbol": "BTC-USDT", "order_id": "1-0", "quantity": text})) == (
        codes.INVALID_QUANTITY
    )


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
        "1e2",
        " 5.00 ",
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


# Executions queries (issue 8) ---------------------------------------------------------------------
def executions(**fields: Any) -> ExecutionsQuery | Reject | None:
    msg = decode(json.dumps({"op": "executions", **fields}))
    assert msg is not None
    return parse_executions(msg, "alice", INSTRUMENTS)


@pytest.mark.parametrize(
    ("fields", "query"),
    [
        ({"symbol": "BTC-USDT", "after": 0}, ExecutionsQuery("BTC-USDT", "alice", 0, 1000)),
        ({"symbol": "BTC-USDT", "after": 41, "limit": 5}, ExecutionsQuery("BTC-USDT", "alice", 41, 5)),
        ({"symbol": "ETH-USDT", "after": "17"}, ExecutionsQuery("ETH-USDT", "alice", 17, 1000)),
        (
            {"symbol": "BTC-USDT", "after": "007", "limit": "5000"},
            ExecutionsQuery("BTC-USDT", "alice", 7, 5000),
        ),
        (
            {"symbol": "BTC-USDT", "after": 2**63 - 1, "limit": 1},
            ExecutionsQuery("BTC-USDT", "alice", 2**63 - 1, 1),
        ),
        ({"symbol": "BTC-USDT", "after": 3, "limit": None}, ExecutionsQuery("BTC-USDT", "alice", 3, 1000)),
    ],
)
def test_executions_query(fields: dict[str, Any], query: ExecutionsQuery) -> None:
    assert executions(**fields) == query


def test_executions_after_as_a_big_json_integer() -> None:
    msg = decode('{"op":"executions","symbol":"BTC-USDT","after":9223372036854775807}')
    assert msg is not None
    assert parse_executions(msg, "bob", INSTRUMENTS) == ExecutionsQuery("BTC-USDT", "bob", 2**63 - 1, 1000)
    msg = decode('{"op":"executions","symbol":"BTC-USDT","after":9223372036854775808}')
    assert msg is not None
    assert code_of(parse_executions(msg, "bob", INSTRUMENTS)) == codes.INVALID_MESSAGE


@pytest.mark.parametrize("symbol", ["XRP-USDT", None, 5, "btc-usdt"])
def test_executions_unknown_symbol(symbol: Any) -> None:
    result = executions(symbol=symbol, after=0)
    assert code_of(result) == codes.UNKNOWN_SYMBOL
    assert isinstance(result, dict) and result["op"] == "executions"


@pytest.mark.parametrize(
    "after", [None, -1, 1.0, 1.5, "1.0", "-1", "+1", " 1", "1e3", "", "\u0661", True, [1], "9" * 20, 2**63]
)
def test_executions_bad_after(after: Any) -> None:
    result = executions(symbol="BTC-USDT", after=after)
    assert code_of(result) == codes.INVALID_MESSAGE
    assert isinstance(result, dict) and "after" in result["reason"]


def test_executions_after_is_required() -> None:
    assert code_of(executions(symbol="BTC-USDT")) == codes.INVALID_MESSAGE


@pytest.mark.parametrize("limit", [0, 5001, -1, 1.5, "ten", True, "0", [10]])
def test_executions_bad_limit(limit: Any) -> None:
    result = executions(symbol="BTC-USDT", after=0, limit=limit)
    assert code_of(result) == codes.INVALID_MESSAGE
    assert isinstance(result, dict) and "limit" in result["reason"]


def test_executions_query_is_frozen() -> None:
    query = ExecutionsQuery("BTC-USDT", "alice", 1, 2)
    with pytest.raises(AttributeError):
        query.after = 5  # type: ignore[misc]


def test_tiny_increments_take_the_exact_path() -> None:
    inst = Instrument("T-Y", tick_size="1e-61", max_price="0.001")
    assert validation._ticks(inst, "0.00001") == 10**56
    assert validation._ticks(inst, JsonNumber("1E-61")) == 1
    assert validation._ticks(inst, "1E-61") is None  # a string: no exponent
    assert validation._ticks(inst, "1") is None  # too large
    huge = Instrument("T-Z", tick_size="1e-70", max_price="1")
    assert validation._ticks(huge, "1") is None  # beyond the exact path's 60 digits: refused, not raised


# The other order types ----------------------------------------------------------------------------
def test_the_other_order_types_parse_to_their_command_fields() -> None:
    stop = new(type="stop_limit", stop_price="100.40", tif=_DROP)
    assert isinstance(stop, NewOrder) and (stop.type, stop.tif, stop.stop_price) == (
        "stop_limit",
        "gtc",
        10040,
    )
    smkt = new(type="stop_market", stop_price="99", price=_DROP)
    assert isinstance(smkt, NewOrder) and (smkt.tif, smkt.price, smkt.stop_price) == ("ioc", None, 9900)
    gtd = new(tif="gtd", expire_time="1732500060000")
    assert isinstance(gtd, NewOrder) and gtd.expire_time == 1_732_500_060_000
    ice = new(display_quantity="0.5")
    assert isinstance(ice, NewOrder) and ice.display_quantity == 50_000
    quote = new(type="market", price=_DROP, quantity=_DROP, quote_quantity="10.5")
    assert isinstance(quote, NewOrder) and (quote.quantity, quote.quote_quantity) == (None, 105_000_000)
    assert new(display_quantity=0.5) == ice  # a binary float is read from its exact text


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"type": "stop_limit"}, codes.INVALID_STOP_PRICE),
        ({"type": "stop_limit", "stop_price": "1.001"}, codes.INVALID_STOP_PRICE),
        ({"stop_price": "100"}, codes.INVALID_STOP_PRICE),
        ({"type": "stop_market", "price": _DROP, "tif": "gtc", "stop_price": "1"}, codes.INVALID_TIF),
        ({"tif": "gtd"}, codes.INVALID_EXPIRE_TIME),
        ({"tif": "gtd", "expire_time": -5}, codes.INVALID_EXPIRE_TIME),
        ({"tif": "gtd", "expire_time": 1.5}, codes.INVALID_EXPIRE_TIME),
        ({"expire_time": 1732500060000}, codes.INVALID_EXPIRE_TIME),
        ({"display_quantity": "99"}, codes.INVALID_DISPLAY_QUANTITY),
        ({"display_quantity": "0.000001"}, codes.INVALID_DISPLAY_QUANTITY),
        ({"display_quantity": "0.1", "tif": "ioc"}, codes.INVALID_DISPLAY_QUANTITY),
        (
            {"type": "market", "price": _DROP, "quantity": _DROP, "quote_quantity": "0.00000001"},
            codes.INVALID_QUANTITY,
        ),
        (
            {"type": "market", "price": _DROP, "quantity": _DROP, "quote_quantity": "0.001"},
            codes.MIN_NOTIONAL,
        ),
        ({"type": "market", "price": _DROP, "quote_quantity": "10"}, codes.INVALID_QUANTITY),
        (
            {"type": "market", "price": _DROP, "quantity": _DROP, "tif": "fok", "quote_quantity": "10"},
            codes.INVALID_TIF,
        ),
        ({"quantity": _DROP, "quote_quantity": "10"}, codes.INVALID_QUANTITY),
    ],
)
def test_the_other_order_types_are_checked_at_the_gateway(changes: dict[str, Any], code: str) -> None:
    assert code_of(new(**changes)) == code


# Funding, balances, cancel_all ----------------------------------------------------------------------
SCALES = asset_scales(INSTRUMENTS.values())  # BTC, ETH: 5 places; USDT: 2 + 5 + 3 = 10


def fund(op: str = "deposit", account: object = "alice", **fields: Any) -> validation.Submission | Reject:
    """Decode (from text, as the server does) a funding message and parse it."""
    msg = decode(json.dumps({"op": op, "asset": "USDT", "amount": "1000", **fields}))
    assert msg is not None
    return validation.parse_funding(op, msg, account, INSTRUMENTS, SCALES)


def test_scales_of_the_default_instruments() -> None:
    assert SCALES == {"BTC": 5, "USDT": 10, "ETH": 5}


def test_deposit_goes_to_the_assets_funding_stream_with_exact_units() -> None:
    sub = fund(amount="1000.50", request_id="r-1")
    assert isinstance(sub, validation.Submission)
    assert sub.entries == (("BTC-USDT", Deposit("alice", "USDT", 100050 * 10**8, "r-1")),)
    assert sub.ack == {
        "type": "ack",
        "op": "deposit",
        "request_id": "r-1",
        "account": "alice",
        "asset": "USDT",
        "amount": "1000.5",  # the canonical form of what was credited
    }
    eth = fund("withdraw", asset="ETH", amount=2)
    assert isinstance(eth, validation.Submission)
    assert eth.entries == (("ETH-USDT", Withdraw("alice", "ETH", 200000, None)),)
    assert eth.ack["request_id"] is None and eth.ack["amount"] == "2"


@pytest.mark.parametrize(
    ("literal", "units"),
    [
        ("0.00001", 1),  # BTC's finest unit
        ("1e2", 100 * 10**5),
        ("123456789012345678901", 123456789012345678901 * 10**5),  # beyond 64 bits
    ],
)
def test_amount_json_numbers_are_read_exactly(literal: str, units: int) -> None:
    msg = decode('{"op":"deposit","asset":"BTC","amount":' + literal + "}")
    assert msg is not None
    sub = validation.parse_funding("deposit", msg, "alice", INSTRUMENTS, SCALES)
    assert isinstance(sub, validation.Submission)
    assert sub.entries[0][1] == Deposit("alice", "BTC", units, None)


def test_a_float_amount_is_not_rounded_by_the_fast_decoder() -> None:
    # orjson reads this as the float 0.1 (on BTC's grid); the exact decoder keeps all 19 places.
    msg = decode('{"op":"deposit","asset":"BTC","amount":0.1000000000000000001}')
    assert msg is not None
    assert (
        code_of(validation.parse_funding("deposit", msg, "alice", INSTRUMENTS, SCALES))
        == codes.INVALID_AMOUNT
    )


@pytest.mark.parametrize(
    "amount",
    ["0", "-1", "0.000000000000000001", "1e3", "abc", "", " 1", True, None, [1], 2**96, "NaN"],
)
def test_invalid_amount(amount: Any) -> None:
    result = fund(amount=amount, request_id="r-9")
    assert code_of(result) == codes.INVALID_AMOUNT
    assert isinstance(result, dict) and result["op"] == "deposit" and result["request_id"] == "r-9"


def test_amounts_from_one_unit_to_just_below_the_cores_bound() -> None:
    for amount, ok in (
        ("0.00001", True),
        (units_to_amount(2**96 - 1, 5), True),
        (units_to_amount(2**96, 5), False),
    ):
        result = fund(asset="BTC", amount=amount)
        assert isinstance(result, validation.Submission) if ok else code_of(result) == codes.INVALID_AMOUNT


@pytest.mark.parametrize("asset", ["DOGE", "usdt", "", 5, None, ["USDT"]])
def test_unknown_asset(asset: Any) -> None:
    assert code_of(fund(asset=asset)) == codes.UNKNOWN_ASSET


@pytest.mark.parametrize(
    ("op", "account", "ok"),
    [
        ("deposit", "_fees", False),
        ("withdraw", "_fees", True),  # the venue's fees are taken out by an admin
        ("deposit", "_x", False),
        ("withdraw", "_x", False),
        ("deposit", "al ice", False),
        ("deposit", "a" * 65, False),
        ("deposit", 5, False),
        ("deposit", "a" * 64, True),
    ],
)
def test_funding_accounts_agree_with_the_core(op: str, account: object, ok: bool) -> None:
    result = fund(op, account)
    if ok:
        assert isinstance(result, validation.Submission)
    else:
        assert code_of(result) == codes.INVALID_ACCOUNT


@pytest.mark.parametrize("rid", ["", "r" * 65, 5, "caf\u00e9", "a\nb"])
def test_invalid_request_id(rid: Any) -> None:
    result = fund(request_id=rid)
    assert code_of(result) == codes.INVALID_MESSAGE
    assert isinstance(result, dict) and result["request_id"] is None  # not echoed


def test_request_id_of_64_characters_is_fine() -> None:
    assert isinstance(fund(request_id="r" * 64), validation.Submission)


def test_reserved_accounts_are_no_accounts() -> None:
    assert not valid_account("_fees") and not valid_account("_")
    assert validation.valid_account_name("_fees")  # a well-formed name, readable by an admin
    assert valid_account("a_b") and valid_account("alice_")


def test_balances_query_names_any_well_formed_account() -> None:
    assert validation.parse_balances("_fees") == validation.BalancesQuery("_fees")
    assert code_of(validation.parse_balances("al ice")) == codes.INVALID_ACCOUNT
    assert code_of(validation.parse_balances(7)) == codes.INVALID_ACCOUNT


def test_balances_reply_formats_units_sorted_and_skips_untraded_assets() -> None:
    stored: dict[bytes | str, bytes | str] = {
        b"USDT": b"10005000000000 250000000",
        b"BTC": b"100000 0",
        b"DOGE": b"5 5",  # no instrument trades it (any more)
    }
    assert validation.balances_reply("alice", stored, SCALES) == {
        "type": "balances",
        "account": "alice",
        "balances": {
            "BTC": {"available": "1", "held": "0"},
            "USDT": {"available": "1000.5", "held": "0.025"},
        },
    }
    assert validation.balances_reply("bob", {}, SCALES)["balances"] == {}


@pytest.mark.parametrize("value", [b"12", b"1 2 3", b"x 1", b""])
def test_malformed_balance_records_raise(value: bytes) -> None:
    with pytest.raises(ValueError):
        validation.balances_reply("alice", {"BTC": value}, SCALES)  # str keys work too


def test_cancel_all_one_command_per_symbol() -> None:
    every = validation.parse_cancel_all({"op": "cancel_all"}, "alice", INSTRUMENTS)
    assert isinstance(every, validation.Submission)
    assert every.entries == (
        ("BTC-USDT", CancelAll("BTC-USDT", "alice", "user")),
        ("ETH-USDT", CancelAll("ETH-USDT", "alice", "user")),
    )
    assert every.ack == {"type": "ack", "op": "cancel_all", "symbol": None}
    one = validation.parse_cancel_all({"op": "cancel_all", "symbol": "ETH-USDT"}, "alice", INSTRUMENTS)
    assert isinstance(one, validation.Submission)
    assert one.entries == (("ETH-USDT", CancelAll("ETH-USDT", "alice", "user")),)
    assert one.ack == {"type": "ack", "op": "cancel_all", "symbol": "ETH-USDT"}


@pytest.mark.parametrize("symbol", ["DOGE-USDT", 5, ["BTC-USDT"], ""])
def test_cancel_all_unknown_symbol(symbol: Any) -> None:
    result = validation.parse_cancel_all({"op": "cancel_all", "symbol": symbol}, "alice", INSTRUMENTS)
    assert code_of(result) == codes.UNKNOWN_SYMBOL


def test_faucet_spec() -> None:
    assert validation.parse_faucet(validation.DEFAULT_FAUCET, SCALES) == [
        ("USDT", 10**6 * 10**10),
        ("BTC", 100 * 10**5),
        ("ETH", 1000 * 10**5),
    ]
    assert validation.parse_faucet(" BTC = 0.5 ", SCALES) == [("BTC", 50000)]
    assert validation.parse_faucet("none", SCALES) == validation.parse_faucet("NONE", SCALES) == []
    btc_only = {"BTC": 5, "USDT": 15}
    assert validation.parse_faucet("ETH=1,BTC=1", btc_only, strict=False) == [("BTC", 100000)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("DOGE=1", "not the base or quote"),
        ("BTC", "ASSET=AMOUNT"),
        ("=1", "ASSET=AMOUNT"),
        ("", "ASSET=AMOUNT"),
        ("BTC=1,BTC=2", "named twice"),
        ("BTC=0.000001", "at most 5 decimal places"),
        ("BTC=-1", "positive"),
    ],
)
def test_bad_faucet_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validation.parse_faucet(spec, SCALES)
