import json

import pytest

from libs.schema import InvalidRow, parse_conversation


def row(**kw):
    base = {"items": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0.1}],
            "condition": "GPT3"}
    base.update(kw)
    return json.dumps(base)


def test_parses_valid_row_keeping_weights_and_condition():
    conv = parse_conversation(row())
    assert conv.condition == "GPT3"
    assert [m.weight for m in conv.items] == [1.0, 0.1]
    assert conv.system == ""


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"items": [{"role": "user", "content": "hi"', "bad_json"),
        ('["a", "list"]', "not_an_object"),
        (row(items=[{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]), "unknown_role"),
        (row(items=[{"role": "user", "content": " \n "}, {"role": "assistant", "content": "y"}]), "empty_content"),
        (row(items=[{"role": "user", "content": "only a question"}]), "no_assistant_turn"),
        (json.dumps({"condition": "GPT3"}), "missing_field"),
        (row(items=[{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]), "invalid_field"),
        (row(items=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": -1}]), "invalid_field"),
    ],
)
def test_quarantines_bad_row_with_countable_reason(line, reason):
    with pytest.raises(InvalidRow) as e:
        parse_conversation(line)
    assert e.value.reason == reason
    assert e.value.detail
