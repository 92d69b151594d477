"""Metric names: every name deploy/ uses is exported by a service (shared.metrics), every exported metric
follows the Prometheus naming rules with bounded labels only, and every one is shown and documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.deploy import (
    PROMETHEUS_SYNTHETIC,
    README,
    ROOT,
    TARGET_LABELS,
    Exported,
    all_exprs,
    exported,
    exported_series,
    grouping_labels,
    legend_labels,
    promql_labels,
    promql_names,
    recording_rule_names,
    rules,
)

# Labels whose values are unbounded (one per account, order or trade) must never be metric labels.
FORBIDDEN_LABELS = {
    "account",
    "order_id",
    "client_order_id",
    "trade_id",
    "api_key",
    "user",
    "client",
    "connection",
}
# The bounded labels the services use; a new one is a deliberate review decision (add it here).
BOUNDED_LABELS = {"symbol", "side", "type", "result", "code", "stage", "channel", "reason", "op", "server"}
BOUNDED_LABELS |= {"service", "instance"}  # of cme_service_info only
TIME_WORDS = ("latency", "duration", "seconds", "wait", "time", "age", "timestamp", "elapsed")
NON_BASE_UNITS = re.compile(r"_(milliseconds|microseconds|nanoseconds|minutes|hours|ms|us|ns|percent)(_|$)")
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
FAMILIES = sorted(exported().values(), key=lambda f: f.family)


def _ids(family: Exported) -> str:
    return family.exposed


def test_shared_metrics_defines_the_metrics() -> None:
    assert len(FAMILIES) >= 20, "shared.metrics should define every metric of the services"
    from shared.metrics import REGISTRY

    registered = {m.name for m in REGISTRY.collect()}
    assert registered == {f.family for f in FAMILIES}, "a collector is registered but not a module attribute"


def test_no_metric_on_the_default_registry() -> None:
    """Metrics of the default prometheus_client registry would not be served by shared.metrics.serve()."""
    from prometheus_client import REGISTRY as DEFAULT

    import shared.metrics  # noqa: F401  (make sure it is imported)

    leaked = sorted(m.name for m in DEFAULT.collect() if m.name.startswith("cme_"))
    assert not leaked, f"cme metrics registered on prometheus_client's default registry: {leaked}"


def _metric_constructors(path: Path) -> list[str]:
    """Calls that create a metric in a module: prometheus_client classes or FastHistogram."""
    tree = ast.parse(path.read_text(), str(path))
    metric_classes = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client")
        for alias in node.names
        if alias.name in metric_classes
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if name in imported or name == "FastHistogram":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(...)")
    return found


def test_metrics_are_defined_only_in_shared_metrics() -> None:
    """shared/metrics.py is the one list of exported metrics that deploy/ is checked against."""
    sources = sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "shared").rglob("*.py"))
    elsewhere = [
        call
        for path in sources
        if path != ROOT / "shared" / "metrics.py"
        for call in _metric_constructors(path)
    ]
    assert not elsewhere, f"metrics defined outside shared/metrics.py: {elsewhere}"


@pytest.mark.parametrize("family", FAMILIES, ids=_ids)
def test_naming_rules(family: Exported) -> None:
    name = family.exposed
    assert SNAKE.fullmatch(name), f"{name}: not snake_case"
    assert name.startswith("cme_"), f"{name}: no cme_ prefix"
    assert not NON_BASE_UNITS.search(name), f"{name}: use base units (seconds, bytes, ratios)"
    if family.kind == "counter":
        assert name.endswith("_total") and not family.family.endswith("_total"), f"{name}: counter not _total"
    else:
        assert not name.endswith("_total"), f"{name}: only counters end with _total"
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        assert not family.family.endswith(suffix), f"{name}: {suffix} is reserved for histogram series"
    if set(family.family.split("_")) & set(TIME_WORDS):
        assert family.family.endswith("_seconds"), f"{name}: a time is in seconds and named _seconds"


@pytest.mark.parametrize("family", FAMILIES, ids=_ids)
def test_labels_are_bounded(family: Exported) -> None:
    for label in family.labels:
        assert SNAKE.fullmatch(label), f"{family.exposed}: label {label!r} is not snake_case"
        assert label not in FORBIDDEN_LABELS, f"{family.exposed}: label {label!r} is unbounded"
        assert label not in {"le", "quantile", "job"}, f"{family.exposed}: label {label!r} is reserved"
        assert label in BOUNDED_LABELS, (
            f"{family.exposed}: label {label!r} is new: make sure its values are bounded, then add it to "
            "BOUNDED_LABELS in tests/deploy/test_metric_names.py"
        )
    if "instance" in family.labels:
        assert family.kind == "info", f"{family.exposed}: only the identity metric carries an instance label"


def test_time_histograms_span_5us_to_5s() -> None:
    """Latency histograms are in seconds with buckets from (at most) 5 microseconds to (at least) 5 s."""
    from shared.metrics import LATENCY_BUCKETS

    assert LATENCY_BUCKETS[0] == pytest.approx(5e-6)
    assert LATENCY_BUCKETS[-1] == pytest.approx(5.0)
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    time_histograms = [f for f in FAMILIES if f.kind == "histogram" and f.family.endswith("_seconds")]
    assert len(time_histograms) >= 5
    for family in time_histograms:
        assert family.buckets[0] <= 5e-6 and family.buckets[-1] >= 5.0, family.exposed
    for family in FAMILIES:
        if family.kind == "histogram" and not family.family.endswith("_seconds"):
            assert family.buckets[0] >= 1, (
                f"{family.exposed}: sub-unit buckets look like a time: name it _seconds"
            )


def test_the_issue_metrics_exist() -> None:
    """The stages and the counters/gauges the issue asks for."""
    names = {f.exposed for f in FAMILIES}
    required = {
        "cme_service_info",
        "cme_gateway_ack_latency_seconds",
        "cme_matcher_command_seconds",
        "cme_stream_wait_seconds",
        "cme_order_to_publish_seconds",
        "cme_feed_publish_to_send_seconds",
        "cme_orders_total",
        "cme_rejects_total",
        "cme_trades_total",
        "cme_traded_notional_total",
        "cme_stream_length",
        "cme_matcher_lag_entries",
        "cme_checkpoint_duration_seconds",
        "cme_checkpoint_last_timestamp_seconds",
        "cme_replayed_entries",
        "cme_ws_connections",
        "cme_feed_dropped_clients_total",
        "cme_published_messages_total",
        "cme_redis_roundtrips_total",
        "cme_redis_errors_total",
    }
    assert required <= names, sorted(required - names)


def test_every_name_used_in_deploy_is_exported() -> None:
    series = exported_series()
    records = recording_rule_names()
    unknown = []
    for e in all_exprs():
        for name in promql_names(e.expr):
            if name not in series and name not in records and name not in PROMETHEUS_SYNTHETIC:
                unknown.append(f"{e.where}: {name}")
    assert not unknown, "names no service exports and no rule records:\n" + "\n".join(unknown)


def test_recording_rules_are_level_metric_operations() -> None:
    """`level:metric:operations`, where metric is an exported series (histograms: _bucket/_count ok)."""
    names = set(exported_series()) | {f.exposed for f in FAMILIES}
    for rule in rules():
        if "record" not in rule:
            continue
        parts = rule["record"].split(":")
        assert len(parts) == 3 and all(parts), f"{rule['record']}: not level:metric:operations"
        level, metric, operations = parts
        assert level in {"stage", "symbol", "instance", "service", "venue"}, rule["record"]
        assert metric in names, f"{rule['record']}: {metric} is not an exported metric"
        assert metric in str(rule["expr"]), f"{rule['record']}: does not derive from {metric}"
        assert re.fullmatch(r"[a-z0-9_]+", operations), rule["record"]


def _labels_of(name: str, record_labels: dict[str, set[str]]) -> set[str]:
    family = exported_series().get(name)
    if family is not None:
        return set(family.labels) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
    if name in record_labels:
        return record_labels[name]
    return set(TARGET_LABELS)  # up and the other synthetic series


def _record_labels() -> dict[str, set[str]]:
    """Labels each recording rule's series carries: its `by` list, else those of what it reads."""
    out: dict[str, set[str]] = {}
    for rule in rules():
        if "record" in rule:
            expr = str(rule["expr"])
            kept = grouping_labels(expr)
            if kept is None:
                kept = set().union(*(_labels_of(n, out) for n in promql_names(expr)))
            out[rule["record"]] = kept
    return out


def test_labels_used_in_deploy_exist() -> None:
    """Every label an expression matches, groups by or shows in a legend exists on what it reads."""
    record_labels = _record_labels()
    wrong = []
    for e in all_exprs():
        available = set().union(*(_labels_of(n, record_labels) for n in promql_names(e.expr)))
        for label in promql_labels(e.expr) - available:
            wrong.append(f"{e.where}: label {label!r} not on {sorted(promql_names(e.expr))}")
        kept = grouping_labels(e.expr)
        shown = kept if kept is not None else available
        for label in legend_labels(e.legend) - shown:
            wrong.append(f"{e.where}: legend label {label!r} is not in the result")
    assert not wrong, "\n".join(wrong)


def test_every_exported_metric_is_used_in_deploy() -> None:
    """Each metric a service exports is on a dashboard or in a rule (else nobody would ever see it)."""
    used = {name for e in all_exprs() for name in promql_names(e.expr)}
    unused = sorted(f.exposed for f in FAMILIES if not (f.series & used))
    assert not unused, f"exported but shown nowhere in deploy/: {unused}"


def test_every_exported_metric_is_documented() -> None:
    text = README.read_text()
    missing = sorted(f.exposed for f in FAMILIES if f"`{f.exposed}`" not in text)
    assert not missing, f"deploy/README.md does not describe: {missing}"
