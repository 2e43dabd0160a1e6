import time

import numpy as np
import pytest
import torch

from raychat.core.train.loss import weighted_cross_entropy
from raychat.core.train.pack import (
    PACKED_SDPA,
    document_causal_mask,
    group_packs,
    pack,
    packed_forward,
    plan_epoch,
    plan_feed,
    row_keys,
)

BUDGET = 65536


def sharegpt_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lognormal lengths (median 700, most 100-2000), clipped to [16, 4096]; budget/mean ≈ 60."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(700), 1.0, n), 16, 4096).astype(np.int64)


# --- the packed forward pass -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from raychat.core.model.hf import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def three_rows():
    g = torch.Generator().manual_seed(0)
    rows_ids, rows_w = [], []
    for n in (7, 12, 5):
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        ids[0] = 1  # BOS
        w = torch.rand(n, generator=g).tolist()
        w[0] = 0.0
        rows_ids.append(ids)
        rows_w.append(w)
    return rows_ids, rows_w


def rows_alone(model, rows_ids):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in rows_ids]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_logits_equal_each_row_run_alone(tiny_model, attn):
    tiny_model.set_attn_implementation(attn)
    try:
        rows_ids, rows_w = three_rows()
        packed = pack(rows_ids, rows_w)
        with torch.no_grad():
            logits = packed_forward(tiny_model, packed)[0]
        expected = torch.cat(rows_alone(tiny_model, rows_ids))
    finally:
        tiny_model.set_attn_implementation("sdpa")
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


class RecordingLM(torch.nn.Module):
    """Stands in for a causal LM whose attention is a flash-attention kernel (no GPU here)."""

    def __init__(self, attn_implementation):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.config = type("Config", (), {"_attn_implementation": attn_implementation, "sliding_window": None})()
        self.calls = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return type("Out", (), {"logits": torch.zeros(1, kwargs["input_ids"].shape[1], 10)})()


@pytest.mark.parametrize(
    "attn", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "flex_attention"]
)
def test_varlen_kernels_get_position_ids_and_no_mask(attn):
    model = RecordingLM(attn)
    packed = pack([[1, 2, 3], [1, 4]], [[0, 1, 1], [0, 1]])
    assert packed_forward(model, packed).shape == (1, 5, 10)
    (call,) = model.calls
    assert "attention_mask" not in call and call["use_cache"] is False
    assert call["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_positions_to_keep_reach_the_model_as_indices():
    """A [1, T] bool mask goes to transformers as 1-D positions: a 2-D bool ``logits_to_keep``
    fails on transformers releases before ~5.2x (5.17, the lent GPU machine's, raises IndexError)."""
    model = RecordingLM("flash_attention_2")
    packed = pack([[1, 2, 3], [1, 4]], [[0, 1, 1], [0, 1]])
    keep = torch.tensor([[False, True, False, True, True]])
    packed_forward(model, packed, logits_to_keep=keep)
    assert model.calls[0]["logits_to_keep"].tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="bool \\[1, T\\] mask"):
        packed_forward(model, packed, logits_to_keep=keep[0])


def test_sdpa_gets_the_4d_document_mask_in_the_model_dtype():
    model = RecordingLM("sdpa").to(torch.bfloat16)
    packed = pack([[1, 2, 3], [1, 4]], [[0, 1, 1], [0, 1]])
    packed_forward(model, packed)
    mask = model.calls[0]["attention_mask"]
    assert mask.dtype == torch.bfloat16
    assert torch.equal(mask, document_causal_mask(packed["seq_lens"], torch.bfloat16))


def test_packed_crlft_loss_sums_equal_sum_over_rows(tiny_model):
    rows_ids, rows_w = three_rows()
    packed = pack(rows_ids, rows_w)
    with torch.no_grad():
        whole = weighted_cross_entropy(packed_forward(tiny_model, packed), packed["input_ids"], packed["weights"])
    singles = [
        weighted_cross_entropy(logits[None], torch.tensor([ids]), torch.tensor([w]))
        for logits, ids, w in zip(rows_alone(tiny_model, rows_ids), rows_ids, rows_w)
    ]
    torch.testing.assert_close(whole.loss_sum, sum(p.loss_sum for p in singles), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(whole.weight_sum, sum(p.weight_sum for p in singles))
    torch.testing.assert_close(whole.correct_weight, sum(p.correct_weight for p in singles))


def test_without_the_document_mask_the_second_row_leaks(tiny_model):
    """The equality test above can fail: attention across rows changes row 2's logits."""
    rows_ids, rows_w = three_rows()
    packed = pack(rows_ids, rows_w)
    alone = rows_alone(tiny_model, rows_ids)[1]
    second = slice(len(rows_ids[0]), len(rows_ids[0]) + len(rows_ids[1]))
    with torch.no_grad():
        naive = tiny_model(input_ids=packed["input_ids"]).logits[0, second]
        # Positions restarted but a plain causal (not block-diagonal) mask: still leaks.
        t = packed["input_ids"].shape[1]
        causal = document_causal_mask(torch.tensor([t]), torch.float32)
        causal_only = tiny_model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=causal
        ).logits[0, second]
    assert not torch.allclose(naive, alone, atol=1e-3)
    assert not torch.allclose(causal_only, alone, atol=1e-3)


def test_transformers_derives_row_isolation_from_position_ids_alone(tiny_model):
    """What the flash/flex branch of packed_forward relies on (shown here with SDPA).

    transformers only looks for restarting position_ids when there is no cache, and the model
    creates one by default (``use_cache`` is on in the config), so ``use_cache=False`` is required.
    """
    rows_ids, rows_w = three_rows()
    packed = pack(rows_ids, rows_w)
    expected = torch.cat(rows_alone(tiny_model, rows_ids))
    kwargs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with torch.no_grad():
        without_cache = tiny_model(**kwargs, use_cache=False).logits[0]
        with_default_cache = tiny_model(**kwargs).logits[0]
    torch.testing.assert_close(without_cache, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(with_default_cache, expected, atol=1e-3)


def test_document_causal_mask_is_block_diagonal_and_causal():
    mask = document_causal_mask(torch.tensor([2, 3]), torch.float32)
    allowed = (mask[0, 0] == 0).int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ]
    )
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.float32
    assert torch.equal(allowed, expected)
    assert mask.min() == torch.finfo(torch.float32).min
    windowed = document_causal_mask(torch.tensor([2, 3]), torch.bfloat16, sliding_window=2)
    assert windowed.dtype == torch.bfloat16
    assert (windowed[0, 0, 4] == 0).tolist() == [False, False, False, True, True]


# --- pack ----------------------------------------------------------------------------------------


def test_pack_restarts_positions_and_builds_cu_seqlens():
    out = pack([[1, 5, 6], [1, 7], [1, 8, 9, 10]], [[0, 1, 1], [0, 0.5], [0, 0, 1, 1]])
    assert out["input_ids"].tolist() == [[1, 5, 6, 1, 7, 1, 8, 9, 10]]
    assert out["input_ids"].dtype == torch.long
    assert out["weights"].dtype == torch.float32 and out["weights"].shape == (1, 9)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert out["position_ids"].dtype == torch.long
    assert out["seq_lens"].tolist() == [3, 2, 4] and out["seq_lens"].dtype == torch.long
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 9] and out["cu_seqlens"].dtype == torch.int32


def test_pack_rejects_non_zero_first_weight():
    with pytest.raises(ValueError, match="row 1: first weight"):
        pack([[1, 5], [1, 6]], [[0, 1], [0.5, 1]])


def test_pack_rejects_mismatched_or_empty_rows():
    with pytest.raises(ValueError):
        pack([[1, 5]], [[0, 1, 1]])
    with pytest.raises(ValueError):
        pack([], [])


# --- plan_epoch ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lengths():
    return sharegpt_like_lengths(20_000)


def check_plan(plan, lengths, budget, num_ranks):
    seen = [i for step in plan.steps for p in step for i in p]
    assert len(seen) == len(set(seen)), "a row was used twice in one epoch"
    assert all(len(step) == num_ranks for step in plan.steps), "ranks must get the same number of steps"
    assert all(p for step in plan.steps for p in step), "empty pack"
    assert max(int(lengths[p].sum()) for step in plan.steps for p in step) <= budget
    assert plan.left_out == len(lengths) - len(seen)
    packed = sum(int(lengths[p].sum()) for step in plan.steps for p in step)
    assert plan.efficiency == pytest.approx(packed / (plan.num_steps * num_ranks * budget))
    assert plan.for_rank(num_ranks - 1) == [step[-1] for step in plan.steps]


@pytest.mark.parametrize("num_ranks", [2, 8])
@pytest.mark.parametrize("budget", [BUDGET, BUDGET // 2])
def test_plan_epoch_packs_sharegpt_like_mix_at_995_efficiency(lengths, num_ranks, budget):
    plan = plan_epoch(lengths, budget, num_ranks, seed=0, epoch=0)
    check_plan(plan, lengths, budget, num_ranks)
    print(
        f"budget={budget} ranks={num_ranks}: efficiency={plan.efficiency:.5f} steps={plan.num_steps} "
        f"left_out={plan.left_out}/{len(lengths)} (budget/mean={budget / lengths.mean():.0f})"
    )
    assert plan.efficiency >= 0.995


def test_plan_epoch_is_deterministic_and_changes_with_epoch(lengths):
    a = plan_epoch(lengths, BUDGET, 8, seed=3, epoch=1)
    b = plan_epoch(list(lengths), BUDGET, 8, seed=3, epoch=1)
    assert a == b
    assert plan_epoch(lengths, BUDGET, 8, seed=3, epoch=2).steps != a.steps
    assert plan_epoch(lengths, BUDGET, 8, seed=4, epoch=1).steps != a.steps


def test_every_row_is_used_within_three_epochs(lengths):
    used = set()
    left_out = []
    for epoch in range(3):
        plan = plan_epoch(lengths, BUDGET, 8, seed=0, epoch=epoch)
        left_out.append(plan.left_out)
        used.update(i for step in plan.steps for p in step for i in p)
    assert all(n > 0 for n in left_out), "make the test meaningful: some rows must be left out per epoch"
    assert len(used) == len(lengths)


def test_left_out_rows_are_not_biased_to_short_or_long(lengths):
    plan = plan_epoch(lengths, BUDGET, 8, seed=0, epoch=0)
    used = np.zeros(len(lengths), dtype=bool)
    used[[i for step in plan.steps for p in step for i in p]] = True
    assert plan.left_out > 50
    # Left-out rows come from the tail of the shuffle, so their median length is the mix's.
    assert np.median(lengths[~used]) == pytest.approx(np.median(lengths), rel=0.25)


def test_plan_epoch_rejects_rows_longer_than_budget():
    with pytest.raises(ValueError, match=r"5000 tokens.*batch_max_len=4096"):
        plan_epoch([100, 5000, 300], 4096, 2, seed=0, epoch=0)


def test_plan_epoch_small_inputs():
    assert plan_epoch([], 100, 2, seed=0, epoch=0).num_steps == 0
    plan = plan_epoch([60, 60, 40, 40], 100, 2, seed=0, epoch=0)
    assert plan.num_steps == 1 and plan.efficiency == 1.0 and plan.left_out == 0
    assert sorted(sorted(p) for p in plan.steps[0]) == [[0, 2], [1, 3]]
    # Not even one step's worth of tokens: everything is left out rather than padded.
    assert plan_epoch([50, 50, 50], 100, 2, seed=0, epoch=0).left_out == 3


def test_planning_100k_rows_takes_under_two_seconds():
    lengths = sharegpt_like_lengths(100_000, seed=1)
    start = time.perf_counter()
    plan = plan_epoch(lengths, BUDGET, 8, seed=0, epoch=0)
    elapsed = time.perf_counter() - start
    print(f"planned 100k rows in {elapsed:.3f}s, efficiency={plan.efficiency:.5f}")
    assert elapsed < 2.0
    assert plan.efficiency >= 0.995


# --- plan_feed / group_packs / row_keys: the training feed ---------------------------------------


def packs_of(plan, epoch, rank):
    """{micro: [rows in pack order]} of one rank in one epoch."""
    out: dict[int, list[int]] = {}
    for i in plan.rows_of(epoch, rank):
        out.setdefault(int(plan.micro[epoch, i]), []).append(int(i))
    return out


def test_plan_feed_gives_every_rank_accum_packs_per_step_within_budget():
    lengths = sharegpt_like_lengths(3000, seed=2)
    budget, ranks, accum, epochs = 16384, 2, 2, 2
    plan = plan_feed(lengths, budget, ranks, seed=1, epochs=epochs, accum=accum)
    first = 0
    for e in range(epochs):
        steps = plan.steps_per_epoch[e]
        expected_micros = list(range(first * accum, (first + steps) * accum))
        used = []
        for r in range(ranks):
            packs = packs_of(plan, e, r)
            assert sorted(packs) == expected_micros, "every rank needs one pack per micro-step"
            assert all(lengths[rows].sum() <= budget for rows in packs.values())
            assert all(plan.pos[e, rows].tolist() == list(range(len(rows))) for rows in packs.values())
            used += [i for rows in packs.values() for i in rows]
        assert len(used) == len(set(used)) == len(lengths) - plan.left_out[e]
        assert plan.efficiency[e] == pytest.approx(lengths[used].sum() / (steps * ranks * accum * budget))
        assert plan.efficiency[e] >= 0.99
        first += steps
    assert plan.total_steps == first


def test_plan_feed_uses_plan_epoch_packs_rank_major():
    lengths = sharegpt_like_lengths(2000, seed=3)
    plan = plan_feed(lengths, 8192, 2, seed=5, epochs=1, accum=3)
    reference = plan_epoch(lengths, 8192, 6, seed=5, epoch=0)
    for s, step in enumerate(reference.steps):
        for k, rows in enumerate(step):
            rank, m = divmod(k, 3)
            assert sorted(packs_of(plan, 0, rank)[s * 3 + m]) == sorted(rows)


def test_plan_feed_leaves_out_rows_longer_than_the_budget_instead_of_failing():
    lengths = np.array([60, 5000, 40, 60, 40, 30, 70])
    plan = plan_feed(lengths, 100, 1, seed=0, epochs=2)
    assert plan.too_long == 1
    assert (plan.rank[:, 1] == -1).all()
    assert all(n >= 1 for n in plan.left_out)


def test_group_packs_regroups_rows_across_batch_boundaries():
    batches = [
        {"micro": np.array([4, 4, 5]), "input_ids": [[1, 2], [1, 3], [1, 4]], "weights": [[0, 1], [0, 1], [0, 1]]},
        {"micro": np.array([5, 6]), "input_ids": [[1, 5], [1, 6]], "weights": [[0, 1], [0, 1]]},
    ]
    got = [(m, ids) for m, ids, _ in group_packs(batches)]
    assert got == [(4, [[1, 2], [1, 3]]), (5, [[1, 4], [1, 5]]), (6, [[1, 6]])]


def test_group_packs_rejects_an_unsorted_stream():
    batches = [{"micro": np.array([1, 2, 1]), "input_ids": [[1], [1], [1]], "weights": [[0], [0], [0]]}]
    with pytest.raises(ValueError, match="micro-batch 1 appears twice"):
        list(group_packs(batches))


def test_row_keys_are_stable_and_tell_rows_apart():
    a = row_keys(["/d/a.jsonl", "/d/a.jsonl", "/d/b.jsonl"], [0, 1, 0])
    assert a.dtype == np.uint64 and len(set(a.tolist())) == 3
    assert row_keys(["/d/a.jsonl"], [1])[0] == a[1]


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention", "sdpa"])
def test_packed_forward_on_gpu_in_bf16_matches_rows_alone(tiny_model_dir, attn):
    """The GPU path: varlen kernels (from restarting position_ids) or the 4D mask, in bf16."""
    from raychat.core.model.hf import load_causal_lm

    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    model = model.cuda().eval()
    model.set_attn_implementation(attn)
    rows_ids, rows_w = three_rows()
    with torch.no_grad():
        logits = packed_forward(model, pack(rows_ids, rows_w))[0].float()
        alone = torch.cat([model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float() for ids in rows_ids])
    torch.testing.assert_close(logits, alone, atol=3e-2, rtol=3e-2)


# --- per-row attention (the CPU training path): no T×T mask, Σ Lᵢ² scores -------------------------


def test_per_row_attention_logits_equal_each_row_run_alone(tiny_model):
    from raychat.core.train.pack import use_packed_attention

    rows_ids, rows_w = three_rows()
    expected = torch.cat(rows_alone(tiny_model, rows_ids))
    try:
        assert use_packed_attention(tiny_model) == PACKED_SDPA
        with torch.no_grad():
            logits = packed_forward(tiny_model, pack(rows_ids, rows_w))[0]
    finally:
        tiny_model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_per_row_attention_keeps_mistral_sliding_window_within_each_row():
    from transformers import MistralForCausalLM

    from raychat.core.model.hf import tiny_mistral_config
    from raychat.core.train.pack import use_packed_attention

    config = tiny_mistral_config(vocab_size=64)
    config.sliding_window, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    rows_ids = [[1] + torch.randint(3, 64, (n - 1,), generator=g).tolist() for n in (8, 2, 6)]
    packed = pack(rows_ids, [[0.0] * len(r) for r in rows_ids])
    with torch.no_grad():
        dense = packed_forward(model, packed)  # the document mask, windowed
        use_packed_attention(model)
        per_row = packed_forward(model, packed)
        model.config.sliding_window = None
        per_row_unwindowed = packed_forward(model, packed)
    torch.testing.assert_close(per_row, dense, atol=1e-5, rtol=1e-5)
    # The 8-token row is longer than the window: dropping the window would change its logits.
    assert not torch.allclose(per_row_unwindowed[0, :8], per_row[0, :8], atol=1e-4)


def test_per_row_attention_refuses_a_call_that_is_not_a_pack(tiny_model):
    from raychat.core.train.pack import use_packed_attention

    try:
        use_packed_attention(tiny_model)
        with pytest.raises(ValueError, match="only runs packs"), torch.no_grad():
            tiny_model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=False)
    finally:
        tiny_model.set_attn_implementation("sdpa")


def test_varlen_kernels_are_kept_by_use_packed_attention():
    from raychat.core.train.pack import use_packed_attention

    model = RecordingLM("flash_attention_2")
    assert use_packed_attention(model) == "flash_attention_2"
    assert model.config._attn_implementation == "flash_attention_2"


def test_checkpoint_of_a_per_row_attention_model_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from raychat.core.model.hf import load_causal_lm
    from raychat.core.train.pack import use_packed_attention

    model, _ = load_causal_lm(tiny_model_dir)
    use_packed_attention(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert reloaded(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 32002)


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["per-row-sdpa", "varlen-flash"])
def test_per_row_attention_on_gpu_in_bf16_matches_rows_alone(tiny_model_dir, varlen, monkeypatch):
    import raychat.core.train.pack
    from raychat.core.model.hf import load_causal_lm
    from raychat.core.train.pack import use_packed_attention

    monkeypatch.setattr(raychat.core.train.pack, "PACKED_VARLEN_FLASH", varlen)
    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    model = model.cuda().eval()
    rows_ids, rows_w = three_rows()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float() for ids in rows_ids])
        use_packed_attention(model)
        logits = packed_forward(model, pack(rows_ids, rows_w))[0].float()
    torch.testing.assert_close(logits, alone, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_varlen_flash_gradients_match_per_row_sdpa(tiny_model_dir, monkeypatch):
    """One varlen kernel for the whole pack trains exactly like one SDPA call per row."""
    import raychat.core.train.pack
    from raychat.core.model.hf import load_causal_lm
    from raychat.core.train.pack import use_packed_attention
    from raychat.core.train.step import forward_packed_ce

    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    model = model.cuda().to(torch.bfloat16)
    use_packed_attention(model)
    packed = pack(*three_rows())
    grads = {}
    for varlen in (False, True):
        monkeypatch.setattr(raychat.core.train.pack, "PACKED_VARLEN_FLASH", varlen)
        model.zero_grad(set_to_none=True)
        parts = forward_packed_ce(model, packed)
        parts.loss_sum.backward()
        grads[varlen] = (parts.loss_sum.detach().float(), [p.grad.float().clone() for p in model.parameters()])
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=2e-2, rtol=1e-2)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "capability", "ok"),
    [
        ("cuda", torch.bfloat16, 128, (9, 0), True),  # H100 / H200
        ("cuda", torch.float16, 64, (8, 0), True),  # A100
        ("cuda", torch.float32, 128, (9, 0), False),  # fp32 training on a GPU: per-row SDPA
        ("cuda", torch.bfloat16, 128, (7, 0), False),  # V100: no flash kernel
        ("cuda", torch.bfloat16, 20, (9, 0), False),
        ("cuda", torch.bfloat16, 512, (9, 0), False),
        ("cpu", torch.bfloat16, 128, None, False),
    ],
)
def test_varlen_flash_only_where_the_flash_kernel_runs(device, dtype, head_dim, capability, ok):
    from raychat.core.train.pack import varlen_flash_supported

    assert varlen_flash_supported(device, dtype, head_dim, capability) is ok
