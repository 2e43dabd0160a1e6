import json

import pytest

from libs.pretokenize import ROW_SCHEMA, merge_counts, process_lines
from libs.sample_data import BAD_ROWS, sample_jsonl
from libs.templates import get_template
from libs.tokenization import ConversationTokenizer


@pytest.fixture(scope="module")
def ct(tokenizer):
    return ConversationTokenizer(tokenizer, get_template("openchat_3.5"), max_length=256)


def test_every_line_is_written_quarantined_or_dropped(ct):
    lines = sample_jsonl(40).splitlines()
    res = process_lines(lines, ["f.jsonl"] * len(lines), ct)
    c = merge_counts([res.counts()])
    assert c["read"] == 45 == c["written"] + c["quarantined"] + c["dropped"]
    assert c["quarantined"] == len(BAD_ROWS)
    assert res.table.schema == ROW_SCHEMA
    assert res.table.column("length").to_pylist() == [len(x) for x in res.table.column("input_ids").to_pylist()]


def test_quarantine_keeps_original_record_source_and_reason(ct):
    bad = '{"items": [{"role": "wizard", "content": "x"}]}'
    res = process_lines([bad], ["s3://b/in.jsonl"], ct)
    (q,) = res.quarantined
    assert q == {"source": "s3://b/in.jsonl", "reason": "unknown_role", "detail": q["detail"], "record": bad}


def test_row_id_comes_from_input_and_conditions_are_kept(ct):
    line = json.dumps({"id": "abc", "condition": "GPT3", "items": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.1}]})
    res = process_lines([line], ["f"], ct)
    row = res.table.to_pylist()[0]
    assert (row["id"], row["condition"]) == ("abc", "GPT3")
    assert row["total_weight"] == pytest.approx(0.1 * sum(1 for w in row["weights"] if w > 0))
