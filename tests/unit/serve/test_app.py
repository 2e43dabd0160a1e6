import pytest
from pydantic import ValidationError

from libs.config import ServeConfig
from serve.app import engine_options


def test_engine_autoscales_by_default_with_queue_limit_answering_429():
    opts = engine_options(ServeConfig(checkpoint="/ckpt"))
    auto = opts["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 12)
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (32, 64)
    assert opts["backpressure_config"].status_code == 429 and "num_replicas" not in opts


def test_fixed_replicas_resources_and_autoscaling_overrides_come_from_the_config():
    fixed = engine_options(ServeConfig(checkpoint="/c", num_replicas=3, num_gpus=1, num_cpus=4))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    tuned = engine_options(ServeConfig(checkpoint="/c", autoscaling_overrides={"upscale_delay_s": 3}))
    assert tuned["autoscaling_config"].upscale_delay_s == 3


@pytest.mark.parametrize("bad", [{"min_replicas": 5, "max_replicas": 2}, {"max_batch_size": 64, "max_ongoing_requests": 32}])
def test_inconsistent_limits_are_rejected(bad):
    with pytest.raises(ValidationError):
        ServeConfig(checkpoint="/c", **bad)
