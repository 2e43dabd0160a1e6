"""A pack as one padding-free sequence, its attention mask, and the forward pass over it.

A pack (rows chosen by :func:`raychat.core.train.plan.plan_epoch`) is one sequence ``[1, total]``
with no padding. ``position_ids`` restart at 0 for each row and attention is causal *within* a row
and never crosses rows (block-diagonal), so every row's logits equal those of running it alone.
:func:`packed_forward` picks how, from the model's attention implementation: per-row attention
(:func:`raychat.core.model.attention.packed_sdpa_attention`), a varlen kernel fed by the restarting
``position_ids``, or the dense :func:`document_causal_mask`.

Loss invariant: :func:`raychat.core.train.loss.weighted_cross_entropy` shifts internally, so the last token
of row ``k`` "predicts" the first token of row ``k + 1`` with weight ``weights[first of k+1]``.
Every row starts with BOS at weight 0, so that cross-row prediction carries no loss and the
pack's Σ w·CE and Σ w equal the sums over its rows computed separately. :func:`pack` enforces
this by rejecting rows whose first weight is not 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from raychat.core.model.attention import (
    DEFAULT_KERNELS,
    PACKED_SDPA,
    KernelOptions,
    host_to_device,
    uses_varlen_kernel,
)


def pack(rows_ids: Sequence[Sequence[int]], rows_weights: Sequence[Sequence[float]]) -> dict[str, torch.Tensor]:
    """Concatenates the rows of one pack into a single padding-free sequence.

    Args:
        rows_ids: Token ids of each row.
        rows_weights: Unshifted loss weights of each row (same lengths); each row's first weight
            must be 0 (its BOS), which makes the cross-row prediction carry no loss.

    Returns:
        ``input_ids`` (long ``[1, T]``), ``weights`` (float32 ``[1, T]``), ``position_ids`` (long
        ``[1, T]``, restarting at 0 per row), ``seq_lens`` (long ``[num_rows]``) and
        ``cu_seqlens`` (int32 ``[num_rows + 1]``, cumulative from 0, for varlen attention kernels).

    Raises:
        ValueError: On no rows, mismatched ids/weights, an empty row, or a non-zero first weight.
    """
    if len(rows_ids) != len(rows_weights):
        raise ValueError(f"{len(rows_ids)} id rows but {len(rows_weights)} weight rows")
    if not rows_ids:
        raise ValueError("cannot pack zero rows")
    seq_lens: list[int] = []
    for k, (row_ids, row_w) in enumerate(zip(rows_ids, rows_weights)):
        n = len(row_ids)
        if n == 0 or n != len(row_w):
            raise ValueError(f"row {k}: {n} ids and {len(row_w)} weights (need the same, non-zero count)")
        if row_w[0] != 0:
            raise ValueError(
                f"row {k}: first weight is {row_w[0]}, must be 0 — otherwise the previous row's last "
                "token would be trained to predict this row's first token"
            )
        seq_lens.append(n)
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows_ids])
    weights = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows_weights])
    lens_np = np.asarray(seq_lens, dtype=np.int64)
    # Position of each token within its row: global index minus its row's start.
    positions = np.arange(ids.size, dtype=np.int64) - np.repeat(np.cumsum(lens_np) - lens_np, lens_np)
    lens_t = torch.from_numpy(lens_np)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens_t, 0)
    return {
        "input_ids": torch.from_numpy(ids).unsqueeze(0),
        "weights": torch.from_numpy(weights).unsqueeze(0),
        "position_ids": torch.from_numpy(positions).unsqueeze(0),
        "seq_lens": lens_t,
        "cu_seqlens": cu,
    }


def document_causal_mask(
    seq_lens: torch.Tensor, dtype: torch.dtype, *, sliding_window: int | None = None
) -> torch.Tensor:
    """Additive 4D mask for a pack: causal within each row, nothing across rows.

    Memory is O(T²) (a 64k-token pack would need 16 GiB in float32): this is the CPU / eager /
    SDPA path; flash-attention kernels use ``cu_seqlens`` / ``position_ids`` instead.

    Args:
        seq_lens: ``[num_rows]`` row lengths, in pack order.
        dtype: Dtype of the mask (that of the attention scores).
        sliding_window: If set, a token also sees only the last ``sliding_window`` tokens of its
            row (itself included), as Mistral's sliding-window attention does.

    Returns:
        ``[1, 1, T, T]`` tensor: 0 where query ``q`` may attend key ``k``, ``finfo(dtype).min``
        elsewhere.
    """
    seq_lens = seq_lens.reshape(-1).to(torch.long)
    row = torch.repeat_interleave(torch.arange(len(seq_lens), device=seq_lens.device), seq_lens)
    idx = torch.arange(row.numel(), device=seq_lens.device)
    allowed = (row[:, None] == row[None, :]) & (idx[None, :] <= idx[:, None])
    if sliding_window is not None:
        allowed &= idx[None, :] > idx[:, None] - sliding_window
    mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=seq_lens.device)
    mask.masked_fill_(allowed, 0)
    return mask[None, None]


def packed_forward(
    model,
    packed: dict[str, torch.Tensor],
    logits_to_keep: torch.Tensor | None = None,
    kernels: KernelOptions = DEFAULT_KERNELS,
) -> torch.Tensor:
    """Runs an HF causal LM on a pack without attention crossing rows.

    Args:
        model: A transformers causal LM (e.g. ``MistralForCausalLM``), or a wrapper exposing it as
            ``.module``.
        packed: Output of :func:`pack`.
        logits_to_keep: Optional bool ``[1, T]`` mask: the LM head runs only at these positions
            (transformers' ``logits_to_keep``), e.g. :func:`raychat.core.train.loss.loss_positions`.
        kernels: The CUDA kernel choice of per-row attention (passed down to it with the forward).

    Returns:
        Logits ``[1, T, vocab]``, or ``[kept, vocab]`` with ``logits_to_keep``.
    """
    inner = getattr(model, "module", model)
    config = inner.config
    device = inner.get_input_embeddings().weight.device
    input_ids = host_to_device(packed["input_ids"], device)
    position_ids = host_to_device(packed["position_ids"], device)
    kwargs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    if logits_to_keep is not None:
        # As positions (1-D), which every transformers 5.x takes; a [batch, seq] bool mask is
        # taken only by later 5.x releases (5.17 fails on it). A pack is one row, so they agree.
        if logits_to_keep.dim() != 2 or logits_to_keep.size(0) != 1 or logits_to_keep.dtype != torch.bool:
            raise ValueError(
                f"logits_to_keep: a bool [1, T] mask; got {tuple(logits_to_keep.shape)} {logits_to_keep.dtype}"
            )
        kwargs["logits_to_keep"] = host_to_device(logits_to_keep[0].nonzero().squeeze(1), device)
    impl = getattr(config, "_attn_implementation", None)
    if impl == PACKED_SDPA:
        # Per-row SDPA (see use_packed_attention): row boundaries instead of a mask. They stay on
        # the CPU (the attention reads them as Python ints, which needs no device sync), and a
        # device copy made once here serves every layer's varlen kernel on CUDA.
        cu = packed["cu_seqlens"]
        extra = {"cu_seq_lens_k": host_to_device(cu, device)} if device.type == "cuda" else {}
        out = model(**kwargs, cu_seq_lens_q=cu, kernel_options=kernels, **extra)
    elif uses_varlen_kernel(impl):
        # GPU path (untested here, no GPU). With flash-attention, transformers sees that
        # position_ids restart (batch of 1) and calls the varlen kernel with cu_seqlens derived from
        # them; with flex attention, masking_utils builds a per-row BlockMask from the same restarts.
        # A dense 4D mask would be wrong (flash) or O(T²) (flex), so pass none.
        out = model(**kwargs)
    else:
        # Eager / SDPA: masking_utils returns a 4D attention_mask as-is (custom mask), and both
        # kernels add a float mask to the attention scores.
        mask = document_causal_mask(
            packed["seq_lens"].to(device),
            dtype=inner.get_input_embeddings().weight.dtype,
            sliding_window=getattr(config, "sliding_window", None),
        )
        out = model(**kwargs, attention_mask=mask)
    return out.logits if logits_to_keep is None else out.logits[0]
