"""The MFU arithmetic of benchmarks/train_throughput.py (the GPU figures in docs/performance/ rest on it)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from train_throughput import attention_length, build_model, mfu


def test_attention_length_is_token_weighted():
    # 1000 tokens attend within a 1000-token row, 10 within a 10-token row: not the plain mean 505.
    assert attention_length([1000, 10]) == pytest.approx((1000**2 + 10**2) / 1010)
    assert attention_length([]) == 0


def test_mfu_counts_matrix_weights_and_attention():
    # 6 FLOPs per matrix weight per token + 12·L·H·ℓ, over the peak.
    assert mfu(10**9, 10_000, 16, 2048, 1000, 989) == pytest.approx(10_000 * (6e9 + 12 * 16 * 2048 * 1000) / 989e12)


def test_the_1b_benchmark_model_has_787m_matrix_weights():
    import torch

    with torch.device("meta"):
        model = build_model("1b", 32002, 2048, "meta", torch.bfloat16, seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert total == 852_568_064
    assert total - model.get_input_embeddings().weight.numel() == 787_027_968


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_1b_benchmark_model_has_the_same_weights_with_heads_of_64_or_128(head_dim):
    import torch

    with torch.device("meta"):
        model = build_model("1b", 32002, 2048, "meta", torch.bfloat16, seed=0, head_dim=head_dim)
    assert model.config.num_attention_heads * head_dim == 2048
    assert model.config.num_attention_heads == 4 * model.config.num_key_value_heads
    assert sum(p.numel() for p in model.parameters()) == 852_568_064
