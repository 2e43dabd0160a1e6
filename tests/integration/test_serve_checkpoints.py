"""Serving a training run's ``best`` / ``latest`` checkpoint straight from S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import openai
import pytest

from tests.integration.serving import deploy, serve_port  # noqa: F401 (fixture)
from tests.fake_runs import write_run

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time"


def local_greedy(model_dir, max_tokens: int = 8) -> str:
    """What the checkpoint's weights generate in-process for PROMPT (greedy)."""
    from libs.generation import ContinuousBatcher, SamplingParams
    from libs.model import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    b = ContinuousBatcher(model, stop_ids=[32000, tok.eos_token_id], pad_id=32001, max_context=2048)
    ids = [s.token_id for step in b.generate([tok(PROMPT)["input_ids"]], [SamplingParams(max_tokens=max_tokens, temperature=0)])
           for s in step if s is not None and s.token_id is not None]
    return tok.decode(ids, skip_special_tokens=True)


def serve_run(port: int, run_uri: str, select: str, cache_dir) -> tuple[dict, str]:
    url = deploy(port, "ckpt", checkpoint=run_uri, checkpoint_select=select, model_id="crlft", allow_no_auth=True,
                 num_replicas=1, num_cpus=0.5, cache_dir=str(cache_dir))
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    card = c.models.list().data[0].model_extra["checkpoint"]
    text = c.completions.create(model="crlft", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    return card, text


def test_best_and_latest_checkpoints_of_an_s3_run_are_served(serve_port, s3_bucket, tiny_model_dir, tmp_path):
    from libs.model import create_embedded_base_model

    other = create_embedded_base_model(tmp_path / "other", seed=1)  # different weights
    run = f"s3://{s3_bucket}/runs/crlft"
    manifest = write_run(run, [(tiny_model_dir, 10, 5.0), (other, 20, 6.0)])
    best_card, best_text = serve_run(serve_port, run, "best", tmp_path / "cache")
    latest_card, latest_text = serve_run(serve_port, run, "latest", tmp_path / "cache")

    assert (best_card["uri"], best_card["step"], best_card["eval_loss"], best_card["run"]) == \
        (manifest["checkpoints"][0]["uri"], 10, 5.0, run)
    assert (latest_card["uri"], latest_card["step"], latest_card["eval_loss"]) == (manifest["checkpoints"][1]["uri"], 20, 6.0)
    assert best_text == local_greedy(tiny_model_dir) and latest_text == local_greedy(other)
    assert best_text != latest_text
    # Downloaded once each into the node cache, without the DeepSpeed training state.
    copies = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(copies) == 2 and not any((p / "training_state").exists() for p in copies)
