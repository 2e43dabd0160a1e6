"""Rows to pack, the tiny model and stand-in models, shared by the attention and packing tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The embedded tiny Mistral in float32, eval mode (one per test module: tests switch its attention)."""
    from raychat.core.model.hf import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def three_rows() -> tuple[list[list[int]], list[list[float]]]:
    """Three rows of 7, 12 and 5 tokens (BOS first, at weight 0) with random ids and weights."""
    g = torch.Generator().manual_seed(0)
    rows_ids, rows_w = [], []
    for n in (7, 12, 5):
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        ids[0] = 1  # BOS
        w = torch.rand(n, generator=g).tolist()
        w[0] = 0.0
        rows_ids.append(ids)
        rows_w.append(w)
    return rows_ids, rows_w


def rows_alone(model, rows_ids) -> list[torch.Tensor]:
    """Each row's logits with the row run on its own."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in rows_ids]


class RecordingLM(torch.nn.Module):
    """Stands in for a causal LM whose attention is a flash-attention kernel (no GPU here)."""

    def __init__(self, attn_implementation):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.config = type("Config", (), {"_attn_implementation": attn_implementation, "sliding_window": None})()
        self.calls = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return type("Out", (), {"logits": torch.zeros(1, kwargs["input_ids"].shape[1], 10)})()
