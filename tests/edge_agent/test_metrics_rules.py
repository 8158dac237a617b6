"""deploy/prometheus and deploy/grafana: rules that promtool accepts and whose tests pass,
dashboards whose every query is valid PromQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import deploy_queries
from tests.support.promtool import run


def test_alert_rules_pass_promtool_check_rules() -> None:
    checked = run("check", "rules", deploy_queries.ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 15 rules found" in checked.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    tested = run("test", "rules", deploy_queries.ALERT_TESTS.name, cwd=deploy_queries.ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test_and_a_runbook_section() -> None:
    import yaml

    rules = yaml.safe_load(deploy_queries.ALERTS.read_text("utf-8"))["groups"]
    names = {rule["alert"] for group in rules for rule in group["rules"]}
    tests = yaml.safe_load(deploy_queries.ALERT_TESTS.read_text("utf-8"))["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert names == tested
    operations = (deploy_queries.DEPLOY.parent / "docs" / "operations.md").read_text("utf-8")
    for group in rules:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook"].partition("#")[2]
            assert anchor == rule["alert"].lower()
            assert f"#### {rule['alert']}" in operations, f"no runbook for {rule['alert']}"


@pytest.mark.parametrize("path", deploy_queries.DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_are_valid_promql(path: Path, tmp_path: Path) -> None:
    document = deploy_queries.dashboard(path)
    assert document["uid"]
    assert document["title"]
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    # promtool parses PromQL only inside rule files: each query becomes a recording rule.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, expr in enumerate(deploy_queries.dashboard_expressions(path)):
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {expr!r}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    checked = run("check", "rules", rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_there_is_a_dashboard_per_agent_and_one_for_the_fleet() -> None:
    uids = {deploy_queries.dashboard(p)["uid"] for p in deploy_queries.DASHBOARDS}
    assert uids == {"edge-agent", "edge-fleet"}
