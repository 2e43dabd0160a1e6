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
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    w = weights[:, 1:].to(shift_logits.dtype)
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), targets.reshape(-1), reduction="none")
    w = w.reshape(-1)
    with torch.no_grad():
        correct = (shift_logits.argmax(-1).reshape(-1) == targets.reshape(-1)).to(w.dtype)
        correct_weight = (correct * w).sum()
    return WeightedCE((ce * w).sum(), w.sum().detach(), correct_weight)


def crlft_loss(parts: WeightedCE, global_weight_sum: torch.Tensor | float, world_size: int = 1) -> torch.Tensor:
    """The local share of the global C-RLFT loss, ready for ``backward``.

    Data-parallel engines average gradients over ranks (divide by ``world_size``), so each
    rank scales its Σ w·CE by ``world_size / Σ w_global``; the averaged gradient is then
    exactly that of Σ w·CE / Σ w over the whole global batch.
    """
    denom = torch.as_tensor(global_weight_sum, dtype=parts.loss_sum.dtype).clamp_min(1e-8)
    return parts.loss_sum * world_size / denom
