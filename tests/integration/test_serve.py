"""The OpenAI endpoint on real Ray Serve, driven by the official ``openai`` client (loopback only)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.integration.serving import delete_app, deploy

pytestmark = pytest.mark.integration

KEY = "sk-raychat-test-1"
MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("secret") / "api-keys"
    f.write_text(f"# mounted secret\n{KEY}\n")
    return f


#: Every engine raychat ships; the OpenAI suite below runs against each.
ENGINES = ["builtin", "vllm"]
#: vLLM as the tests run it: eager (starts in seconds, no compile), a small KV cache (vLLM would take most of RAM).
VLLM_TEST = {"vllm_enforce_eager": True, "vllm_kv_cache_gb": 0.25}


def engine_cfg(engine: str) -> dict:
    """The ServeConfig fields that pick ``engine`` (with the test settings of vLLM)."""
    return {"engine": engine, **(VLLM_TEST if engine == "vllm" else {})}


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def api(serve_port, tiny_model_dir, key_file, engine):
    name = f"api-{engine}"
    url = deploy(
        serve_port,
        name,
        checkpoint=str(tiny_model_dir),
        model_id="tiny",
        api_keys_file=str(key_file),
        num_replicas=1,
        num_cpus=0.5,
        max_context=MAX_CONTEXT,
        max_batch_size=16,
        max_request_bytes=64 << 10,
        **engine_cfg(engine),
    )
    yield url
    delete_app(name)


def tiny_app(tiny_model_dir, **cfg) -> dict:
    """The ServeConfig fields the load and fault tests share: the tiny model, no API keys, a quarter CPU a replica."""
    return {"checkpoint": str(tiny_model_dir), "model_id": "tiny", "allow_no_auth": True, "num_cpus": 0.25} | cfg


def deploy_tiny(serve_port: int, name: str, tiny_model_dir, **cfg) -> str:
    """:func:`deploy` of :func:`tiny_app` with ``cfg`` on top."""
    return deploy(serve_port, name, **tiny_app(tiny_model_dir, **cfg))


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def aclient(url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """Raw HTTP (status, headers, JSON body) for what the openai client would not send."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


MSG = [{"role": "user", "content": "Name three colours."}]
# A request that stays in flight for seconds (for timeouts and killed engines): decoded greedily,
# so it cannot end early. From this prompt the tiny model's greedy path runs all 2000 tokens
# without a stop id (2.4 s in a quiet process on one thread; it fills the 2048-token context).
# Sampled at temperature 1 a request may stop early, and did in CI: the dead-engine test once found
# its 1000-token request already finished after a second.
LONG_PROMPT = [500 + i for i in range(48)]
LONG_MAX_TOKENS = 2000


def test_models_lists_the_model_and_where_it_came_from(api, tiny_model_dir):
    (card,) = client(api).models.list().data
    assert card.id == "tiny" and card.root == str(tiny_model_dir)
    assert card.model_extra["checkpoint"]["uri"] == str(tiny_model_dir)
    assert client(api).models.retrieve("tiny").id == "tiny"


def test_chat_usage_counts_the_templated_prompt_and_generated_tokens(api, tokenizer):
    from raychat.core.data.templates import get_template
    from raychat.core.data.tokenizer import ConversationTokenizer

    r = client(api).chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0)
    ct = ConversationTokenizer(tokenizer, get_template("openchat_3.5"))
    assert r.usage.prompt_tokens == len(ct.encode_prompt([("user", MSG[0]["content"])]))
    assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 5
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_system_message_and_condition_change_the_prompt(api, tokenizer):
    from raychat.core.data.templates import get_template
    from raychat.core.data.tokenizer import ConversationTokenizer

    ct = ConversationTokenizer(tokenizer, get_template("openchat_3.5"))
    c = client(api)
    sys_msgs = [{"role": "system", "content": "You are terse."}, *MSG]
    r_sys = c.chat.completions.create(model="tiny", messages=sys_msgs, max_tokens=1)
    r_cond = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1, extra_body={"condition": "GPT3"})
    assert r_sys.usage.prompt_tokens == len(ct.encode_prompt([("user", MSG[0]["content"])], system="You are terse."))
    assert r_cond.usage.prompt_tokens == len(ct.encode_prompt([("user", MSG[0]["content"])], condition="GPT3"))


def test_streaming_chat_gives_the_same_text_and_usage_as_non_streaming(api):
    c = client(api)
    whole = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stream_is_sse_ending_with_done(api):
    body = json.dumps({"model": "tiny", "messages": MSG, "stream": True, "max_tokens": 4}).encode()
    req = urllib.request.Request(
        api + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        content_type, text = r.headers["content-type"], r.read().decode()
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert content_type.startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_with_several_prompts_and_n_choices(api):
    c = client(api)
    sampled = dict(model="tiny", prompt=["Once upon a time", "The capital of France is"], n=2, max_tokens=6)
    r = c.completions.create(**sampled, temperature=0.8, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    one = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    two = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens + two.usage.prompt_tokens  # once per prompt, not per choice
    assert sum(bool(ch.text) for ch in r.choices) <= r.usage.completion_tokens <= 4 * 6
    again = c.completions.create(**sampled, temperature=0.8, seed=7)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # seeded: reproducible


def test_completions_accept_token_ids_and_stream(api):
    c = client(api)
    whole = c.completions.create(model="tiny", prompt=[1, 415, 5565, 302], max_tokens=8, temperature=0)
    chunks = list(
        c.completions.create(
            model="tiny",
            prompt=[1, 415, 5565, 302],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert whole.usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_chat_choices_are_seeded_and_distinct_indices(api):
    c = client(api)
    r = c.chat.completions.create(model="tiny", messages=MSG, n=3, max_tokens=8, temperature=1.0, seed=1)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    again = c.chat.completions.create(model="tiny", messages=MSG, n=3, max_tokens=8, temperature=1.0, seed=1)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    streamed = list(
        c.chat.completions.create(model="tiny", messages=MSG, n=3, max_tokens=8, temperature=1.0, seed=1, stream=True)
    )
    by_index = {
        i: "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices[0].index == i) for i in range(3)
    }
    assert [by_index[i] for i in range(3)] == [ch.message.content for ch in r.choices]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_honoured_and_not_returned(api, stream):
    c = client(api)
    full = c.completions.create(model="tiny", prompt="Tell me a story", max_tokens=24, temperature=0).choices[0].text
    assert len(full) > 12
    stop = full[6:9]
    kwargs = dict(model="tiny", prompt="Tell me a story", max_tokens=24, temperature=0, stop=[stop, "never-appears"])
    if stream:
        chunks = list(c.completions.create(stream=True, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
    else:
        r = c.completions.create(**kwargs)
        text, finish = r.choices[0].text, [r.choices[0].finish_reason]
    assert text == full[: full.index(stop)] and finish == ["stop"]


def test_missing_or_wrong_api_key_is_401_in_openai_format(api):
    with pytest.raises(openai.AuthenticationError) as e:
        client(api, key="sk-wrong").models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, _, body = http(api + "/models")
    assert status == 401 and body["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_in_openai_format(api):
    with pytest.raises(openai.NotFoundError) as e:
        client(api).chat.completions.create(model="gpt-9", messages=MSG)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_invalid_parameter_is_400_naming_it(api):
    with pytest.raises(openai.BadRequestError) as e:
        client(api).chat.completions.create(model="tiny", messages=MSG, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client(api).completions.create(model="tiny", prompt="x", n=3, best_of=2)
    assert e.value.body["param"] == "best_of"


def test_prompt_longer_than_context_is_400_context_length_exceeded(api):
    with pytest.raises(openai.BadRequestError) as e:
        client(api).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 2000}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client(api).completions.create(model="tiny", prompt="hello", max_tokens=MAX_CONTEXT)
    assert e.value.body["code"] == "context_length_exceeded"


def _transformers_logprobs(model_dir, ids: list[int], new_tokens: int) -> tuple[list[float], list[int], list[float]]:
    """Recomputed with transformers in float32: the logprob of each of ``ids[1:]``, then greedy generation's
    ``new_tokens`` ids and their logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    scores = [float(logp[i - 1, seq[i]]) for i in range(1, len(seq))]
    return scores[: len(ids) - 1], seq[len(ids) :], scores[len(ids) - 1 :]


def test_logprobs_and_echo_match_a_recomputation_with_transformers(api, engine, tiny_model_dir, tokenizer):
    c = client(api)
    ids = [1, 415, 5565, 302, 4843, 349, 5465]
    if engine == "builtin":  # what an engine cannot do is a 400 naming the parameter, never silently ignored
        for kwargs, param in ((dict(logprobs=2), "logprobs"), (dict(echo=True), "echo")):
            with pytest.raises(openai.BadRequestError) as e:
                c.completions.create(model="tiny", prompt=ids, max_tokens=2, **kwargs)
            assert e.value.body["param"] == param
        return
    prompt_lp, greedy, gen_lp = _transformers_logprobs(tiny_model_dir, ids, 6)
    # Loglikelihood scoring as lm-eval-harness asks for it: echo + logprobs, one new token.
    scored = c.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(prompt_lp, abs=1e-3)
    assert sum(lp.token_logprobs[1 : len(ids)]) == pytest.approx(sum(prompt_lp), abs=1e-3)
    assert scored.choices[0].text.startswith(tokenizer.decode(ids, skip_special_tokens=True))
    assert lp.text_offset == sorted(lp.text_offset)
    # Generated tokens: greedy, with the 3 most likely alternatives; the chosen one is the first of them.
    for stream in (False, True):
        kwargs = dict(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3)
        if stream:
            chunks = list(c.completions.create(stream=True, **kwargs))
            text = "".join(ch.choices[0].text for ch in chunks)
            got = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
            tokens, values, tops = (
                [x for g in got for x in getattr(g, f)] for f in ("tokens", "token_logprobs", "top_logprobs")
            )
        else:
            r = c.completions.create(**kwargs).choices[0]
            text, tokens, values, tops = r.text, r.logprobs.tokens, r.logprobs.token_logprobs, r.logprobs.top_logprobs
        # The same tokens as transformers' greedy path: each one's logprob matches, and they spell the text.
        assert "".join(tokens) == text and len(tokens) == len(greedy)
        assert values == pytest.approx(gen_lp, abs=1e-3)
        assert all(len(top) == 3 and max(top.values()) == pytest.approx(v, abs=1e-6) for top, v in zip(tops, values))
    chat = c.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert (
        len(content) == chat.usage.completion_tokens
        and "".join(t.token for t in content) == chat.choices[0].message.content
    )
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)


def test_json_schema_output_parses_and_validates(api, engine):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "grade": {"enum": ["A", "B", "C"]}},
        "required": ["ok", "grade"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    c = client(api)
    if engine == "builtin":
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=40, response_format=fmt)
        assert e.value.body["param"] == "response_format"
        return
    for seed in range(3):
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=40, seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny",
            messages=MSG,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
    assert e.value.body["param"] == "response_format"


def test_tools_are_400_naming_the_parameter(api):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client(api).chat.completions.create(model="tiny", messages=MSG, tools=[tool])
    assert e.value.body["param"] == "tools" and "template" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(api).chat.completions.create(model="tiny", messages=MSG, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"


def test_bad_json_oversized_body_and_unknown_route_answer_in_openai_format(api):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, body = http(api + "/chat/completions", b"{not json", auth)
    assert status == 400 and "error" in body
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (70 << 10)}]}).encode()
    status, _, body = http(api + "/chat/completions", big, auth)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, _, body = http(api + "/embeddings", b"{}", auth)
    assert status == 404 and body["error"]["code"] == "not_found"


def test_other_layout_and_engine_mode_serve_the_same_text_whole_and_streamed(api, engine, serve_port, tiny_model_dir):

    from raychat.core.config import ServeConfig

    # The default layout and engine mode serve `api`; this app has the other layout and the other
    # engine mode (the batching loop as a thread of the replica, or in a child process).
    other = "split" if ServeConfig.model_fields["layout"].default == "combined" else "combined"
    process = not ServeConfig.model_fields["engine_process"].default
    url = deploy_tiny(
        serve_port,
        "other",
        tiny_model_dir,
        num_replicas=1,
        max_batch_size=8,
        layout=other,
        engine_process=process,
        **engine_cfg(engine),
    )
    kwargs = dict(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    reference = client(api).chat.completions.create(**kwargs)
    c = client(url, key="unused")
    whole = c.chat.completions.create(**kwargs)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert whole.choices[0].message.content == reference.choices[0].message.content
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == reference.choices[0].message.content
    )
    assert chunks[-1].usage.model_dump() == reference.usage.model_dump()
    several = list(
        c.completions.create(
            model="tiny",
            prompt=["Once upon a time", "The capital of France is"],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    texts = ["".join(ch.choices[0].text for ch in several if ch.choices[0].index == i) for i in range(2)]
    assert texts == [
        ch.text
        for ch in client(api)
        .completions.create(
            model="tiny", prompt=["Once upon a time", "The capital of France is"], max_tokens=6, temperature=0
        )
        .choices
    ]
    delete_app("other")


@pytest.mark.parametrize("layout", ["combined", "split"])
def test_request_over_request_timeout_is_cancelled_with_504_and_not_retried(serve_port, tiny_model_dir, layout):
    from ray import serve

    url = deploy_tiny(
        serve_port,
        f"deadline-{layout}",
        tiny_model_dir,
        num_replicas=1,
        max_batch_size=1,
        request_timeout_s=1,
        layout=layout,
    )
    # A long greedy generation (LONG_PROMPT); the official client's default retries are on. One
    # request runs at a time, so a generation left running would hold up the next ones.
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=2, timeout=60)
    t = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0)
    dt = time.perf_counter() - t
    assert (
        e.value.status_code == 504
        and e.value.body["code"] == "timeout"
        and "request_timeout_s" in e.value.body["message"]
    )
    assert 1.0 <= dt < 2.5  # answered at the deadline, and not retried (x-should-retry: false)

    def slot_is_free() -> None:  # a generation left running would hold the one slot for seconds more
        t = time.perf_counter()
        # Greedy: sampled at temperature 1, the random model picks one of its 2 stop ids with p ~ 6e-5 a
        # token, which once failed CI here with "stop".
        r = c.completions.create(model="tiny", prompt="story", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length"
        assert time.perf_counter() - t < 1.5

    slot_is_free()
    text = []
    with pytest.raises(openai.APIError) as e:
        for ch in c.completions.create(
            model="tiny", prompt=LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True
        ):
            text.append(ch.choices[0].text)
    assert e.value.body["code"] == "timeout" and "".join(text)  # text up to the deadline, then the error event
    slot_is_free()
    serve.delete(f"deadline-{layout}")


def test_32_concurrent_requests_all_succeed_and_share_batches(api):
    async def main():
        c = aclient(api)
        calls = [
            c.chat.completions.create(
                model="tiny", max_tokens=16, temperature=0, messages=[{"role": "user", "content": f"Count to {i}."}]
            )
            for i in range(24)
        ]
        calls += [
            c.completions.create(model="tiny", prompt=f"{i} + {i} =", max_tokens=16, stream=True) for i in range(8)
        ]
        t = time.perf_counter()
        out = await asyncio.gather(*calls)
        streamed = []
        for s in out[24:]:
            streamed.append([ch async for ch in s])
        return out[:24], streamed, time.perf_counter() - t

    whole, streamed, _ = asyncio.run(main())
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in whole)
    assert all(any(ch.choices[0].finish_reason for ch in s) for s in streamed)
    solo = client(api).chat.completions.create(
        model="tiny", max_tokens=16, temperature=0, messages=[{"role": "user", "content": "Count to 5."}]
    )
    assert whole[5].choices[0].message.content == solo.choices[0].message.content


@pytest.mark.parametrize(("layout", "engine"), [("split", "builtin"), ("combined", "builtin"), ("combined", "vllm")])
def test_full_queue_answers_fast_with_429_retry_after(serve_port, tiny_model_dir, layout, engine):
    name = f"tight-{layout}-{engine}"
    url = deploy_tiny(
        serve_port,
        name,
        tiny_model_dir,
        num_replicas=1,
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        retry_after_s=2,
        layout=layout,
        **engine_cfg(engine),
    )

    async def one(c):
        t = time.perf_counter()
        try:
            r = await c.completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=200, temperature=0)
            return r.status_code, None, time.perf_counter() - t
        except openai.APIStatusError as e:
            return e.status_code, e, time.perf_counter() - t

    async def main():
        c = aclient(url, key="unused")
        return await asyncio.gather(*(one(c) for _ in range(8)))

    results = asyncio.run(main())
    rejected = [(e, dt) for status, e, dt in results if status == 429]
    assert any(status == 200 for status, _, _ in results) and rejected
    assert all(s in (200, 429) for s, _, _ in results)
    for e, dt in rejected:
        # split: the router's answer; combined: the replica's own admission limit, before Serve's
        assert e.response.headers["retry-after"] == "2" and dt < 2.0
        assert e.body["code"] == "queue_full" and e.body["type"] == "rate_limit_error"


def test_default_layout_autoscales_up_under_load(serve_port, tiny_model_dir):
    from ray import serve

    # Replicas of the default (combined) layout take HTTP straight from HAProxy, so no handle sees
    # the load: Serve's autoscaler must get it from the replicas' own reports.
    url = deploy_tiny(
        serve_port,
        "auto",
        tiny_model_dir,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=2,
        max_batch_size=8,
        autoscaling_overrides={"upscale_delay_s": 1, "downscale_delay_s": 600},
    )

    def replicas() -> int:
        states = serve.status().applications["auto"].deployments["LLMEngine"].replica_states
        return sum(n for state, n in states.items() if state in ("RUNNING", "STARTING"))

    async def main():
        c = aclient(url, key="unused")
        tasks = [
            asyncio.ensure_future(c.completions.create(model="tiny", prompt=f"story {i}", max_tokens=400))
            for i in range(32)
        ]
        try:
            for _ in range(80):  # at most 40 s: Serve's replicas report every 10 s
                if replicas() >= 2 or all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.5)
            return replicas(), [t.result() for t in tasks if t.done()]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    assert replicas() == 1
    n, finished = asyncio.run(main())
    assert n == 2, "16 times the target of ongoing requests did not add a replica"
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in finished)
    delete_app("auto")


def test_rolling_out_a_new_config_loses_no_request_in_flight_or_arriving(serve_port, tiny_model_dir):
    import ray
    from ray import serve

    from raychat.serve.app import build_app

    # What a new checkpoint in the RayService does: the same app with other args, so every replica is
    # replaced while requests run and keep coming (default layout: the replicas are the ingress).
    cfg = tiny_app(tiny_model_dir, num_replicas=1, max_batch_size=8)
    url = deploy(serve_port, "roll", **cfg)

    def replica_names() -> set:
        return {
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "LLMEngine" in a["name"] and "roll" in a["name"]
        }

    async def one(c, i, stream: bool, max_tokens: int):
        if stream:
            finish = None
            async for ch in await c.completions.create(
                model="tiny", prompt=f"s{i}", max_tokens=max_tokens, stream=True
            ):
                finish = ch.choices[0].finish_reason or finish
            return finish
        return (
            (await c.completions.create(model="tiny", prompt=f"s{i}", max_tokens=max_tokens)).choices[0].finish_reason
        )

    async def main():
        c = aclient(url, key="unused")
        running = [asyncio.ensure_future(one(c, i, i % 2 == 0, 300)) for i in range(8)]
        await asyncio.sleep(1.0)
        rollout = asyncio.get_running_loop().run_in_executor(
            None, lambda: serve.run(build_app({**cfg, "stream_interval_s": 0.03}), name="roll", route_prefix="/roll")
        )
        arriving = []
        for _ in range(120):  # at most 60 s
            if rollout.done():
                break
            arriving.append(asyncio.ensure_future(one(c, len(arriving), len(arriving) % 2 == 0, 16)))
            await asyncio.sleep(0.5)
        await rollout
        return await asyncio.gather(*running), await asyncio.gather(*arriving)

    before = replica_names()
    in_flight, arriving = asyncio.run(main())
    assert replica_names().isdisjoint(before), "the rollout did not replace the replica"
    assert len(arriving) >= 4 and all(f in ("length", "stop") for f in in_flight + arriving), (in_flight, arriving)
    serve.delete("roll")


def _engine_processes(engine: str = "builtin") -> set[int]:
    """PIDs of the engine child processes running on this machine: the builtin engine's (``engine_process``),
    or vLLM's engine cores."""
    import psutil

    def ours(cmdline: list[str]) -> bool:
        if engine == "vllm":
            return bool(cmdline) and cmdline[0].startswith("VLLM::EngineCore")
        return "raychat.core.infer.engine_process" in cmdline

    return {p.pid for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])}


def _kill_a_replica_mid_load(app: str, c: openai.AsyncOpenAI) -> list[tuple]:
    """24 completions (every 4th streamed, 96 tokens; the rest 48 tokens) against ``app``; once 4
    streams have begun, one of its ``LLMEngine`` replicas is killed. Returns one ``(outcome, detail)``
    per request: ``ok``, ``truncated`` (a stream that ended without a finish_reason), an HTTP status,
    ``stream-error`` (an error event in the stream) or ``connection`` (the connection broke)."""
    import ray

    started: set[int] = set()

    async def one(i):
        try:
            if i % 4 == 0:
                finish = None
                async for ch in await c.completions.create(
                    model="tiny", prompt=f"story {i}", max_tokens=96, stream=True
                ):
                    started.add(i)
                    finish = ch.choices[0].finish_reason or finish
                return ("ok" if finish else "truncated"), finish
            r = await c.completions.create(model="tiny", prompt=f"story {i}", max_tokens=48)
            return "ok", r.choices[0].finish_reason
        except openai.APIStatusError as e:
            return e.status_code, e.body
        except openai.APIConnectionError as e:
            return "connection", repr(e.__cause__)
        except openai.APIError as e:  # an error event in the SSE stream
            return "stream-error", e.body

    async def main():
        tasks = [asyncio.ensure_future(one(i)) for i in range(24)]
        for _ in range(400):  # at most 20 s
            if len(started) >= 4 or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
        assert len(started) >= 4, "the streams never began"
        await asyncio.sleep(0.2)
        victim = next(
            a for a in ray.util.list_named_actors(all_namespaces=True) if "LLMEngine" in a["name"] and app in a["name"]
        )
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)

    return asyncio.run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_killing_an_engine_replica_mid_load_loses_no_accepted_request_in_split_layout(
    serve_port, tiny_model_dir, engine
):
    # The router retries a dead engine replica and reports, in OpenAI's format, what it cannot retry.
    before = _engine_processes(engine)
    url = deploy_tiny(
        serve_port,
        "killsplit",
        tiny_model_dir,
        num_replicas=2,
        max_batch_size=8,
        layout="split",
        **engine_cfg(engine),
    )
    results = _kill_a_replica_mid_load("killsplit", aclient(url, key="unused"))  # no client retries
    for status, body in results:
        if status == "ok":
            continue
        # Only clean OpenAI-format failures are allowed, never a 500, a cut-off stream or a hang.
        assert status in (503, "stream-error") and body["code"] == "replica_unavailable", (status, body)
    assert sum(s == "ok" for s, _ in results) >= 18
    delete_app("killsplit")
    # The killed replica's engine processes went with it: none is left behind holding memory.
    deadline = time.monotonic() + 30
    while _engine_processes(engine) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _engine_processes(engine) - before


def test_killing_a_replica_mid_load_in_combined_layout_fails_only_streams_under_way_and_loudly(
    serve_port, tiny_model_dir
):
    from ray import serve

    # The replica is the ingress: its requests die with it. HAProxy answers those not yet answered
    # with a 500, which the official client retries (max_retries=2 is its default) on the replica left;
    # a stream already under way breaks off, which the client raises — it never ends as if complete.
    engines_before = _engine_processes()
    url = deploy_tiny(
        serve_port,
        "killcomb",
        tiny_model_dir,
        num_replicas=2,
        max_batch_size=8,
        layout="combined",
        engine_process=True,
    )
    assert len(_engine_processes()) == len(engines_before) + 2  # one child process per replica
    server_errors = []

    async def note_5xx(response):
        if response.status_code >= 500:
            server_errors.append(response.status_code)

    c = openai.AsyncOpenAI(
        base_url=url,
        api_key="unused",
        max_retries=2,
        timeout=60,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [note_5xx]}),
    )
    results = _kill_a_replica_mid_load("killcomb", c)
    non_streamed = [r for i, r in enumerate(results) if i % 4]
    streams = [r for i, r in enumerate(results) if i % 4 == 0]
    assert all(status == "ok" for status, _ in non_streamed), non_streamed
    assert all(status in ("ok", "connection") for status, _ in streams), streams
    # The kill did hit accepted requests: answers the client had to retry, or streams that broke off.
    assert server_errors or any(status == "connection" for status, _ in streams)
    serve.delete("killcomb")
    # The killed replica's engine process is gone too (it exits when its command pipe closes; Ray also
    # reaps a dead worker's children), and the others went with their replicas.
    deadline = time.monotonic() + 30
    while _engine_processes() != engines_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _engine_processes() == engines_before


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dead_engine_process_fails_its_requests_with_503_and_serve_replaces_the_replica(
    serve_port, tiny_model_dir, engine
):
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    before = _engine_processes(engine)
    url = deploy_tiny(
        serve_port,
        "childdeath",
        tiny_model_dir,
        num_replicas=1,
        max_batch_size=4,
        layout="combined",
        engine_process=True,
        health_check_period_s=1,
        **engine_cfg(engine),
    )
    (child,) = _engine_processes(engine) - before
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            c.completions.create, model="tiny", prompt=LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0
        )
        time.sleep(1.0)
        assert not pending.done()
        os.kill(child, signal.SIGKILL)
        t = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as e:
            pending.result(timeout=30)
    # The request in flight fails at once with a retryable OpenAI error, not a hang or a bare 500.
    assert e.value.status_code == 503 and e.value.body["code"] == "replica_unavailable"
    assert time.perf_counter() - t < 5 and e.value.response.headers.get("retry-after")
    # The health check fails, Serve replaces the replica, and a new engine process serves.
    deadline, outcome = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        try:
            outcome = (
                c.completions.create(model="tiny", prompt="story", max_tokens=4, temperature=0).choices[0].finish_reason
            )  # greedy: never a sampled stop
            break
        except (openai.APIStatusError, openai.APIConnectionError) as err:
            assert getattr(err, "status_code", 503) >= 500  # unavailable while being replaced, never a 4xx
            time.sleep(1)
    assert outcome == "length"
    (replacement,) = _engine_processes(engine) - before
    assert replacement != child
    delete_app("childdeath")
