import pytest
import torch

from libs.generation import BatchGenerator, IncrementalDetokenizer, SamplingParams
from libs.model import load_causal_lm


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def run_all(gen, prompts, params):
    outs = [[] for _ in prompts]
    finish = [None] * len(prompts)
    for step in gen.generate(prompts, params):
        for i, s in enumerate(step):
            if s is None:
                continue
            if s.token_id is not None:
                outs[i].append(s.token_id)
            if s.finish_reason:
                finish[i] = s.finish_reason
    return outs, finish


def test_batched_greedy_equals_one_at_a_time_despite_left_padding(model_and_tok):
    model, _ = model_and_tok
    gen = BatchGenerator(model, stop_ids=[32000], pad_id=32001, max_context=256)
    prompts = [[1, 420, 6316, 28781], [1, 22557, 28747, 5, 6, 7, 8, 9, 10], [1, 99]]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    batched, _ = run_all(gen, prompts, [greedy] * 3)
    single = [run_all(gen, [p], [greedy])[0][0] for p in prompts]
    assert batched == single


def test_stop_token_ends_request_and_is_not_returned(model_and_tok):
    model, _ = model_and_tok
    probe = BatchGenerator(model, stop_ids=[], pad_id=32001, max_context=256)
    first = run_all(probe, [[1, 5, 6]], [SamplingParams(max_tokens=3, temperature=0)])[0][0]
    gen = BatchGenerator(model, stop_ids=[first[1]], pad_id=32001, max_context=256)
    out, finish = run_all(gen, [[1, 5, 6]], [SamplingParams(max_tokens=10, temperature=0)])
    assert out[0] == first[:1] and finish == ["stop"]


def test_max_tokens_and_context_limit_finish_with_length(model_and_tok):
    model, _ = model_and_tok
    gen = BatchGenerator(model, stop_ids=[], pad_id=32001, max_context=10)
    out, finish = run_all(gen, [[1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8]], [SamplingParams(max_tokens=5, temperature=0)] * 2)
    assert [len(o) for o in out] == [5, 2] and finish == ["length", "length"]
    with pytest.raises(ValueError, match="no room"):
        next(gen.generate([[1] * 10], [SamplingParams()]))


def test_seeded_sampling_is_reproducible(model_and_tok):
    model, _ = model_and_tok
    gen = BatchGenerator(model, stop_ids=[], pad_id=32001, max_context=64)
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert run_all(gen, [[1, 5]], [sp])[0] == run_all(gen, [[1, 5]], [sp])[0]


def test_detokenizer_never_splits_multibyte_characters(tokenizer):
    text = "héllo 😎 wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in x for x in deltas)
