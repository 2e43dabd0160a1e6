"""Where Ray should connect, decided without importing Ray (used by jobs/ and serve/)."""

from __future__ import annotations

import os
from typing import MutableMapping


def ray_address(env: MutableMapping[str, str] | None = None) -> str | None:
    """The ``address`` for ``ray.init``: ``RAY_ADDRESS`` if set, else None (a new local instance).

    A dashboard / Jobs API URL (``http://head:8265``, what ``ray job submit`` wants) is not a GCS
    address: it is removed from ``env`` (default ``os.environ``; ``ray.init`` would reject it) and a
    process started by hand on a cluster node joins the running cluster instead (``"auto"``).
    """
    env = os.environ if env is None else env
    address = env.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        del env["RAY_ADDRESS"]
        return "auto"
    return address
