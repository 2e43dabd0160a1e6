from raychat.core.common.metric_specs import ALL_METRICS


def test_metric_names_and_descriptions_are_ascii_as_ray_metrics_require():
    # ray.util.metrics encodes names and descriptions as ASCII; anything else fails at creation.
    for spec in ALL_METRICS:
        assert spec.name.isascii() and spec.description.isascii(), spec.name
