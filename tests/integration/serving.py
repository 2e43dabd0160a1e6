"""Fixtures and helpers for the Serve tests: one Serve instance per module on a free loopback port."""

from __future__ import annotations

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def deploy(port: int, name: str, **cfg) -> str:
    """Runs one raychat app (``cfg``: ServeConfig fields) under ``/<name>``; returns its OpenAI base URL."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}/v1"
