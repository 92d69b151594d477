"""The trading page in a real headless Chromium against a real `cme up` (its own web server included).

A person's round trip: connect an account, place a limit order with the ticket, see it in the book
ladder and in open orders, reload and still see it, cancel it with its button; then another client
trades against the page's account and the trade reaches the tape and the current candle. The
balances panel: the faucet's amounts, a resting buy's hold, after a reload too, and its release; on
a venue without balances the panel gives way to a note. And a burst of more than a thousand book
updates a second: every update is applied, the screen is drawn at most once per animation frame,
and the final book is the feed's.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from cme_client import Connection, gateway_session, is_type, l2_snapshot
from websockets.asyncio.server import ServerConnection, serve

from services.web.latency import LatencyReport
from services.web.server import WebConfig, WebServer
from shared.instruments import default_instruments
from tests.web.conftest import save_artifact, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BTC = "BTC-USDT"
ETH = "ETH-USDT"


def js(driver: Any, expr: str) -> Any:
    return driver.execute_script(f"return {expr}")


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    elements: list[Any] = driver.find_elements(By.CSS_SELECTOR, selector)
    return elements


def fill(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def click(driver: Any, selector: str) -> None:
    css(driver, selector)[0].click()


def choose(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def texts(driver: Any, selector: str) -> list[list[str]]:
    """The cell texts of every element matching `selector`, read in one go (the page redraws often)."""
    rows: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map((el) => [...el.children].map((c) => c.textContent))",
        selector,
    )
    return rows


def balance_rows(driver: Any) -> dict[str, tuple[Decimal, Decimal]]:
    """The balances panel as shown: asset -> (available, held)."""
    rows = texts(driver, "#balances tr")
    return {asset: (Decimal(available), Decimal(held)) for asset, available, held in rows}


def order_rows(driver: Any) -> dict[str, list[str]]:
    """Open orders as shown: order id -> the row's cell texts."""
    rows: dict[str, list[str]] = driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#open-orders tr')]"
        ".map((tr) => [tr.dataset.orderId, [...tr.children].map((td) => td.textContent)]))"
    )
    return rows


async def place(conn: Connection, **order: str) -> dict[str, Any]:
    """Send a new order and wait for its first execution report."""
    cid = f"py-{time.monotonic_ns()}"
    msg = {"op": "new", "type": "limit", **order, "client_order_id": cid}
    report: dict[str, Any] = await conn.request(msg, is_type("execution", client_order_id=cid), 15)
    return report


async def test_ticket_book_open_orders_cancel_and_a_trade_on_the_tape(
    up: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    mm = await gateway_session(up["gateway"], "maker")
    bob = await gateway_session(up["gateway"], "bob")
    try:
        for i in range(10):
            await place(mm, symbol=BTC, side="buy", price=f"{29950 - i * 2}.00", quantity=f"0.{i + 1}")
            await place(mm, symbol=BTC, side="sell", price=f"{30050 + i * 2}.00", quantity=f"0.{i + 2}")

        browser.get(up["web"])
        await until(
            lambda: js(browser, "window.__cme && window.__cme.book()?.bids.length === 10"), "the book"
        )
        assert js(browser, "window.__cme.book().asks[0]") == ["30050.00", "0.20000"]
        fill(browser, "account", "alice")
        click(browser, "#connect")
        await until(lambda: js(browser, "window.__cme.authed()"), "authenticated")

        # A limit order from the ticket: in the ladder (marked as ours) and in open orders.
        fill(browser, "price", "29990.00")
        fill(browser, "qty", "0.25")
        assert browser.find_element("id", "notional").text == "7497.50 USDT"
        click(browser, "#submit")
        row = '.bids .ladder-row.mine[data-price="29990.00"]'
        await until(lambda: css(browser, row), "our bid in the ladder")
        assert texts(browser, row)[0][1:3] == ["29990.00", "0.25000"]
        rows = await until(lambda: order_rows(browser), "the open order")
        (order_id, cells), *_ = rows.items()
        assert cells[1:6] == [BTC, "buy", "29990.00", "0.25000", "0.00000"] and len(rows) == 1
        assert ["29990.00", "0.25000"] in (await l2_snapshot(up["md"], BTC))["bids"]

        # A reload rebuilds the open orders (from the `open_orders` query at login).
        browser.refresh()
        await until(lambda: order_id in order_rows(browser), "the open order after a reload")

        click(browser, f'button.cancel[data-order-id="{order_id}"]')
        await until(lambda: not order_rows(browser), "the open order to go")
        await until(lambda: not css(browser, '.ladder-row[data-price="29990.00"]'), "the level to go")
        assert ["29990.00", "0.25000"] not in (await l2_snapshot(up["md"], BTC))["bids"]

        # A resting sell of the page's account, then another client takes it.
        click(browser, "#side-sell")
        fill(browser, "price", "30020.00")
        fill(browser, "qty", "0.4")
        click(browser, "#submit")
        await until(lambda: len(order_rows(browser)) == 1, "the resting sell")
        taken = await place(bob, symbol=BTC, side="buy", price="30020.00", quantity="0.4", tif="ioc")
        if taken["status"] == "new":  # the ack-time report; the fill follows
            taken = await bob.wait_for(is_type("execution", order_id=taken["order_id"], status="filled"), 15)
        assert taken["status"] == "filled" and taken["last_price"] == "30020.00"
        tape = await until(lambda: texts(browser, "#tape .tape-row"), "the trade on the tape")
        assert len(tape) == 1 and tape[0][:2] == ["30020.00", "0.40000"]
        await until(lambda: not order_rows(browser), "the filled sell to leave open orders")
        candle = js(browser, "window.__cme.candles()")[-1]
        assert (candle["close"], candle["volume"], candle["trades"]) == ("30020.00", "0.40000", 1)
        await until(lambda: "C 30020.00" in browser.find_element("id", "candle-info").text, "the candle")

        # A market order from the ticket, then a few more trades for the chart and the tape.
        click(browser, "#side-buy")
        choose(browser, "type", "market")
        assert not browser.find_element("id", "price").is_enabled()
        fill(browser, "qty", "0.15")
        click(browser, "#submit")
        await until(lambda: js(browser, "window.__cme.trades().length") == 2, "the market order's trade")
        assert js(browser, "window.__cme.trades()[0]")["price"] == "30050.00"
        for i in range(4):
            await place(bob, symbol=BTC, side="sell", price=f"{29950 - i * 2}.00", quantity="0.1", tif="ioc")
        trades = await until(
            lambda: (t := js(browser, "window.__cme.trades()")) and len(t) == 6 and t, "six trades"
        )
        assert_candles_match(js(browser, "window.__cme.candles()"), trades)

        # A stop limit from the ticket: an open order that is not in the book until it triggers.
        choose(browser, "type", "stop_limit")
        assert browser.find_element("id", "stop-price").is_displayed()
        fill(browser, "stop-price", "31000.00")
        fill(browser, "price", "31010.00")
        fill(browser, "qty", "0.1")
        click(browser, "#submit")
        stops = await until(lambda: order_rows(browser), "the untriggered stop in open orders")
        (stop_id, cells), *_ = stops.items()
        assert cells[1:5] == [BTC, "buy", "31010.00", "0.10000"], cells
        assert not css(browser, '.ladder-row[data-price="31010.00"]'), "a stop never rests in the book"
        click(browser, f'button.cancel[data-order-id="{stop_id}"]')
        await until(lambda: not order_rows(browser), "the cancelled stop to go")

        # One more resting order, so that the screenshot shows an open order with its button.
        choose(browser, "type", "limit")
        choose(browser, "tif", "gtc")
        fill(browser, "price", "29900.00")
        fill(browser, "qty", "0.3")
        click(browser, "#submit")
        await until(lambda: len(order_rows(browser)) == 1, "the last resting order")

        # The latency panel, from the services' own histograms.
        def shown(stage: str) -> bool:
            row = texts(browser, f'#latency tr[data-stage="{stage}"]')
            return bool(row) and row[0][1] != "—"

        for stage in ("gateway_ack", "matcher_core", "feed_l2", "feed_trades"):
            await until(functools.partial(shown, stage), f"the {stage} latency")

        shot = tmp_path / "trading-page.png"
        assert browser.save_screenshot(str(shot))
        print(f"\nscreenshot: {save_artifact(shot)}")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        await mm.close()
        await bob.close()


async def test_the_balances_panel_shows_the_faucet_and_a_resting_buy_moves_usdt_to_held(
    up: dict[str, Any], browser: Any
) -> None:
    browser.get(up["web"])
    await until(lambda: js(browser, "window.__cme && window.__cme.book()?.ready"), "the book")
    fill(browser, "account", "carol")  # a new account: the faucet funds it at this first login
    click(browser, "#connect")
    faucet = {"USDT": (Decimal(1000000), Decimal(0)), "BTC": (Decimal(100), Decimal(0))}
    faucet["ETH"] = (Decimal(1000), Decimal(0))
    await until(lambda: balance_rows(browser) == faucet, "the faucet's amounts in the balances panel")
    assert browser.find_element("id", "balances-table").is_displayed()
    assert not browser.find_element("id", "balances-note").is_displayed()

    # A buy far below the asks rests: price x quantity x (1 + the higher fee rate) is held.
    inst = default_instruments()[BTC]
    price, qty = Decimal("20000.00"), Decimal("0.5")
    hold = price * qty * (1 + max(inst.maker_fee, inst.taker_fee))
    fill(browser, "price", str(price))
    fill(browser, "qty", str(qty))
    click(browser, "#submit")
    held = {**faucet, "USDT": (Decimal(1000000) - hold, hold)}
    await until(lambda: balance_rows(browser) == held, f"{hold} USDT moved from available to held")
    rows = await until(lambda: order_rows(browser), "the resting buy")
    (order_id, _), *_ = rows.items()

    # After a reload the panel and the open orders come from the login's queries, not from replays.
    browser.refresh()
    await until(lambda: js(browser, "window.__cme.ordersSynced()"), "the open orders after a reload")
    # The answer is drawn at the page's next animation frame, not when it arrives.
    await until(lambda: list(order_rows(browser)) == [order_id], "the resting buy from the login's answer")
    await until(lambda: balance_rows(browser) == held, "the hold after a reload")

    click(browser, f'button.cancel[data-order-id="{order_id}"]')
    await until(lambda: balance_rows(browser) == faucet, "the hold released by the cancel")
    assert not order_rows(browser)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


async def until_async(
    fetch: Callable[[], Awaitable[dict[str, Any]]],
    ok: Callable[[dict[str, Any]], bool],
    timeout: float = 15.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not ok(value := await fetch()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last: {value}")
        await asyncio.sleep(0.05)
    return value


def assert_candles_match(candles: list[dict[str, Any]], trades: list[dict[str, Any]]) -> None:
    """The page's 1m candles are exactly its trades (newest first) grouped by minute."""
    by_minute: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in reversed(trades):
        by_minute[t["ts"] // 60_000 * 60_000].append(t)
    expected = [
        {
            "t": minute,
            "open": ts[0]["price"],
            "high": max(ts, key=lambda t: Decimal(t["price"]))["price"],
            "low": min(ts, key=lambda t: Decimal(t["price"]))["price"],
            "close": ts[-1]["price"],
            "volume": f"{sum(Decimal(t['quantity']) for t in ts):.5f}",
            "trades": len(ts),
        }
        for minute, ts in sorted(by_minute.items())
    ]
    assert candles == expected


async def test_a_burst_of_book_updates_is_drawn_at_most_once_per_frame(
    up: dict[str, Any], browser: Any
) -> None:
    browser.get(f"{up['web']}?symbol={ETH}")
    await until(lambda: js(browser, "window.__cme && window.__cme.book()?.ready"), "the ETH book")
    before = js(browser, "window.__cme.stats")
    seq0 = js(browser, "window.__cme.book().seq")

    flood = await gateway_session(up["gateway"], "flood")
    commands, per_tick, started = 4500, 25, time.monotonic()
    try:
        for i in range(commands):
            if i % 3 == 2:  # cancel an order placed two commands ago: every command moves a level
                msg = {"op": "cancel", "symbol": ETH, "client_order_id": f"f-{i - 2}"}
            else:
                side, level = ("buy", 1999 - i % 300) if i % 2 else ("sell", 2001 + i % 300)
                msg = {
                    "op": "new",
                    "symbol": ETH,
                    "side": side,
                    "price": f"{level}.{i % 7:02d}",
                    "quantity": f"0.{i % 9 + 1}",
                    "client_order_id": f"f-{i}",
                }
            await flood.send(msg)
            if i % per_tick == per_tick - 1:  # about 1,500 commands a second
                await asyncio.sleep(per_tick / 1500 - 0.002)
        offered = commands / (time.monotonic() - started)
        last = await place(flood, symbol=ETH, side="buy", price="1000.00", quantity="0.1")
        assert last["status"] == "new"  # the stream is in order: every command before it is applied
    finally:
        await flood.close()
    # The report and the book update leave the matcher together, but on different channels.
    expected = await until_async(
        lambda: l2_snapshot(up["md"], ETH), lambda snap: ["1000.00", "0.10000"] in snap["bids"]
    )

    def page_book() -> Any:
        return js(browser, "window.__cme.book()")

    await until(lambda: page_book()["seq"] == expected["seq"], "the page to apply every update", 30)
    book = page_book()
    assert (book["bids"], book["asks"]) == (expected["bids"], expected["asks"])
    after = js(browser, "window.__cme.stats")
    updates = after["l2Updates"] - before["l2Updates"]
    frames = after["frames"] - before["frames"]
    renders = after["renders"] - before["renders"]
    print(
        f"\noffered {offered:.0f} commands/s; page: {updates} updates, {frames} frames, {renders} renders, "
        f"longest render {after['maxRenderMs']:.1f} ms"
    )
    assert updates == expected["seq"] - seq0 >= commands  # each one applied, none skipped
    assert after["resyncs"] == before["resyncs"] and after["snapshots"] == before["snapshots"]
    assert renders <= frames
    assert renders * 4 <= updates, "updates between two frames must be drawn once"


async def test_without_balances_the_panel_gives_way_to_a_note_and_open_orders_come_from_the_query(
    browser: Any,
) -> None:
    """Against a scripted gateway of a venue with --risk off: `balances` is answered BALANCES_DISABLED;
    `open_orders` replaces whatever reports came before it, and later reports apply on top."""
    asked: asyncio.Queue[str] = asyncio.Queue()
    conns: asyncio.Queue[ServerConnection] = asyncio.Queue()

    def order(order_id: str, status: str, filled: str) -> dict[str, Any]:
        return {
            "order_id": order_id, "client_order_id": f"c-{order_id}", "symbol": BTC, "side": "buy",
            "order_type": "limit", "tif": "gtc", "status": status, "price": "100.00",
            "quantity": "1.00000", "filled_quantity": filled, "remaining_quantity": "1.00000", "ts": 1,
        }  # fmt: skip

    async def venue(conn: ServerConnection) -> None:
        async for raw in conn:
            msg = orjson.loads(raw)
            op = msg.get("op")
            if op == "auth":
                await conn.send(orjson.dumps({"type": "authenticated", "account": msg["account"]}).decode())
                await conns.put(conn)
            elif op in ("open_orders", "balances"):
                await asked.put(op)

    async with serve(venue, "127.0.0.1", 0) as ws_server:
        url = f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}"
        web = WebServer(("127.0.0.1", 0), WebConfig(url, url, url, default_instruments()), LatencyReport([]))
        thread = threading.Thread(target=web.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            browser.get(f"http://127.0.0.1:{web.port}/?symbol={BTC}&account=dave")
            conn = await asyncio.wait_for(conns.get(), 15)
            assert {await asyncio.wait_for(asked.get(), 15) for _ in range(2)} == {"open_orders", "balances"}

            async def send(msg: dict[str, Any]) -> None:
                await conn.send(orjson.dumps(msg).decode())

            # A report sent before the answer is in it already: the answer (without that order) wins.
            await send({"type": "execution", "exec_id": 7, **order("1-0", "new", "0.00000")})
            await send({"type": "open_orders", "orders": [order("2-0", "new", "0.00000")]})
            await send(
                {"type": "reject", "op": "balances", "code": "BALANCES_DISABLED", "reason": "risk off"}
            )
            await until(lambda: js(browser, "window.__cme.ordersSynced()"), "the open_orders answer")
            await until(lambda: list(order_rows(browser)) == ["2-0"], "the answer's order only")
            await send({"type": "execution", "exec_id": 8, **order("2-0", "partially_filled", "0.40000")})
            await until(lambda: order_rows(browser)["2-0"][5] == "0.40000", "a later report on top")

            note = browser.find_element("id", "balances-note")
            await until(lambda: note.is_displayed() and "keeps no balances" in note.text, "the note")
            assert not browser.find_element("id", "balances-table").is_displayed()
            assert js(browser, "window.__cme.balances()") is None
            messages = browser.find_element("id", "messages").text
            assert "BALANCES_DISABLED" not in messages, "an expected answer is not an error to show"
        finally:
            web.shutdown()
            web.server_close()


async def test_a_sequence_gap_throws_the_book_away_and_resubscribes(browser: Any) -> None:
    """Against a scripted feed: an update that skips a seq is not applied; a fresh snapshot is asked."""
    received: list[dict[str, Any]] = []
    subscribed = asyncio.Queue[ServerConnection]()

    async def feed(conn: ServerConnection) -> None:
        async for raw in conn:
            msg = orjson.loads(raw)
            received.append(msg)
            if msg.get("op") == "subscribe" and msg.get("channel") == "l2":  # not the trade feed's
                await subscribed.put(conn)

    async with serve(feed, "127.0.0.1", 0) as ws_server:
        url = f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}"
        cfg = WebConfig(url, url, url, default_instruments())
        web = WebServer(("127.0.0.1", 0), cfg, LatencyReport([]))
        thread = threading.Thread(target=web.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            browser.get(f"http://127.0.0.1:{web.port}/?symbol={BTC}")
            md = await asyncio.wait_for(subscribed.get(), 15)

            def send(msg: dict[str, Any]) -> Awaitable[None]:
                return md.send(orjson.dumps({"symbol": BTC, **msg}).decode())

            await send(
                {
                    "type": "l2_snapshot",
                    "seq": 5,
                    "bids": [["100.00", "1.00000"]],
                    "asks": [["101.00", "2.00000"]],
                }
            )
            await send({"type": "l2_update", "seq": 6, "changes": [["buy", "100.50", "0.50000"]]})
            await until(lambda: js(browser, "window.__cme.book().seq") == 6, "seq 6")
            await send({"type": "l2_update", "seq": 8, "changes": [["sell", "100.90", "9.00000"]]})
            await asyncio.wait_for(subscribed.get(), 15)  # asked again, after an unsubscribe
            l2 = [m for m in received if m.get("channel") == "l2"]
            assert [m["op"] for m in l2][-2:] == ["unsubscribe", "subscribe"]
            assert js(browser, "window.__cme.book().ready") is False
            await send({"type": "l2_snapshot", "seq": 20, "bids": [["99.00", "3.00000"]], "asks": []})
            await send({"type": "l2_update", "seq": 21, "changes": [["sell", "102.00", "1.00000"]]})
            book = await until(
                lambda: (b := js(browser, "window.__cme.book()"))["seq"] == 21 and b, "the fresh book"
            )
            assert (book["bids"], book["asks"]) == ([["99.00", "3.00000"]], [["102.00", "1.00000"]])
            assert js(browser, "window.__cme.stats.resyncs") == 1
        finally:
            web.shutdown()
            web.server_close()
