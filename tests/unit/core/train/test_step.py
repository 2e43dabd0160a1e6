import itertools
import math

import pytest
import torch

from raychat.core.config import TrainConfig
from raychat.core.train.step import collate, deepspeed_config, forward_weighted_ce, lr_multiplier, openchat_auto_lr


def test_collate_right_pads_with_zero_weight_and_mask():
    b = collate([[1, 2, 3], [1, 2]], [[0, 1, 1], [0, 0.5]], pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 2, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["weights"][1].tolist() == [0, 0.5, 0]


def test_lr_warms_up_then_decays_to_floor():
    lrs = [lr_multiplier(s, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
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


def test_compile_blocks_with_zero3_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match="compile_blocks with zero_stage 3"):
        TrainConfig(data="d", output="o", zero_stage=3, compile_blocks="layers")
    assert TrainConfig(data="d", output="o", compile_blocks="norms-mlps").compile_blocks == "norms-mlps"
    with pytest.raises(ValueError, match="compile_blocks"):
        TrainConfig(data="d", output="o", compile_blocks="everything")


def test_training_steps_reduce_weighted_loss_on_tiny_model(tiny_model_dir, tokenizer):
    from raychat.core.model.hf import load_causal_lm

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


# --- the optimised packed step is exact: loss and gradients equal the unoptimised reference -------

from unittest import mock  # noqa: E402

import raychat.core.train.step  # noqa: E402
from raychat.core.model.attention import use_packed_attention  # noqa: E402
from raychat.core.train.loss import weighted_cross_entropy  # noqa: E402
from raychat.core.train.pack import pack, packed_forward  # noqa: E402
from raychat.core.train.step import forward_packed_ce  # noqa: E402


def _random_pack(lengths: list[int], prompt_lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Rows with BOS, a zero-weight prompt prefix of the given length, then random rewards (some 0)."""
    g = torch.Generator().manual_seed(seed)
    rows_ids, rows_w = [], []
    for n, prompt in zip(lengths, prompt_lengths):
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        ids[0] = 1
        w = (torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.2)).tolist()
        w[:prompt] = [0.0] * prompt
        rows_ids.append(ids)
        rows_w.append(w)
    return pack(rows_ids, rows_w)


PACKS = {
    # a row of 1 and one of 2 tokens, a row that is all prompt (no weight at all), prompts before answers
    "mixed rows": ([9, 1, 2, 13, 6, 17], [3, 1, 1, 5, 6, 2]),
    "one row": ([23], [7]),
    "one row of two tokens": ([2], [1]),
}


@pytest.fixture(scope="module")
def step_model(tiny_model_dir):
    from raychat.core.model.hf import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    return model


def _unoptimised(model, packed):
    """The step as it was: the dense T×T document mask, logits and cross-entropy at every position."""
    model.set_attn_implementation("sdpa")
    logits = packed_forward(model, packed)
    return weighted_cross_entropy(logits, packed["input_ids"], packed["weights"])


def _logits_only_where_weighted(model, packed):
    """transformers' logits_to_keep path (taken when the head cannot be fused, e.g. under ZeRO-3)."""
    model.set_attn_implementation("sdpa")
    with mock.patch("raychat.core.train.step._fusable_head", return_value=False):
        return forward_packed_ce(model, packed)


def _fused_head_where_weighted(model, packed):
    model.set_attn_implementation("sdpa")
    return forward_packed_ce(model, packed)


def _per_row_attention(model, packed):
    use_packed_attention(model)
    logits = packed_forward(model, packed)
    return weighted_cross_entropy(logits, packed["input_ids"], packed["weights"])


def _both(model, packed):
    use_packed_attention(model)
    return forward_packed_ce(model, packed)


def _loss_and_grads(model, step, packed):
    model.zero_grad(set_to_none=True)
    parts = step(model, packed)
    (parts.loss_sum / parts.weight_sum).backward()
    return parts, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pack_name", list(PACKS))
@pytest.mark.parametrize(
    "step",
    [_logits_only_where_weighted, _fused_head_where_weighted, _per_row_attention, _both],
    ids=lambda f: f.__name__.strip("_"),
)
def test_optimised_packed_step_has_the_loss_and_gradients_of_the_unoptimised_one(step_model, step, pack_name):
    packed = _random_pack(*PACKS[pack_name], seed=len(pack_name))
    try:
        ref, ref_grads = _loss_and_grads(step_model, _unoptimised, packed)
        got, grads = _loss_and_grads(step_model, step, packed)
    finally:
        step_model.set_attn_implementation("sdpa")
    assert float(ref.weight_sum) > 0
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.weight_sum, ref.weight_sum)
    torch.testing.assert_close(got.correct_weight, ref.correct_weight)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref_g = ref_grads[name]
        # fp32 sums over a 32k vocabulary in another order: tolerance relative to the tensor's scale, with a
        # floor for near-zero gradients (a two-token row gives the query weights of the tiny model ~1e-6).
        atol = 1e-5 * float(ref_g.abs().max()) + 1e-8
        torch.testing.assert_close(g, ref_g, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_lm_head_runs_only_where_the_next_token_has_weight(step_model):
    packed = _random_pack(*PACKS["mixed rows"], seed=3)
    weighted = int((packed["weights"][0, 1:] != 0).sum())
    assert 0 < weighted < packed["input_ids"].shape[1] - 1
    head_rows, fused_rows = [], []
    hook = step_model.lm_head.register_forward_hook(lambda mod, args, out: head_rows.append(args[0].shape[:-1].numel()))
    fused = raychat.core.train.step.linear_weighted_cross_entropy

    def spy(hidden, *args, **kwargs):
        fused_rows.append(hidden.shape[0])
        return fused(hidden, *args, **kwargs)

    try:
        with torch.no_grad(), mock.patch("raychat.core.train.step.linear_weighted_cross_entropy", spy):
            forward_packed_ce(step_model, packed)  # fused: the model's own head sees no position
            with mock.patch("raychat.core.train.step._fusable_head", return_value=False):
                forward_packed_ce(step_model, packed)  # logits_to_keep: the head sees the weighted ones
    finally:
        hook.remove()
    assert fused_rows == [weighted]
    assert head_rows == [0, weighted]


def test_a_pack_without_any_weight_gives_zero_sums(step_model):
    parts = forward_packed_ce(step_model, pack([[1], [1, 5]], [[0.0], [0.0, 0.0]]))
    assert float(parts.loss_sum.detach()) == 0 and float(parts.weight_sum) == 0 and float(parts.correct_weight) == 0
    parts.loss_sum.backward()  # the LM head saw no position; the step still backpropagates


def test_only_plain_bias_free_heads_of_known_models_are_fused():
    from raychat.core.train.step import _fusable_head

    head = torch.nn.Linear(4, 10, bias=False)
    config = type("Config", (), {"model_type": "mistral"})()
    assert _fusable_head(head, config)
    assert not _fusable_head(head, type("Config", (), {"model_type": "gemma2"})())  # softcaps its logits
    assert not _fusable_head(torch.nn.Linear(4, 10), config)  # a bias
    head.weight.ds_id = 0  # a ZeRO-3 partition
    assert not _fusable_head(head, config)
