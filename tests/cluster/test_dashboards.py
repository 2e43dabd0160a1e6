"""cluster/grafana and cluster/prometheus.yml: the dashboards plot only metrics that exist — the ones
raychat/core/common/metric_specs.py declares, under the names Ray's exporter gives them — and plot all of them."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from raychat.core.common.metric_specs import ALL_METRICS, SERVE_METRICS, TRAIN_METRICS
from tests.cluster.conftest import ROOT, exported_series

DASHBOARDS = sorted((ROOT / "cluster" / "grafana").glob("*.json"))
# Ray's own metrics the dashboards use (names as in Ray's bundled Grafana dashboards).
RAY_BUILTIN = {
    "ray_serve_deployment_replica_healthy",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_node_gpus_utilization",
    "ray_node_gram_used",
}
# PromQL words that look like metric names but are functions, keywords or label names.
_NOT_METRICS = {
    "sum",
    "rate",
    "avg",
    "by",
    "le",
    "histogram_quantile",
    "label_values",
    "model",
    "run",
    "route",
    "status",
    "deployment",
    "instance",
    "application",
}


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + [
        v["definition"] for v in dashboard["templating"]["list"] if "definition" in v
    ]


def metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels) if w not in _NOT_METRICS}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_name_only_exported_metrics(path):
    known = set().union(*map(exported_series, ALL_METRICS)) | RAY_BUILTIN
    dashboard = json.loads(path.read_text())
    assert dashboard["panels"], path.name
    for expr in exprs(dashboard):
        assert metric_names(expr) and metric_names(expr) <= known, (expr, metric_names(expr) - known)


def test_every_raychat_metric_is_on_its_dashboard():
    for name, specs in (("raychat-serving.json", SERVE_METRICS), ("raychat-training.json", TRAIN_METRICS)):
        used = set().union(
            *(metric_names(e) for e in exprs(json.loads((ROOT / "cluster" / "grafana" / name).read_text())))
        )
        missing = [s.name for s in specs if not exported_series(s) & used]
        assert not missing, f"{name} plots nothing of {missing}"


def test_metric_name_check_catches_a_misspelled_metric():
    known = set().union(*map(exported_series, ALL_METRICS))
    assert metric_names('sum(rate(ray_raychat_requests{model=~"$model"}[5m])) by (route)') == {"ray_raychat_requests"}
    assert "ray_raychat_requests" not in known and "ray_raychat_requests_total" in known


def test_prometheus_config_scrapes_local_heads_and_raychat_pods():
    config = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["ray-local"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    keep = {
        tuple(r["source_labels"]): r["regex"]
        for r in jobs["ray-kuberay"]["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert keep == {
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name",): "raychat",
        ("__meta_kubernetes_pod_container_port_name",): "metrics",
    }
