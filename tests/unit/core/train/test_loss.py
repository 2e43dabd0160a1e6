import pytest
import torch
import torch.nn.functional as F

from raychat.core.train.loss import crlft_loss, weighted_cross_entropy


def test_weighted_ce_equals_manual_sum_over_shifted_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    w = torch.rand(2, 5)
    parts = weighted_cross_entropy(logits, ids, w)
    manual = sum(
        w[b, t] * F.cross_entropy(logits[b, t - 1][None], ids[b, t][None]) for b in range(2) for t in range(1, 5)
    )
    assert torch.allclose(parts.loss_sum, manual, atol=1e-5)
    assert torch.allclose(parts.weight_sum, w[:, 1:].sum())


def test_zero_weight_tokens_do_not_change_loss():
    torch.manual_seed(0)
    logits, ids = torch.randn(1, 6, 7), torch.randint(0, 7, (1, 6))
    w = torch.tensor([[0, 0, 1.0, 1.0, 0, 0]])
    other_logits = logits.clone()
    other_logits[0, 4:] = torch.randn(2, 7) * 100  # positions predicting weight-0 tokens
    a = weighted_cross_entropy(logits, ids, w)
    b = weighted_cross_entropy(other_logits, ids, w)
    assert torch.allclose(a.loss_sum, b.loss_sum)


def test_low_reward_tokens_weigh_less():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 5.0  # confident & right on token 1, uniform (wrong-ish) on token 2
    ids = torch.tensor([[0, 1, 2]])
    hi = weighted_cross_entropy(logits, ids, torch.tensor([[0.0, 0.1, 1.0]]))
    lo = weighted_cross_entropy(logits, ids, torch.tensor([[0.0, 1.0, 0.1]]))
    assert crlft_loss(hi, hi.weight_sum) > crlft_loss(lo, lo.weight_sum)


def test_two_ranks_with_global_normalisation_match_one_process():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 13)
    x = torch.randn(4, 6, 8)
    ids = torch.randint(0, 13, (4, 6))
    w = torch.rand(4, 6) * (torch.rand(4, 6) > 0.3)

    def grads(sl, global_w, world):
        layer.zero_grad()
        parts = weighted_cross_entropy(layer(x[sl]), ids[sl], w[sl])
        crlft_loss(parts, global_w, world).backward()
        return layer.weight.grad.clone()

    total_w = w[:, 1:].sum()
    whole = grads(slice(0, 4), total_w, 1)
    # Uneven split on purpose: rank 0 gets 1 row, rank 1 gets 3; data-parallel averages grads.
    averaged = (grads(slice(0, 1), total_w, 2) + grads(slice(1, 4), total_w, 2)) / 2
    assert torch.allclose(whole, averaged, atol=1e-6)


def test_loss_positions_are_those_whose_next_token_has_weight():
    from raychat.core.train.loss import loss_positions, weighted_cross_entropy_at

    w = torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0, 2.0]])
    keep = loss_positions(w)
    assert keep.tolist() == [[False, True, True, False, True, False]]  # the last position never predicts
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 7)
    ids = torch.randint(0, 7, (1, 6))
    full = weighted_cross_entropy(logits, ids, w)
    kept = weighted_cross_entropy_at(logits[keep], ids[:, 1:][keep[:, :-1]], w[:, 1:][keep[:, :-1]])
    torch.testing.assert_close(kept.loss_sum, full.loss_sum)
    torch.testing.assert_close(kept.weight_sum, full.weight_sum)
    torch.testing.assert_close(kept.correct_weight, full.correct_weight)


@pytest.mark.parametrize("chunk", [3, 64])
def test_fused_linear_ce_equals_logits_then_ce_with_gradients(chunk):
    from raychat.core.train.loss import linear_weighted_cross_entropy, weighted_cross_entropy_at

    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    w = torch.rand(10) * (torch.rand(10) > 0.3)
    ref = weighted_cross_entropy_at(hidden @ weight.T, targets, w)
    ref_grads = torch.autograd.grad(ref.loss_sum * 3.0, (hidden, weight))
    got = linear_weighted_cross_entropy(hidden, weight, targets, w, chunk=chunk)
    grads = torch.autograd.grad(got.loss_sum * 3.0, (hidden, weight))  # a scaled loss, as crlft_loss makes
    torch.testing.assert_close(got.loss_sum, ref.loss_sum)
    torch.testing.assert_close(got.weight_sum, ref.weight_sum)
    torch.testing.assert_close(got.correct_weight, ref.correct_weight)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_weighted_cross_entropy(hidden, weight, targets, w, chunk).loss_sum, ref.loss_sum
        )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_linear_ce_in_bf16_matches_fp32_reference(device):
    """bf16 as on a GPU: each chunk's head gradient is a bf16 product, summed over chunks in fp32."""
    from raychat.core.train.loss import linear_weighted_cross_entropy, weighted_cross_entropy_at

    torch.manual_seed(0)
    n, h, v = 600, 64, 1000  # more rows than one chunk on every device (256 CPU, 4096 accelerator: 2 chunks forced)
    hidden = torch.randn(n, h, device=device).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=device) / 8).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    w = torch.rand(n, device=device) * (torch.rand(n, device=device) > 0.3)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = weighted_cross_entropy_at(h32 @ w32.T, targets, w)
    ref_grads = torch.autograd.grad(ref.loss_sum, (h32, w32))
    for chunk in (None, 256):
        got = linear_weighted_cross_entropy(hidden, weight, targets, w, chunk=chunk)
        grads = torch.autograd.grad(got.loss_sum, (hidden, weight))
        torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-3, atol=1e-2)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), r, rtol=2e-2, atol=2e-2)


def test_compiled_ce_chunks_match_eager_ones():
    """The compiled per-chunk softmax/gradient (the CUDA default) gives the eager sums and gradients;
    on the CPU here, with a ragged last chunk (the row count is dynamic)."""
    from raychat.core.train.loss import linear_weighted_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(70, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (70,))
    w = torch.rand(70) * (torch.rand(70) > 0.3)
    ref = linear_weighted_cross_entropy(hidden, weight, targets, w, chunk=32, compiled=False)
    ref_grads = torch.autograd.grad(ref.loss_sum, (hidden, weight))
    got = linear_weighted_cross_entropy(hidden, weight, targets, w, chunk=32, compiled=True)
    grads = torch.autograd.grad(got.loss_sum, (hidden, weight))
    torch.testing.assert_close(got.loss_sum, ref.loss_sum)
    torch.testing.assert_close(got.correct_weight, ref.correct_weight)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
