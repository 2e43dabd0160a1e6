import pytest

from raychat.core.data.templates import get_template


def test_openchat_35_renders_reference_format():
    t = get_template("openchat_3.5")
    segs = t.segments([("user", "Hi", 0.0), ("assistant", "Hello", 1.0)], condition="GPT4 Correct")
    assert t.render(segs) == "<s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello<|end_of_turn|>"


def test_user_turn_weight_is_zero_and_assistant_eot_carries_weight():
    t = get_template("openchat_3.5")
    segs = t.segments([("user", "q", 1.0), ("assistant", "a", 0.1)], condition="GPT3")
    weights = {(s.kind, s.text): s.weight for s in segs}
    assert weights[("content", "q")] == 0.0
    assert weights[("content", "a")] == 0.1
    assert segs[-1].kind == "eot" and segs[-1].weight == 0.1
    assert [s.text for s in segs if s.kind == "prefix"] == ["GPT3 User:", "GPT3 Assistant:"]


def test_empty_condition_gives_bare_role_prefix_and_none_gives_default():
    t = get_template("openchat_3.5")
    assert t.role_prefix("user", "") == "User:"
    assert t.role_prefix("assistant", None) == "GPT4 Correct Assistant:"


def test_system_prompt_comes_first_with_eot_and_generation_prompt_last():
    t = get_template("openchat_3.5")
    segs = t.segments([("user", "q", 0.0)], condition=None, system="Be brief.", add_generation_prompt=True)
    assert [s.kind for s in segs[:3]] == ["bos", "system", "eot"]
    assert segs[-1].kind == "prefix" and segs[-1].text == "GPT4 Correct Assistant:"


def test_unknown_template_error_lists_known():
    with pytest.raises(ValueError, match=r"openchat_3\.5"):
        get_template("vicuna")
