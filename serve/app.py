"""The Serve application builder: one ``import_path`` for ``serve run``, ``serve deploy``,
``python -m serve`` and a KubeRay RayService.

    serve run serve.app:build_app checkpoint=runs/demo/train/crlft/checkpoint_...
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from libs.config import ServeConfig
from serve.engine import LLMEngine
from serve.router import OpenAIRouter


def build_app(args: dict) -> Application:
    """Builds the app from ``args`` (the fields of :class:`libs.config.ServeConfig`)."""
    cfg = ServeConfig.model_validate(args)
    engine = serve.deployment(
        LLMEngine,
        name="LLMEngine",
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=max(2 * cfg.max_batch_size, 16),
    ).bind(cfg.model_dump())
    router = serve.deployment(OpenAIRouter, name="OpenAIRouter", num_replicas=1,
                              ray_actor_options={"num_cpus": 0})
    return router.bind(engine, cfg.model_dump())
