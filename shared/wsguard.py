"""Connection limits of the WebSocket servers (gateway and feeds), in small pieces.

The pieces (`Policy`, `Guard`, `ConnectionLimiter`, `ReadGate`, `connection_cap`, `Throttled`) know
nothing of the WebSocket library; shared/wsserver.py applies them to every connection:

- At accept time, before any byte of the handshake is read, a connection over the global cap or over
  its IP's cap is aborted (`connection_made`): a refused connection costs an accept and a close.
- The global cap stays below the file-descriptor limit minus `FD_RESERVE`, so a connection flood
  never takes the descriptors Redis, the metrics thread and the logs need.
- Reading stops while the write side is paused (the transport's buffer is above its high-water
  mark): pongs and close replies are written from reads, so a client that sends pings and never
  reads would otherwise make the server buffer pongs without end.
- Every byte queued for a connection counts, control frames included: after each read that leaves
  more than `max_queued` bytes in the transport, the connection is aborted and its buffer freed.
- A connection whose write side stays paused for `send_timeout` seconds (its client reads nothing) is
  aborted: a close frame could not reach it either.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Final

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
    """Reading is paused while any reason (a bit) holds; shared/wsserver.py holds WRITE while the
    writes are paused."""

    __slots__ = ("held", "pause", "resume")
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
