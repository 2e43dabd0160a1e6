import pytest

from raychat.core.common import node_cache, storage


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
    local = node_cache.local_or_download(uri, tmp_path / "cache")
    assert (local / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    # Second call hits the cache (same directory, no new download).
    assert node_cache.local_or_download(uri, tmp_path / "cache") == local


def test_config_makes_local_paths_absolute_and_keeps_s3(tmp_path, monkeypatch):
    from raychat.core.config import PipelineConfig, TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data="tok", output="file://" + str(tmp_path / "out"), base_model="s3://b/m")
    assert cfg.data == str(tmp_path / "tok")
    assert cfg.output == str(tmp_path / "out")
    assert cfg.base_model == "s3://b/m"
    assert PipelineConfig(workdir="runs").workdir == str(tmp_path / "runs")


def test_expand_inputs_handles_files_dirs_globs_and_reports_misses(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/a.jsonl", "d/sub/b.json", "d/notes.txt", "d/_quarantine.jsonl", "c.jsonl"]:
        (tmp_path / name).write_text("{}\n")
    _, files = storage.expand_inputs([str(tmp_path / "d")])
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.jsonl", "b.json"]
    _, files = storage.expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "c.jsonl")])
    assert [f.rsplit("/", 1)[-1] for f in files] == ["c.jsonl"]
    with pytest.raises(FileNotFoundError, match="matched no"):
        storage.expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="mix"):
        storage.expand_inputs([str(tmp_path), "s3://b/x"])


def test_expand_inputs_on_s3_prefix_and_glob(s3_bucket):
    for key in ["in/a.jsonl", "in/b.jsonl", "in/x.txt"]:
        storage.write_text(f"s3://{s3_bucket}/{key}", "{}\n")
    fs, files = storage.expand_inputs([f"s3://{s3_bucket}/in"])
    assert files == [f"{s3_bucket}/in/a.jsonl", f"{s3_bucket}/in/b.jsonl"]
    assert storage.display_uri(fs, files[0]) == f"s3://{s3_bucket}/in/a.jsonl"
    _, files = storage.expand_inputs([f"s3://{s3_bucket}/in/b*"])
    assert files == [f"{s3_bucket}/in/b.jsonl"]


def test_glob_stars_stay_in_one_segment_and_double_star_recurses():
    rx = storage.glob_regex("/d/*.jsonl")
    assert rx.fullmatch("/d/a.jsonl") and not rx.fullmatch("/d/sub/a.jsonl")
    rx = storage.glob_regex("/d/**/*.json")
    assert rx.fullmatch("/d/a.json") and rx.fullmatch("/d/x/y/a.json")
