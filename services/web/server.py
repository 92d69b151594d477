"""`cme web`: the trading page and its two helper endpoints.

The page (static/: plain JavaScript, no build step) talks to the public WebSocket endpoints directly;
this server only hands it its files, `GET /api/config` (where those endpoints are, the instruments,
the auth mode) and `GET /api/latency` (p50/p99 per pipeline stage, scraped from the services'
/metrics, which the page cannot read across origins). Only the files shipped in static/ are served,
looked up by exact name: no path from a request ever reaches the file system.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import orjson

from services.web.latency import LatencyReport
from shared import logs, metrics
from shared.instruments import Instrument, load_instruments

log = logging.getLogger("cme.web")

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
# The page connects to the feeds and the gateway on other ports: WebSocket targets are allowed, all
# else stays same-origin (no inline script, no third-party resource).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def load_static() -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type) for every file shipped in services/web/static."""
    out: dict[str, tuple[bytes, str]] = {}
    root = resources.files("services.web").joinpath("static")
    for entry in root.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and suffix in TYPES:
            out[f"/{name}"] = (entry.read_bytes(), TYPES[suffix])
    out["/"] = out["/index.html"]
    return out


@dataclass(frozen=True)
class WebConfig:
    gateway_url: str
    md_url: str
    trades_url: str
    instruments: dict[str, Instrument]
    metrics_urls: tuple[str, ...] = ()
    auth: str = "open"  # open: the page asks for an account name; api_key: for a key

    def public(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway_url,
            "md": self.md_url,
            "trades": self.trades_url,
            "auth": self.auth,
            "symbols": [inst.spec() for inst in self.instruments.values()],
        }


class WebServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck browser connection never holds up shutdown

    def __init__(
        self, address: tuple[str, int], cfg: WebConfig, latency: LatencyReport | None = None
    ) -> None:
        self.cfg = cfg
        self.static = load_static()
        self.config_body = orjson.dumps(cfg.public())
        self.latency = latency or LatencyReport(cfg.metrics_urls)
        super().__init__(address, Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls /api/latency

    def version_string(self) -> str:
        return "cme-web"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/api/config":
            self._send(HTTPStatus.OK, self.server.config_body, "application/json", body)
        elif path == "/api/latency":
            self._send(HTTPStatus.OK, orjson.dumps(self.server.latency.report()), "application/json", body)
        elif path == "/healthz":
            self._send(HTTPStatus.OK, b"OK\n", TYPES[".txt"], body)
        elif path in self.server.static:
            content, ctype = self.server.static[path]
            self._send(HTTPStatus.OK, content, ctype, body)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", TYPES[".txt"], body)

    def _send(self, status: HTTPStatus, content: bytes, ctype: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def run(args: argparse.Namespace) -> int:
    """`cme web`: serve until SIGTERM / SIGINT, then exit 0."""
    logs.from_args("web", args)
    try:
        instruments = load_instruments(args.instruments)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    cfg = WebConfig(
        gateway_url=args.gateway_url,
        md_url=args.md_url,
        trades_url=args.trades_url,
        instruments=instruments,
        metrics_urls=tuple(args.metrics_url or ()),
        auth=args.auth,
    )
    metrics.serve("web", args.metrics_port, args.instance, args.metrics_host)
    server = WebServer((args.host, args.port), cfg)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    thread.start()
    log.info("trading page on http://%s:%d/", args.host, server.port)
    stop.wait()
    server.shutdown()
    server.server_close()
    log.info("stopped")
    return 0
