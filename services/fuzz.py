"""`cme fuzz`: seeded hostile traffic against a gateway and a feed, watched by well-behaved neighbours.

`Generator` turns a seed into WebSocket traffic, written frame by frame over raw sockets so that nothing
a client library refuses to send is out of reach: mutated protocol messages, random JSON, hostile
strings (lone surrogates, duplicate keys, deep nesting, huge numbers), random bytes, binary frames,
fragments (well formed and broken), frames over the size limit, pings, unmasked and reserved frames.

While it runs, a gateway neighbour keeps placing and cancelling orders (each must be acked) and a feed
neighbour stays subscribed to l2 and trades (its l2 seq must never skip). An anomaly is: a neighbour
closed, refused or unanswered; a close with 1011 (internal error) sent to a fuzz connection (other than
the echo of a 1011 close the fuzzer sent); and, when
the stack is our own, a traceback or an ERROR line in a service log or a service over the memory bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
SYMBOL = "BTC-USDT"
INTERNAL_ERROR = 1011
SETTLE_EVERY = 4  # messages between two round trips that wait for the server to catch up
SETTLE_TIMEOUT = 10.0
# Log lines that are anomalies: an uncaught exception, an error, a crash in native code (faulthandler's
# report), and a message whose handling raised (the servers' catch-all turns it into a reject).
LOG_MARKS = ("Traceback", " ERROR ", "Fatal Python error", "could not be handled")
MAX_RSS_MIB = 256  # per service process, gateway and feeds (each idles at about 70 MiB)


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One client frame (RFC 6455 5.2), masked unless told otherwise."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0xF])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += struct.pack("!BH", bit | 126, n)
    else:
        head += struct.pack("!BQ", bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    mask_bytes = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask_bytes, "big")).to_bytes(n, "big")
    return head + key + masked


def close_code_of(data: bytes) -> int | None:
    """The status code of `data` when it starts with a whole masked close frame that has one."""
    if len(data) < 8 or data[0] != 0x80 | CLOSE or not data[1] & 0x80 or not 2 <= data[1] & 0x7F < 126:
        return None
    return ((data[6] ^ data[2]) << 8) | (data[7] ^ data[3])


def upgrade_request(host: str, port: int, path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def split_frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete server frames (unmasked) at the head of `buf` as (opcode, payload), and the rest."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while True:
        if i + 2 > len(buf):
            break
        opcode, n, at = buf[i] & 0xF, buf[i + 1] & 0x7F, i + 2
        if n == 126:
            if at + 2 > len(buf):
                break
            n, at = struct.unpack_from("!H", buf, at)[0], at + 2
        elif n == 127:
            if at + 8 > len(buf):
                break
            n, at = struct.unpack_from("!Q", buf, at)[0], at + 8
        if at + n > len(buf):
            break
        out.append((opcode, buf[at : at + n]))
        i = at + n
    return out, buf[i:]


# The generator ----------------------------------------------------------------------------------
HOSTILE_TEXTS = [
    '{"op":"\\ud800"}',
    '{"op":"\\udfff","symbol":"BTC-USDT"}',
    '{"op":"ping","id":"\\ud800"}',
    '{"op":"auth","account":"\\ud83d"}',
    '{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":"1","client_order_id":"\\udc00"}',
    '{"op":"subscribe","symbol":"\\ud800"}',
    '{"op":"subscribe","symbol":"BTC-USDT","channel":"\\ud800"}',
    '{"op":"ping","op":"ping"}',
    '{"op":"new","price":1e400,"quantity":1e-400}',
    '{"op":"new","price":NaN,"quantity":Infinity}',
    '{"op":"ping","id":' + "9" * 5000 + "}",
    "[" * 50_000 + "]" * 50_000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    '"\\u0000"',
    '{"op":"ping"}\x00',
    '{"op":"ping","id":"\u202e\u0000\ufeff"}',
    "\ufeff" + '{"op":"ping"}',
    "null",
    "",
]


@dataclass
class Action:
    kind: str
    data: bytes  # wire bytes: one or more frames


class Generator:
    """Seeded client traffic for one server kind ("gateway" or "feeds")."""

    def __init__(self, seed: int, server: str, max_frame: int) -> None:
        self.rnd = random.Random(seed)
        self.server = server
        self.max_frame = max_frame
        kinds: list[tuple[str, int, Callable[[], bytes]]] = [
            ("mutated", 40, lambda: self._text(self._mutated())),
            ("json", 12, lambda: self._text(self._json_text())),
            ("hostile", 10, lambda: self._text(self.rnd.choice(HOSTILE_TEXTS).encode())),
            ("valid", 8, lambda: self._text(self._dumps(self._template()))),
            ("fragments", 8, self._fragments),
            ("ping", 10, lambda: ws_frame(self.rnd.choice((PING, PONG)), self._bytes(125))),
            ("bytes", 3, lambda: ws_frame(TEXT, self._bytes(200))),
            ("binary", 2, lambda: ws_frame(BINARY, self._bytes(200))),
            ("bad_fragments", 2, self._bad_fragments),
            (
                "huge",
                2,
                lambda: ws_frame(TEXT, b'{"op":"ping","pad":"' + b"x" * (self.max_frame + 64) + b'"}'),
            ),
            ("bad_frame", 2, self._bad_frame),
            (
                "close",
                1,
                lambda: ws_frame(CLOSE, struct.pack("!H", self.rnd.randrange(5000)) + self._bytes(20)),
            ),
        ]
        self.kinds = kinds
        self.weights = [w for _, w, _ in kinds]

    def next(self) -> Action:
        kind, _, make = self.rnd.choices(self.kinds, self.weights)[0]
        return Action(kind, make())

    # Messages ---------------------------------------------------------------------------------
    def _template(self) -> dict[str, Any]:
        rnd = self.rnd
        if self.server == "feeds":
            return {
                "op": rnd.choice(("subscribe", "unsubscribe")),
                "symbol": rnd.choice((SYMBOL, "ETH-USDT")),
                "channel": rnd.choice(("l2", "depth", "trades")),
                "depth": rnd.randint(1, 20),
            }
        op = rnd.choice(("new", "new", "new", "cancel", "amend", "auth", "ping", "executions"))
        msg: dict[str, Any] = {"op": op, "symbol": rnd.choice((SYMBOL, "ETH-USDT"))}
        if op == "auth":
            return {"op": "auth", "account": f"fuzz{rnd.randrange(3)}"}
        if op == "ping":
            return {"op": "ping", "id": rnd.randrange(1000)}
        if op in ("new", "amend"):
            msg.update(
                side=rnd.choice(("buy", "sell")),
                type=rnd.choice(("limit", "market", "ioc", "fok")),
                price=f"{rnd.randint(90, 110)}.{rnd.randrange(100):02d}",
                quantity=f"0.{rnd.randint(1, 999):03d}",
                client_order_id=f"f{rnd.randrange(10**6)}",
            )
        if op == "cancel":
            msg["order_id"] = f"{rnd.randrange(10**13)}-{rnd.randrange(10)}"
        return msg

    def _value(self, depth: int = 0) -> Any:
        rnd = self.rnd
        choice = rnd.randrange(12 if depth < 3 else 8)
        if choice == 0:
            return None
        if choice == 1:
            return rnd.choice((True, False))
        if choice == 2:
            return rnd.choice((0, -1, 1, 2**63, -(2**63) - 1, 10**30, rnd.randrange(-(10**6), 10**6)))
        if choice == 3:
            return rnd.choice((0.0, -0.0, 1e-9, 1.5, 1e308, rnd.uniform(-1e6, 1e6)))
        if choice == 4:
            return rnd.choice(
                ("", "0", "-1", "1e1", "+10", " 10 ", "\u0661\u0660", "\uff11\uff10", "0.000000001", "9" * 40)
            )
        if choice == 5:
            return "".join(
                chr(rnd.choice((rnd.randrange(32, 127), rnd.randrange(0x10FFFF)))) for _ in range(8)
            )
        if choice in (6, 7):
            return self._bytes(16).decode("latin-1")
        if choice in (8, 9):
            return [self._value(depth + 1) for _ in range(rnd.randrange(4))]
        return {self._key(): self._value(depth + 1) for _ in range(rnd.randrange(4))}

    def _key(self) -> str:
        return self.rnd.choice(("op", "symbol", "side", "type", "price", "quantity", "id", "channel", "x"))

    def _mutated(self) -> bytes:
        rnd = self.rnd
        msg = self._template()
        for _ in range(rnd.randint(1, 3)):
            action = rnd.randrange(4)
            if action == 0 and msg:
                del msg[rnd.choice(list(msg))]
            elif action == 1 and msg:
                msg[rnd.choice(list(msg))] = self._value()
            elif action == 2:
                msg[self._key()] = self._value()
            else:
                msg["pad"] = "x" * rnd.randrange(self.max_frame // 2)
        data = self._dumps(msg)
        if rnd.random() < 0.3:  # byte-level damage: may leave invalid JSON or invalid UTF-8
            buf = bytearray(data)
            for _ in range(rnd.randint(1, 4)):
                if buf:
                    i = rnd.randrange(len(buf))
                    op = rnd.randrange(3)
                    if op == 0:
                        del buf[i]
                    elif op == 1:
                        buf.insert(i, rnd.randrange(256))
                    else:
                        buf[i] = rnd.randrange(32, 127)
            data = bytes(buf)
        return data

    def _json_text(self) -> bytes:
        return self._dumps(self._value())

    def _dumps(self, value: Any) -> bytes:
        ascii_only = self.rnd.random() < 0.5
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    def _bytes(self, most: int) -> bytes:
        return self.rnd.randbytes(self.rnd.randrange(most + 1))

    # Frames -----------------------------------------------------------------------------------
    def _text(self, data: bytes) -> bytes:
        return ws_frame(TEXT, data)

    def _fragments(self) -> bytes:
        data = self._dumps(self._template())
        cuts = sorted(self.rnd.sample(range(1, max(len(data), 2)), min(3, max(len(data) - 1, 1))))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = b""
        for i, part in enumerate(parts):
            out += ws_frame(TEXT if i == 0 else CONT, part, fin=i == len(parts) - 1)
            if self.rnd.random() < 0.3:
                out += ws_frame(PING, self._bytes(20))  # control frames may interleave with fragments
        return out

    def _bad_fragments(self) -> bytes:
        return self.rnd.choice(
            (
                ws_frame(CONT, b'{"op":"ping"}'),  # continuation of nothing
                ws_frame(TEXT, b'{"op":', fin=False) + ws_frame(TEXT, b'"ping"}'),  # new message mid-way
                ws_frame(PING, b"x", fin=False),  # fragmented control frame
            )
        )

    def _bad_frame(self) -> bytes:
        rnd = self.rnd
        return rnd.choice(
            (
                ws_frame(TEXT, b'{"op":"ping"}', mask=False),
                ws_frame(TEXT, b'{"op":"ping"}', rsv=rnd.randint(1, 7)),
                ws_frame(rnd.choice((3, 4, 5, 6, 7, 11, 12, 13, 14, 15)), self._bytes(10)),
                ws_frame(PING, self._bytes(300)),  # control frames carry at most 125 bytes
            )
        )


# Running it -------------------------------------------------------------------------------------
@dataclass
class Report:
    sent: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    reconnects: int = 0
    unsent: int = 0  # messages whose write found the connection gone (at most one per connection)
    acked: int = 0
    l2_messages: int = 0
    max_rss: dict[str, int] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)

    def anomaly(self, what: str) -> None:
        if len(self.anomalies) < 100:
            self.anomalies.append(what)


class FuzzConnection:
    """A raw WebSocket connection that drains what the server sends and notes its close code."""

    def __init__(self, host: str, port: int, report: Report, server: str) -> None:
        self.host, self.port, self.report, self.server = host, port, report, server
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.probe = b""  # payload of the ping whose pong we wait for
        self.closing = False  # the server sent its close frame
        self.sent_close: int | None = None  # the code of the close frame we sent: the server echoes it
        self.answered = asyncio.Event()

    async def open(self) -> None:
        """Connect and upgrade; ConnectionError (with what the server did) if either fails."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"connect: {type(exc).__name__}: {exc}") from exc
        try:
            writer.write(upgrade_request(self.host, self.port))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except asyncio.IncompleteReadError as exc:
            writer.close()
            raise ConnectionError(f"closed after {len(exc.partial)} bytes of the upgrade's answer") from exc
        except (OSError, TimeoutError) as exc:
            writer.close()
            raise ConnectionError(f"upgrade: {type(exc).__name__}: {exc}") from exc
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"upgrade refused: {head[:60]!r}")
        self.writer = writer
        self.reader_task = asyncio.create_task(self._drain(reader))

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                frames, buf = split_frames(buf + chunk)
                for opcode, payload in frames:
                    if opcode == PONG and payload == self.probe:
                        self.answered.set()
                    if opcode != CLOSE or self.closing:
                        continue
                    # Answer as a client should, so the server closes the TCP connection at once.
                    self.closing = True
                    self.answered.set()
                    if self.writer is not None:
                        with contextlib.suppress(OSError):
                            self.writer.write(ws_frame(CLOSE, payload[:2]))
                    code = int(struct.unpack_from("!H", payload)[0]) if len(payload) >= 2 else 1005
                    self.report.closes[code] += 1
                    if code == INTERNAL_ERROR and code != self.sent_close:
                        self.report.anomaly(
                            f"{self.server} closed a fuzz connection with 1011: {payload[2:]!r}"
                        )

    @property
    def alive(self) -> bool:
        return (
            self.writer is not None
            and self.reader_task is not None
            and not self.reader_task.done()
            and not self.closing
        )

    async def send(self, data: bytes) -> bool:
        assert self.writer is not None
        if self.writer.is_closing():  # the connection is gone: asyncio would drop the bytes and warn
            return False
        code = close_code_of(data)
        if code is not None:
            self.sent_close = code
        try:
            self.writer.write(data)
            await self.writer.drain()
            return True
        except OSError:
            return False

    async def ended(self) -> None:
        """Until the reader has seen the end of a connection whose write failed. Without this wait,
        a failed send does not yield to the loop (drain raises the reader's exception at once), the
        reader never runs, and the worker would spend the rest of its messages on the dead
        connection."""
        assert self.reader_task is not None
        await asyncio.wait([self.reader_task], timeout=SETTLE_TIMEOUT)
        if not self.reader_task.done():
            self.report.anomaly(f"{self.server}: a connection whose write failed did not end")

    async def settle(self, n: int) -> None:
        """Ping and wait for the pong (or the end): the server has handled everything sent before."""
        assert self.reader_task is not None
        self.probe = b"probe-%d" % n
        self.answered.clear()
        if not await self.send(ws_frame(PING, self.probe)):
            return
        answered = asyncio.create_task(self.answered.wait())
        done, _ = await asyncio.wait(
            [answered, self.reader_task], timeout=SETTLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        answered.cancel()
        if not done:
            self.report.anomaly(f"{self.server}: no pong within {SETTLE_TIMEOUT:.0f} s")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        if self.reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader_task


async def fuzz_server(
    url: str, server: str, gen: Generator, messages: int, report: Report, progress: Callable[[], None]
) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    conn: FuzzConnection | None = None
    for n in range(messages):
        if conn is None or not conn.alive:
            if conn is not None:
                await conn.close()
                report.reconnects += 1
            conn = FuzzConnection(host, port, report, server)
            try:
                await conn.open()
            except ConnectionError as exc:
                # The server turned a new connection away: an anomaly, and the end of this worker, so
                # that the run still ends with the logs scanned and the processes checked.
                report.anomaly(f"{server}: a new connection failed after {n} messages: {exc}")
                return
        action = gen.next()
        report.sent[f"{server}:{action.kind}"] += 1
        if not await conn.send(action.data):
            report.unsent += 1
            await conn.ended()  # the next message goes to a new connection
        elif n % SETTLE_EVERY == 0:
            await conn.settle(n)
        progress()
    if conn is not None:
        await conn.close()


async def gateway_neighbour(url: str, report: Report, stop: asyncio.Event) -> None:
    """Places and cancels an order at a time; each must be acked, the connection must stay open."""
    try:
        async with connect(url, compression=None, open_timeout=10) as ws:
            await ws.send('{"op":"auth","account":"neighbour"}')
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if reply.get("type") != "authenticated":
                report.anomaly(f"gateway neighbour: auth answered {reply}")
                return
            i = 0
            while not stop.is_set():
                i += 1
                side, price = ("buy", "50.00") if i % 2 else ("sell", "150.00")  # rests, never trades
                new = {"op": "new", "symbol": SYMBOL, "side": side, "price": price, "quantity": "0.01"}
                await ws.send(orjson.dumps({**new, "client_order_id": f"n{i}"}).decode())
                ack = await _reply(ws, "new")
                if ack.get("type") != "ack":
                    report.anomaly(f"gateway neighbour: order answered {ack}")
                    return
                await ws.send(
                    orjson.dumps({"op": "cancel", "symbol": SYMBOL, "order_id": ack["order_id"]}).decode()
                )
                if (await _reply(ws, "cancel")).get("type") != "ack":
                    report.anomaly("gateway neighbour: cancel not acked")
                    return
                report.acked += 2
    except (ConnectionClosed, OSError, TimeoutError) as exc:
        report.anomaly(f"gateway neighbour lost its connection: {exc!r}")


async def _reply(ws: ClientConnection, op: str) -> dict[str, Any]:
    """The next ack or reject of `op`, skipping execution reports."""
    while True:
        msg: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("type") in ("ack", "reject") and msg.get("op") == op:
            return msg


async def feed_neighbour(url: str, report: Report, stop: asyncio.Event) -> None:
    """Subscribed to l2 for the whole run; its seq must rise by one per update."""
    try:
        async with connect(url, compression=None, open_timeout=10, max_size=None) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "symbol": SYMBOL, "channel": "l2"}).decode())
            seq: int | None = None
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                msg = orjson.loads(raw)
                kind = msg.get("type")
                if kind == "l2_snapshot":
                    seq = msg["seq"]
                elif kind == "l2_update":
                    if seq is not None and msg["seq"] != seq + 1:
                        report.anomaly(f"feed neighbour: l2 seq {msg['seq']} after {seq}")
                    seq = msg["seq"]
                    report.l2_messages += 1
    except (ConnectionClosed, OSError, TimeoutError) as exc:
        report.anomaly(f"feed neighbour lost its connection: {exc!r}")


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def watch_memory(pids: dict[str, int], report: Report, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for name, pid in pids.items():
            report.max_rss[name] = max(report.max_rss.get(name, 0), rss_bytes(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def run_fuzz(
    gateway: str,
    md: str,
    *,
    seed: int,
    messages: int,
    connections: int = 2,
    pids: dict[str, int] | None = None,
    quiet: bool = False,
) -> Report:
    """`messages` generated messages per server, over `connections` connections to each at a time."""
    report = Report()
    stop = asyncio.Event()
    done = 0
    started = time.monotonic()
    total = 2 * messages

    def progress() -> None:
        nonlocal done
        done += 1
        if not quiet and done % max(total // 10, 1) == 0:
            rate = done / max(time.monotonic() - started, 1e-9)
            print(f"  {done}/{total} messages ({rate:.0f}/s), {len(report.anomalies)} anomalies", flush=True)

    neighbours = [
        asyncio.create_task(gateway_neighbour(gateway, report, stop)),
        asyncio.create_task(feed_neighbour(md, report, stop)),
    ]
    if pids:
        neighbours.append(asyncio.create_task(watch_memory(pids, report, stop)))
    workers = []
    for server, url, max_frame in (("gateway", gateway, 16_384), ("feeds", md, 4096)):
        for i in range(connections):
            gen = Generator(seed * 1000 + i * 2 + (server == "feeds"), server, max_frame)
            share = messages // connections + (i < messages % connections)
            workers.append(fuzz_server(url, server, gen, share, report, progress))
    try:
        await asyncio.gather(*workers)
    finally:
        stop.set()
        await asyncio.gather(*neighbours)
    if report.acked == 0:
        report.anomaly("the gateway neighbour got no order acked")
    return report


def scan_logs(paths: list[Path], report: Report) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if any(mark in line for mark in LOG_MARKS):
                    report.anomaly(f"{path.name}: {line[:200]}")


def summary(report: Report, seconds: float, max_rss: int) -> str:
    lines = [
        f"fuzz: {sum(report.sent.values())} messages in {seconds:.1f} s, {report.reconnects} reconnects,"
        f" {report.unsent} found their connection gone"
    ]
    by_kind = Counter({k: v for k, v in report.sent.items()})
    lines.append("  sent: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    lines.append(
        "  server closes by code: " + ", ".join(f"{c} x{n}" for c, n in sorted(report.closes.items()))
    )
    lines.append(f"  neighbours: {report.acked} order acks, {report.l2_messages} l2 updates")
    for name, rss in sorted(report.max_rss.items()):
        lines.append(f"  {name}: max RSS {rss / 2**20:.0f} MiB (bound {max_rss / 2**20:.0f} MiB)")
    lines.append(f"  anomalies: {len(report.anomalies)}")
    lines.extend(f"    {a}" for a in report.anomalies)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`cme fuzz`: against --gateway/--md, or a stack of its own (logs and memory watched too)."""
    started = time.monotonic()
    max_rss = args.max_rss_mib << 20
    if args.gateway and args.md:
        report = asyncio.run(
            run_fuzz(
                args.gateway, args.md, seed=args.seed, messages=args.messages, connections=args.connections
            )
        )
    elif args.gateway or args.md:
        print("cme fuzz: give both --gateway and --md, or neither (own stack)", file=sys.stderr)
        return 2
    else:
        report = fuzz_own_stack(args.seed, args.messages, args.connections, max_rss)
    print(summary(report, time.monotonic() - started, max_rss))
    return 1 if report.anomalies else 0


def fuzz_own_stack(seed: int, messages: int, connections: int, max_rss: int, quiet: bool = False) -> Report:
    from services.supervisor import Stack, StackConfig, describe_exit

    with tempfile.TemporaryDirectory(prefix="cme-fuzz-") as tmp:
        root = Path(tmp)
        cfg = StackConfig(
            gateway_port=0,
            md_port=0,
            trades_port=0,
            metrics_port=0,
            data_dir=root / "data",
            log_dir=root / "logs",
            log_level="INFO",
        )
        stack = Stack(cfg)
        try:
            stack.start()
            if not stack.wait_ready():
                raise RuntimeError("the stack did not become ready")
            pids = {c.name: c.pid for c in stack.children if c.service in ("gateway", "feeds") and c.pid}
            host = cfg.client_host
            report = asyncio.run(
                run_fuzz(
                    f"ws://{host}:{stack.ports['gateway']}",
                    f"ws://{host}:{stack.ports['md']}",
                    seed=seed,
                    messages=messages,
                    connections=connections,
                    pids=pids,
                    quiet=quiet,
                )
            )
            for child in stack.children:
                if child.service in ("gateway", "feeds") and not child.alive():
                    assert child.proc is not None
                    report.anomaly(f"{child.name} died: {describe_exit(child.proc.returncode)}")
        finally:
            stack.stop()
        scan_logs(
            sorted((root / "logs").glob("gateway*.log")) + sorted((root / "logs").glob("feeds*.log")), report
        )
    for name, rss in report.max_rss.items():
        if rss > max_rss:
            report.anomaly(f"{name}: RSS {rss / 2**20:.0f} MiB over the bound")
    return report
