"""Connection limits of the WebSocket servers (gateway and feeds), in small pieces.

The pure pieces (`ConnectionLimiter`, `ReadGate`, `connection_cap`, `Throttled`) know nothing of the
WebSocket library; `GuardedConnection` applies them to a websockets 17 server connection:

- At accept time, before any byte of the handshake is read, a connection over the global cap or over
  its IP's cap is aborted (`connection_made`): a refused connection costs an accept and a close.
- The global cap stays below the file-descriptor limit minus `FD_RESERVE`, so a connection flood
  never takes the descriptors Redis, the metrics thread and the logs need.
- Reading stops while the write side is paused (the transport's buffer is above its high-water
  mark): websockets writes pongs and close replies on its own, from data_received, so a client that
  sends pings and never reads would otherwise make the server buffer pongs without end.
- Every byte queued for a connection counts, control frames included: after each data_received that
  leaves more than `max_queued` bytes in the transport, the connection is aborted and its buffer freed.
- A connection whose write side stays paused for `send_timeout` seconds (its client reads nothing) is
  aborted: a close frame could not reach it either.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar, cast

from websockets.asyncio.server import ServerConnection

log = logging.getLogger("cme.wsguard")

FD_RESERVE: Final = 256  # descriptors kept for Redis, listeners, the metrics thread, logs, accept bursts
MAX_CONNECTIONS: Final = 10_000
MAX_CONNECTIONS_PER_IP: Final = 1_000
HANDSHAKE_TIMEOUT: Final = 10.0
SEND_TIMEOUT: Final = 30.0
MAX_QUEUED: Final = 8 << 20
REFUSED_GLOBAL: Final = "too many connections"
REFUSED_PER_IP: Final = "too many connections from one address"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel caps lower
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(requested: int, reserve: int = FD_RESERVE) -> int:
    """The global connection cap: `requested`, lowered to the descriptor limit minus `reserve`."""
    available = raise_nofile_limit() - reserve
    if requested > available:
        log.warning(
            "--max-connections %d lowered to %d: the open-files limit leaves no more (reserve %d)",
            requested,
            max(available, 1),
            reserve,
        )
        return max(available, 1)
    return requested


class Throttled:
    """A warning that repeats at most once per `every` seconds, with the count of what it folded."""

    __slots__ = ("every", "folded", "last", "logger")

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger, self.every = logger, every
        self.last = -1e18
        self.folded = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.folded += 1
            return
        folded, self.folded, self.last = self.folded, 0, now
        if folded:
            self.logger.warning(msg + " (and %d more like it since the last report)", *args, folded)
        else:
            self.logger.warning(msg, *args)


class ConnectionLimiter:
    """Open connections in total and per peer address, against two caps. Pure bookkeeping."""

    __slots__ = ("by_ip", "max_per_ip", "max_total", "total")

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        if max_total < 1 or max_per_ip < 1:
            raise ValueError("connection caps must be at least 1")
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Count a new connection from `ip`; the refusal reason instead if a cap is reached."""
        if self.total >= self.max_total:
            return REFUSED_GLOBAL
        held = self.by_ip.get(ip, 0)
        if held >= self.max_per_ip:
            return REFUSED_PER_IP
        self.by_ip[ip] = held + 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        held = self.by_ip.get(ip, 0) - 1
        if held > 0:
            self.by_ip[ip] = held
        else:
            self.by_ip.pop(ip, None)
        self.total -= 1


class ReadGate:
    """Reading is paused while any reason holds (the message queue is full, the writes are paused)."""

    __slots__ = ("held", "pause", "resume")
    QUEUE: Final = 1
    WRITE: Final = 2

    def __init__(self, pause: Any, resume: Any) -> None:
        self.pause, self.resume = pause, resume
        self.held = 0

    def hold(self, reason: int) -> None:
        if not self.held:
            self.pause()
        self.held |= reason

    def release(self, reason: int) -> None:
        if self.held & reason:
            self.held &= ~reason
            if not self.held:
                self.resume()


@dataclass(frozen=True)
class Policy:
    """Per-process connection limits (the flags of `cme gateway` and `cme feeds`)."""

    max_connections: int = MAX_CONNECTIONS
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_queued: int = MAX_QUEUED

    @classmethod
    def from_args(cls, args: Any) -> Policy:
        return cls(
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_connections_per_ip,
            handshake_timeout=args.handshake_timeout,
            send_timeout=args.send_timeout,
            max_queued=args.max_queued_bytes,
        )


class Guard:
    """What the connections of one process share: the policy, the limiter and throttled logs."""

    def __init__(self, policy: Policy, name: str) -> None:
        self.policy, self.name = policy, name
        cap = connection_cap(policy.max_connections)
        self.limiter = ConnectionLimiter(cap, policy.max_connections_per_ip)
        self.refused = Throttled(log)
        self.aborted = Throttled(log)


class GuardedConnection(ServerConnection):
    """A websockets server connection under a `Guard` (set on a subclass by `guarded`)."""

    guard: ClassVar[Guard]
    peer_ip: str | None = None  # None: refused at accept time
    accepted_at = 0.0  # loop time of the accept
    _gate: ReadGate
    _stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else ""
        guard = self.guard
        refusal = guard.limiter.admit(ip)
        if refusal is not None:
            guard.refused.warning("%s: refused a connection from %s: %s", guard.name, ip, refusal)
            transport.abort()  # no handler task, no handshake: connection_lost only
            return
        self.peer_ip = ip
        self.accepted_at = self.loop.time()
        super().connection_made(transport)
        gate = self._gate = ReadGate(transport.pause_reading, transport.resume_reading)
        queue = self.recv_messages  # its own flow control goes through the gate too
        queue.pause = lambda: gate.hold(ReadGate.QUEUE)
        queue.resume = lambda: gate.release(ReadGate.QUEUE)

    def connection_lost(self, exc: Exception | None) -> None:
        ip = self.peer_ip
        if ip is None:
            return  # refused: websockets never saw it
        self.peer_ip = None
        self.guard.limiter.release(ip)
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._gate.hold(ReadGate.WRITE)
        timeout = self.guard.policy.send_timeout
        if timeout > 0:
            self._stall = self.loop.call_later(timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._gate.release(ReadGate.WRITE)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        queued = self.transport.get_write_buffer_size()
        if queued > self.guard.policy.max_queued:
            self.abort(f"{queued} bytes queued, over the limit of {self.guard.policy.max_queued}")

    def _stalled(self) -> None:
        self._stall = None
        self.abort(f"read nothing for {self.guard.policy.send_timeout:g} s with its send buffer full")

    def abort(self, why: str) -> None:
        """Cut the TCP connection now, freeing what is queued for it."""
        if not self.transport.is_closing():
            guard = self.guard
            guard.aborted.warning("%s: aborted the connection of %s: %s", guard.name, self.peer_ip, why)
        self.transport.abort()


C = TypeVar("C", bound=GuardedConnection)


def guarded(cls: type[C], guard: Guard) -> type[C]:
    """A subclass of `cls` whose connections are under `guard` (websockets instantiates the class)."""
    return type(cls.__name__, (cls,), {"guard": guard})
