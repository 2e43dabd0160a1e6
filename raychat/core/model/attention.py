"""Attention over packs, and which CUDA kernels run it: :class:`KernelOptions`.

A pack (:func:`raychat.core.train.pack.pack`) is one sequence of whole rows; attention must stay
inside each row. Models on a varlen kernel (flash-attention, flex) get that from the packed
``position_ids``; every other model gets :func:`packed_sdpa_attention` (registered as
:data:`PACKED_SDPA` by :func:`use_packed_attention`): one causal SDPA call per row, or on a recent
GPU one flash-attention varlen call for the whole pack, never a ``T × T`` mask.

Kernel choices are a :class:`KernelOptions` value, not module state: the training step passes it
down to the attention function (through the model's forward keyword arguments) and to the fused
cross-entropy; the serving engine passes it to :func:`sdpa_backend_scope`.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

#: Attention implementation name of :func:`packed_sdpa_attention` in transformers' ``AttentionInterface``.
PACKED_SDPA = "raychat_packed_sdpa"


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels the packed training step and the serving engine use on CUDA (CPU runs ignore them).

    Attributes:
        sdpa_backends: SDPA kernels that per-row attention and the serving engine's forward passes
            may use, in torch's ``SDPBackend`` names; ``None`` leaves the choice to torch. cuDNN's
            attention is left out by default: it builds an execution plan for every new sequence
            length, and each row of a pack (each decode step's key length) has a length of its own,
            while flash attention takes any length at no setup cost (docs/performance/training.md).
        varlen_flash: Run all rows of a pack in one flash-attention varlen call (``cu_seqlens``, as
            flash-attn's ``flash_attn_varlen_func`` does) instead of one SDPA call per row: no
            per-row slicing, concatenation or launches (docs/performance/training.md). Rows longer than a sliding window, fp32
            models and GPUs the flash kernel does not run on (:func:`varlen_flash_supported`) use
            the per-row path either way; logits and gradients match it (the ``gpu`` tests of
            tests/unit/core/model/test_attention.py).
        compile_ce_chunks_on_cuda: Whether the fused cross-entropy
            (:func:`raychat.core.train.loss.linear_weighted_cross_entropy`) compiles its per-chunk
            softmax and gradient on CUDA: the element-wise passes over each ``[chunk, vocab]``
            block become a few fused kernels.
    """

    sdpa_backends: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    varlen_flash: bool = True
    compile_ce_chunks_on_cuda: bool = True

    def __post_init__(self) -> None:
        if self.sdpa_backends is None:
            return
        from torch.nn.attention import SDPBackend

        known = [name for name in SDPBackend.__members__ if name != "ERROR"]
        backends = tuple(self.sdpa_backends)
        unknown = [name for name in backends if name not in known]
        if not backends or unknown:
            what = f"unknown {unknown}" if unknown else "none given"
            raise ValueError(f"sdpa_backends {list(backends)}: {what}; choose from {known}, or None for torch's choice")
        object.__setattr__(self, "sdpa_backends", backends)


#: The kernel choice where none is given (frozen: pass another :class:`KernelOptions` to change it).
DEFAULT_KERNELS = KernelOptions()


def varlen_flash_supported(
    device_type: str, dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None
) -> bool:
    """Whether PyTorch's flash kernel takes these inputs: CUDA, fp16/bf16, head_dim a multiple of 8
    up to 256, an Ampere or newer GPU (``capability`` ≥ (8, 0))."""
    return (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and capability is not None
        and capability >= (8, 0)
    )


def _use_varlen_flash(query: torch.Tensor, kernels: KernelOptions) -> bool:
    if not kernels.varlen_flash or not query.is_cuda:
        return False
    capability = torch.cuda.get_device_capability(query.device)
    return varlen_flash_supported(query.device.type, query.dtype, query.shape[-1], capability)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)`` for a pack's small host tensors without stalling a CUDA stream.

    A plain copy from pageable host memory makes the host wait until the GPU has finished all the
    work queued before it (once per layer, for the row bounds); from pinned memory with
    ``non_blocking`` the host goes on queueing kernels (the pinned block is not reused before the
    copy has run).
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _varlen_flash_attention(query, key, value, cu_seq_lens: torch.Tensor, max_len: int, scaling: float | None):
    """Causal flash attention over a pack's rows in one kernel; ``[1, T, heads, head_dim]`` out.

    ``cu_seq_lens`` may already be on the query's device (:func:`raychat.core.train.pack.packed_forward`
    copies it once per forward pass); a host copy is moved here.
    """
    cu = cu_seq_lens if cu_seq_lens.device == query.device else host_to_device(cu_seq_lens, query.device)
    cu = cu.to(torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]; GQA as is
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scaling)[0]
    return out.unsqueeze(0)


def sdpa_backend_scope(
    device: torch.device, kernels: KernelOptions = DEFAULT_KERNELS
) -> contextlib.AbstractContextManager:
    """The ``sdpa_kernel`` scope of ``kernels.sdpa_backends`` on CUDA; no scope elsewhere, or when it is ``None``."""
    backends = kernels.sdpa_backends
    if device.type != "cuda" or backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in backends])


def uses_varlen_kernel(attn_implementation: str | None) -> bool:
    """Whether transformers derives per-row attention from packed ``position_ids`` by itself."""
    impl = attn_implementation or ""
    return "flash" in impl or impl == "flex_attention"


def _row_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool ``[length, length]``: causal, and at most ``window`` keys back (the query included)."""
    idx = torch.arange(length, device=device)
    return (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - window)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    kernel_options: KernelOptions = DEFAULT_KERNELS,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA run separately on each row of a pack (an ``AttentionInterface`` function).

    The dense alternative (:func:`raychat.core.train.pack.document_causal_mask`) scores all ``T²``
    query/key pairs of a pack and masks most of them away; here each row ``i`` is its own causal
    SDPA call, so the work is ``Σ Lᵢ²`` and no mask is built (CPU's SDPA and CUDA's flash kernels
    both take ``is_causal``). Rows longer than ``sliding_window`` get an explicit banded mask, as
    Mistral's window needs.

    Row boundaries come from ``cu_seq_lens_q`` (the varlen kernels' keyword, which the model passes
    through to its attention); :func:`raychat.core.train.pack.packed_forward` supplies it, and the
    forward pass's ``kernel_options``. Without row boundaries the call is
    refused: transformers builds no mask for this implementation, so a padded batch would silently
    attend to padding. ``cu_seq_lens_k``, when given, is the same boundaries already on the device
    (the varlen kernel's copy; self-attention has the same rows for queries and keys).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        raise ValueError(
            f"attention {PACKED_SDPA!r} only runs packs through raychat.core.train.pack.packed_forward "
            "(cu_seq_lens_q is missing)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"a pack is one sequence (batch 1), got batch {query.shape[0]}")
    bounds = cu_seq_lens_q.tolist()
    max_len = max(end - start for start, end in itertools.pairwise(bounds))
    if (
        dropout == 0.0
        and (sliding_window is None or max_len <= sliding_window)
        and _use_varlen_flash(query, kernel_options)
    ):
        cu = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
        return _varlen_flash_attention(query, key, value, cu, max_len, scaling), None
    outs = []
    with sdpa_backend_scope(query.device, kernel_options):  # the backward pass runs the kernel the forward chose
        for start, end in itertools.pairwise(bounds):
            length = end - start
            mask = None
            if sliding_window is not None and length > sliding_window:
                mask = _row_window_mask(length, sliding_window, query.device)
            out, _ = sdpa_attention_forward(
                module,
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=True,
            )
            outs.append(out)
    return torch.cat(outs, dim=1), None


def use_packed_attention(model) -> str:
    """Selects per-row attention (:func:`packed_sdpa_attention`) for a model that trains on packs.

    Models already on a varlen kernel (flash-attention, flex) keep it: transformers derives rows
    from the packed ``position_ids`` there. Only the attention of the forward pass changes; the
    implementation is not written into saved configs, so checkpoints load with plain transformers.
    The kernel choice is not fixed here: each forward pass brings its :class:`KernelOptions`
    (:func:`raychat.core.train.pack.packed_forward`).

    Args:
        model: A transformers ``PreTrainedModel`` (before any PEFT wrapping).

    Returns:
        The attention implementation the model now uses.
    """
    from transformers import AttentionInterface

    if uses_varlen_kernel(getattr(model.config, "_attn_implementation", None)):
        return model.config._attn_implementation
    if PACKED_SDPA not in AttentionInterface._global_mapping:
        # Never traced by torch.compile (raychat.core.model.compile.compile_blocks): it reads row bounds on the host.
        AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
    model.set_attn_implementation(PACKED_SDPA)
    return PACKED_SDPA
