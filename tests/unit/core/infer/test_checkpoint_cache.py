import shutil
import threading

import pytest

from raychat.core.common import storage
from raychat.core.infer.checkpoint_cache import fetch_checkpoint
from raychat.core.run_dir import CheckpointError


def test_s3_checkpoint_is_downloaded_once_without_training_state_and_verified(s3_run, tmp_path):
    uri = s3_run["checkpoints"][0]["uri"]
    local = fetch_checkpoint(uri, tmp_path / "cache")
    assert (local / "model.safetensors").is_file() and (local / "config.json").is_file()
    assert not (local / "training_state").exists()
    # Once complete, the copy is reused: the source can go away.
    fs, path = storage.resolve(uri)
    fs.delete_file(f"{path}/config.json")
    assert fetch_checkpoint(uri, tmp_path / "cache") == local


def test_concurrent_fetches_on_one_node_share_one_download(s3_run, tmp_path):
    uri = s3_run["checkpoints"][1]["uri"]
    results, errors = [], []

    def fetch():
        try:
            results.append(fetch_checkpoint(uri, tmp_path / "cache"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [results[0].name]


def test_truncated_weights_are_refused(tiny_model_dir, tmp_path, s3_bucket):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fetch_checkpoint(str(bad), tmp_path / "cache")
    storage.upload_dir(bad, f"s3://{s3_bucket}/bad")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fetch_checkpoint(f"s3://{s3_bucket}/bad", tmp_path / "cache")


def test_pickle_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        fetch_checkpoint(str(pickled), tmp_path / "cache")
