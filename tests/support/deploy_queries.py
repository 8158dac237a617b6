"""The PromQL that deploy/ ships: alert rules and Grafana dashboard queries, and what they name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

import yaml

DEPLOY: Final = Path(__file__).resolve().parents[2] / "deploy"
ALERTS: Final = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS: Final = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARDS: Final = tuple(sorted((DEPLOY / "grafana").glob("*.json")))
# Our own metric families and the client library's process/Python collectors.
_METRIC = re.compile(r"\b((?:edge|customer_store|process|python)_[a-z0-9_]+)\b")
# Grafana's template variables, as a concrete query would have them.
_GRAFANA_VARIABLES: Final = {"$__rate_interval": "5m", "$instance": ".*", "${datasource}": ""}


def alert_expressions() -> list[str]:
    document = yaml.safe_load(ALERTS.read_text("utf-8"))
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def dashboard(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return loaded


def dashboard_expressions(path: Path) -> list[str]:
    """Every panel query with Grafana's variables filled in."""
    queries = []
    for panel in dashboard(path)["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append(expr)
    return queries


def metric_names(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in _METRIC.findall(expr)}
