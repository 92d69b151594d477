"""The bare Redis connection: round trips against a real Redis, and timeouts against a real socket on
127.0.0.1 that accepts and never answers (a silent partition, a frozen Redis)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import hiredis
import pytest

from shared.resp import KEEPALIVE_IDLE, RespConnection, pack

pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
async def silent() -> AsyncIterator[int]:
    """A port whose server accepts connections, reads everything and answers nothing."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_round_trip_nobody_answers_times_out_and_closes_the_connection(silent: int) -> None:
    conn = await RespConnection.open(f"redis://127.0.0.1:{silent}", read_timeout=0.2)
    with pytest.raises(TimeoutError):
        await conn.roundtrip(pack(b"PING"), 1)
    # A late reply would be taken for the next round trip's: the connection is never used again.
    with pytest.raises(ConnectionError):
        conn.roundtrip(pack(b"PING"), 1)
    conn.close()


async def test_connection_setup_nobody_answers_times_out(silent: int) -> None:
    with pytest.raises(TimeoutError):
        await RespConnection.open(f"redis://:secret@127.0.0.1:{silent}", connect_timeout=0.2)


async def test_answered_round_trips_do_not_time_out_later(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url, read_timeout=0.2)
    try:
        assert await conn.roundtrip(pack(b"PING") + pack(b"ECHO", b"x"), 2) == [b"PONG", b"x"]
        await asyncio.sleep(0.4)  # past the timeout of the answered round trip: its timer is gone
        assert conn.lost is None
        replies = await conn.roundtrip(pack(b"GET", b"no-such-key") + pack(b"NOSUCHCOMMAND"), 2)
        assert replies[0] is None and isinstance(replies[1], hiredis.ReplyError)
    finally:
        conn.close()


async def test_a_blocking_read_within_the_timeout_is_answered(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url, read_timeout=1.0)
    try:
        cmd = pack(b"XREAD", b"BLOCK", b"300", b"STREAMS", b"empty-stream", b"$")
        assert await conn.roundtrip(cmd, 1) == [None]
    finally:
        conn.close()


async def test_tcp_keepalive_is_on(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url)
    try:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
    finally:
        conn.close()
    off = await RespConnection.open(redis_url, keepalive=False)
    try:
        assert off.transport is not None
        assert off.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        off.close()


def test_client_options_time_out_commands_and_probe_idle_links() -> None:
    from shared.resp import client_options

    plain = client_options(5.0)
    assert plain["socket_timeout"] == 5.0 and plain["socket_connect_timeout"] == 5.0
    assert plain["socket_keepalive"] is True and plain["socket_keepalive_options"]
    blocking = client_options(5.0, blocking=True)
    assert "socket_timeout" not in blocking, "pub/sub waits for messages by design"
    assert blocking["health_check_interval"] == 5 and blocking["socket_keepalive"] is True
    assert blocking["protocol"] == 2, "RESP3 pushes cost a str() of every message in redis-py 8.1"


def test_pack_writes_one_resp_array_of_bulk_strings() -> None:
    assert pack(b"SET", b"", b"a\r\nb") == b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\na\r\nb\r\n"
    long = b"x" * 5000  # beyond the ready-made headers
    assert pack(b"ECHO", long) == b"*2\r\n$4\r\nECHO\r\n$5000\r\n" + long + b"\r\n"
    assert pack(*(long, b"y")) == hiredis.pack_command((long, b"y"))
