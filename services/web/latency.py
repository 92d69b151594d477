"""Latency of each pipeline stage, read from the services' own /metrics, for the trading page.

A browser page cannot read another origin's /metrics, so the web server scrapes them and answers
`GET /api/latency` with p50/p99 per stage. Each stage is one histogram of shared/metrics.py, summed
over every process and label set that matches. Quantiles are computed as Prometheus's
histogram_quantile does (linear within the bucket), over the observations of about the last
`WINDOW` seconds (the difference between this scrape and one kept from a while ago), or over
everything since the processes started while no older scrape exists or the window saw nothing.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

WINDOW = 60.0  # seconds of observations a "recent" quantile covers
MIN_AGE = 5.0  # an older scrape must be at least this old to serve as the window's start
CACHE_SECONDS = 1.0  # several tabs polling share one scrape a second
SCRAPE_TIMEOUT = 1.0


@dataclass(frozen=True)
class Stage:
    key: str
    label: str  # short, for the page's table
    detail: str  # what exactly is measured
    metric: str  # histogram family name (without _bucket)
    match: dict[str, str] = field(default_factory=dict)  # labels a sample must carry


# In pipeline order: what an order meets from the gateway to the client's screen.
STAGES: tuple[Stage, ...] = (
    Stage(
        "gateway_ack",
        "gateway ack",
        "gateway: order received -> ack, after the stream append",
        "cme_gateway_ack_latency_seconds",
        {"op": "new"},
    ),
    Stage("stream_wait", "stream wait", "gateway append -> matcher read", "cme_stream_wait_seconds"),
    Stage("matcher_core", "matching", "matcher core time per command", "cme_matcher_command_seconds"),
    Stage(
        "order_to_publish",
        "order -> reports",
        "gateway receive -> the matcher publishes its reports",
        "cme_order_to_publish_seconds",
    ),
    Stage(
        "feed_l2",
        "feed send: book",
        "matcher publish -> the feed writes to clients (l2)",
        "cme_feed_publish_to_send_seconds",
        {"channel": "l2"},
    ),
    Stage(
        "feed_trades",
        "feed send: trades",
        "matcher publish -> the feed writes to clients (trades)",
        "cme_feed_publish_to_send_seconds",
        {"channel": "trades"},
    ),
)

# upper bound (seconds, +inf last) -> cumulative count
Histogram = dict[float, float]


def parse(text: str, stages: Sequence[Stage] = STAGES) -> dict[str, Histogram]:
    """Each stage's histogram from one /metrics page (stages absent from it are left out)."""
    wanted: dict[str, list[Stage]] = {}
    for st in stages:
        wanted.setdefault(st.metric, []).append(st)
    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        for st in wanted.get(family.name, ()):
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    continue
                labels = sample.labels
                if any(labels.get(k) != v for k, v in st.match.items()):
                    continue
                bound = float(labels["le"])
                hist = out.setdefault(st.key, {})
                hist[bound] = hist.get(bound, 0.0) + sample.value
    return out


def merge(into: dict[str, Histogram], more: dict[str, Histogram]) -> None:
    for key, hist in more.items():
        target = into.setdefault(key, {})
        for bound, count in hist.items():
            target[bound] = target.get(bound, 0.0) + count


def delta(new: Histogram, old: Histogram | None) -> Histogram:
    """Observations between two scrapes; the newer one alone if a process restarted (counts fell)."""
    if not old:
        return new
    out = {bound: count - old.get(bound, 0.0) for bound, count in new.items()}
    if any(v < 0 for v in out.values()):
        return new
    return out


def total(hist: Histogram) -> float:
    return hist.get(math.inf, max(hist.values(), default=0.0))


def quantile(q: float, hist: Histogram) -> float | None:
    """histogram_quantile(q): None without observations; the highest finite bound if it lands in +Inf."""
    bounds = sorted(hist)
    count = total(hist)
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in bounds:
        cumulative = hist[bound]
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as resp:  # our own /metrics endpoints
        body: bytes = resp.read()
    return body.decode("utf-8", "replace")


class LatencyReport:
    """Scrapes the /metrics URLs on demand (at most once per CACHE_SECONDS) and keeps a short history."""

    def __init__(
        self,
        urls: Sequence[str],
        fetcher: Callable[[str], str] = fetch,
        clock: Callable[[], float] = time.monotonic,
        stages: Sequence[Stage] = STAGES,
    ) -> None:
        self.urls = list(urls)
        self.fetcher = fetcher
        self.clock = clock
        self.stages = list(stages)
        self._history: deque[tuple[float, dict[str, Histogram]]] = deque()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def report(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            current, sources = self._scrape()
            older = self._window_start(now)
            self._history.append((now, current))
            while self._history and now - self._history[0][0] > WINDOW:
                self._history.popleft()
            result = {
                "stages": [self._stage(st, current, older) for st in self.stages],
                "sources": sources,
                "window_seconds": round(now - older[0], 1) if older is not None else None,
            }
            self._cached = (now, result)
            return result

    def _scrape(self) -> tuple[dict[str, Histogram], list[dict[str, Any]]]:
        merged: dict[str, Histogram] = {}
        sources: list[dict[str, Any]] = []
        if not self.urls:
            return merged, sources
        with ThreadPoolExecutor(max_workers=min(8, len(self.urls))) as pool:
            pages = list(pool.map(self._try_fetch, self.urls))
        for url, (text, error) in zip(self.urls, pages, strict=True):
            if text is not None:
                merge(merged, parse(text, self.stages))
            sources.append({"url": url, "ok": error is None, "error": error})
        return merged, sources

    def _try_fetch(self, url: str) -> tuple[str | None, str | None]:
        try:
            return self.fetcher(url), None
        except (OSError, ValueError) as exc:
            return None, str(exc)

    def _window_start(self, now: float) -> tuple[float, dict[str, Histogram]] | None:
        """The oldest kept scrape that is old enough to span a useful window."""
        for entry in self._history:
            if now - entry[0] <= WINDOW and now - entry[0] >= MIN_AGE:
                return entry
        return None

    @staticmethod
    def _stage(
        st: Stage, current: dict[str, Histogram], older: tuple[float, dict[str, Histogram]] | None
    ) -> dict[str, Any]:
        hist = current.get(st.key, {})
        scope = "since_start"
        if older is not None:
            recent = delta(hist, older[1].get(st.key))
            if total(recent) > 0:
                hist, scope = recent, "recent"

        def micros(q: float) -> float | None:
            v = quantile(q, hist)
            return None if v is None else round(v * 1e6, 1)

        return {
            "stage": st.key,
            "label": st.label,
            "detail": st.detail,
            "p50_us": micros(0.5),
            "p99_us": micros(0.99),
            "count": int(total(hist)) if hist else 0,
            "scope": scope,
        }
