"""Fixtures shared by unit and integration tests: the real tokenizer, a tiny model, a moto S3 server."""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow; set RAYCHAT_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not os.environ.get("RAYCHAT_SLOW"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tokenizer():
    from raychat.core.data.tokenizer import build_embedded_tokenizer

    return build_embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from raychat.core.model.hf import create_embedded_base_model

    return create_embedded_base_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_side_ports_env() -> dict[str, str]:
    """Free ports for the fixed ones Serve's HAProxy ingress binds on every node (metrics 9101,
    stats 8404, fallback proxy 8500 / 9500), so two Ray instances on this machine (the tests' own
    and a ``ray start`` head, or a developer's local cluster) never fight over them."""
    names = (
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    )
    return {name: str(free_port()) for name in names}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto) on 127.0.0.1; env points boto3 and pyarrow at it for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    name = f"raychat-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
