import pytest
from pydantic import ValidationError

from serve.protocol import ChatCompletionRequest, error_body
from serve.router import to_engine_request


def req(**kw):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return ChatCompletionRequest.model_validate(base)


def test_system_messages_become_the_system_prompt_in_order():
    r = req(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "system", "content": "Use English."}])
    e = to_engine_request(r)
    assert e.system == "Be brief.\nUse English."
    assert e.messages == [("user", "hi")]


def test_max_completion_tokens_is_an_alias_and_condition_passes_through():
    e = to_engine_request(req(max_completion_tokens=7, condition="GPT3"))
    assert (e.max_tokens, e.condition) == (7, "GPT3")


@pytest.mark.parametrize("bad", [{"temperature": 2.5}, {"top_p": 0}, {"max_tokens": 0}, {"messages": []},
                                 {"messages": [{"role": "tool", "content": "x"}]}])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValidationError):
        req(**bad)


def test_unknown_openai_fields_are_ignored():
    assert req(logprobs=False, user="abc").model == "m"


def test_error_body_is_openai_shaped():
    assert error_body("x", param="p", code="c") == {
        "error": {"message": "x", "type": "invalid_request_error", "param": "p", "code": "c"}}
