"""Fixtures for the k8s/ and cluster/ checks: the overlays rendered once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from raychat.core.common.metric_specs import MetricSpec, prometheus_name

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """``{overlay name: rendered resources}`` for every directory under k8s/overlays/."""
    from cluster.kustomize import render

    return {name: render(ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """The resources of ``kind`` (and ``name``) among ``docs``."""
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def cluster_specs(docs: list[dict]) -> dict[str, dict]:
    """Every RayCluster spec in ``docs``, embedded ones included, by ``Kind/name``."""
    specs = {}
    for doc in docs:
        spec = doc.get("spec", {})
        inner = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }.get(doc["kind"])
        if inner:
            specs[f"{doc['kind']}/{doc['metadata']['name']}"] = inner
    return specs


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Every Ray pod template in ``docs`` by ``Kind/name/group``."""
    out = {}
    for where, spec in cluster_specs(docs).items():
        out[f"{where}/head"] = spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            out[f"{where}/{group['groupName']}"] = group["template"]
    return out


def exported_series(spec: MetricSpec) -> set[str]:
    """The series Ray's Prometheus exporter writes for ``spec`` (checked on a live head by
    tests/integration/test_job_submit.py::test_metrics_export_uses_the_names_the_dashboards_plot)."""
    base = prometheus_name(spec)
    return {
        "counter": {f"{base}_total"},
        "gauge": {base},
        "histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count"},
    }[spec.kind]
