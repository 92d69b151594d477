"""The recording Connection against an in-process `websockets` server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from cme_client import Connection, Disconnected, is_answer, is_type
from websockets.asyncio.server import Server, ServerConnection, serve

pytestmark = pytest.mark.timeout(30)


async def scripted(ws: ServerConnection) -> None:
    """Answers {"op":"say","n":N} with N numbered messages, "bad" with non-objects, "bye" with a close."""
    async for raw in ws:
        msg = orjson.loads(raw)
        if msg["op"] == "say":
            for i in range(msg["n"]):
                await ws.send(orjson.dumps({"type": "n", "i": i}).decode())
        elif msg["op"] == "bad":
            await ws.send("[1]")
            await ws.send("{oops")
        elif msg["op"] == "bye":
            await ws.close(4000, "bye")


@pytest.fixture()
async def url() -> AsyncIterator[str]:
    srv: Server = await serve(scripted, "127.0.0.1", 0)
    port = next(iter(srv.sockets)).getsockname()[1]
    yield f"ws://127.0.0.1:{port}"
    srv.close()
    await srv.wait_closed()


async def test_marks_and_waits_see_every_message_in_order(url: str) -> None:
    conn = await Connection.open(url)
    await conn.send({"op": "say", "n": 3})
    assert (await conn.wait_for(is_type("n", i=2)))["i"] == 2
    start = conn.mark()
    got = await conn.request({"op": "say", "n": 2}, is_type("n", i=1))
    assert got == {"type": "n", "i": 1}
    assert conn.since(start) == [{"type": "n", "i": 0}, {"type": "n", "i": 1}]
    assert len(await conn.wait_count(is_type("n"), 5)) == 5
    with pytest.raises(TimeoutError):
        await conn.wait_for(is_type("n", i=9), timeout=0.2)
    await conn.close()


async def test_non_objects_are_recorded_for_the_caller_to_see(url: str) -> None:
    conn = await Connection.open(url)
    await conn.send({"op": "bad"})
    first, second = await conn.wait_count(lambda m: m["type"].startswith("<"), 2)
    assert first == {"type": "<not an object>", "raw": "[1]"}
    assert second == {"type": "<not json>", "raw": "{oops"}
    await conn.close()


async def test_a_close_ends_the_waits_and_keeps_the_code(url: str) -> None:
    conn = await Connection.open(url)
    waiter = asyncio.create_task(conn.wait_for(is_type("never")))
    await conn.send({"op": "bye"})
    assert await conn.wait_closed() == (4000, "bye")
    assert conn.closed_reason == "4000 bye"
    with pytest.raises(Disconnected):
        await waiter
    with pytest.raises(ConnectionError):
        await conn.send({"op": "say", "n": 1})


def test_is_answer_tells_the_gateways_answer_from_the_matchers_reject() -> None:
    pred = is_answer({"op": "cancel", "symbol": "S", "client_order_id": "c1"})
    assert pred({"type": "ack", "op": "cancel", "client_order_id": "c1", "order_id": None})
    assert pred({"type": "reject", "op": "cancel", "client_order_id": "c1", "code": "UNAUTHENTICATED"})
    assert not pred({"type": "reject", "op": "cancel", "client_order_id": "c1", "exec_id": 4})
    assert not pred({"type": "ack", "op": "new", "client_order_id": "c1"})
