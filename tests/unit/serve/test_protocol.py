import pytest
from pydantic import ValidationError

from raychat.serve.protocol import ChatCompletionRequest, CompletionRequest


def req(**kw):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return ChatCompletionRequest.model_validate(base)


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
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ],
)
def test_invalid_or_unsupported_parameters_are_rejected_naming_them(bad, param):
    with pytest.raises(ValidationError) as e:
        req(**bad)
    assert e.value.errors()[0]["loc"][0] == param


def test_unknown_openai_fields_are_ignored():
    assert req(logprobs=False, user="abc", parallel_tool_calls=True, tool_choice="none").model == "m"


def test_logprobs_and_response_format_reach_the_engine_request():
    assert req().engine_logprobs() is None and req(logprobs=True).engine_logprobs() == 0
    assert req(logprobs=True, top_logprobs=5).engine_logprobs() == 5
    assert req(response_format={"type": "text"}).response_format.for_engine() is None
    assert req(response_format={"type": "json_object"}).response_format.for_engine() == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert req(response_format=fmt).response_format.for_engine() == {"type": "json_schema", "schema": schema}


def test_logprobs_render_in_openai_shapes():
    from raychat.serve.protocol import chat_logprobs, completion_logprobs

    entries = [("<s>", None, []), (" Hé", -0.5, [(" Hé", -0.5), (" Ho", -1.25)]), ("!", -2.0, [("?", -1.0)])]
    chat = chat_logprobs(entries[1:])["content"]
    assert chat[0] == {
        "token": " Hé",
        "logprob": -0.5,
        "bytes": [32, 72, 195, 169],
        "top_logprobs": [
            {"token": " Hé", "logprob": -0.5, "bytes": [32, 72, 195, 169]},
            {"token": " Ho", "logprob": -1.25, "bytes": [32, 72, 111]},
        ],
    }
    text = completion_logprobs(entries, text_offset=10)
    assert text == {
        "tokens": ["<s>", " Hé", "!"],
        "token_logprobs": [None, -0.5, -2.0],
        "top_logprobs": [None, {" Hé": -0.5, " Ho": -1.25}, {"?": -1.0}],
        "text_offset": [10, 13, 16],
    }


def test_stream_options_include_usage_only_when_streaming():
    assert req(stream=True, stream_options={"include_usage": True}).include_usage
    assert not req(stream=False, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize(
    "prompt,expected",
    [("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]])],
)
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


def test_completion_defaults_to_16_tokens_and_rejects_suffix_and_best_of_above_n():
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16
    ok = CompletionRequest(model="m", prompt="x", echo=True, logprobs=5)
    assert ok.echo and ok.logprobs == 5
    for bad in ({"suffix": "x"}, {"logprobs": 21}, {"logprobs": -1}, {"best_of": 3}, {"prompt": []}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **bad})


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
