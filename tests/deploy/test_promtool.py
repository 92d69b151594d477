"""promtool: the Prometheus configs and rules are valid, the alert rules behave as their unit tests say, and
every PromQL expression of the dashboards parses. Skipped (loudly) without promtool: install it with
deploy/install-prometheus.sh, which `make test` runs. CME_REQUIRE_PROMTOOL=1 turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import (
    DEPLOY,
    PROMETHEUS,
    PROMETHEUS_LOCAL,
    RULES,
    RULES_TEST,
    alert_selector,
    all_exprs,
    dashboard_exprs,
    rules,
)

PROMTOOL = shutil.which("promtool")
MISSING = (
    "PROMTOOL IS NOT INSTALLED: the Prometheus config and rules are NOT checked. "
    "Run deploy/install-prometheus.sh (Debian's `prometheus` package ships promtool)."
)


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is None:
        if os.environ.get("CME_REQUIRE_PROMTOOL") == "1":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return PROMTOOL


def run(promtool: str, *args: str, cwd: Path = DEPLOY) -> str:
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


@pytest.mark.parametrize("config", [PROMETHEUS, PROMETHEUS_LOCAL], ids=lambda p: p.name)
def test_check_config(promtool: str, config: Path) -> None:
    """Also checks the rule files the config names, resolved relative to the config file."""
    out = run(promtool, "check", "config", str(config), cwd=Path("/"))
    assert "SUCCESS" in out and "rules found" in out, out


def test_check_rules(promtool: str) -> None:
    out = run(promtool, "check", "rules", str(RULES))
    assert f"SUCCESS: {len(rules())} rules found" in out, out


def test_rule_unit_tests(promtool: str) -> None:
    """deploy/prometheus/tests/rules_test.yml: a healthy venue fires nothing; each failure fires its alert."""
    out = run(promtool, "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in out, out


def test_every_alert_is_tested(promtool: str) -> None:
    tested_firing: set[str] = set()
    tested_quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (tested_firing if check["exp_alerts"] else tested_quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts <= tested_quiet, (
        f"alerts not checked quiet on a healthy venue: {sorted(alerts - tested_quiet)}"
    )
    paging = {rule["alert"] for rule in rules() if "alert" in rule and rule["labels"]["severity"] == "page"}
    assert paging <= tested_firing, f"paging alerts never shown to fire: {sorted(paging - tested_firing)}"


def test_dashboard_and_selector_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query and every alert selector (its comparison stripped) is valid PromQL: written
    as recording rules into a scratch file that promtool checks."""
    exprs = [e.expr for e in dashboard_exprs()]
    exprs += [alert_selector(e.expr) for e in all_exprs() if e.alert]
    scratch = {
        "groups": [
            {
                "name": "scratch",
                "rules": [{"record": f"check:expr:n{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(scratch, sort_keys=False))
    out = run(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(exprs)} rules found" in out, out
