"""The data job on real Ray: mixed formats, directories and globs, a truncated JSON array, S3, --strict."""

import json

import pyarrow.parquet as pq
import pytest

from raychat.core.common import storage
from raychat.core.data.dataset import METADATA_KEY
from raychat.core.data.sample import sample_jsonl

pytestmark = pytest.mark.integration


def sharegpt(i, model=None):
    row = {
        "id": f"sg-{i}",
        "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}],
    }
    if model:
        row["model"] = model
    return row


def write_inputs(root):
    (root / "in" / "gpt35").mkdir(parents=True)
    # A pretty-printed JSON array cut off mid-record, like the real ShareGPT V3 dump.
    array = json.dumps([sharegpt(i) for i in range(20)], indent=2)
    (root / "in" / "sharegpt.json").write_text(array[: array.rindex('"answer 19"') + 5])
    # OpenAI messages, one with a bad role and one exact duplicate, in a source-named folder.
    msgs = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(5)
    ]
    msgs += [msgs[0], {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    (root / "in" / "gpt35" / "part-0.jsonl").write_text("\n".join(json.dumps(m) for m in msgs) + "\n")
    (root / "in" / "notes.txt").write_text("not data")


CFG = dict(
    sources={"gpt4": {"condition": "GPT4 Correct", "weight": 1.0}, "gpt35": {"condition": "GPT3", "weight": 0.1}},
    file_sources={"*/gpt35/*": "gpt35"},
    default_source="gpt4",
    batch_size=4,
)


def test_mixed_inputs_every_row_accounted_for(ray_local, tmp_path):
    from raychat.core.config import PretokenizeConfig
    from raychat.jobs.pretokenize import run

    write_inputs(tmp_path)
    report = run(PretokenizeConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), **CFG))
    assert report["read"] == 20 + 7
    assert report["written"] == 19 + 5
    assert report["quarantined_by_reason"] == {"truncated": 1, "unknown_role": 1}
    assert report["dropped_by_reason"] == {"duplicate": 1}
    assert report["by_source"]["gpt35"]["rows"] == 5 and report["by_source"]["gpt4"]["rows"] == 19
    assert report["by_condition"]["GPT3"]["rows"] == 5

    files = storage.list_files(str(tmp_path / "out"), ".parquet")
    table = pq.read_table(files)
    assert table.num_rows == 24
    meta = json.loads(pq.read_schema(files[0]).metadata[METADATA_KEY])
    assert meta["template"] == "openchat_3.5" and meta["vocab_size"] == 32002 and meta["max_length"] == 8192
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["sg-3"]["condition"] == "GPT4 Correct" and max(rows["sg-3"]["weights"]) == 1.0
    gpt35 = [r for r in rows.values() if r["source"] == "gpt35"]
    assert all(max(r["weights"]) == pytest.approx(0.1) for r in gpt35)

    quarantine = [
        json.loads(line)
        for f in (tmp_path / "out" / "_quarantine").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    by_reason = {q["reason"]: q for q in quarantine}
    assert by_reason["truncated"]["file"].endswith("sharegpt.json") and by_reason["truncated"]["index"] == 19
    assert by_reason["unknown_role"]["index"] == 6 and "robot" in by_reason["unknown_role"]["record"]
    saved = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert saved["read"] == saved["written"] + saved["quarantined"] + saved["dropped"]


def test_strict_fails_naming_file_index_and_reason(ray_local, tmp_path):
    from raychat.core.config import PretokenizeConfig
    from raychat.jobs.pretokenize import run

    write_inputs(tmp_path)
    with pytest.raises(SystemExit, match=r"--strict: bad row: .*part-0.jsonl record 6: unknown_role"):
        run(
            PretokenizeConfig(
                input=str(tmp_path / "in" / "gpt35" / "*.jsonl"), output=str(tmp_path / "out"), strict=True, **CFG
            )
        )


def test_s3_in_s3_out(ray_local, s3_bucket):
    from raychat.core.config import PretokenizeConfig
    from raychat.jobs.pretokenize import run

    storage.write_text(f"s3://{s3_bucket}/in/a.jsonl", sample_jsonl(30))
    storage.write_text(f"s3://{s3_bucket}/in/b.json", json.dumps([sharegpt(i) for i in range(3)]))
    out = f"s3://{s3_bucket}/tokenized"
    report = run(PretokenizeConfig(input=f"s3://{s3_bucket}/in", output=out, batch_size=16))
    assert report["read"] == 35 + 3 and report["written"] == 33 and report["quarantined"] == 5
    fs, _ = storage.resolve(out)
    assert pq.read_table(storage.list_files(out, ".parquet"), filesystem=fs).num_rows == 33
    assert json.loads(storage.read_text(f"{out}/_report.json"))["written"] == 33
    (q,) = [
        json.loads(line)
        for p in storage.list_files(f"{out}/_quarantine", ".jsonl")
        for line in storage.read_text(f"s3://{p}").splitlines()
        if '"not_an_object"' in line
    ]
    assert q["file"] == f"s3://{s3_bucket}/in/a.jsonl"


def test_refuses_non_empty_output_and_missing_input(ray_local, tmp_path):
    from raychat.core.config import PretokenizeConfig
    from raychat.jobs.pretokenize import run

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.parquet").write_text("")
    (tmp_path / "in.jsonl").write_text(sample_jsonl(2))
    with pytest.raises(SystemExit, match="not empty"):
        run(PretokenizeConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="matched no"):
        run(PretokenizeConfig(input=str(tmp_path / "*.parquet"), output=str(tmp_path / "out2")))
