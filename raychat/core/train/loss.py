"""The C-RLFT objective: a reward-weighted cross-entropy, Σ w·CE / Σ w.

Weights are unshifted — ``weights[:, t]`` weighs predicting ``input_ids[:, t]`` from the
positions before it — so the first position never carries loss and padding carries
weight 0. Normalising by Σ w over the *global* batch (every rank, every accumulation
step) makes the loss independent of how tokens are split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WeightedCE:
    """Sums of one micro-batch; combine across ranks before dividing."""

    loss_sum: torch.Tensor  # Σ w·CE (differentiable)
    weight_sum: torch.Tensor  # Σ w
    correct_weight: torch.Tensor  # Σ w·[argmax == target], for weighted token accuracy


def weighted_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> WeightedCE:
    """Σ w·CE and Σ w for a batch of sequences.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        input_ids: ``[batch, seq]`` token ids.
        weights: ``[batch, seq]`` unshifted per-token weights (0 on padding and prompts).
    """
    vocab = logits.size(-1)
    return weighted_cross_entropy_at(
        logits[:, :-1, :].reshape(-1, vocab), input_ids[:, 1:].reshape(-1), weights[:, 1:].reshape(-1)
    )


def weighted_cross_entropy_at(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> WeightedCE:
    """Σ w·CE and Σ w over already-shifted prediction positions.

    Args:
        logits: ``[n, vocab]`` logits of the positions that predict ``targets``.
        targets: ``[n]`` the token each position predicts.
        weights: ``[n]`` the weight of each target.
    """
    logits = logits.float()
    w = weights.to(logits.dtype)
    ce = F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).to(w.dtype)
        correct_weight = (correct * w).sum()
    return WeightedCE((ce * w).sum(), w.sum().detach(), correct_weight)


def loss_positions(weights: torch.Tensor) -> torch.Tensor:
    """Positions whose logits the loss needs: those whose *next* token has a non-zero weight.

    Weights are unshifted (``weights[:, t]`` weighs predicting token ``t`` from position
    ``t - 1``), so position ``t`` matters iff ``weights[:, t + 1] != 0``; the last position never
    does. Every other position adds exactly 0 to Σ w·CE, Σ w and their gradients, so computing
    the LM head and cross-entropy only here gives the same sums.

    Args:
        weights: ``[batch, seq]`` unshifted per-token weights.

    Returns:
        Bool ``[batch, seq]`` mask (transformers' ``logits_to_keep`` accepts it as is).
    """
    keep = torch.zeros(weights.shape, dtype=torch.bool, device=weights.device)
    keep[:, :-1] = weights[:, 1:] != 0
    return keep


def crlft_loss(parts: WeightedCE, global_weight_sum: torch.Tensor | float, world_size: int = 1) -> torch.Tensor:
    """The local share of the global C-RLFT loss, ready for ``backward``.

    Data-parallel engines average gradients over ranks (divide by ``world_size``), so each
    rank scales its Σ w·CE by ``world_size / Σ w_global``; the averaged gradient is then
    exactly that of Σ w·CE / Σ w over the whole global batch.
    """
    denom = torch.as_tensor(global_weight_sum, dtype=parts.loss_sum.dtype).clamp_min(1e-8)
    return parts.loss_sum * world_size / denom


def _ce_chunk(logits: torch.Tensor, t: torch.Tensor, wc: torch.Tensor, need_grad: bool):
    """One chunk of :class:`_LinearWeightedCE`: Σ w·CE, Σ w·[argmax == t] and, with ``need_grad``,
    the logits' gradient ``w · (softmax - onehot)`` in the logits' dtype (``None`` otherwise).

    ``logits`` are ``[rows, vocab]`` in the model's dtype; the arithmetic is fp32. Eager, the fp32
    copy becomes the softmax and then the gradient in place; compiled (:func:`_compiled_ce_chunk`),
    it all fuses into a few passes over the low-precision logits.
    """
    x = logits.float()
    rows = torch.arange(x.shape[0], device=x.device)
    target_logit = x[rows, t]
    top, arg = x.max(-1)
    probs = x.sub_(top[:, None]).exp_()
    total = probs.sum(-1)
    loss = ((top + total.log() - target_logit) * wc).sum()
    correct = ((arg == t).float() * wc).sum()
    if not need_grad:
        return loss, correct, None
    dlogits = probs.div_(total[:, None])
    dlogits[rows, t] -= 1
    return loss, correct, dlogits.mul_(wc[:, None]).to(logits.dtype)


_COMPILED_CE_CHUNK = None


def _compiled_ce_chunk():
    """:func:`_ce_chunk` through ``torch.compile`` (once per process; row count dynamic)."""
    global _COMPILED_CE_CHUNK
    if _COMPILED_CE_CHUNK is None:
        _COMPILED_CE_CHUNK = torch.compile(_ce_chunk, dynamic=True)
    return _COMPILED_CE_CHUNK


class _LinearWeightedCE(torch.autograd.Function):
    """Σ w·CE of ``hidden @ weight.T`` by row chunks, with its gradients worked out chunk by chunk.

    The ``[n, vocab]`` logits are never whole: each chunk's logits give its gradient
    (``w · (softmax - onehot)``, :func:`_ce_chunk`), which is multiplied into the gradients of
    ``hidden`` and ``weight`` before the next chunk. ``backward`` only scales them by the incoming
    gradient (the loss is a sum, so that is exact).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, w, chunk: int, with_grad: bool, compiled: bool):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_h, need_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = w.float()
        step = _compiled_ce_chunk() if compiled else _ce_chunk
        for start in range(0, hidden.shape[0], chunk):
            h, t, wc = hidden[start : start + chunk], targets[start : start + chunk], w[start : start + chunk]
            loss_c, correct_c, dlogits = step(h @ weight.T, t, wc, need_h or need_w)
            loss += loss_c
            correct += correct_c
            if need_h:
                grad_h[start : start + chunk] = dlogits @ weight
            if need_w:
                # In the model's dtype (bf16 on a GPU: tensor cores, fp32 accumulation inside the
                # product), summed over chunks in fp32. An fp32 product here ran at fp32 speed.
                grad_w.add_(dlogits.T @ h)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def linear_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk: int | None = None,
    compiled: bool | None = None,
) -> WeightedCE:
    """:func:`weighted_cross_entropy_at` of the logits ``hidden @ weight.T``, without ever holding them.

    A fused LM head + cross-entropy: with a 32k vocabulary the ``[n, vocab]`` fp32 logits, their
    log-softmax and their gradient are the largest tensors of a small model's step. Here they exist
    one ``chunk`` of rows at a time (256 rows × 32k × 4 bytes = 32 MB), and the gradients are
    computed in the forward pass, so the backward pass is a scaling.

    Args:
        hidden: ``[n, hidden]`` final hidden states of the positions that predict ``targets``.
        weight: ``[vocab, hidden]`` the LM head's weight (a bias-free linear layer).
        targets: ``[n]`` the token each position predicts.
        weights: ``[n]`` the weight of each target.
        chunk: Rows per chunk. Default: 256 on the CPU (a chunk's logits stay in cache), 4096 on
            an accelerator (fewer, larger matrix products; 4096 × 32k × 4 bytes = 512 MB).
        compiled: Whether each chunk's softmax and gradient run through ``torch.compile``.
            Default: compiled on CUDA, eager elsewhere (the training step passes
            :attr:`raychat.core.model.attention.KernelOptions.compile_ce_chunks_on_cuda`).
    """
    if chunk is None:
        chunk = 256 if hidden.device.type == "cpu" else 4096
    if compiled is None:
        compiled = hidden.device.type == "cuda"
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum, correct = _LinearWeightedCE.apply(hidden, weight, targets, weights, chunk, with_grad, compiled)
    return WeightedCE(loss_sum, weights.float().sum().detach(), correct.detach())
