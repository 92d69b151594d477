"""Grafana: provisioning files and dashboards parse, refer to the provisioned datasource, are laid out
sanely and show what the issue asks for (per-stage p50/p99/p99.9, throughput, rejects by code, matcher lag,
connections, dropped clients, checkpoint age; BBO, spread, trades per second)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.deploy import (
    COMPOSE,
    DASHBOARD_PROVIDERS,
    DASHBOARDS,
    DATASOURCES,
    DEPLOY,
    alert_selector,
    all_exprs,
    load_json,
    load_yaml,
)

PANEL_TYPES = {"timeseries", "stat", "row"}
STAGES = (
    "cme_gateway_ack_latency_seconds",
    "cme_matcher_command_seconds",
    "cme_stream_wait_seconds",
    "cme_order_to_publish_seconds",
    "cme_feed_publish_to_send_seconds",
)


def panels(path: Path) -> list[dict[str, Any]]:
    return [p for p in load_json(path)["panels"] if p["type"] != "row"]


def dashboard(uid: str) -> dict[str, Any]:
    for path in DASHBOARDS:
        board = load_json(path)
        if board["uid"] == uid:
            return dict(board)
    raise AssertionError(f"no dashboard with uid {uid}")


def exprs_of(board: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))


def datasources() -> dict[str, dict[str, Any]]:
    return {ds["uid"]: ds for ds in load_yaml(DATASOURCES)["datasources"]}


def grafana_mounts() -> dict[str, Path]:
    """Container path -> repo path of grafana's bind mounts in docker-compose.yml."""
    mounts = {}
    for volume in load_yaml(COMPOSE)["services"]["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = (DEPLOY / source).resolve()
    return mounts


def in_repo(container_path: str) -> Path:
    """Where a path inside the grafana container comes from in the repository."""
    path = PurePosixPath(container_path)
    for target, source in grafana_mounts().items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted into the grafana container")


def test_there_are_two_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} == {"latency.json", "book.json"}


def test_datasource_provisioning() -> None:
    provisioned = load_yaml(DATASOURCES)
    assert provisioned["apiVersion"] == 1
    prometheus = datasources()["prometheus"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["isDefault"] is True
    url = urlparse(prometheus["url"])
    compose = load_yaml(COMPOSE)["services"]
    assert url.hostname in compose, f"datasource url host {url.hostname} is no compose service"
    assert any(port.endswith(f":{url.port}") for port in compose[url.hostname]["ports"]), url


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    provisioned = load_yaml(DASHBOARD_PROVIDERS)
    assert provisioned["apiVersion"] == 1
    for provider in provisioned["providers"]:
        assert provider["type"] == "file"
        folder = in_repo(provider["options"]["path"])
        assert folder.is_dir()
        assert sorted(folder.glob("*.json")) == DASHBOARDS
    assert in_repo("/etc/grafana/provisioning/datasources/prometheus.yml") == DATASOURCES
    assert in_repo("/etc/grafana/provisioning/dashboards/dashboards.yml") == DASHBOARD_PROVIDERS
    home = load_yaml(COMPOSE)["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert in_repo(home).is_file()


def test_dashboard_uids_and_titles_are_unique() -> None:
    boards = [load_json(p) for p in DASHBOARDS]
    uids = [b["uid"] for b in boards]
    titles = [b["title"] for b in boards]
    assert all(uids) and len(set(uids)) == len(uids)
    assert len(set(titles)) == len(titles)
    for board in boards:
        assert board["id"] is None, "provisioned dashboards carry no database id"
        assert 36 <= board["schemaVersion"] <= 40
        for link in board.get("links", []):
            assert link["url"].removeprefix("/d/") in uids, link


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels(path: Path) -> None:
    board = load_json(path)
    uids = set(datasources())
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids), "panel ids repeat"
    titles = [p["title"] for p in panels(path)]
    assert len(set(titles)) == len(titles), "panel titles repeat"
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["datasource"]["type"] == datasources()[panel["datasource"]["uid"]]["type"]
        assert panel["targets"], f"{panel['title']}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
            # the stack test runs each query verbatim: no template variables
            assert "$" not in target["expr"], f"{panel['title']}: template variables in {target['expr']}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_layout_fits_and_does_not_overlap(path: Path) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in load_json(path)["panels"]:
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0
        assert g["x"] + g["w"] <= 24, f"{panel['title']} is wider than the grid"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_latency_dashboard_shows_every_stage_at_p50_p99_p999() -> None:
    exprs = exprs_of(dashboard("cme-latency"))
    for stage in STAGES:
        for quantile in ("p50", "p99", "p999"):
            assert f"stage:{stage}:{quantile}" in exprs, f"{stage} {quantile} missing"


@pytest.mark.parametrize(
    ("uid", "metric"),
    [
        ("cme-latency", "cme_orders_total"),  # throughput
        ("cme-latency", "cme_matcher_applied_total"),
        ("cme-latency", "cme_published_messages_total"),
        ("cme-latency", "cme_rejects_total"),  # rejects by code
        ("cme-latency", "cme_matcher_lag_entries"),
        ("cme-latency", "cme_ws_connections"),
        ("cme-latency", "cme_feed_dropped_clients_total"),
        ("cme-latency", "cme_checkpoint_last_timestamp_seconds"),  # checkpoint age
        ("cme-book", "cme_book_best_price"),  # BBO
        ("cme-book", "cme_book_spread"),
        ("cme-book", "cme_trades_total"),  # trades per second
    ],
)
def test_dashboard_shows(uid: str, metric: str) -> None:
    board = dashboard(uid)
    exprs = exprs_of(board)
    assert metric in exprs, f"{uid} does not show {metric}"


def test_rejects_are_shown_by_code() -> None:
    assert "sum by (code) (rate(cme_rejects_total" in exprs_of(dashboard("cme-latency"))


def test_trades_per_second_and_checkpoint_age() -> None:
    assert "rate(cme_trades_total[1m])" in exprs_of(dashboard("cme-book"))
    assert "symbol:cme_checkpoint_last_timestamp_seconds:age" in exprs_of(dashboard("cme-latency"))


def test_alert_expressions_have_a_strippable_comparison() -> None:
    """The convention deploy/README.md documents for the stack test: `<selector> <op> <threshold>`, one line,
    the selector holding no comparison of its own (so it returns data on a healthy stack)."""
    alerts = [e for e in all_exprs() if e.alert]
    assert len(alerts) >= 8
    for e in alerts:
        assert "\n" not in e.expr.strip(), e.where
        selector = alert_selector(e.expr)
        for op in (" > ", " < ", " >= ", " <= ", " == ", " != "):
            assert op not in selector, f"{e.where}: comparison left in the selector {selector!r}"
