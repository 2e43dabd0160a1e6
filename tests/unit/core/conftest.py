"""Fixtures of the core tests: a training run's layout on the moto S3 server."""

import pytest

from tests.fake_runs import write_run


@pytest.fixture
def s3_run(s3_bucket, tiny_model_dir):
    run = f"s3://{s3_bucket}/runs/crlft"
    return write_run(run, [(tiny_model_dir, 10, 5.0), (tiny_model_dir, 20, 6.0)])
