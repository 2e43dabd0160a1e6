"""``python -m raychat.serve --checkpoint URI``: run the OpenAI endpoint in the foreground."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from raychat.core.common.cli import parse_config
from raychat.core.config import ServeConfig


def main(argv: Sequence[str] | None = None) -> int:
    import ray
    from ray import serve

    from raychat.core.common.ray_env import address_for_init
    from raychat.serve.app import build_app

    cfg = parse_config(ServeConfig, argv, prog="raychat serve")
    ray.init(address=address_for_init())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg.model_dump()), name="raychat", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
