"""Prometheus metrics of every service, defined in one place (names follow Prometheus conventions:
base units, `_seconds`, `_total`, bounded labels only: symbol, type, result, code, channel, reason).

Hot paths record into `FastHistogram`: a bisect and an integer increment (no lock, no label lookup),
exposed through a custom collector. prometheus_client's Histogram costs about a microsecond per
observation, as much as matching an order, so the matcher must not use it per command.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# 5 microseconds to 5 seconds in 1-2-3-5-7 steps: fine enough to read p50/p99/p99.9 per decade.
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(m * 10.0**e, 9) for e in range(-6, 1) for m in (1, 2, 3, 5, 7)
)[3:-1]
# The core takes a few microseconds per command: its histogram starts at 1 microsecond.
CORE_BUCKETS: tuple[float, ...] = (1e-6, 2e-6, 3e-6, 4e-6, *LATENCY_BUCKETS)

REGISTRY = CollectorRegistry(auto_describe=True)


class FastHistogram(Collector):
    """A histogram with one optional label set per child, cheap enough for per-command use."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.bounds = list(buckets)
        self._children: dict[tuple[str, ...], FastHistogram.Child] = {}
        REGISTRY.register(self)

    class Child:
        __slots__ = ("bounds", "counts", "total")

        def __init__(self, bounds: list[float]) -> None:
            self.bounds = bounds
            self.counts = [0] * (len(bounds) + 1)
            self.total = 0.0

        def observe(self, seconds: float) -> None:
            self.counts[bisect_left(self.bounds, seconds)] += 1
            self.total += seconds

        def observe_n(self, seconds: float, n: int) -> None:
            """n observations of the same value (one message written to n clients)."""
            self.counts[bisect_left(self.bounds, seconds)] += n
            self.total += seconds * n

        def observe_many(self, seconds: list[float]) -> None:
            counts, bounds = self.counts, self.bounds
            for s in seconds:
                counts[bisect_left(bounds, s)] += 1
            self.total += sum(seconds)

    def labels(self, *values: str) -> FastHistogram.Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = FastHistogram.Child(self.bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labelnames))
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*self.bounds, float("inf")], child.counts, strict=True):
                cumulative += count
                buckets.append((_bound_str(bound), cumulative))
            family.add_metric(list(values), buckets, child.total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=list(self.labelnames))


def _bound_str(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(f"{bound:.6g}"))


# --- identity ---------------------------------------------------------------------------------
SERVICE_INFO = Info("cme_service", "Which service and instance this process is", registry=REGISTRY)

# --- gateway ----------------------------------------------------------------------------------
GATEWAY_ACK_SECONDS = FastHistogram(
    "cme_gateway_ack_latency_seconds",
    "Gateway receive of an order to its ack (after the stream append)",
    ("op",),
)
ORDERS = Counter(
    "cme_orders_total",
    "Order messages by symbol, type and result at the gateway",
    ("symbol", "type", "result"),
    registry=REGISTRY,
)
REJECTS = Counter(
    "cme_rejects_total", "Rejects by code and where they happened", ("code", "stage"), registry=REGISTRY
)
CONNECTIONS = Gauge("cme_ws_connections", "Open WebSocket connections", ("server",), registry=REGISTRY)
REDIS_ROUNDTRIPS = Counter("cme_redis_roundtrips_total", "Redis round trips", ("op",), registry=REGISTRY)
REDIS_ERRORS = Counter("cme_redis_errors_total", "Redis errors", ("op",), registry=REGISTRY)
APPEND_BATCH = FastHistogram(
    "cme_gateway_append_batch_size",
    "Orders appended per Redis round trip",
    (),
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)

# --- matcher ----------------------------------------------------------------------------------
COMMAND_SECONDS = FastHistogram(
    "cme_matcher_command_seconds", "Core time per command", ("symbol",), buckets=CORE_BUCKETS
)
STREAM_WAIT_SECONDS = FastHistogram(
    "cme_stream_wait_seconds", "Gateway append to matcher read, from the stream entry id", ("symbol",)
)
ORDER_TO_PUBLISH_SECONDS = FastHistogram(
    "cme_order_to_publish_seconds", "Gateway receive to the matcher's publish of its reports", ("symbol",)
)
BATCH_SIZE = FastHistogram(
    "cme_matcher_batch_size",
    "Stream entries applied per commit",
    ("symbol",),
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
TRADES = Counter("cme_trades_total", "Trades", ("symbol",), registry=REGISTRY)
TRADED_NOTIONAL = Counter(
    "cme_traded_notional_total", "Traded notional in quote currency", ("symbol",), registry=REGISTRY
)
STREAM_LENGTH = Gauge("cme_stream_length", "Entries in the orders stream", ("symbol",), registry=REGISTRY)
MATCHER_LAG = Gauge(
    "cme_matcher_lag_entries", "Entries appended but not yet applied", ("symbol",), registry=REGISTRY
)
APPLIED = Counter("cme_matcher_applied_total", "Stream entries applied", ("symbol",), registry=REGISTRY)
CHECKPOINT_SECONDS = FastHistogram(
    "cme_checkpoint_duration_seconds", "Time to write a checkpoint", ("symbol",)
)
CHECKPOINT_TIMESTAMP = Gauge(
    "cme_checkpoint_last_timestamp_seconds",
    "Unix time of the last checkpoint",
    ("symbol",),
    registry=REGISTRY,
)
REPLAYED = Gauge("cme_replayed_entries", "Entries replayed at the last start", ("symbol",), registry=REGISTRY)
PUBLISHED = Counter("cme_published_messages_total", "Messages published", ("channel",), registry=REGISTRY)
BEST_PRICE = Gauge("cme_book_best_price", "Best bid and ask", ("symbol", "side"), registry=REGISTRY)
SPREAD = Gauge("cme_book_spread", "Best ask minus best bid", ("symbol",), registry=REGISTRY)
RESTING_ORDERS = Gauge("cme_book_resting_orders", "Resting orders", ("symbol",), registry=REGISTRY)

# --- feeds ------------------------------------------------------------------------------------
FEED_SEND_SECONDS = FastHistogram(
    "cme_feed_publish_to_send_seconds", "Matcher publish to the feed's write to clients", ("channel",)
)
FEED_SENT = Counter(
    "cme_feed_messages_sent_total", "Messages written to clients", ("channel",), registry=REGISTRY
)
FEED_DROPPED = Counter(
    "cme_feed_dropped_clients_total",
    "Clients disconnected for falling behind",
    ("reason",),
    registry=REGISTRY,
)
FEED_RESYNCS = Counter(
    "cme_feed_resyncs_total", "Book resyncs after a sequence gap", ("symbol",), registry=REGISTRY
)


def instance_name(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def serve(service: str, port: int, instance: str | None = None, host: str = "127.0.0.1") -> int:
    """Expose /metrics on host:port (port 0: any free port); returns the bound port. The host is the
    service's own --host unless --metrics-host says otherwise: never every interface by default."""
    SERVICE_INFO.info({"service": service, "instance": instance or instance_name(service)})
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    metrics_app = server.get_app()
    assert metrics_app is not None
    server.set_app(_with_health(metrics_app))
    return int(server.server_port)


class Heartbeat:
    """The event loop's pulse, for /healthz on the metrics port.

    That port is served by prometheus_client's thread, which a flood of the WebSocket ports cannot
    starve (the connection caps keep descriptors for it); but a thread answering proves nothing about
    the loop, so /healthz answers 503 once the loop has not beaten for `stale_after` seconds.
    """

    def __init__(self, stale_after: float = 5.0) -> None:
        self.stale_after = stale_after
        self.last: float | None = None  # None: no loop beats here (yet): healthy

    def healthy(self) -> bool:
        return self.last is None or time.monotonic() - self.last < self.stale_after

    async def run(self, every: float = 1.0) -> None:
        while True:
            self.last = time.monotonic()
            await asyncio.sleep(every)


HEARTBEAT = Heartbeat()
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HealthSource(Protocol):
    """What a service reports through /healthz and /readyz: a reason, or None when all is well."""

    def problem(self) -> str | None:
        """Why the service cannot do its work now (Redis or the matcher unreachable, lag too high)."""

    def unready(self) -> str | None:
        """Why a load balancer should not send it clients yet (the problems, or still starting)."""


class AlwaysHealthy:
    """The source of a process whose service registered none (the matcher: its heartbeat is all)."""

    def problem(self) -> str | None:
        return None

    def unready(self) -> str | None:
        return None


class Health:
    """/healthz and /readyz of a process: the event loop's heartbeat, then its service's source.

    Read from prometheus_client's thread and from the WebSocket servers' request hook; a source only
    reads attributes its event loop maintains, so no lock is needed."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat
        self.source: HealthSource = AlwaysHealthy()

    def answer(self, path: str, source: HealthSource | None = None) -> tuple[int, str] | None:
        """(HTTP status, body) for /healthz or /readyz, None for any other path."""
        if path not in ("/healthz", "/readyz"):
            return None
        src = source or self.source
        if not self.heartbeat.healthy():
            reason: str | None = "event loop stalled"
        else:
            reason = src.problem() if path == "/healthz" else src.unready()
        return (200, "OK\n") if reason is None else (503, reason + "\n")


HEALTH = Health(HEARTBEAT)


def _with_health(app: WsgiApp) -> WsgiApp:
    def serve_health(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = HEALTH.answer(str(environ.get("PATH_INFO")))
        if answer is None:
            return app(environ, start_response)
        status, body = answer
        line = "200 OK" if status == 200 else "503 Service Unavailable"
        start_response(line, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    return serve_health
