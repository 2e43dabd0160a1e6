"""raychat.serve.ingress: an OpenAI request becomes one engine request per choice (no Ray, no HTTP)."""

from raychat.serve.engine_protocol import EngineRequest
from raychat.serve.ingress import choice_requests, to_engine_request
from tests.unit.serve.test_protocol import req


def test_system_and_developer_messages_become_the_system_prompt_in_order():
    r = req(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": "Use English."},
        ]
    )
    e = to_engine_request(r)
    assert e.system == "Be brief.\nUse English."
    assert e.messages == [("user", "hi")]


def test_text_parts_are_joined_into_the_message():
    r = req(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "you"}]}]
    )
    assert to_engine_request(r).messages == [("user", "Hello, you")]


def test_max_completion_tokens_is_an_alias_and_condition_and_sampling_pass_through():
    e = to_engine_request(
        req(max_completion_tokens=7, condition="GPT3", presence_penalty=0.5, frequency_penalty=-1, seed=3, stop="###")
    )
    assert (e.max_tokens, e.condition, e.presence_penalty, e.frequency_penalty, e.seed, e.stop) == (
        7,
        "GPT3",
        0.5,
        -1,
        3,
        ["###"],
    )


def test_n_choices_per_prompt_get_consecutive_seeds():
    bases = [EngineRequest(prompt="a", seed=10), EngineRequest(prompt="b")]
    out = choice_requests(bases, 2)
    assert [(e.prompt, e.seed) for e in out] == [("a", 10), ("a", 11), ("b", None), ("b", None)]
