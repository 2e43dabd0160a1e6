"""Shared plumbing of the Ray jobs: connecting to Ray and logging."""

from __future__ import annotations

import logging
import os

import ray

from raychat.core.common.ray_env import address_for_init

log = logging.getLogger("raychat")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("RAYCHAT_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def init_ray() -> None:
    """Connects to Ray: the cluster in ``RAY_ADDRESS`` if set (e.g. under `ray job submit`), else a local one."""
    if ray.is_initialized():
        return
    address = address_for_init()
    ray.init(address=address, log_to_driver=True)
    log.info("connected to Ray %s (%s)", ray.__version__, address or "local")
