"""The data → train contract: rows carry how they were made, and training refuses data made for another model."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raychat.core.data.dataset import METADATA_KEY, ROW_SCHEMA, check_data_matches_model, data_metadata


def _write_rows(directory, metadata: dict | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    schema = ROW_SCHEMA if metadata is None else ROW_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata)})
    row = {"id": "a", "source": "s", "condition": "", "file": "f", "index": 0}
    row |= {"input_ids": [1, 2], "weights": [0.0, 1.0], "length": 2, "total_weight": 1.0}
    pq.write_table(pa.Table.from_pylist([row], schema=schema), directory / "part-0.parquet")


def test_metadata_names_template_tokenizer_and_its_fingerprint():
    meta = data_metadata("openchat_3.5", None, 512)
    assert set(meta) == {"template", "tokenizer", "tokenizer_fingerprint", "vocab_size", "max_length", "eot_id"}
    assert (meta["template"], meta["tokenizer"], meta["max_length"]) == ("openchat_3.5", "embedded", 512)
    assert data_metadata("openchat_3.5", None, 512) == meta  # deterministic: the fingerprint is the vocabulary's


def test_data_made_for_the_model_is_accepted(tiny_model_dir, tmp_path):
    meta = data_metadata("openchat_3.5", None, 512)
    _write_rows(tmp_path / "tok", meta)
    assert check_data_matches_model(str(tmp_path / "tok"), str(tiny_model_dir)) == meta


def test_data_made_with_another_tokenizer_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    meta = data_metadata("openchat_3.5", None, 512) | {"tokenizer": "s3://b/other", "tokenizer_fingerprint": "f00"}
    _write_rows(tmp_path / "tok", meta)
    with pytest.raises(SystemExit, match=r"was tokenized with tokenizer 's3://b/other'.*--tokenizer pointing at"):
        check_data_matches_model(str(tmp_path / "tok"), str(tiny_model_dir))


def test_missing_rows_or_metadata_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no parquet files"):
        check_data_matches_model(str(tmp_path / "empty"), str(tiny_model_dir))
    _write_rows(tmp_path / "bare", None)
    with pytest.raises(SystemExit, match="no raychat metadata"):
        check_data_matches_model(str(tmp_path / "bare"), str(tiny_model_dir))
