"""The Prometheus metrics raychat exports, as data.

One list shared by the code that records them (``serve/`` and ``raychat/jobs/train/driver.py``, through
``ray.util.metrics``) and by what reads them (the Grafana dashboards and Prometheus config under
``cluster/``), so a dashboard cannot plot a metric that nothing exports. Ray's exporter adds the
``ray_`` prefix: :func:`prometheus_name` gives the name as Prometheus stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Latency buckets (seconds) for time to first token and inter-token latency.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: Name given to ``ray.util.metrics`` (without Ray's ``ray_`` prefix).
        kind: ``counter``, ``gauge`` or ``histogram``.
        description: Help text shown by Prometheus.
        tag_keys: Label names the metric is recorded with.
        boundaries: Histogram bucket boundaries (histograms only).
    """

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = field(default=())


SERVE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "raychat_requests", "counter", "OpenAI API requests by route and HTTP status.", ("model", "route", "status")
    ),
    MetricSpec("raychat_prompt_tokens", "counter", "Prompt tokens processed.", ("model",)),
    MetricSpec("raychat_generated_tokens", "counter", "Completion tokens generated.", ("model",)),
    MetricSpec(
        "raychat_time_to_first_token_seconds",
        "histogram",
        "Time from request arrival to its first generated token.",
        ("model",),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "raychat_inter_token_latency_seconds",
        "histogram",
        "Time between consecutive generated tokens of one request.",
        ("model",),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec("raychat_batch_size", "histogram", "Requests sharing one decode step.", ("model",), BATCH_SIZE_BUCKETS),
    MetricSpec("raychat_queue_length", "gauge", "Requests waiting for a place in the running batch.", ("model",)),
    MetricSpec("raychat_running_requests", "gauge", "Requests in the running batch.", ("model",)),
)

TRAIN_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "raychat_train_loss",
        "gauge",
        "C-RLFT training loss (sum w*CE / sum w over the global batch) of the last step.",
        ("run",),
    ),
    MetricSpec("raychat_train_eval_loss", "gauge", "Weighted held-out loss of the last evaluation.", ("run",)),
    MetricSpec("raychat_train_learning_rate", "gauge", "Learning rate of the last step.", ("run",)),
    MetricSpec("raychat_train_grad_norm", "gauge", "Gradient norm (before clipping) of the last step.", ("run",)),
    MetricSpec("raychat_train_tokens_per_second", "gauge", "Training tokens per second over all workers.", ("run",)),
    MetricSpec(
        "raychat_train_packing_efficiency", "gauge", "Real tokens / token budget of the packed batches.", ("run",)
    ),
    MetricSpec("raychat_train_step", "gauge", "Optimizer steps done.", ("run",)),
)

ALL_METRICS: tuple[MetricSpec, ...] = SERVE_METRICS + TRAIN_METRICS


def prometheus_name(spec: MetricSpec) -> str:
    """The metric's base name in Prometheus (Ray prefixes ``ray_``). Ray 2.60's exporter writes
    counters as ``<base>_total``, histograms as ``<base>_bucket`` / ``_sum`` / ``_count`` and gauges
    as ``<base>`` (checked on a live head by tests/integration/test_job_submit.py)."""
    return f"ray_{spec.name}"


def get(name: str) -> MetricSpec:
    """The spec called ``name``; raises KeyError naming the known metrics otherwise."""
    for spec in ALL_METRICS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown metric {name!r}; known: {[s.name for s in ALL_METRICS]}")
