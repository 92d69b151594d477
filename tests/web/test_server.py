"""The page's HTTP server on a real socket: its files, /api/config, /api/latency, nothing else."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from importlib import resources

import orjson
import pytest

from services.web.latency import LatencyReport
from services.web.server import WebConfig, WebServer
from shared.instruments import default_instruments


@pytest.fixture()
def server() -> Iterator[WebServer]:
    cfg = WebConfig(
        gateway_url="ws://127.0.0.1:8000",
        md_url="ws://127.0.0.1:8001",
        trades_url="ws://127.0.0.1:8002",
        instruments=default_instruments(),
        auth="api_key",
    )
    page = "# TYPE cme_stream_wait_seconds histogram\n" + "".join(
        f'cme_stream_wait_seconds_bucket{{symbol="BTC-USDT",le="{le}"}} {n}\n'
        for le, n in (("0.001", 0), ("0.002", 4), ("+Inf", 4))
    )
    latency = LatencyReport(["http://127.0.0.1:1/metrics"], fetcher=lambda _url: page)
    srv = WebServer(("127.0.0.1", 0), cfg, latency)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv: WebServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def shipped(name: str) -> bytes:
    return resources.files("services.web").joinpath("static", name).read_bytes()


def test_the_page_and_its_files_are_served_with_their_types(server: WebServer) -> None:
    for path, name, ctype in (
        ("/", "index.html", "text/html"),
        ("/index.html", "index.html", "text/html"),
        ("/app.js", "app.js", "text/javascript"),
        ("/style.css", "style.css", "text/css"),
        ("/favicon.svg", "favicon.svg", "image/svg+xml"),
    ):
        status, headers, body = get(server, path)
        assert status == 200 and body == shipped(name), path
        assert headers["Content-Type"].startswith(ctype)
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, body = get(server, "/app.js?v=2")  # a query string does not change the file
    assert status == 200 and body == shipped("app.js")


def test_the_page_references_only_files_that_are_served(server: WebServer) -> None:
    html = shipped("index.html").decode()
    for ref in ("style.css", "app.js", "favicon.svg"):
        assert f'"{ref}"' in html
        assert get(server, f"/{ref}")[0] == 200


@pytest.mark.parametrize(
    "path",
    ["/server.py", "/../server.py", "/static/app.js", "/%2e%2e/server.py", "/api", "/app.js/", "/etc/passwd"],
)
def test_nothing_but_the_shipped_files_is_reachable(server: WebServer, path: str) -> None:
    status, _headers, body = get(server, path)
    assert status == 404 and body == b"not found\n"


def test_head_answers_without_a_body(server: WebServer) -> None:
    status, headers, body = get(server, "/app.js", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(shipped("app.js"))


def test_config_tells_the_page_where_to_connect(server: WebServer) -> None:
    status, headers, body = get(server, "/api/config")
    assert status == 200 and headers["Content-Type"] == "application/json"
    cfg = orjson.loads(body)
    assert (cfg["gateway"], cfg["md"], cfg["trades"]) == (
        "ws://127.0.0.1:8000",
        "ws://127.0.0.1:8001",
        "ws://127.0.0.1:8002",
    )
    assert cfg["auth"] == "api_key"
    assert [s["symbol"] for s in cfg["symbols"]] == ["BTC-USDT", "ETH-USDT"]
    assert cfg["symbols"][0]["tick_size"] == "0.01" and cfg["symbols"][0]["lot_size"] == "0.00001"


def test_latency_is_scraped_and_summarised(server: WebServer) -> None:
    status, _headers, body = get(server, "/api/latency")
    assert status == 200
    report = orjson.loads(body)
    wait = next(s for s in report["stages"] if s["stage"] == "stream_wait")
    assert wait["count"] == 4 and wait["p50_us"] == 1500.0 and wait["p99_us"] == pytest.approx(1990.0)
    ack = next(s for s in report["stages"] if s["stage"] == "gateway_ack")
    assert ack["count"] == 0 and ack["p50_us"] is None
    assert report["sources"] == [{"url": "http://127.0.0.1:1/metrics", "ok": True, "error": None}]
