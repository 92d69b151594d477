"""`cme stats`: a live terminal table of every pipeline stage's latency and the rates, read from the
services' own /metrics (no Prometheus needed).

The services are found in a `cme up` data dir's stack.json (as `cme demo` does), or from
--metrics-port: that port and the following ones, while they answer. Each refresh scrapes every
process, sums the histograms of one stage over the processes, and shows p50 / p99 / p99.9 of what
was observed since the previous refresh (of everything since start when the interval saw nothing,
marked `all`), and per-second rates of the counters over the interval.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

# (stage, histogram): in the order an order travels.
STAGES: tuple[tuple[str, str], ...] = (
    ("gateway receive -> ack", "cme_gateway_ack_latency_seconds"),
    ("gateway append -> matcher read", "cme_stream_wait_seconds"),
    ("matcher core, per command", "cme_matcher_command_seconds"),
    ("gateway receive -> matcher publish", "cme_order_to_publish_seconds"),
    ("matcher publish -> feed send", "cme_feed_publish_to_send_seconds"),
)
RATES: tuple[tuple[str, str], ...] = (
    ("orders at the gateways", "cme_orders_total"),
    ("rejects", "cme_rejects_total"),
    ("entries applied by the matcher", "cme_matcher_applied_total"),
    ("trades", "cme_trades_total"),
    ("messages sent by the feeds", "cme_feed_messages_sent_total"),
)
QUANTILES = (0.5, 0.99, 0.999)
SCRAPE_TIMEOUT = 2.0


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound (the last bound is +Inf), summed over label sets."""

    buckets: dict[float, float]

    @property
    def count(self) -> float:
        return max(self.buckets.values(), default=0.0)

    def minus(self, older: Histogram | None) -> Histogram:
        if older is None:
            return self
        return Histogram({b: c - older.buckets.get(b, 0.0) for b, c in self.buckets.items()})

    def quantile(self, q: float) -> float | None:
        """As PromQL's histogram_quantile: linear within the bucket that holds the rank."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for bound in sorted(self.buckets):
            cumulative = self.buckets[bound]
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower  # above the last finite bucket: that bound is all we know
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return lower


@dataclass
class Sample:
    """One scrape of every process: histograms and counters by metric name, and when it was taken."""

    at: float
    histograms: dict[str, Histogram]
    counters: dict[str, float]
    processes: int


def parse(texts: Iterable[str]) -> tuple[dict[str, Histogram], dict[str, float]]:
    """Sum each histogram's buckets and each counter over label sets and processes."""
    histograms: dict[str, dict[float, float]] = {}
    counters: dict[str, float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.type == "histogram":
                buckets = histograms.setdefault(family.name, {})
                for s in family.samples:
                    if s.name.endswith("_bucket"):
                        bound = float(s.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + s.value
            elif family.type == "counter":
                for s in family.samples:
                    if s.name.endswith("_total"):
                        counters[s.name] = counters.get(s.name, 0.0) + s.value
    return {name: Histogram(b) for name, b in histograms.items()}, counters


def scrape(urls: list[str]) -> Sample:
    texts = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as reply:
                texts.append(reply.read().decode())
        except OSError:
            continue  # a process restarting: the next refresh reads it again
    histograms, counters = parse(texts)
    return Sample(time.monotonic(), histograms, counters, len(texts))


def find_from_data_dir(data_dir: Path) -> list[str]:
    path = data_dir / "stack.json"
    try:
        state = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise LookupError(f"no running `cme up` in {data_dir} ({path}: {exc}); try --metrics-port") from exc
    return [str(p["metrics"]) for p in state["processes"]]


def find_from_port(host: str, first: int, most: int = 64) -> list[str]:
    """The first port and the following ones, while each answers /metrics."""
    urls = []
    for port in range(first, first + most):
        url = f"http://{host}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT):
                urls.append(url)
        except OSError:
            break
    if not urls:
        raise LookupError(f"nothing answers http://{host}:{first}/metrics")
    return urls


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def rows(new: Sample, old: Sample | None) -> tuple[list[list[str]], list[list[str]]]:
    """The latency rows (stage, n, p50, p99, p99.9, window) and the rate rows (what, per second)."""
    latency = []
    for stage, name in STAGES:
        total = new.histograms.get(name)
        if total is None:
            latency.append([stage, "0", "-", "-", "-", "-"])
            continue
        window = total.minus(old.histograms.get(name) if old else None) if old else total
        over = "interval" if old else "all"
        if window.count <= 0:
            window, over = total, "all"
        latency.append(
            [stage, f"{window.count:.0f}", *(duration(window.quantile(q)) for q in QUANTILES), over]
        )
    rates = []
    elapsed = (new.at - old.at) if old else 0.0
    for what, name in RATES:
        if old is None or elapsed <= 0:
            rates.append([what, "-"])
            continue
        rate = (new.counters.get(name, 0.0) - old.counters.get(name, 0.0)) / elapsed
        rates.append([what, f"{max(rate, 0.0):,.1f}/s"])
    return latency, rates


def render(new: Sample, old: Sample | None, sources: int) -> str:
    latency, rates = rows(new, old)
    head = ["stage", "n", "p50", "p99", "p99.9", "over"]
    out = [f"cme stats: {new.processes} of {sources} processes answered"]
    out += table(head, latency)
    out.append("")
    out += table(["rate", "per second"], rates)
    return "\n".join(out)


def table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    return [line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)]


def sources(args: argparse.Namespace) -> list[str]:
    if args.metrics_port is not None:
        return find_from_port(args.metrics_host, args.metrics_port)
    return find_from_data_dir(Path(args.data_dir))


def run(args: argparse.Namespace) -> int:
    try:
        urls = sources(args)
    except LookupError as exc:
        print(f"cme stats: {exc}", file=sys.stderr)
        return 2
    interval = max(0.1, float(args.interval))
    old = scrape(urls)
    live = sys.stdout.isatty() and not args.once
    try:
        while True:
            time.sleep(interval)
            new = scrape(urls)
            text = render(new, old, len(urls))
            if live:  # redraw in place
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text if live else text + "\n", flush=True)
            if args.once:
                return 0
            old = new
    except KeyboardInterrupt:
        return 0
