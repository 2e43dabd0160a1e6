"""The vLLM engine's translations, without starting vLLM (its engine runs in tests/integration/test_serve.py)."""

from collections import namedtuple

import pytest

from raychat.serve.engine_protocol import EngineRequest
from raychat.serve.prompts import PromptError, unsupported
from raychat.serve.vllm_engine import refused, sampling_params, token_logprobs

Logprob = namedtuple("Logprob", "logprob rank decoded_token")  # the fields of vllm.logprobs.Logprob


class Tok:
    def decode(self, ids):
        return f"<{ids[0]}>"


def test_logprob_entries_keep_the_chosen_token_and_the_top_k_by_rank():
    positions = [
        None,  # a prompt's first token
        {7: Logprob(-3.0, 9, " far"), 5: Logprob(-0.5, 1, " top"), 6: Logprob(-1.0, 2, " next")},
        {5: Logprob(-0.25, 1, " top")},  # the chosen token is the most likely: one entry
    ]
    assert token_logprobs([1, 7, 5], positions, 2, Tok()) == [
        ("<1>", None, []),
        (" far", -3.0, [(" top", -0.5), (" next", -1.0)]),
        (" top", -0.25, [(" top", -0.25)]),
    ]
    assert token_logprobs([7], positions[1:2], 0, Tok()) == [(" far", -3.0, [])]


def test_what_the_builtin_engine_cannot_do_is_refused_naming_the_parameter():
    unsupported(EngineRequest(prompt="x"), "builtin")
    for field, value in (("logprobs", 0), ("echo", True), ("response_format", {"type": "json_object"})):
        with pytest.raises(PromptError) as e:
            unsupported(EngineRequest(prompt="x", **{field: value}), "builtin")
        assert e.value.body["error"]["param"] == field and "engine: vllm" in e.value.body["error"]["message"]


def test_a_schema_vllm_refuses_is_a_response_format_error():
    req = EngineRequest(prompt="x", response_format={"type": "json_schema", "schema": {"type": "nonsense"}})
    assert refused(req, ValueError("Grammar error: Invalid type"))["error"]["param"] == "response_format"
    err = ValueError("bad")
    err.parameter = "max_tokens"
    assert refused(EngineRequest(prompt="x"), err)["error"]["param"] == "max_tokens"


def test_sampling_params_carry_every_option():
    pytest.importorskip("vllm")
    req = EngineRequest(
        prompt=[1, 2],
        temperature=0.5,
        top_p=0.9,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        stop=["\n"],
        logprobs=2,
        echo=True,
        response_format={"type": "json_schema", "schema": {"type": "object"}},
        stream=False,
    )
    p = sampling_params(req, 7, [32000, 2])
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (7, 0.5, 0.9, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.stop, p.stop_token_ids) == (0.5, 0.25, ["\n"], [32000, 2])
    assert (p.logprobs, p.prompt_logprobs, p.structured_outputs.json) == (2, 2, {"type": "object"})
    assert sampling_params(EngineRequest(prompt=[1]), 1, []).prompt_logprobs is None


def test_auto_engine_is_vllm_with_gpus_and_builtin_on_cpu():
    from raychat.core.config import ServeConfig

    assert ServeConfig(checkpoint="/m").engine_name() == "builtin"
    assert ServeConfig(checkpoint="/m", num_gpus=1).engine_name() == "vllm"
    assert ServeConfig(checkpoint="/m", num_gpus=1, engine="builtin").engine_name() == "builtin"
    assert ServeConfig(checkpoint="/m", engine="vllm").engine_name() == "vllm"
