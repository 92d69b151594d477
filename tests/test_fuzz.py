"""`cme fuzz` in make test: a bounded seeded run against a stack of real processes (services/fuzz.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.fuzz import (
    CLOSE,
    INTERNAL_ERROR,
    TEXT,
    FuzzConnection,
    Generator,
    Report,
    close_code_of,
    fuzz_own_stack,
    fuzz_server,
    scan_logs,
    split_frames,
    summary,
    ws_frame,
)


def test_the_generator_is_seeded() -> None:
    one, two = Generator(3, "gateway", 16_384), Generator(3, "gateway", 16_384)
    first = [one.next().kind for _ in range(200)]
    again = [two.next().kind for _ in range(200)]
    assert first == again and len(set(first)) > 5


def test_frames_round_trip() -> None:
    wire = ws_frame(TEXT, b"x" * 70_000, mask=False) + ws_frame(CLOSE, b"\x03\xe8", mask=False) + b"\x81"
    frames, rest = split_frames(wire)
    assert frames == [(TEXT, b"x" * 70_000), (CLOSE, b"\x03\xe8")] and rest == b"\x81"


async def test_a_server_that_drops_a_new_connection_is_an_anomaly_not_a_crash() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the upgrade request, unanswered
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    report = Report()
    async with server:
        await fuzz_server(
            f"ws://127.0.0.1:{port}", "gateway", Generator(1, "gateway", 4096), 5, report, lambda: None
        )
    assert report.anomalies == [
        "gateway: a new connection failed after 0 messages: closed after 0 bytes of the upgrade's answer"
    ]


async def test_nothing_is_written_to_a_connection_that_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        await reader.read()

    server = await asyncio.start_server(upgrade, "127.0.0.1", 0)
    async with server:
        conn = FuzzConnection("127.0.0.1", server.sockets[0].getsockname()[1], Report(), "feeds")
        await conn.open()
        assert conn.writer is not None
        conn.writer.transport.abort()  # lost, as when the server resets it
        assert [await conn.send(b"x") for _ in range(10)] == [False] * 10
        await conn.close()
    # asyncio warns "socket.send() raised exception." from the fifth write on a lost connection.
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_the_code_of_a_close_frame_the_fuzzer_sends() -> None:
    assert close_code_of(ws_frame(CLOSE, b"\x03\xf3bye")) == INTERNAL_ERROR
    assert close_code_of(ws_frame(CLOSE, b"")) is None
    assert close_code_of(ws_frame(TEXT, b"\x03\xf3bye")) is None


@pytest.mark.parametrize(("first", "anomalies"), [(CLOSE, 0), (TEXT, 1)])
async def test_only_a_1011_of_the_servers_own_is_an_anomaly(first: int, anomalies: int) -> None:
    async def close_1011(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        await reader.read(1)  # whatever the client sent: closed with 1011 (an echo, for a close)
        writer.write(ws_frame(CLOSE, b"\x03\xf3", mask=False))
        await reader.read()

    server = await asyncio.start_server(close_1011, "127.0.0.1", 0)
    report = Report()
    async with server:
        conn = FuzzConnection("127.0.0.1", server.sockets[0].getsockname()[1], report, "feeds")
        await conn.open()
        assert await conn.send(ws_frame(first, b"\x03\xf3"))
        assert conn.reader_task is not None
        await asyncio.wait_for(asyncio.shield(conn.answered.wait()), 10)  # the close came back
        await conn.close()
    assert report.closes[INTERNAL_ERROR] == 1 and len(report.anomalies) == anomalies


def test_a_crash_or_a_failed_handler_in_a_log_is_an_anomaly(tmp_path: Path) -> None:
    log = tmp_path / "gateway-1.log"
    log.write_text(
        "2026-12-02T15:48:12.957Z INFO gateway gateway-1 gateway: connection from 127.0.0.1:50080\n"
        "2026-12-02T15:48:12.958Z WARNING gateway gateway-1 gateway: a message could not be handled: X\n"
        "Fatal Python error: Segmentation fault\n"
    )
    report = Report()
    scan_logs([log], report)
    assert [a.split(": ", 1)[1][:20] for a in report.anomalies] == [
        "2026-12-02T15:48:12.",
        "Fatal Python error: ",
    ]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_fuzz_20000_messages_no_anomaly() -> None:
    """10,000 generated messages and frames per server: no traceback or ERROR in the gateway's and the
    feeds' logs, no 1011, neighbours never closed (orders acked, l2 seq unbroken), RSS under 256 MiB."""
    report = fuzz_own_stack(seed=20_000, messages=10_000, connections=2, max_rss=256 << 20, quiet=True)
    text = summary(report, 0.0, 256 << 20)
    assert not report.anomalies, text
    assert sum(report.sent.values()) == 20_000 and report.acked > 0 and report.l2_messages > 0, text
    # The messages reached live connections: about one in eight makes a server close its connection
    # (2,700 reconnects for this seed), and at most one per connection found it gone. Before the
    # fuzzer waited for a failed connection's end, it spent the rest of a worker's messages on it
    # (16 to 36 reconnects).
    assert report.reconnects > 1_000 and report.unsent <= report.reconnects + 4, text
    assert report.max_rss and report.closes, text
