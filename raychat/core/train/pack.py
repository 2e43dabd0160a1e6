"""Padding-free packing of training rows (OpenChat's multipack idea), and a packed forward pass.

Planning (:func:`plan_epoch`)
    Every optimizer step gives each of ``num_ranks`` ranks one *pack*: a list of whole rows whose
    total length is at most ``batch_max_len`` tokens. Following OpenChat's
    ``MultipackDistributedSampler``:

    1. Rows are shuffled with a numpy ``Generator`` seeded by ``(seed, epoch)``.
    2. The shuffled order is consumed in large groups of ``B`` bins of capacity ``batch_max_len``
       (``group_bins`` rounded down to whole steps, i.e. a multiple of ``num_ranks``; fewer at the
       end of the epoch). For each group a binary search finds the longest
       *prefix* of the not-yet-packed rows that best-fit-decreasing (BFD: first-fit-decreasing,
       but into the tightest bin that fits, found with ``bisect`` in O(log B)) can fit into the
       ``B`` bins. Rows after that prefix simply stay first in line for the next group, so which
       rows wait (and, at the end of the epoch, which rows are left out) is decided by the
       shuffle, never by row length: short or long rows are not systematically starved.
    3. The ``B`` bins of a group are shuffled and dealt out ``num_ranks`` at a time, so every
       rank gets exactly the same number of steps.
    4. When less than one step's worth of tokens remains, the rest of the epoch's rows are left
       out (``PackingPlan.left_out``); a fresh shuffle next epoch makes them as likely to be used
       as any other row.

    Packing a group of many bins at once (rather than OpenChat's one step at a time) gives BFD
    plenty of small rows to fill gaps with, which is what keeps efficiency above ~99.5%.

Packing and the forward pass (:func:`pack`, :func:`packed_forward`)
    A pack is one sequence ``[1, total]`` with no padding. ``position_ids`` restart at 0 for each
    row and attention is causal *within* a row and never crosses rows (block-diagonal), so every
    row's logits equal those of running it alone.

    Loss invariant: :func:`raychat.core.train.loss.weighted_cross_entropy` shifts internally, so the last token
    of row ``k`` "predicts" the first token of row ``k + 1`` with weight ``weights[first of k+1]``.
    Every row starts with BOS at weight 0, so that cross-row prediction carries no loss and the
    pack's Σ w·CE and Σ w equal the sums over its rows computed separately. :func:`pack` enforces
    this by rejecting rows whose first weight is not 0.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_GROUP_BINS = 128

# Lower bounds tried (as a fraction of the group's capacity) before bisecting on the prefix
# length: the best prefix nearly always fills the bins to >99.5%, so bracketing it closely
# first saves most of the BFD runs.
_GALLOP_FILL = (0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.6, 0.3)


@dataclass
class PackingPlan:
    """One epoch of packs.

    Attributes:
        steps: ``steps[s][rank]`` is the list of row indices that ``rank`` packs at step ``s``.
        efficiency: Σ packed tokens / (num_steps · num_ranks · batch_max_len).
        left_out: Number of rows not used in this epoch.
    """

    steps: list[list[list[int]]]
    efficiency: float
    left_out: int

    @property
    def num_steps(self) -> int:
        """Number of optimizer steps in the epoch (identical for every rank)."""
        return len(self.steps)

    def for_rank(self, rank: int) -> list[list[int]]:
        """The packs (lists of row indices) of one rank, one per step."""
        return [step[rank] for step in self.steps]


def _best_fit_decreasing(sizes: list[int], ids: list[int], capacity: int, num_bins: int) -> list[list[int]] | None:
    """Packs items (already sorted by decreasing size) into ``num_bins`` bins, tightest fit first.

    Returns:
        The item ids per bin, or ``None`` as soon as one item fits in no bin.
    """
    # Each bin is the int ``remaining * num_bins + bin``: sorting these sorts by remaining capacity,
    # and ``bisect_left(keys, size * num_bins)`` finds the tightest bin with remaining >= size.
    keys = list(range(capacity * num_bins, capacity * num_bins + num_bins))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for size, item in zip(sizes, ids):
        i = bisect_left(keys, size * num_bins)
        if i == num_bins:
            return None
        key = keys.pop(i)
        bins[key % num_bins].append(item)
        insort(keys, key - size * num_bins)
    return bins


def _pack_prefix(window: np.ndarray, capacity: int, num_bins: int) -> tuple[int, list[list[int]]]:
    """The longest prefix of ``window`` (row lengths) that BFD fits into ``num_bins`` bins.

    Returns:
        ``(m, bins)``: the prefix length and its packing (positions within ``window``).
    """
    cum = np.cumsum(window)
    # Stable sort on -length: ties keep shuffled order, so the result is deterministic.
    desc = np.argsort(-window, kind="stable")
    desc_sizes = window[desc]

    def attempt(m: int) -> list[list[int]] | None:
        keep = desc < m
        return _best_fit_decreasing(desc_sizes[keep].tolist(), desc[keep].tolist(), capacity, num_bins)

    total = num_bins * capacity
    hi = int(np.searchsorted(cum, total, side="right"))  # no longer prefix can fit by token count
    best = attempt(hi)
    if best is not None:
        return hi, best
    lo, lo_bins = 0, [[] for _ in range(num_bins)]
    for fill in _GALLOP_FILL:
        m = min(int(np.searchsorted(cum, total * fill, side="right")), hi - 1)
        if m <= lo:
            continue
        found = attempt(m)
        if found is not None:
            lo, lo_bins = m, found
            break
        hi = m
    # Invariant: prefix lo fits, prefix hi does not (BFD is not strictly monotone in the prefix
    # length, so this is a very good prefix rather than provably the longest one).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = attempt(mid)
        if found is None:
            hi = mid
        else:
            lo, lo_bins = mid, found
    return lo, lo_bins


def plan_epoch(
    lengths: Sequence[int],
    batch_max_len: int,
    num_ranks: int,
    seed: int,
    epoch: int,
    *,
    group_bins: int = DEFAULT_GROUP_BINS,
) -> PackingPlan:
    """Plans one epoch of multipack steps; see the module docstring for the algorithm.

    Args:
        lengths: Token count of every row (row index = position in this sequence).
        batch_max_len: Token budget of one pack (one rank, one step).
        num_ranks: Data-parallel world size; every step has exactly one pack per rank.
        seed: Shuffle seed (non-negative).
        epoch: Epoch number (non-negative); each epoch gets a different shuffle.
        group_bins: Packs solved together as one bin-packing problem (rounded to whole steps,
            at least one); larger packs tighter.

    Returns:
        The epoch's plan. Deterministic in all arguments.

    Raises:
        ValueError: On a row longer than ``batch_max_len``, a non-positive row length, or
            non-positive ``batch_max_len`` / ``num_ranks`` / ``group_bins``.
    """
    if batch_max_len < 1 or num_ranks < 1 or group_bins < 1:
        raise ValueError(
            f"batch_max_len, num_ranks and group_bins must be >= 1, got {batch_max_len}, {num_ranks}, {group_bins}"
        )
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lens.size and lens.max() > batch_max_len:
        raise ValueError(
            f"a row of {int(lens.max())} tokens is longer than batch_max_len={batch_max_len}; "
            "truncate or drop such rows, or raise the budget"
        )
    if lens.size and lens.min() < 1:
        raise ValueError(f"row lengths must be >= 1, got {int(lens.min())}")

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lens.size)
    shuffled = lens[order]
    cum = np.cumsum(shuffled)
    total = int(cum[-1]) if lens.size else 0
    step_tokens = num_ranks * batch_max_len
    group_steps = max(1, group_bins // num_ranks)

    steps: list[list[list[int]]] = []
    packed_tokens = 0
    # Rows (positions in the shuffled order) that did not make it into the previous group; they go
    # first in the next one, followed by fresh rows from ``pos`` on.
    carry = np.empty(0, dtype=np.int64)
    carry_tokens = 0
    pos = 0
    while True:
        done = int(cum[pos - 1]) if pos else 0
        available = carry_tokens + total - done
        if available < step_tokens:
            break
        num_bins = num_ranks * min(group_steps, available // step_tokens)
        # Fresh rows up to one past the group's token capacity: no longer prefix can fit.
        end = int(np.searchsorted(cum, done + num_bins * batch_max_len - carry_tokens, side="right")) + 1
        end = max(pos, min(end, lens.size))
        window_pos = np.concatenate([carry, np.arange(pos, end)])
        m, bins = _pack_prefix(shuffled[window_pos], batch_max_len, num_bins)
        bins = [b for b in bins if b]
        # Normally all bins are used; if not, keep whole steps and carry the other rows over.
        kept = len(bins) - len(bins) % num_ranks
        if kept == 0:
            break
        perm = rng.permutation(kept)
        for s in range(0, kept, num_ranks):
            step = [sorted(order[window_pos[bins[b]]].tolist()) for b in perm[s : s + num_ranks]]
            steps.append(step)
            packed_tokens += int(sum(lens[p].sum() for p in step))
        dropped = [j for b in bins[kept:] for j in b]
        carry = np.concatenate([window_pos[dropped], window_pos[m:]]).astype(np.int64)
        carry_tokens = int(shuffled[carry].sum())
        pos = end

    used = sum(len(p) for step in steps for p in step)
    capacity = len(steps) * step_tokens
    return PackingPlan(steps=steps, efficiency=packed_tokens / capacity if capacity else 0.0, left_out=lens.size - used)


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


#: Attention implementation name of :func:`packed_sdpa_attention` in transformers' ``AttentionInterface``.
PACKED_SDPA = "raychat_packed_sdpa"


#: SDPA kernels the per-row attention may use on CUDA, in torch's ``SDPBackend`` names; ``None``
#: leaves the choice to torch. cuDNN's attention is left out: it builds an execution plan for every
#: new sequence length, and each row of a pack has a length of its own. Flash attention takes any
#: length at no setup cost. Measured on an H200 (0.85B Mistral, bf16, 16k-token packs of new
#: lengths each step): 1341 ms per step with torch's choice (cuDNN) against 290 ms with these.
PACKED_SDPA_BACKENDS: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


#: On CUDA, run all rows of a pack in one flash-attention varlen call (``cu_seqlens``, as
#: flash-attn's ``flash_attn_varlen_func`` does) instead of one SDPA call per row: no per-row
#: slicing, concatenation or launches. Rows longer than a sliding window, fp32 models and GPUs
#: the flash kernel does not run on (see :func:`varlen_flash_supported`) use the per-row path.
#: Measured on an H200 (0.85B Mistral, bf16, 16k-token packs): 250 ms per step against 287 ms
#: per row; logits and gradients match the per-row path (the ``gpu`` tests of test_packing.py).
PACKED_VARLEN_FLASH: bool = True


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


def _use_varlen_flash(query: torch.Tensor) -> bool:
    if not PACKED_VARLEN_FLASH or not query.is_cuda:
        return False
    capability = torch.cuda.get_device_capability(query.device)
    return varlen_flash_supported(query.device.type, query.dtype, query.shape[-1], capability)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)`` for a pack's small host tensors without stalling a CUDA stream.

    A plain copy from pageable host memory makes the host wait until the GPU has finished all the
    work queued before it; from pinned memory with ``non_blocking`` the host goes on queueing
    kernels (the pinned block is not reused before the copy has run). Measured on an H200: ~20
    such waits a step (one per layer) before this.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _varlen_flash_attention(query, key, value, cu_seq_lens: torch.Tensor, max_len: int, scaling: float | None):
    """Causal flash attention over a pack's rows in one kernel; ``[1, T, heads, head_dim]`` out.

    ``cu_seq_lens`` may already be on the query's device (:func:`packed_forward` copies it once
    per forward pass); a host copy is moved here.
    """
    cu = cu_seq_lens if cu_seq_lens.device == query.device else host_to_device(cu_seq_lens, query.device)
    cu = cu.to(torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]; GQA as is
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scaling)[0]
    return out.unsqueeze(0)


def sdpa_backend_scope(device: torch.device):
    """The ``sdpa_kernel`` scope of :data:`PACKED_SDPA_BACKENDS` on CUDA; no scope elsewhere."""
    import contextlib

    if device.type != "cuda" or PACKED_SDPA_BACKENDS is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in PACKED_SDPA_BACKENDS])


def _uses_varlen_kernel(attn_implementation: str | None) -> bool:
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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA run separately on each row of a pack (an ``AttentionInterface`` function).

    The dense alternative (:func:`document_causal_mask`) scores all ``T²`` query/key pairs of a
    pack and masks most of them away; here each row ``i`` is its own causal SDPA call, so the work
    is ``Σ Lᵢ²`` and no mask is built (CPU's SDPA and CUDA's flash kernels both take ``is_causal``).
    Rows longer than ``sliding_window`` get an explicit banded mask, as Mistral's window needs.

    Row boundaries come from ``cu_seq_lens_q`` (the varlen kernels' keyword, which the model passes
    through to its attention); :func:`packed_forward` supplies it. Without it the call is refused:
    transformers builds no mask for this implementation, so a padded batch would silently attend
    to padding. ``cu_seq_lens_k``, when given, is the same boundaries already on the device (the
    varlen kernel's copy; self-attention has the same rows for queries and keys).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        raise ValueError(
            f"attention {PACKED_SDPA!r} only runs packs through raychat.core.train.pack.packed_forward (cu_seq_lens_q is missing)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"a pack is one sequence (batch 1), got batch {query.shape[0]}")
    bounds = cu_seq_lens_q.tolist()
    max_len = max(end - start for start, end in itertools.pairwise(bounds))
    if dropout == 0.0 and (sliding_window is None or max_len <= sliding_window) and _use_varlen_flash(query):
        cu = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
        return _varlen_flash_attention(query, key, value, cu, max_len, scaling), None
    outs = []
    with sdpa_backend_scope(query.device):  # the backward pass runs the kernel the forward chose
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

    Args:
        model: A transformers ``PreTrainedModel`` (before any PEFT wrapping).

    Returns:
        The attention implementation the model now uses.
    """
    from transformers import AttentionInterface

    if _uses_varlen_kernel(getattr(model.config, "_attn_implementation", None)):
        return model.config._attn_implementation
    if PACKED_SDPA not in AttentionInterface._global_mapping:
        # Never traced by torch.compile (raychat.core.model.hf.compile_blocks): it reads row bounds on the host.
        AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
    model.set_attn_implementation(PACKED_SDPA)
    return PACKED_SDPA


def packed_forward(model, packed: dict[str, torch.Tensor], logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Runs an HF causal LM on a pack without attention crossing rows.

    Args:
        model: A transformers causal LM (e.g. ``MistralForCausalLM``), or a wrapper exposing it as
            ``.module``.
        packed: Output of :func:`pack`.
        logits_to_keep: Optional bool ``[1, T]`` mask: the LM head runs only at these positions
            (transformers' ``logits_to_keep``), e.g. :func:`raychat.core.train.loss.loss_positions`.

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
        out = model(**kwargs, cu_seq_lens_q=cu, **extra)
    elif _uses_varlen_kernel(impl):
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


# --- the training feed: a multi-epoch plan as per-row tables, and regrouping rows into packs ------


@dataclass
class FeedPlan:
    """Every epoch's packs for every rank, as per-row tables (what the data feed joins rows against).

    Rows are addressed by their position ``i`` in the ``lengths`` given to :func:`plan_feed`. For
    epoch ``e``, row ``i`` goes to rank ``rank[e, i]`` (-1: not used that epoch) as position
    ``pos[e, i]`` of *micro-batch* ``micro[e, i]``. Micro-batches are numbered globally across
    epochs, ``micro = optimizer_step * accum + m`` with ``m < accum``, so a rank's rows sorted by
    ``(micro, pos)`` are exactly its packs in training order, and resuming at optimizer step ``s``
    means skipping micro-batches below ``s * accum``.

    Attributes:
        steps_per_epoch: Optimizer steps of each epoch (identical for every rank).
        efficiency: Packing efficiency of each epoch (real tokens / token budget).
        left_out: Rows not used in each epoch (they get a fresh chance in the next shuffle).
        too_long: Rows longer than ``batch_max_len`` (never used).
        rank, micro, pos: ``[epochs, rows]`` tables (int16, int64, int32).
    """

    steps_per_epoch: list[int]
    efficiency: list[float]
    left_out: list[int]
    too_long: int
    rank: np.ndarray
    micro: np.ndarray
    pos: np.ndarray

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all epochs."""
        return sum(self.steps_per_epoch)

    def rows_of(self, epoch: int, rank: int) -> np.ndarray:
        """Row indices ``rank`` trains on in ``epoch``, in training order."""
        sel = np.flatnonzero(self.rank[epoch] == rank)
        return sel[np.lexsort((self.pos[epoch, sel], self.micro[epoch, sel]))]


def plan_feed(
    lengths: Sequence[int],
    batch_max_len: int,
    num_ranks: int,
    seed: int,
    epochs: int,
    *,
    accum: int = 1,
    group_bins: int = DEFAULT_GROUP_BINS,
) -> FeedPlan:
    """Plans ``epochs`` epochs of packs with :func:`plan_epoch` and turns them into row tables.

    Each optimizer step gives every rank ``accum`` packs (gradient accumulation): the epoch is
    planned for ``num_ranks * accum`` packs per step and rank ``r`` takes packs
    ``r * accum ... r * accum + accum - 1`` of each step. Rows longer than ``batch_max_len`` are
    never used (counted in ``too_long``) instead of failing the run.

    Returns:
        The :class:`FeedPlan`; deterministic in all arguments.
    """
    if accum < 1 or epochs < 1:
        raise ValueError(f"accum and epochs must be >= 1, got {accum}, {epochs}")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    eligible = np.flatnonzero((lens <= batch_max_len) & (lens >= 1))
    n = lens.size
    rank = np.full((epochs, n), -1, dtype=np.int16)
    micro = np.full((epochs, n), -1, dtype=np.int64)
    pos = np.full((epochs, n), -1, dtype=np.int32)
    steps_per_epoch, efficiency, left_out = [], [], []
    done_steps = 0
    for e in range(epochs):
        plan = plan_epoch(lens[eligible], batch_max_len, num_ranks * accum, seed, e, group_bins=group_bins)
        for s, step in enumerate(plan.steps):
            for k, rows in enumerate(step):
                idx = eligible[np.asarray(rows, dtype=np.int64)]
                rank[e, idx] = k // accum
                micro[e, idx] = (done_steps + s) * accum + k % accum
                pos[e, idx] = np.arange(idx.size, dtype=np.int32)
        steps_per_epoch.append(plan.num_steps)
        efficiency.append(plan.efficiency)
        left_out.append(plan.left_out + (n - eligible.size))
        done_steps += plan.num_steps
    return FeedPlan(steps_per_epoch, efficiency, left_out, int(n - eligible.size), rank, micro, pos)


def row_keys(files: Sequence[str], indices: Sequence[int]) -> np.ndarray:
    """A stable 64-bit key per training row from its source ``(file, index)`` (unique per data run).

    The data stage writes one row per source record, so ``(file, index)`` identifies a row
    whatever order a reader yields rows in; the key is what the feed joins rows to the plan on.
    """
    import hashlib

    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(f"{f}\x00{i}".encode(), digest_size=8).digest(), "little")
            for f, i in zip(files, indices)
        ),
        dtype=np.uint64,
        count=len(files),
    )


def group_packs(batches) -> Iterator[tuple[int, list, list]]:
    """Regroups a rank's row stream (sorted by micro-batch, then position) into whole packs.

    Args:
        batches: Iterable of dicts with ``micro`` (int array), ``input_ids`` and ``weights``
            (sequences of per-row arrays), as Ray Data's ``iter_batches(batch_format="numpy")``
            yields them; a pack may span batch boundaries.

    Yields:
        ``(micro, rows_ids, rows_weights)`` per pack, in stream order.

    Raises:
        ValueError: If a micro-batch number reappears after another one (the stream is not sorted).
    """
    current, ids, ws = None, [], []
    seen: set[int] = set()
    for batch in batches:
        for m, row_ids, row_w in zip(batch["micro"], batch["input_ids"], batch["weights"]):
            m = int(m)
            if m != current:
                if current is not None:
                    yield current, ids, ws
                if m in seen:
                    raise ValueError(
                        f"micro-batch {m} appears twice in the stream: rows are not sorted by (micro, pos)"
                    )
                seen.add(m)
                current, ids, ws = m, [], []
            ids.append(row_ids)
            ws.append(row_w)
    if current is not None:
        yield current, ids, ws
