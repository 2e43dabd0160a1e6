"""Prometheus metrics of the Serve app: ``ray.util.metrics`` objects built from ``raychat.core.common.metric_specs.SERVE_METRICS``.

Ray exports them (prefixed ``ray_``) next to Serve's built-in request/latency metrics.
"""

from __future__ import annotations

from raychat.core.common.metric_specs import SERVE_METRICS, MetricSpec


def _make(spec: MetricSpec, default_tags: dict[str, str]):
    from ray.util import metrics

    if spec.kind == "counter":
        m = metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    elif spec.kind == "gauge":
        m = metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    else:
        m = metrics.Histogram(
            spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
        )
    m.set_default_tags({k: v for k, v in default_tags.items() if k in spec.tag_keys})
    return m


class ServeMetrics:
    """The serve metrics by short name (``requests``, ``time_to_first_token_seconds``…), with ``model`` preset."""

    def __init__(self, model: str):
        self._m = {s.name.removeprefix("raychat_"): _make(s, {"model": model}) for s in SERVE_METRICS}

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_m"][name]
        except KeyError:
            raise AttributeError(name) from None
