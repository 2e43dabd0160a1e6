"""Unit tests are Ray-free: calling ``ray.init`` from one is a bug (as in Ray Serve's own unit tests)."""

import pytest


@pytest.fixture(autouse=True)
def _forbid_ray_init(monkeypatch):
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def _fail(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", _fail)
