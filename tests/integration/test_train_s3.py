"""Training with S3-only storage (moto on 127.0.0.1): checkpoints, manifest URIs, and a plain transformers load."""

import json

import pytest

from libs import storage
from libs.sample_data import sample_jsonl

pytestmark = pytest.mark.integration


def test_train_writes_checkpoints_and_manifest_to_s3(ray_local, s3_bucket, tmp_path):
    from jobs.pretokenize import run as pretokenize
    from jobs.train import run as train
    from libs.config import PretokenizeConfig, TrainConfig
    from transformers import AutoModelForCausalLM

    storage.write_text(f"s3://{s3_bucket}/in.jsonl", sample_jsonl(48, include_bad_rows=False))
    pretokenize(PretokenizeConfig(input=f"s3://{s3_bucket}/in.jsonl", output=f"s3://{s3_bucket}/tok"))
    s = train(TrainConfig(data=f"s3://{s3_bucket}/tok", output=f"s3://{s3_bucket}/runs", name="r", max_steps=2,
                          batch_max_len=256, eval_fraction=0.1, learning_rate=1e-3))
    manifest = json.loads(storage.read_text(s["manifest"]))
    assert s["checkpoint"].startswith(f"s3://{s3_bucket}/runs/r/checkpoint_")
    assert manifest["latest"] == s["checkpoint"] and manifest["best"].startswith("s3://")
    local = storage.local_or_download(s["checkpoint"], tmp_path / "cache")
    assert AutoModelForCausalLM.from_pretrained(local, use_safetensors=True).config.model_type == "mistral"
