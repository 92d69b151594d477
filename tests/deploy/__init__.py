"""Checks of deploy/: compose file, Prometheus config and rules, Grafana provisioning and dashboards.

Helpers shared by the tests of this package: where the files are, how to read them, every PromQL
expression they hold, and the metric names and labels the services export (shared.metrics).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_LOCAL = DEPLOY / "prometheus" / "prometheus.local.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "tests" / "rules_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
README = DEPLOY / "README.md"

# Series Prometheus itself writes for every target: allowed in expressions although no service exports them.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels Prometheus attaches to every scraped series (target labels).
TARGET_LABELS = {"job", "instance"}

# An alert expression is `<selector> <op> <threshold>`: the stack test evaluates the selector alone.
ALERT_EXPR = re.compile(
    r"(?P<selector>.+?)\s+(?P<op>>=|<=|==|!=|>|<)\s+(?P<threshold>[-+]?[0-9.]+(?:[eE][-+]?\d+)?)"
)


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def load_json(path: Path) -> Any:
    with path.open() as f:
        return json.load(f)


@dataclass(frozen=True)
class Expr:
    """One PromQL expression found in deploy/, with where it came from."""

    where: str
    expr: str
    legend: str = ""
    record: str = ""  # name of the recording rule it defines, if any
    alert: str = ""  # name of the alert it belongs to, if any


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alert_selector(expr: str) -> str:
    """The alert expression without its trailing comparison (raises if it is not of that form)."""
    m = ALERT_EXPR.fullmatch(expr.strip())
    if m is None:
        raise ValueError(f"alert expression is not `<selector> <op> <threshold>`: {expr!r}")
    return m["selector"]


def rule_exprs() -> Iterator[Expr]:
    for rule in rules():
        if "record" in rule:
            yield Expr(f"rules.yml record {rule['record']}", str(rule["expr"]), record=rule["record"])
        else:
            yield Expr(f"rules.yml alert {rule['alert']}", str(rule["expr"]), alert=rule["alert"])


def dashboard_exprs() -> Iterator[Expr]:
    for path in DASHBOARDS:
        for panel in load_json(path)["panels"]:
            for target in panel.get("targets", []):
                yield Expr(
                    f"{path.name} panel {panel['title']!r} target {target['refId']}",
                    target["expr"],
                    legend=target.get("legendFormat", ""),
                )


def all_exprs() -> list[Expr]:
    return [*rule_exprs(), *dashboard_exprs()]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


# --- a small PromQL scanner: enough to find the series names and label names an expression uses ------
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
_KEYWORDS |= {"offset", "inf", "nan", "Inf", "NaN"}


def promql_names(expr: str) -> set[str]:
    """Series names (metrics and recording rules) an expression selects."""
    s = _MATCHERS.sub("", _STRING.sub('""', expr))
    s = _OFFSET.sub("", _GROUPING.sub("", _RANGE.sub("", s)))
    names = set()
    for m in _IDENT.finditer(s):
        ident, call = m.group(1), m.group(2)
        if call is None and ident not in _KEYWORDS:
            names.add(ident)
    return names


def promql_labels(expr: str) -> set[str]:
    """Label names an expression matches on or groups by (not the `without` lists)."""
    labels: set[str] = set()
    for block in _MATCHERS.findall(_STRING.sub('""', expr)):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for keyword, names in _GROUPING.findall(expr):
        if keyword != "without":
            labels |= {n.strip() for n in names.split(",") if n.strip()}
    return labels


def grouping_labels(expr: str) -> set[str] | None:
    """Labels an aggregation keeps (`by` lists), or None when the expression has no `by`."""
    found = [names for keyword, names in _GROUPING.findall(expr) if keyword == "by"]
    if not found:
        return None
    return {n.strip() for names in found for n in names.split(",") if n.strip()}


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}", legend))


# --- what the services export ----------------------------------------------------------------------
@dataclass(frozen=True)
class Exported:
    """One metric family of shared.metrics."""

    family: str  # the name as declared (a counter's without _total)
    kind: str  # counter, gauge, histogram, info
    labels: frozenset[str]
    buckets: tuple[float, ...] = ()

    @property
    def series(self) -> set[str]:
        """Names of the series Prometheus stores for this family."""
        if self.kind == "counter":
            return {self.family + "_total"}
        if self.kind == "histogram":
            return {self.family + suffix for suffix in ("_bucket", "_sum", "_count")}
        if self.kind == "info":
            return {self.family + "_info"}
        return {self.family}

    @property
    def exposed(self) -> str:
        """The name people read and search: cme_orders_total, cme_service_info, cme_stream_wait_seconds."""
        if self.kind in ("counter", "info"):
            return next(iter(self.series))
        return self.family


# The Info metric's labels are the keys of the dict shared.metrics.serve() gives it.
INFO_LABELS = {"cme_service": frozenset({"service", "instance"})}


@cache
def exported() -> dict[str, Exported]:
    """Every metric family of shared.metrics, by family name, from the collectors themselves (their
    labelled children exist only once observed, so REGISTRY.collect() alone would not show labels)."""
    from prometheus_client.metrics import MetricWrapperBase

    from shared import metrics

    found: dict[str, Exported] = {}
    for value in vars(metrics).values():
        if isinstance(value, metrics.FastHistogram):
            found[value.name] = Exported(
                value.name, "histogram", frozenset(value.labelnames), tuple(value.bounds)
            )
        elif isinstance(value, MetricWrapperBase):
            name, kind = value._name, str(value._type)
            labels = INFO_LABELS.get(name, frozenset()) if kind == "info" else frozenset(value._labelnames)
            buckets = tuple(getattr(value, "_upper_bounds", ()))
            found[name] = Exported(name, kind, labels, buckets)
    return found


def exported_series() -> dict[str, Exported]:
    """Series name (cme_orders_total, cme_stream_wait_seconds_bucket ...) -> its family."""
    return {series: family for family in exported().values() for series in family.series}
