"""The data job reads from and writes to s3:// (a moto server on loopback) through the same code path."""

import json

import pyarrow.parquet as pq
import pytest

from libs import storage
from libs.sample_data import sample_jsonl

pytestmark = pytest.mark.integration


def test_pretokenize_s3_in_s3_out(ray_local, s3_bucket):
    from jobs.pretokenize import run
    from libs.config import PretokenizeConfig

    src = f"s3://{s3_bucket}/in/sample.jsonl"
    storage.write_text(src, sample_jsonl(30))
    out = f"s3://{s3_bucket}/tokenized"
    report = run(PretokenizeConfig(input=src, output=out, batch_size=16))
    assert report["read"] == 35 and report["written"] == 30 and report["quarantined"] == 5

    fs, path = storage.resolve(out)
    table = pq.read_table([p for p in storage.list_files(out, ".parquet")], filesystem=fs)
    assert table.num_rows == 30
    assert json.loads(storage.read_text(f"{out}/_meta.json"))["template"] == "openchat_3.5"
    assert len(storage.list_files(f"{out}/_quarantine", ".jsonl")) >= 1


def test_pretokenize_refuses_non_empty_output(ray_local, tmp_path):
    from jobs.pretokenize import run
    from libs.config import PretokenizeConfig

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.parquet").write_text("")
    (tmp_path / "in.jsonl").write_text(sample_jsonl(2))
    with pytest.raises(SystemExit, match="not empty"):
        run(PretokenizeConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out")))
