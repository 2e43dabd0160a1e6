import pytest

from libs import storage


def test_local_paths_and_file_uris_resolve_to_the_same_place(tmp_path):
    storage.write_text(str(tmp_path / "a" / "b.txt"), "hello")
    assert storage.read_text(f"file://{tmp_path}/a/b.txt") == "hello"
    assert storage.exists(str(tmp_path / "a" / "b.txt"))
    assert not storage.exists(str(tmp_path / "nope"))


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported storage scheme 'gs'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.resolve("s3://")


def test_join_keeps_scheme():
    assert storage.join("s3://b/p/", "x", "/y") == "s3://b/p/x/y"


def test_s3_roundtrip_through_moto(s3_bucket, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    uri = f"s3://{s3_bucket}/runs/model"
    storage.upload_dir(src, uri)
    assert storage.exists(f"{uri}/config.json")
    assert [p.rsplit("/", 1)[-1] for p in storage.list_files(uri)] == ["config.json", "w.bin"]
    local = storage.local_or_download(uri, tmp_path / "cache")
    assert (local / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    # Second call hits the cache (same directory, no new download).
    assert storage.local_or_download(uri, tmp_path / "cache") == local


def test_missing_s3_directory_is_file_not_found(s3_bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.local_or_download(f"s3://{s3_bucket}/absent", tmp_path)


def test_config_makes_local_paths_absolute_and_keeps_s3(tmp_path, monkeypatch):
    from libs.config import PipelineConfig, TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data="tok", output="file://" + str(tmp_path / "out"), base_model="s3://b/m")
    assert cfg.data == str(tmp_path / "tok")
    assert cfg.output == str(tmp_path / "out")
    assert cfg.base_model == "s3://b/m"
    assert PipelineConfig(workdir="runs").workdir == str(tmp_path / "runs")
