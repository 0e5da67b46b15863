"""The provisioned Grafana dashboard (deploy/grafana/dashboards/mesh.json) reads only metrics
and labels the code defines: every PromQL expression's metric names, the labels it matches and
groups by, and the labels its legends print, checked against the instruments that the mesh's,
the events' and the gateway's metrics classes register. A renamed metric or label fails here,
not on a user's empty panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from mesh.telemetry.metrics import MeshMetrics
from meshkit.events.metrics import EventMetrics
from meshkit.gateway.observe import GatewayMetrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "mesh.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
"""The data source deploy/grafana/provisioning/datasources/prometheus.yml provisions."""

IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
STRING = r'"(?:[^"\\]|\\.)*"'
SELECTOR = re.compile(rf"({IDENT})?\s*\{{((?:[^}}\"]|{STRING})*)\}}")
MATCHER = re.compile(rf"({IDENT})\s*(?:=~|!~|!=|=)\s*{STRING}")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class Recording(CollectorRegistry):
    """A registry that keeps the collectors registered in it."""

    def __init__(self) -> None:
        super().__init__()
        self.collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.collectors.append(collector)


def defined_series() -> dict[str, frozenset[str]]:
    """Every sample name the code's instruments expose, with its label names."""
    registry = Recording()
    MeshMetrics(registry)
    EventMetrics(registry)
    GatewayMetrics(registry)
    series: dict[str, frozenset[str]] = {}
    for collector in registry.collectors:
        for family in collector.describe():
            # a metric's label names: the instrument's, or a custom collector's family's
            labels = frozenset(
                getattr(collector, "_labelnames", None) or getattr(family, "_labelnames", ())
            )
            if family.type == "counter":
                series[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                series[f"{family.name}_bucket"] = labels | {"le"}
                series[f"{family.name}_count"] = labels
                series[f"{family.name}_sum"] = labels
            else:
                series[family.name] = labels
    return series


SERIES = defined_series()


class Query:
    """What a PromQL expression reads: its metric names, the labels its selectors match and
    the labels it groups by. A small scanner, enough for the dashboard's expressions."""

    def __init__(self, expr: str) -> None:
        self.matched: dict[str, set[str]] = {}
        for metric, matchers in SELECTOR.findall(expr):
            self.matched.setdefault(metric, set()).update(MATCHER.findall(matchers))
        self.grouped = {
            label.strip()
            for labels in GROUPING.findall(expr)
            for label in labels.split(",")
            if label.strip()
        }
        rest = SELECTOR.sub(lambda m: f" {m[1] or ''} ", expr)
        rest = GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", " ", rest))
        rest = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", " ", rest)
        self.metrics = {
            name
            for name, call in re.findall(rf"({IDENT})\s*(\(?)", rest)
            if not call and name.lower() not in KEYWORDS
        }
        self.matched.pop("", None)

    def labels(self) -> frozenset[str]:
        """The labels the expression's metrics carry."""
        return frozenset().union(*(SERIES.get(m, frozenset()) for m in self.metrics))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p["type"] != "row"]


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in panels() for t in p["targets"]]


def test_the_scanner_finds_metrics_matchers_and_groupings() -> None:
    q = Query(
        "histogram_quantile(0.99, sum by (le, service) "
        '(rate(grpc_server_handling_seconds_bucket{service=~"$service", grpc_code!="OK"}'
        "[$__rate_interval]))) / ignoring(x) nope_total"
    )
    assert q.metrics == {"grpc_server_handling_seconds_bucket", "nope_total"}
    assert q.matched == {"grpc_server_handling_seconds_bucket": {"service", "grpc_code"}}
    assert q.grouped == {"le", "service", "x"}
    assert "nope_total" not in SERIES  # what the tests below would refuse


def test_the_code_defines_the_conventional_grpc_series() -> None:
    for side in ("server", "client"):
        assert SERIES[f"grpc_{side}_handled_total"] == {
            "grpc_type",
            "grpc_service",
            "grpc_method",
            "grpc_code",
            "service",
        }
        assert SERIES[f"grpc_{side}_handling_seconds_bucket"] == {
            "grpc_type",
            "grpc_service",
            "grpc_method",
            "service",
            "le",
        }
        for name in ("started_total", "msg_received_total", "msg_sent_total"):
            assert f"grpc_{side}_{name}" in SERIES


@pytest.mark.parametrize(("title", "target"), targets(), ids=lambda v: str(v)[:40])
def test_every_expression_reads_what_the_code_defines(title: str, target: dict[str, Any]) -> None:
    q = Query(target["expr"])
    assert q.metrics, title
    for metric in q.metrics:
        assert metric in SERIES, f"{title}: {metric} is not a metric of the code"
    for metric, labels in q.matched.items():
        assert labels <= SERIES[metric], f"{title}: {metric} has no {labels - SERIES[metric]}"
    assert q.grouped <= q.labels(), f"{title}: grouped by {q.grouped - q.labels()}"
    legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
    assert legend <= q.grouped or not q.grouped, f"{title}: legend prints {legend - q.grouped}"
    assert legend <= q.labels(), title


def test_panels_use_the_provisioned_prometheus() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_the_service_variable_lists_the_services_serving() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "service"]
    assert variable["datasource"] == DATASOURCE
    match = re.fullmatch(rf"label_values\(({IDENT}),\s*(\w+)\)", variable["query"]["query"])
    assert match is not None and match[0] == variable["definition"]
    assert match[1] in SERIES and match[2] in SERIES[match[1]]
    assert variable["includeAll"] and variable["multi"]
    uses = [t["expr"] for _, t in targets() if "$service" in t["expr"]]
    assert len(uses) >= len(targets()) - 3  # all but the consumers' panels (no service label)


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    read = set().union(*(Query(t["expr"]).metrics for _, t in targets()))
    for side in ("server", "client"):
        assert f"grpc_{side}_handled_total" in read
        assert f"grpc_{side}_handling_seconds_bucket" in read
    assert {
        "mesh_circuit_breaker_state",
        "mesh_ejections_total",
        "mesh_ejected_endpoints",
        "mesh_retry_budget_exhausted_total",
        "foodmesh_outbox_backlog",
        "foodmesh_event_consumer_lag",
    } <= read
    errors = [t["expr"] for _, t in targets() if 'grpc_code!="OK"' in t["expr"]]
    assert len(errors) == 2
    quantiles = {
        q for _, t in targets() for q in re.findall(r"histogram_quantile\(([\d.]+)", t["expr"])
    }
    assert quantiles == {"0.5", "0.99"}
