"""A pack as one sequence, its document mask, and the packed forward pass (raychat.core.train.pack)."""

import pytest
import torch

from raychat.core.train.loss import weighted_cross_entropy
from raychat.core.train.pack import document_causal_mask, pack, packed_forward
from tests.unit.core.packed_rows import RecordingLM, rows_alone, three_rows

# --- the packed forward pass -------------------------------------------------------------------


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
