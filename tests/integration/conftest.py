"""Integration tests run real local Ray: one shared 2-CPU instance per session."""

import os

import pytest

from tests.conftest import free_port, serve_side_ports_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ray_local(s3_server):
    # The moto endpoint/credentials are in os.environ before Ray starts, so every worker inherits them.
    import ray

    from raychat.core.common.ray_env import apply_local_ray_env

    apply_local_ray_env()  # Serve as raychat clusters run it: HAProxy ingress, throughput-optimized
    os.environ.update(serve_side_ports_env())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """One Serve instance per test module on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
