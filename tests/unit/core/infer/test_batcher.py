import pytest

from raychat.core.infer.batcher import ContinuousBatcher, SamplingParams, greedy_tokens
from raychat.core.model.hf import load_causal_lm

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def batcher(model, stop_ids=(32000,), max_context=256, **kw):
    return ContinuousBatcher(model, stop_ids=list(stop_ids), pad_id=32001, max_context=max_context, **kw)


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


def drain(b, outs, finish):
    """Steps until idle, collecting tokens by request id."""
    while b.has_work():
        for rid, s in b.step():
            if s.token_id is not None:
                outs.setdefault(rid, []).append(s.token_id)
            if s.finish_reason:
                finish[rid] = s.finish_reason


@pytest.mark.parametrize("rows,vocab", [(1, 32002), (4, 32002), (16, 32002), (16, 32000), (5, 300), (8, 129), (8, 100)])
def test_greedy_tokens_is_argmax_with_first_index_on_ties(rows, vocab):
    import torch

    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g)
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    # Ties: the maximum in two slices, twice in one slice, in the tail and before it, all positions.
    tied = torch.zeros(rows, vocab)
    for r in range(rows):
        picks = torch.randint(0, vocab, (3,), generator=g)
        tied[r, picks] = 5.0
        tied[r, -1] = 5.0 if r % 2 else 6.0  # odd rows: a tie in the tail (must lose); even rows: tail wins
    assert torch.equal(greedy_tokens(tied), tied.argmax(-1))
    assert torch.equal(greedy_tokens(tied, block=7), tied.argmax(-1))


def test_batcher_passes_the_cache_under_the_name_this_transformers_takes_without_deprecation_warnings(model_and_tok):
    import warnings

    model, _ = model_and_tok
    b = batcher(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. "`past_key_values` is deprecated ... Use `cache`"
        outs, finish = run_all(b, PROMPTS[:2], [GREEDY] * 2)
    assert all(len(o) == 12 or f == "stop" for o, f in zip(outs, finish))


PROMPTS = [[1, 420, 6316, 28781], [1, 22557, 28747, 5, 6, 7, 8, 9, 10], [1, 99]]


def test_batched_greedy_equals_one_at_a_time_despite_left_padding(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model)
    batched, _ = run_all(b, PROMPTS, [GREEDY] * 3)
    single = [run_all(b, [p], [GREEDY])[0][0] for p in PROMPTS]
    assert batched == single


def test_requests_joining_and_leaving_mid_batch_get_the_tokens_they_get_alone(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model)
    alone = {
        i: run_all(b, [p], [sp])[0][0]
        for i, (p, sp) in enumerate(zip(PROMPTS, [GREEDY, SamplingParams(max_tokens=3, temperature=0), GREEDY]))
    }
    outs, finish = {}, {}
    b.submit(0, PROMPTS[0], GREEDY)
    for _ in range(4):  # request 0 is decoding when 1 (short: leaves early) and then 2 join
        for rid, s in b.step():
            outs.setdefault(rid, []).append(s.token_id)
    b.submit(1, PROMPTS[1], SamplingParams(max_tokens=3, temperature=0))
    for rid, s in b.step():
        outs.setdefault(rid, []).append(s.token_id)
    b.submit(2, PROMPTS[2], GREEDY)
    drain(b, outs, finish)
    assert outs == alone
    assert finish == {0: "length", 1: "length", 2: "length"}


def test_running_batch_never_exceeds_max_batch_size_and_waiting_requests_get_in(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model, max_batch_size=2)
    for i in range(5):
        b.submit(i, PROMPTS[i % 3], SamplingParams(max_tokens=4, temperature=0))
    outs, finish, peak = {}, {}, 0
    while b.has_work():
        for rid, s in b.step():
            outs.setdefault(rid, []).append(s.token_id)
            finish[rid] = s.finish_reason or finish.get(rid)
        peak = max(peak, b.num_running)
    assert peak == 2 and sorted(outs) == [0, 1, 2, 3, 4]
    assert all(len(v) == 4 for v in outs.values())


def test_aborted_request_stops_and_the_others_are_unaffected(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model)
    alone = run_all(b, [PROMPTS[1]], [GREEDY])[0][0]
    b.submit("a", PROMPTS[0], GREEDY)
    b.submit("b", PROMPTS[1], GREEDY)
    outs, finish = {}, {}
    for _ in range(2):
        for rid, s in b.step():
            outs.setdefault(rid, []).append(s.token_id)
    b.abort("a")
    drain(b, outs, finish)
    assert len(outs["a"]) == 2 and "a" not in finish
    assert outs["b"] == alone


def test_stop_token_ends_request_and_is_not_returned(model_and_tok):
    model, _ = model_and_tok
    first = run_all(batcher(model, stop_ids=()), [[1, 5, 6]], [SamplingParams(max_tokens=3, temperature=0)])[0][0]
    out, finish = run_all(
        batcher(model, stop_ids=[first[1]]), [[1, 5, 6]], [SamplingParams(max_tokens=10, temperature=0)]
    )
    assert out[0] == first[:1] and finish == ["stop"]


def test_max_tokens_and_context_limit_finish_with_length(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model, stop_ids=(), max_context=10)
    out, finish = run_all(b, [[1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8]], [SamplingParams(max_tokens=5, temperature=0)] * 2)
    assert [len(o) for o in out] == [5, 2] and finish == ["length", "length"]
    with pytest.raises(ValueError, match="no room"):
        b.submit("x", [1] * 10, SamplingParams())


def test_seeded_sampling_is_reproducible(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model, stop_ids=(), max_context=64)
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert run_all(b, [[1, 5]], [sp])[0] == run_all(b, [[1, 5]], [sp])[0]


def test_presence_penalty_stops_greedy_repetition(model_and_tok):
    model, _ = model_and_tok
    b = batcher(model, stop_ids=(), max_context=128)
    # From this prompt the random tiny model (seed 0) repeats a token greedily within a few steps.
    plain = run_all(b, [[1, 100]], [SamplingParams(max_tokens=40, temperature=0)])[0][0]
    penalised = run_all(b, [[1, 100]], [SamplingParams(max_tokens=40, temperature=0, presence_penalty=2.0)])[0][0]
    assert len(set(plain)) < len(plain)
    assert len(set(penalised)) == len(penalised)


@pytest.mark.gpu
def test_continuous_batching_on_cuda_joins_and_leaves_like_on_cpu(model_and_tok):
    import copy

    model, _ = model_and_tok
    cpu = run_all(batcher(model), PROMPTS, [GREEDY] * 3)[0]
    gpu = batcher(copy.deepcopy(model).to("cuda"))
    gpu.submit(0, PROMPTS[0], GREEDY)
    outs, finish = {}, {}
    for rid, s in gpu.step():
        outs.setdefault(rid, []).append(s.token_id)
    gpu.submit(1, PROMPTS[1], GREEDY)
    gpu.submit(2, PROMPTS[2], GREEDY)
    drain(gpu, outs, finish)
    assert [outs[i] for i in range(3)] == cpu


def test_each_step_runs_inside_the_sdpa_kernel_scope_of_its_device(model_and_tok, monkeypatch):
    """Prefill and decode run under raychat.core.model.attention.sdpa_backend_scope (on CUDA: no cuDNN attention)."""
    import contextlib

    import torch

    import raychat.core.infer.batcher

    model, _ = model_and_tok
    entered, calls = [], []
    real_forward = model.forward

    @contextlib.contextmanager
    def spy_scope(device, kernels):
        entered.append(device)
        yield

    def spy_forward(*a, **k):
        calls.append(len(entered))
        return real_forward(*a, **k)

    monkeypatch.setattr(raychat.core.infer.batcher, "sdpa_backend_scope", spy_scope)
    monkeypatch.setattr(model, "forward", spy_forward)
    b = batcher(model)
    b.submit(0, PROMPTS[0], GREEDY)
    b.step()  # prefill
    b.step()  # decode
    assert entered == [torch.device("cpu")] * 2
    assert calls == [1, 2]  # each forward inside the scope of its own step
