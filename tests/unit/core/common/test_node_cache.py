"""One node cache: a URI used as a base model (training) and as a served model on one node shares one copy."""

import pytest

from raychat.core.common import node_cache, storage
from raychat.core.infer.checkpoint_cache import fetch_checkpoint


@pytest.fixture
def s3_checkpoint(s3_bucket, tiny_model_dir, tmp_path):
    """An s3 checkpoint as training writes it: HF files plus DeepSpeed state serving never fetches."""
    src = tmp_path / "src"
    storage.upload_dir(tiny_model_dir, f"s3://{s3_bucket}/ckpt")
    (src / "training_state").mkdir(parents=True)
    (src / "training_state" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"x" * 4096)
    storage.upload_dir(src, f"s3://{s3_bucket}/ckpt")
    return f"s3://{s3_bucket}/ckpt"


def _delete_from_source(uri: str, rel: str) -> None:
    fs, path = storage.resolve(uri)
    fs.delete_file(f"{path}/{rel}")


def test_serving_a_cached_base_model_keeps_the_first_copy_and_downloads_nothing(s3_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    base = node_cache.local_or_download(s3_checkpoint, cache)
    assert (base / "training_state" / "zero_pp_rank_0_optim_states.pt").is_file()
    # Nothing more needs downloading: serving must reuse the copy, not delete and re-fetch it.
    _delete_from_source(s3_checkpoint, "config.json")
    served = fetch_checkpoint(s3_checkpoint, cache)
    assert served == base
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    assert (base / "training_state" / "zero_pp_rank_0_optim_states.pt").is_file()


def test_a_served_model_used_as_a_base_model_gets_every_file(s3_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    served = fetch_checkpoint(s3_checkpoint, cache)
    assert not (served / "training_state").exists()
    base = node_cache.local_or_download(s3_checkpoint, cache)
    assert (base / "training_state" / "zero_pp_rank_0_optim_states.pt").read_bytes() == b"x" * 4096
    # The served copy is still whole and valid.
    assert (served / "model.safetensors").is_file() and fetch_checkpoint(s3_checkpoint, cache) == served


def test_missing_s3_directory_is_file_not_found(s3_bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        node_cache.local_or_download(f"s3://{s3_bucket}/absent", tmp_path)
