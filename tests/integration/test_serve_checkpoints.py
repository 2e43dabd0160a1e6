"""Serving a training run's ``best`` / ``latest`` checkpoint straight from S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import pytest

from tests.fake_runs import write_run
from tests.integration.serving import local_greedy, serve_run

pytestmark = pytest.mark.integration


def test_best_and_latest_checkpoints_of_an_s3_run_are_served(serve_port, s3_bucket, tiny_model_dir, tmp_path):
    from raychat.core.model.hf import create_embedded_base_model

    other = create_embedded_base_model(tmp_path / "other", seed=1)  # different weights
    run = f"s3://{s3_bucket}/runs/crlft"
    manifest = write_run(run, [(tiny_model_dir, 10, 5.0), (other, 20, 6.0)])
    best_card, best_text = serve_run(serve_port, run, "best", tmp_path / "cache")
    latest_card, latest_text = serve_run(serve_port, run, "latest", tmp_path / "cache")

    assert (best_card["uri"], best_card["step"], best_card["eval_loss"], best_card["run"]) == (
        manifest["checkpoints"][0]["uri"],
        10,
        5.0,
        run,
    )
    assert (latest_card["uri"], latest_card["step"], latest_card["eval_loss"]) == (
        manifest["checkpoints"][1]["uri"],
        20,
        6.0,
    )
    assert best_text == local_greedy(tiny_model_dir) and latest_text == local_greedy(other)
    assert best_text != latest_text
    # Downloaded once each into the node cache, without the DeepSpeed training state.
    copies = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(copies) == 2 and not any((p / "training_state").exists() for p in copies)
