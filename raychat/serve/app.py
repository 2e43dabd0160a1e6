"""The Serve application builder: one ``import_path`` for ``serve run``, ``serve deploy``,
``python -m raychat.serve`` and a KubeRay RayService.

    serve run raychat.serve.app:build_app checkpoint=s3://bucket/runs/crlft checkpoint_select=best

The checkpoint is resolved here, once per deploy (a run's ``best``/``latest`` is read from its
manifest), so every engine replica — including ones autoscaling adds later — serves the same
weights and the router shows where they came from.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from raychat.core.config import ServeConfig
from raychat.core.run_dir import resolve_checkpoint
from raychat.serve.engine_client import engine_class
from raychat.serve.ingress import OpenAIRouter

SAME_EVENT_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def replica_env(cfg: ServeConfig) -> dict:
    """``ray_actor_options`` entries of every replica: the app's runtime_env plus Serve's flags.

    A deployment that sets a runtime_env of its own stops inheriting the app's (Serve merges the
    app's only into deployments named under ``deployments:`` in the config), so this starts from
    the runtime_env the builder runs in, which is the app's (e.g. the API-key env var on KubeRay).
    """
    if not cfg.same_event_loop:
        return {}
    import ray

    inherited = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return {"runtime_env": {**inherited, "env_vars": {**inherited.get("env_vars", {}), **SAME_EVENT_LOOP_ENV}}}


# layout combined: requests Serve lets into a replica beyond its admission limit, so that every
# generation request over the limit reaches the app's own OpenAI-format 429 (and /v1/models,
# /health and metrics scrapes are never held behind generation).
ADMISSION_HEADROOM = 16
# A replica being replaced (a new checkpoint, a downscale) stops taking requests and lets the ones it
# has finish for this long past request_timeout_s, the most any of them can still run (Serve's
# default, 20 s, would cut longer generations off at every rollout).
SHUTDOWN_MARGIN_S = 5.0


def shutdown_timeout_s(cfg: ServeConfig) -> float:
    """``graceful_shutdown_timeout_s`` of the app's deployments: in-flight requests are never cut off."""
    return cfg.request_timeout_s + SHUTDOWN_MARGIN_S


def engine_options(cfg: ServeConfig) -> dict:
    """``serve.deployment`` options of the engine: replicas or autoscaling, limits, resources."""
    limit = cfg.combined_admission_limit() if cfg.layout == "combined" else None
    opts: dict = {
        "max_ongoing_requests": cfg.max_ongoing_requests if limit is None else limit + ADMISSION_HEADROOM,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=cfg.retry_after_s),
        "graceful_shutdown_timeout_s": shutdown_timeout_s(cfg),
        "health_check_period_s": cfg.health_check_period_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, **replica_env(cfg)},
    }
    if cfg.num_replicas is not None:
        opts["num_replicas"] = cfg.num_replicas
    else:
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=cfg.min_replicas,
            max_replicas=cfg.max_replicas,
            initial_replicas=max(cfg.min_replicas, 1),
            target_ongoing_requests=cfg.target_ongoing_requests,
            **cfg.autoscaling_overrides,
        )
    return opts


def build_app(args: dict) -> Application:
    """Builds the app from ``args`` (the fields of :class:`raychat.core.config.ServeConfig`)."""
    cfg = ServeConfig.model_validate(args)
    ref = resolve_checkpoint(cfg.checkpoint, cfg.checkpoint_select)
    if cfg.model_id is None:
        cfg = cfg.model_copy(update={"model_id": ref.uri.rstrip("/").rsplit("/", 1)[-1]})
    if cfg.layout == "combined":  # the engine deployment is the ingress: same name, so same overrides apply
        return serve.deployment(OpenAIRouter, name="LLMEngine", **engine_options(cfg)).bind(
            None, cfg.model_dump(), ref.to_dict()
        )
    engine = serve.deployment(engine_class(cfg.engine_name()), name="LLMEngine", **engine_options(cfg)).bind(
        cfg.model_dump(), ref.to_dict()
    )
    router = serve.deployment(
        OpenAIRouter,
        name="OpenAIRouter",
        num_replicas=cfg.router_replicas,
        max_ongoing_requests=cfg.router_max_ongoing_requests,
        graceful_shutdown_timeout_s=shutdown_timeout_s(cfg),
        ray_actor_options={"num_cpus": 0, **replica_env(cfg)},
    )
    return router.bind(engine, cfg.model_dump(), ref.to_dict())
