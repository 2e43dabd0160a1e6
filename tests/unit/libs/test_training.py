import math

import pytest
import torch

from libs.config import TrainConfig
from libs.training import collate, deepspeed_config, forward_weighted_ce, lr_multiplier, openchat_auto_lr


def test_collate_right_pads_with_zero_weight_and_mask():
    b = collate([[1, 2, 3], [1, 2]], [[0, 1, 1], [0, 0.5]], pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 2, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["weights"][1].tolist() == [0, 0.5, 0]


def test_lr_warms_up_then_decays_to_floor():
    lrs = [lr_multiplier(s, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_multiplier(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_deepspeed_config_follows_train_config():
    ds = deepspeed_config(TrainConfig(data="d", output="o", zero_stage=3, grad_accum=4, grad_clip=0.5), bf16=True)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 1  # one pack per micro-step
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.5


def test_openchat_auto_lr_scales_with_sqrt_of_supervised_tokens():
    # OpenChat: 3e-4 / 6 (Mistral) × √(77824 × 16 × 0.5 / 4M)
    lr = openchat_auto_lr(77824, 16, 0.5, "mistral")
    assert lr == pytest.approx(3e-4 / 6 * math.sqrt(77824 * 16 * 0.5 / 4_000_000))
    assert lr == pytest.approx(1.9726e-5, rel=1e-4)
    assert openchat_auto_lr(77824, 64, 0.5, "mistral") == pytest.approx(2 * lr)  # 4× tokens → 2× LR
    assert openchat_auto_lr(77824, 16, 0.5, "llama") == pytest.approx(6 * lr)
    assert openchat_auto_lr(77824, 8, 0.5, "mistral", accum=2) == pytest.approx(lr)


def test_lora_with_zero3_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match="lora_r with zero_stage 3"):
        TrainConfig(data="d", output="o", zero_stage=3, lora_r=8)


def test_training_steps_reduce_weighted_loss_on_tiny_model(tiny_model_dir, tokenizer):
    from libs.model import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir)
    batch = collate([[1, 420, 6316, 28781, 3198, 32000]] * 2, [[0, 0, 1, 1, 1, 1]] * 2, pad_id=32001)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        parts = forward_weighted_ce(model, batch)
        loss = parts.loss_sum / parts.weight_sum
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
