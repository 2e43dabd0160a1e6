import pytest

from raychat.core.data.formats import SourceRules, SourceSpec, content_hash, normalize
from raychat.core.data.schema import InvalidRow

FALLBACK = SourceSpec("GPT4 Correct", 1.0)
NO_SOURCES = SourceRules({}, None, (), None, FALLBACK)
CRLFT = SourceRules(
    {"gpt4": SourceSpec("GPT4 Correct", 1.0), "gpt35": SourceSpec("GPT3", 0.1)},
    "model",
    (("*/gpt35/*", "gpt35"),),
    None,
    FALLBACK,
)


def sharegpt(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def test_sharegpt_roles_are_normalised_and_fallback_condition_applied():
    conv, source = normalize(
        sharegpt(("human", "hi"), ("gpt", "hello"), ("human", "more"), ("chatgpt", "sure")), "f", NO_SOURCES
    )
    assert [m.role for m in conv.items] == ["user", "assistant", "user", "assistant"]
    assert conv.condition == "GPT4 Correct" and source == "default"
    assert [m.weight for m in conv.items if m.role == "assistant"] == [1.0, 1.0]


@pytest.mark.parametrize("role", ["bard", "bing", "BING", "model", "assistant"])
def test_odd_sharegpt_assistant_roles_map_to_assistant(role):
    conv, _ = normalize(sharegpt(("human", "q"), (role, "a")), "f", NO_SOURCES)
    assert conv.items[1].role == "assistant"


def test_openai_messages_with_leading_system_and_text_parts():
    obj = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "hello"},
        ]
    }
    conv, _ = normalize(obj, "f", NO_SOURCES)
    assert conv.system == "Be brief." and conv.items[0].content == "hi there"


def test_openchat_rows_keep_their_condition_and_per_message_weights():
    obj = {
        "items": [
            {"role": "user", "content": "q", "weight": 0.0},
            {"role": "assistant", "content": "a", "weight": 0.3},
        ],
        "condition": "GPT3",
        "model": "gpt4",
    }
    conv, source = normalize(obj, "f", CRLFT)
    assert conv.condition == "GPT3" and conv.items[1].weight == 0.3 and source == "gpt4"


def test_source_from_field_then_file_pattern():
    by_field, s1 = normalize(sharegpt(("human", "q"), ("gpt", "a"), model="gpt35"), "data/x.json", CRLFT)
    by_file, s2 = normalize(sharegpt(("human", "q"), ("gpt", "a")), "s3://b/gpt35/part-1.json", CRLFT)
    assert (s1, by_field.condition, by_field.items[1].weight) == ("gpt35", "GPT3", 0.1)
    assert (s2, by_file.condition) == ("gpt35", "GPT3")


def test_unknown_source_is_quarantined_when_sources_are_configured():
    with pytest.raises(InvalidRow) as e:
        normalize(sharegpt(("human", "q"), ("gpt", "a"), model="llama"), "f", CRLFT)
    assert e.value.reason == "unknown_source"


def test_consecutive_same_role_turns_merge_or_quarantine():
    obj = sharegpt(("human", "a"), ("human", "b"), ("gpt", "c"))
    conv, _ = normalize(obj, "f", NO_SOURCES)
    assert [m.content for m in conv.items] == ["a\n\nb", "c"]
    with pytest.raises(InvalidRow) as e:
        normalize(obj, "f", NO_SOURCES, same_role="quarantine")
    assert e.value.reason == "repeated_role"


def test_conversation_may_start_with_assistant():
    conv, _ = normalize(sharegpt(("gpt", "Hello! How can I help?"), ("human", "hi"), ("gpt", "ok")), "f", NO_SOURCES)
    assert conv.items[0].role == "assistant"


@pytest.mark.parametrize(
    "obj, reason",
    [
        ([1, 2], "not_an_object"),
        ({"text": "hi"}, "unknown_format"),
        ({"conversations": []}, "empty_conversation"),
        ({"conversations": "hi"}, "invalid_field"),
        (sharegpt(("human", "q"), ("gpt", "  ")), "empty_content"),
        (sharegpt(("human", "q"), ("wizard", "a")), "unknown_role"),
        (sharegpt(("human", "q")), "no_assistant_turn"),
        (sharegpt(("human", "q"), ("gpt", "a"), ("system", "late")), "misplaced_system"),
        ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]}, "invalid_field"),
        ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "missing_field"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "a"}]},
            "unsupported_content",
        ),
        (
            {"items": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": -1}]},
            "invalid_field",
        ),
        (
            {
                "items": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": float("nan")},
                ]
            },
            "invalid_field",
        ),
        (
            {
                "items": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": float("inf")},
                ]
            },
            "invalid_field",
        ),
    ],
)
def test_bad_rows_are_rejected_with_countable_reason(obj, reason):
    with pytest.raises(InvalidRow) as e:
        normalize(obj, "f", NO_SOURCES)
    assert e.value.reason == reason


def test_forced_format_rejects_rows_of_another_format():
    with pytest.raises(InvalidRow) as e:
        normalize(sharegpt(("human", "q"), ("gpt", "a")), "f", NO_SOURCES, fmt="openai")
    assert e.value.reason == "missing_field"


def test_content_hash_ignores_format_but_not_content():
    a, _ = normalize(sharegpt(("human", "q"), ("gpt", "a")), "f", NO_SOURCES)
    b, _ = normalize(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "g", NO_SOURCES
    )
    c, _ = normalize(sharegpt(("human", "q"), ("gpt", "b")), "f", NO_SOURCES)
    assert content_hash(a) == content_hash(b) != content_hash(c)
