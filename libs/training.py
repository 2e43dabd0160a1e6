"""Ray-free training pieces: batching, the LR schedule, DeepSpeed config and the loss step.

``jobs.train`` wires these into Ray Train; a GPU box without Ray can import them directly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from libs.config import TrainConfig
from libs.loss import WeightedCE, weighted_cross_entropy


def collate(input_ids: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], pad_id: int) -> dict[str, torch.Tensor]:
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


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """The DeepSpeed config for ``cfg`` (optimizer and scheduler are passed in as objects)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def forward_weighted_ce(model, batch: dict[str, torch.Tensor]) -> WeightedCE:
    """One forward pass and the C-RLFT sums for a collated micro-batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return weighted_cross_entropy(out.logits, batch["input_ids"], batch["weights"])
