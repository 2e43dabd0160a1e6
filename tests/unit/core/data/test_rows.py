import json

import pytest

from raychat.core.data.dataset import ROW_SCHEMA
from raychat.core.data.formats import SourceRules, SourceSpec
from raychat.core.data.rows import RowPolicy, Stats, StrictModeError, process_records
from raychat.core.data.sample import BAD_ROWS, sample_jsonl
from raychat.core.data.templates import get_template
from raychat.core.data.tokenizer import ConversationTokenizer

RULES = SourceRules(
    {"gpt4": SourceSpec("GPT4 Correct", 1.0), "gpt35": SourceSpec("GPT3", 0.1)},
    "model",
    (),
    None,
    SourceSpec("GPT4 Correct", 1.0),
)


@pytest.fixture(scope="module")
def ct(tokenizer):
    return ConversationTokenizer(tokenizer, get_template("openchat_3.5"), max_length=256)


DEFAULT_POLICY = RowPolicy(RULES)


def run(ct, texts, policy=DEFAULT_POLICY, errors=None, claim=None, file="f.jsonl"):
    n = len(texts)
    return process_records([file] * n, list(range(n)), texts, errors or [None] * n, [None] * n, ct, policy, claim)


def sharegpt(q, a, **kw):
    return json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **kw})


def test_every_record_is_written_quarantined_or_dropped(ct):
    texts = sample_jsonl(40).splitlines()
    res = run(ct, texts)
    c = Stats.merge([res.stats.to_dict()])
    assert c["read"] == 45 == c["written"] + c["quarantined"] + c["dropped"]
    assert c["quarantined"] == len(BAD_ROWS)
    assert res.table.schema.equals(ROW_SCHEMA)
    assert res.table.column("length").to_pylist() == [len(x) for x in res.table.column("input_ids").to_pylist()]


def test_quarantine_keeps_original_record_file_index_and_reason(ct):
    bad = '{"conversations": [{"from": "wizard", "value": "x"}]}'
    res = run(ct, [sharegpt("q", "a"), bad], file="s3://b/in.json")
    (q,) = res.quarantined
    assert (q["file"], q["index"], q["reason"], q["record"]) == ("s3://b/in.json", 1, "unknown_role", bad)


def test_reader_errors_are_quarantined_with_their_reason(ct):
    res = run(ct, ['[{"conversations": [', sharegpt("q", "a")], errors=["truncated", None])
    assert res.stats.quarantined == {"truncated": 1} and res.stats.written == 1


def test_duplicates_dropped_by_claim_and_counted(ct):
    seen: dict = {}

    def claim(hashes, owners):
        return [seen.setdefault(h, o) == o for h, o in zip(hashes, owners)]

    res = run(ct, [sharegpt("q", "a"), sharegpt("q", "a"), sharegpt("q", "b")], claim=claim)
    assert res.stats.written == 2 and res.stats.dropped == {"duplicate": 1}
    # The same batch retried (same owners) keeps its rows: a retry never drops its own data.
    again = run(ct, [sharegpt("q", "a"), sharegpt("q", "a"), sharegpt("q", "b")], claim=claim)
    assert again.stats.written == 2


def test_sources_set_condition_weights_and_per_source_counts(ct):
    res = run(ct, [sharegpt("q", "a", model="gpt35"), sharegpt("q2", "b", model="gpt4")])
    rows = res.table.to_pylist()
    assert [(r["source"], r["condition"]) for r in rows] == [("gpt35", "GPT3"), ("gpt4", "GPT4 Correct")]
    assert max(rows[0]["weights"]) == pytest.approx(0.1)
    assert set(res.stats.to_dict()["by_source"]) == {"gpt35", "gpt4"}
    assert res.stats.to_dict()["by_condition"]["GPT3"]["rows"] == 1


def test_row_id_is_input_id_or_file_and_index(ct):
    res = run(ct, [sharegpt("q", "a", id="abc"), sharegpt("q2", "b")])
    assert res.table.column("id").to_pylist() == ["abc", "f.jsonl:1"]


def test_rows_without_supervised_tokens_after_truncation_are_dropped(tokenizer):
    small = ConversationTokenizer(tokenizer, get_template("openchat_3.5"), max_length=12)
    res = run(small, [sharegpt("a long question " * 10, "answer")])
    assert res.stats.dropped == {"no_supervised_tokens": 1} and res.table.num_rows == 0


def test_strict_fails_on_first_bad_row_naming_file_index_reason(ct):
    with pytest.raises(StrictModeError, match=r"f.jsonl record 1: unknown_role"):
        run(
            ct,
            [sharegpt("q", "a"), '{"conversations": [{"from": "wizard", "value": "x"}]}'],
            policy=RowPolicy(RULES, strict=True),
        )


def test_tokenizer_pool_uses_one_actor_per_thread_group_on_each_node():
    from raychat.core.data.rows import plan_tokenizer_pool

    two = plan_tokenizer_pool([2.0], threads=1, reserved=0.2)
    assert (two.actors, two.threads, two.cpus_per_actor) == (2, 1, 0.9)
    grouped = plan_tokenizer_pool([2.0], threads=2, reserved=0.2)
    assert (grouped.actors, grouped.threads, grouped.cpus_per_actor) == (1, 2, 1.8)
    big = plan_tokenizer_pool([0.0, 16.0, 16.0], threads=2, reserved=0.2)  # a CPU-less head is ignored
    assert big.actors == 16 and big.fits == 16
    assert big.actors * big.cpus_per_actor <= 32 - 2 * 0.2  # read/write tasks keep room on every node
    for nodes in ([16.0, 16.0], [2.0, 8.0], [96.0]):  # one thread each: never more actors than cores
        pool = plan_tokenizer_pool(nodes, threads=1, reserved=0.2)
        assert pool.actors == sum(int(c) for c in nodes)
        assert pool.actors * pool.cpus_per_actor <= sum(nodes) - 0.2 * len(nodes)


def test_tokenizer_pool_caps_threads_at_the_smallest_node_so_every_actor_fits():
    from raychat.core.data.rows import plan_tokenizer_pool

    pool = plan_tokenizer_pool([1.0, 1.0], threads=2, reserved=0.2)
    assert pool.threads == 1 and pool.cpus_per_actor <= 0.8 and pool.actors == 2
    explicit = plan_tokenizer_pool([2.0], threads=1, num_actors=5, reserved=0.2)
    assert explicit.actors == 5 and explicit.fits == 2  # the job warns that 3 must wait
