"""What the training benchmarks share: rows to train on, the job's optimizer, a device sync."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Rows:
    """Training rows: token ids and their unshifted loss weights."""

    input_ids: list[list[int]]
    weights: list[list[float]]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])

    @property
    def supervised(self) -> int:
        return int(sum(sum(1 for w in ws if w > 0) for ws in self.weights))


def synthetic_rows(n: int, max_length: int, vocab: int, seed: int = 0) -> Rows:
    """Log-normal lengths like ShareGPT V3's (median ≈ 1.1k tokens, long tail), clipped to ``max_length``."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=6.9, sigma=1.0, size=n).astype(int), 16, max_length)
    ids, weights = [], []
    for n_tok in lengths.tolist():
        ids.append([1] + rng.integers(3, vocab, n_tok - 1).tolist())
        half = n_tok // 3
        weights.append([0.0] * half + [1.0] * (n_tok - half))
    return Rows(ids, weights)


def make_optimizer(model, device: str) -> torch.optim.Optimizer:
    """AdamW as the job configures it (β 0.9/0.95, wd 0.1); fused on CUDA, as DeepSpeed's FusedAdam is."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")


def sync(device: str) -> None:
    """Waits for the device's queued work (CUDA), so a wall-clock time covers it."""
    if device == "cuda":
        torch.cuda.synchronize()
