"""Ray-free training pieces: the packed C-RLFT step, the LR schedule and the DeepSpeed config.

``raychat.jobs.train`` wires these into Ray Train; a GPU box without Ray or DeepSpeed can import them
directly. One packed training step, as the job runs it::

    from raychat.core.train.pack import pack
    from raychat.core.train.step import forward_packed_ce, train_step

    packed = pack(rows_ids, rows_weights)            # whole conversations, no padding
    parts = forward_packed_ce(model, packed)         # Σ w·CE, Σ w, Σ w·correct of the pack
    (parts.loss_sum / parts.weight_sum).backward()   # one process, one pack: the C-RLFT loss

``train_step(engine, [packed, ...], world, all_reduce)`` is the full data-parallel step: Σ w over
every rank's accumulation packs is known before the first backward, so the gradients equal those
of Σ w·CE / Σ w over the global batch however tokens are split across ranks and micro-steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from raychat.core.model.attention import DEFAULT_KERNELS, KernelOptions, host_to_device
from raychat.core.train.loss import (
    WeightedCE,
    crlft_loss,
    linear_weighted_cross_entropy,
    loss_positions,
    weighted_cross_entropy,
    weighted_cross_entropy_at,
)
from raychat.core.train.pack import packed_forward

if TYPE_CHECKING:  # pydantic is not needed to train a step: a GPU box may have torch and transformers only
    from raychat.core.config import TrainConfig

#: OpenChat's reference point for the automatic LR: LLaMA's 3e-4 at a 4M-token batch.
OPENCHAT_BASE_LR = 3e-4
OPENCHAT_BASE_TOKENS = 4_000_000
#: OpenChat divides the base LR by 6 for Mistral models.
OPENCHAT_LR_DIVISORS = {"mistral": 6.0}


class Engine(Protocol):
    """What :func:`train_step` needs: DeepSpeed's engine API (a model that also steps itself)."""

    def __call__(self, **kwargs): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


def collate(
    input_ids: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pads a micro-batch; padding gets weight 0 and attention mask 0."""
    width = max(len(x) for x in input_ids)
    n = len(input_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    w = torch.zeros((n, width), dtype=torch.float32)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (x, wx) in enumerate(zip(input_ids, weights)):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        w[i, : len(x)] = torch.as_tensor(wx, dtype=torch.float32)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "weights": w}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def openchat_auto_lr(
    batch_max_len: int, num_ranks: int, supervised_ratio: float, model_type: str, accum: int = 1
) -> float:
    """OpenChat's automatic learning rate: LLaMA's LR scaled by √(supervised tokens per step / 4M).

    ``lr = base · √(batch_max_len · ranks · accum · supervised_ratio / 4_000_000)`` with base 3e-4
    (÷ 6 for Mistral), as in ``ochat/training_deepspeed/train.py``; ``supervised_ratio`` is the
    share of tokens with a non-zero loss weight.
    """
    base = OPENCHAT_BASE_LR
    for name, divisor in OPENCHAT_LR_DIVISORS.items():
        if name in model_type.lower():
            base /= divisor
    supervised_tokens = batch_max_len * num_ranks * accum * supervised_ratio
    return base * math.sqrt(supervised_tokens / OPENCHAT_BASE_TOKENS)


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """The DeepSpeed config for ``cfg`` (optimizer and scheduler are passed in as objects).

    One micro-batch is one pack (``train_micro_batch_size_per_gpu`` 1); ``grad_accum`` packs make
    an optimizer step.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        # The optimizer is a torch one passed in; ZeRO only checks it is one of its known kinds.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def forward_weighted_ce(model, batch: dict[str, torch.Tensor]) -> WeightedCE:
    """One forward pass and the C-RLFT sums for a collated (padded) micro-batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return weighted_cross_entropy(out.logits, batch["input_ids"], batch["weights"])


def forward_packed_ce(model, packed: dict[str, torch.Tensor], kernels: KernelOptions = DEFAULT_KERNELS) -> WeightedCE:
    """One forward pass over a pack from :func:`raychat.core.train.pack.pack` and its C-RLFT sums.

    Attention never crosses conversations (see :func:`raychat.core.train.pack.packed_forward`), and the sums
    equal those of running each conversation alone. The LM head and the cross-entropy run only at
    the positions whose next token has a non-zero weight (:func:`raychat.core.train.loss.loss_positions`): every
    other position adds exactly 0 to the sums and their gradients. With a plain bias-free linear
    head they run fused, by chunks (:func:`raychat.core.train.loss.linear_weighted_cross_entropy`), so the
    ``[positions, vocab]`` logits are never held whole; otherwise (a ZeRO-3-partitioned or
    adapter-wrapped head) through transformers' ``logits_to_keep``. ``kernels`` is the CUDA kernel
    choice of the attention and of the fused loss.
    """
    keep = loss_positions(packed["weights"])
    shifted = keep[:, :-1]  # position t predicts token t + 1
    targets = packed["input_ids"][:, 1:][shifted]
    weights = packed["weights"][:, 1:][shifted]
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    if not _fusable_head(head, inner.config):
        logits = packed_forward(model, packed, logits_to_keep=keep, kernels=kernels)
        return weighted_cross_entropy_at(
            logits.reshape(-1, logits.size(-1)), targets.to(logits.device), weights.to(logits.device)
        )
    # The model runs as usual (through the engine: its hooks, checkpointing) but with no position
    # kept, so its own head does no work; the final hidden states come from the decoder's output.
    captured: list[torch.Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        packed_forward(model, packed, logits_to_keep=torch.zeros_like(keep), kernels=kernels)
    finally:
        hook.remove()
    (hidden,) = captured
    device = hidden.device
    # Kept positions as indices worked out where ``keep`` lives (the host, for a pack from
    # raychat.core.train.pack.pack): a boolean mask indexed on the GPU would wait for the whole forward pass.
    rows = host_to_device(keep[0].nonzero().squeeze(1), device)
    return linear_weighted_cross_entropy(
        hidden[0].index_select(0, rows),
        head.weight,
        host_to_device(targets, device),
        host_to_device(weights, device),
        compiled=device.type == "cuda" and kernels.compile_ce_chunks_on_cuda,
    )


#: Causal LMs whose logits are exactly ``lm_head(hidden)`` (no softcapping or logit scaling after
#: it, as Gemma-2 or Cohere apply): only their head is replaced by the fused loss.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"mistral", "llama", "qwen2", "qwen3"})


def _fusable_head(head, config) -> bool:
    """Whether the LM head is a plain bias-free linear layer, whose full weight is at hand, of a
    model that applies nothing after it."""
    return (
        getattr(config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES
        and type(head) is torch.nn.Linear
        and head.bias is None
        and not hasattr(head.weight, "ds_id")  # a ZeRO-3 partition: the weight is gathered only in its forward
    )


def pack_weight_sum(packed: dict[str, torch.Tensor]) -> float:
    """Σ w of a pack as :func:`raychat.core.train.loss.weighted_cross_entropy` counts it (first position excluded)."""
    return float(packed["weights"][:, 1:].sum())


@dataclass
class StepResult:
    """Global (all ranks, all micro-steps) results of one optimizer step."""

    loss: float
    weighted_accuracy: float
    weight_sum: float
    tokens: int  # real tokens of the step's packs, all ranks

    def as_dict(self) -> dict:
        return {"loss": self.loss, "weighted_accuracy": self.weighted_accuracy, "weight_sum": self.weight_sum}


AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def train_step(
    engine: Engine,
    packs: Sequence[dict[str, torch.Tensor]],
    world: int = 1,
    all_reduce: AllReduce = _identity,
    gas_divides: bool = True,
    kernels: KernelOptions = DEFAULT_KERNELS,
) -> StepResult:
    """One optimizer step over this rank's ``packs`` (one per accumulation micro-step).

    Σ w of the whole global batch is all-reduced *before* the first backward (the weights are in
    the data), so each micro-step's loss is ``Σ w·CE_local · world · accum / Σ w_global``: the
    engine averages gradients over ranks (÷ world) and, like DeepSpeed with ``gas_divides``,
    divides each micro-step's loss by ``accum``; what remains is exactly the gradient of
    Σ w·CE / Σ w over every token of the step.

    Args:
        engine: A DeepSpeed engine (``backward`` then ``step`` per micro-step).
        packs: This rank's packs for the step; every rank must pass the same number.
        world: Data-parallel ranks.
        all_reduce: In-place sum over ranks (``torch.distributed.all_reduce``); identity alone.
        gas_divides: Whether ``engine.backward`` divides by the accumulation steps (DeepSpeed does).
        kernels: The CUDA kernel choice of the forward pass and the loss.
    """
    device = getattr(engine, "device", None)
    accum = len(packs)
    local_w = sum(pack_weight_sum(p) for p in packs)
    global_w = all_reduce(torch.tensor([local_w], dtype=torch.float64, device=device))
    global_w = float(global_w[0])
    scale = world * (accum if gas_divides else 1)
    loss_sum = correct = 0.0
    tokens = 0
    for packed in packs:
        parts = forward_packed_ce(engine, packed, kernels)
        engine.backward(crlft_loss(parts, global_w, scale))
        engine.step()
        loss_sum += float(parts.loss_sum.detach())
        correct += float(parts.correct_weight)
        tokens += int(packed["input_ids"].numel())
    stats = all_reduce(torch.tensor([loss_sum, correct, tokens], dtype=torch.float64, device=device))
    denom = max(global_w, 1e-8)
    return StepResult(float(stats[0]) / denom, float(stats[1]) / denom, global_w, int(stats[2]))


def eval_sums(model, packed: dict[str, torch.Tensor], kernels: KernelOptions = DEFAULT_KERNELS) -> tuple[float, float]:
    """``(Σ w·CE, Σ w)`` of a pack without gradients (combine across packs and ranks, then divide)."""
    with torch.no_grad():
        parts = forward_packed_ce(model, packed, kernels)
    return float(parts.loss_sum), float(parts.weight_sum)
