"""Every PromQL expression of deploy/ returns data from a real Prometheus scraping a real stack.

A redis-server, the matcher, two gateways and two feeds run as subprocesses on free ports (tests/deploy/
live_stack.py); Prometheus (Debian's `prometheus` package) scrapes them every second with
deploy/prometheus/rules.yml loaded, through a config derived from deploy/prometheus/prometheus.yml (same
jobs, `instance` = the compose service name). Websocket clients send orders that rest, trade, get
cancelled and get rejected, and subscribe to l2, depth and trades; the matcher checkpoints every 5 s.
The expressions are polled until every one returns data (or POLL_TIMEOUT): each recording rule and
dashboard target verbatim, each alert as its selector (tests.deploy.alert_selector).

Skipped (loudly) without the `prometheus` binary: deploy/install-prometheus.sh, which `make test` runs,
installs it. CME_REQUIRE_PROMTOOL=1 turns the skip into a failure (as in test_promtool.py).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy import Expr, alert_selector, all_exprs, rules
from tests.deploy.live_stack import (
    FEEDS,
    GATEWAYS,
    INSTANCES,
    MATCHER,
    Prometheus,
    PrometheusError,
    Stack,
    Traffic,
    live_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

POLL_TIMEOUT = 150.0  # from Prometheus ready to every expression returning data
POLL_EVERY = 1.0
MISSING = (
    "PROMETHEUS IS NOT INSTALLED: the dashboards' and rules' expressions are NOT checked against a live "
    "stack. Run deploy/install-prometheus.sh (Debian's `prometheus` package) or `make test`."
)

# Grafana's interval variables, should a dashboard use them: the rules' windows are 1m.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "1m",
    "${__interval}": "1m",
    "$__range": "1h",
    "${__range}": "1h",
}


def promql(e: Expr) -> str:
    """What to run for an expression: an alert's selector, anything else verbatim; Grafana variables
    replaced by concrete windows."""
    expr = alert_selector(e.expr) if e.alert else e.expr
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    return expr


@dataclass(repr=False)
class Live:
    """The running stack and Prometheus, and what polling found."""

    stack: Stack
    prometheus: Prometheus
    traffic: Traffic
    started_in: float = 0.0  # seconds to start the stack and Prometheus
    polled_for: float = 0.0  # seconds from Prometheus ready to every expression with data (or timeout)
    rounds: int = 0
    missing: dict[str, str] = field(default_factory=dict)  # `where: query` -> why it has no data
    series: dict[str, int] = field(default_factory=dict)  # `where: query` -> series returned
    stack_problems: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Live(prometheus={self.prometheus.url}, {len(self.missing)} expressions without data)"

    def diagnostics(self) -> str:
        try:
            names = ", ".join(n for n in self.prometheus.metric_names() if not n.startswith("scrape_"))
        except (OSError, PrometheusError) as exc:
            names = f"(cannot list: {exc})"
        return (
            f"\n\nmetric names present: {names}\n\ntraffic: {self.traffic.summary()}\n\n"
            f"service logs:\n{self.stack.logs()}\n--- prometheus:\n{self.prometheus.log_tail()}"
        )


def evaluate(prometheus: Prometheus, exprs: list[Expr]) -> tuple[dict[str, int], dict[str, str]]:
    """(series per expression, why each expression without data has none)."""
    series: dict[str, int] = {}
    missing: dict[str, str] = {}
    for e in exprs:
        query = promql(e)
        key = f"{e.where}: {query}"
        try:
            result = prometheus.query(query)
        except (OSError, PrometheusError) as exc:
            missing[key] = f"query failed: {exc}"
            continue
        series[key] = len(result)
        if not result:
            missing[key] = "empty result"
    return series, missing


def stack_problems(prometheus: Prometheus) -> list[str]:
    """What is wrong with the scrape targets, the service identities and the rule evaluation, if anything."""
    problems: list[str] = []
    try:
        targets = prometheus.targets()
        info = prometheus.query("cme_service_info")
        loaded = prometheus.rules()
    except (OSError, PrometheusError) as exc:
        return [f"Prometheus API failed: {exc}"]
    down = [
        f"{t['labels'].get('instance')}: {t['health']} {t.get('lastError', '')}".strip()
        for t in targets
        if t["health"] != "up"
    ]
    instances = sorted(t["labels"].get("instance", "") for t in targets)
    if instances != sorted(INSTANCES) or down:
        problems.append(f"targets {instances}, expected {sorted(INSTANCES)} all up; not up: {down}")
    identities = sorted(
        (s["metric"].get("instance", ""), s["metric"].get("exported_instance", "")) for s in info
    )
    if len(info) != len(INSTANCES) or identities != [(i, i) for i in sorted(INSTANCES)]:
        problems.append(f"cme_service_info (instance, exported_instance): {identities}")
    unhealthy = [
        f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in loaded if r["health"] != "ok"
    ]
    if len(loaded) != len(rules()) or unhealthy:
        problems.append(f"{len(loaded)} rules loaded of {len(rules())}; not evaluated ok: {unhealthy}")
    return problems


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CME_REQUIRE_PROMTOOL") == "1":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return found


@pytest.fixture(scope="module")
def live(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root: Path = tmp_path_factory.mktemp("live")
    t0 = time.monotonic()
    stack = Stack(root / "stack", checkpoint_seconds=5.0)
    prometheus: Prometheus | None = None
    traffic: Traffic | None = None
    try:
        stack.start()
        prometheus = Prometheus(prometheus_binary, root / "prometheus", live_config(stack.metrics_ports))
        prometheus.start()
        traffic = Traffic(stack.gateway_url, stack.md_url, stack.trades_url)
        traffic.start()
        live = Live(stack, prometheus, traffic, started_in=time.monotonic() - t0)
        exprs = all_exprs()
        t1 = time.monotonic()
        while True:
            live.rounds += 1
            live.series, live.missing = evaluate(prometheus, exprs)
            live.stack_problems = stack_problems(prometheus)
            done = not live.missing and not live.stack_problems
            if done or time.monotonic() - t1 > POLL_TIMEOUT or traffic.error is not None:
                break
            stack.check_alive()
            time.sleep(POLL_EVERY)
        live.polled_for = time.monotonic() - t1
        traffic.stop()
        print(
            f"\nlive Prometheus: stack and Prometheus up in {live.started_in:.1f} s; "
            f"{len(exprs) - len(live.missing)}/{len(exprs)} expressions with data after "
            f"{live.polled_for:.1f} s ({live.rounds} polls); traffic: {traffic.summary()}"
        )
        yield live
    finally:
        if traffic is not None:
            traffic.stop()
        if prometheus is not None:
            prometheus.stop()
        stack.stop()


def test_every_target_is_up_and_named_like_in_compose(live: Live) -> None:
    targets = live.prometheus.targets()
    assert sorted(t["labels"]["instance"] for t in targets) == sorted(INSTANCES)
    assert [t for t in targets if t["health"] != "up"] == [], live.diagnostics()
    jobs = Counter(t["labels"]["job"] for t in targets)
    assert jobs == {"matcher": 1, "gateway": len(GATEWAYS), "feeds": len(FEEDS)}, jobs


def test_service_info_names_every_process_once(live: Live) -> None:
    info = live.prometheus.query("cme_service_info")
    assert len(info) == len(INSTANCES), info
    by_instance = {s["metric"]["instance"]: s["metric"] for s in info}
    assert sorted(by_instance) == sorted(INSTANCES), info
    for instance, labels in by_instance.items():
        # the process's own --instance survives as exported_instance, equal to the target label
        assert labels["exported_instance"] == instance, labels
        expected = re.sub(r"-\d+$", "", instance)
        assert labels["service"] == expected, labels
    counts = {
        s["metric"]["service"]: float(s["value"][1])
        for s in live.prometheus.query("service:cme_service_info:count")
    }
    assert counts == {MATCHER: 1, "gateway": len(GATEWAYS), "feeds": len(FEEDS)}, counts


def test_rules_are_loaded_and_evaluate_without_errors(live: Live) -> None:
    if live.stack_problems:
        pytest.fail("\n".join(live.stack_problems) + live.diagnostics(), pytrace=False)


def test_every_dashboard_and_rule_expression_returns_data(live: Live) -> None:
    exprs = all_exprs()
    if live.missing:
        pytest.fail(
            f"{len(live.missing)} of {len(exprs)} expressions returned no data after "
            f"{live.polled_for:.0f} s of traffic and 1 s scrapes:\n"
            + "\n".join(f"  {k}  -> {why}" for k, why in live.missing.items())
            + live.diagnostics(),
            pytrace=False,
        )
