"""The MFU arithmetic of benchmarks/train_throughput.py (the GPU figures in docs/performance/ rest on it)."""

import pytest

from benchmarks.train_throughput import attention_length, mfu


def test_attention_length_is_token_weighted():
    # 1000 tokens attend within a 1000-token row, 10 within a 10-token row: not the plain mean 505.
    assert attention_length([1000, 10]) == pytest.approx((1000**2 + 10**2) / 1010)
    assert attention_length([]) == 0


def test_mfu_counts_matrix_weights_and_attention():
    # 6 FLOPs per matrix weight per token + 12·L·H·ℓ, over the peak.
    assert mfu(10**9, 10_000, 16, 2048, 1000, 989) == pytest.approx(10_000 * (6e9 + 12 * 16 * 2048 * 1000) / 989e12)
