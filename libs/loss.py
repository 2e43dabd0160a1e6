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
