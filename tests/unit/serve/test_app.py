import pytest
from pydantic import ValidationError

from raychat.core.config import ServeConfig
from raychat.serve.app import ADMISSION_HEADROOM, SHUTDOWN_MARGIN_S, build_app, engine_options


def test_engine_autoscales_by_default_with_queue_limit_answering_429():
    cfg = ServeConfig(checkpoint="/ckpt")
    assert cfg.layout == "combined"
    opts = engine_options(cfg)
    auto = opts["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 12)
    # each replica admits 32 running + 64 waiting and answers the next with 429 itself (Serve lets more in)
    assert cfg.combined_admission_limit() == 96 and opts["max_ongoing_requests"] == 96 + ADMISSION_HEADROOM
    assert opts["max_queued_requests"] == 64
    assert opts["backpressure_config"].status_code == 429 and "num_replicas" not in opts
    split = engine_options(cfg.model_copy(update={"layout": "split"}))
    assert (split["max_ongoing_requests"], split["max_queued_requests"]) == (32, 64)


def test_fixed_replicas_resources_and_autoscaling_overrides_come_from_the_config():
    fixed = engine_options(ServeConfig(checkpoint="/c", num_replicas=3, num_gpus=1, num_cpus=4))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert (fixed["ray_actor_options"]["num_cpus"], fixed["ray_actor_options"]["num_gpus"]) == (4, 1)
    tuned = engine_options(ServeConfig(checkpoint="/c", autoscaling_overrides={"upscale_delay_s": 3}))
    assert tuned["autoscaling_config"].upscale_delay_s == 3


@pytest.mark.parametrize(
    "bad", [{"min_replicas": 5, "max_replicas": 2}, {"max_batch_size": 64, "max_ongoing_requests": 32}]
)
def test_inconsistent_limits_are_rejected(bad):
    with pytest.raises(ValidationError):
        ServeConfig(checkpoint="/c", **bad)


def _deployments(app) -> dict:
    root = app._bound_deployment
    nested = [a._bound_deployment for a in root.init_args if hasattr(a, "_bound_deployment")]
    return {d.name: d for d in [root, *nested]}


@pytest.mark.parametrize("layout", ["combined", "split"])
def test_the_deployment_holding_the_engine_is_llmengine_with_the_limits_and_autoscaling(layout, tiny_model_dir):
    cfg = {
        "checkpoint": str(tiny_model_dir),
        "allow_no_auth": True,
        "layout": layout,
        "max_ongoing_requests": 40,
        "max_queued_requests": 7,
        "max_replicas": 3,
        "num_cpus": 2,
    }
    deployments = _deployments(build_app(cfg))
    assert set(deployments) == ({"LLMEngine"} if layout == "combined" else {"LLMEngine", "OpenAIRouter"})
    engine = deployments["LLMEngine"]
    dc = engine._deployment_config
    # combined: Serve passes more than the replica admits (40 + 7), so the app's own 429 answers first
    ongoing = 40 if layout == "split" else 47 + ADMISSION_HEADROOM
    assert (dc.max_ongoing_requests, dc.max_queued_requests, dc.autoscaling_config.max_replicas) == (ongoing, 7, 3)
    assert engine.ray_actor_options["num_cpus"] == 2
    # Ray Serve's throughput flags reach every replica (as runtime_env env vars, merged with the app's).
    for d in deployments.values():
        assert d.ray_actor_options["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_combined_layout_lets_serve_pass_more_than_it_admits_so_the_app_answers_429_itself():
    split = ServeConfig(checkpoint="/c", max_ongoing_requests=32, max_queued_requests=64, layout="split")
    combined = split.model_copy(update={"layout": "combined"})
    assert split.combined_admission_limit() == 96 and engine_options(split)["max_ongoing_requests"] == 32
    assert engine_options(combined)["max_ongoing_requests"] > combined.combined_admission_limit() == 96
    unbounded = combined.model_copy(update={"max_queued_requests": -1})
    assert unbounded.combined_admission_limit() is None and engine_options(unbounded)["max_ongoing_requests"] == 32


@pytest.mark.parametrize("layout", ["combined", "split"])
def test_replaced_replicas_let_requests_run_to_their_timeout_not_servers_20_s(layout, tiny_model_dir):
    app = build_app(
        {"checkpoint": str(tiny_model_dir), "allow_no_auth": True, "layout": layout, "request_timeout_s": 300}
    )
    for d in _deployments(app).values():  # the engine and, in split, the router
        assert d._deployment_config.graceful_shutdown_timeout_s == 300 + SHUTDOWN_MARGIN_S


def test_engine_health_check_period_is_configurable():
    cfg = ServeConfig(checkpoint="/c", health_check_period_s=2.5)
    assert engine_options(cfg)["health_check_period_s"] == 2.5
    assert engine_options(ServeConfig(checkpoint="/c"))["health_check_period_s"] == 10
