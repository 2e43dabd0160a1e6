import pytest
from pydantic import ValidationError

from raychat.serve.ingress import choice_requests, to_engine_request
from raychat.serve.protocol import ChatCompletionRequest, CompletionRequest, EngineRequest, error_body


def req(**kw):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return ChatCompletionRequest.model_validate(base)


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


@pytest.mark.parametrize(
    "bad,param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_invalid_or_unsupported_parameters_are_rejected_naming_them(bad, param):
    with pytest.raises(ValidationError) as e:
        req(**bad)
    assert e.value.errors()[0]["loc"][0] == param


def test_unknown_openai_fields_are_ignored():
    assert req(logprobs=False, user="abc", response_format={"type": "text"}).model == "m"


def test_stream_options_include_usage_only_when_streaming():
    assert req(stream=True, stream_options={"include_usage": True}).include_usage
    assert not req(stream=False, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize(
    "prompt,expected",
    [("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]])],
)
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


def test_completion_defaults_to_16_tokens_and_rejects_echo_and_best_of_above_n():
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16
    for bad in ({"echo": True}, {"suffix": "x"}, {"logprobs": 2}, {"best_of": 3}, {"prompt": []}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **bad})


def test_n_choices_per_prompt_get_consecutive_seeds():
    bases = [EngineRequest(prompt="a", seed=10), EngineRequest(prompt="b")]
    out = choice_requests(bases, 2)
    assert [(e.prompt, e.seed) for e in out] == [("a", 10), ("a", 11), ("b", None), ("b", None)]


def test_error_body_is_openai_shaped():
    assert error_body("x", param="p", code="c") == {
        "error": {"message": "x", "type": "invalid_request_error", "param": "p", "code": "c"}
    }


def test_whole_answers_serialise_to_what_fastapis_generic_path_gave():
    """The router answers with model_dump_json() in a plain Response: the same JSON as FastAPI's
    jsonable_encoder would have sent for the returned model."""
    import json

    from fastapi.encoders import jsonable_encoder

    from raychat.serve.protocol import AssistantMessage, ChatChoice, ChatCompletion, Completion, CompletionChoice, Usage

    usage = Usage.of(5, 7)
    chat = ChatCompletion(
        model="m",
        usage=usage,
        choices=[
            ChatChoice(index=0, message=AssistantMessage(content='héllo "x"\n😎'), finish_reason="stop"),
            ChatChoice(index=1, message=AssistantMessage(content=""), finish_reason="length"),
        ],
    )
    text = Completion(model="m", usage=usage, choices=[CompletionChoice(index=0, text="t", finish_reason="length")])
    for body in (chat, text):
        assert json.loads(body.model_dump_json()) == jsonable_encoder(body)
