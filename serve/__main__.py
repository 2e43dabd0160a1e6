"""``python -m serve --checkpoint URI``: run the OpenAI endpoint in the foreground."""

from __future__ import annotations

import sys
from typing import Sequence

from libs.cli import parse_config
from libs.config import ServeConfig


def main(argv: Sequence[str] | None = None) -> int:
    import ray
    from ray import serve

    from libs.raycfg import address_for_init
    from serve.app import build_app

    cfg = parse_config(ServeConfig, argv, prog="python -m serve")
    ray.init(address=address_for_init())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg.model_dump()), name="raychat", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
