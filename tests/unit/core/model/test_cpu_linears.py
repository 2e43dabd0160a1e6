"""CPU linears on oneDNN-packed weights (raychat.core.model.cpu_linears, ServeConfig.cpu_packed_linears)."""

import torch

from raychat.core.model.hf import load_causal_lm


def test_packed_cpu_linears_decode_what_plain_ones_do(tiny_model_dir):
    """ServeConfig.cpu_packed_linears: the output projection (the tiny model's one layer over the
    size threshold) runs on oneDNN-packed weights and the batcher generates the same greedy tokens."""
    from raychat.core.infer.batcher import ContinuousBatcher, SamplingParams
    from raychat.core.model.cpu_linears import pack_cpu_linears

    plain, _ = load_causal_lm(tiny_model_dir)
    packed, _ = load_causal_lm(tiny_model_dir)
    assert pack_cpu_linears(packed) == 1
    hidden = torch.randn(16, 1, plain.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (1, 4, 16):
            torch.testing.assert_close(
                packed.lm_head(hidden[:rows]), plain.lm_head(hidden[:rows]), rtol=1e-5, atol=1e-5
            )
    prompts = [[1, 420 + i, 6316, 28781 + i][: 2 + i % 3] for i in range(12)]
    outs = []
    for model in (plain, packed):
        b = ContinuousBatcher(model, stop_ids=[32000], pad_id=32001, max_context=256, max_batch_size=8)
        tokens: dict = {}
        for step in b.generate(prompts, [SamplingParams(max_tokens=12, temperature=0)] * len(prompts)):
            for i, s in enumerate(step):
                if s is not None and s.token_id is not None:
                    tokens.setdefault(i, []).append(s.token_id)
        outs.append(tokens)
    assert outs[0] == outs[1] and sum(map(len, outs[0].values())) > 12 * 6


def test_packed_linears_use_the_packed_copy_for_batches_and_the_plain_weight_otherwise(tiny_model_dir):
    """Several rows run on the packed copy; one row (sequential decoding, where oneDNN was slower
    here) and anything that needs gradients run torch's own linear on the module's weight."""
    from raychat.core.model.cpu_linears import pack_cpu_linears

    model, _ = load_causal_lm(tiny_model_dir)
    pack_cpu_linears(model)
    x = torch.randn(4, 1, model.config.hidden_size)
    with torch.inference_mode():
        batch, row = model.lm_head(x), model.lm_head(x[:1])
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # the packed copy does not see this; the plain weight does
    with torch.inference_mode():
        torch.testing.assert_close(model.lm_head(x), batch)
        torch.testing.assert_close(model.lm_head(x[:1]), 2 * row)
    loss = model(input_ids=torch.tensor([[1, 420, 6316, 28781]]), labels=torch.tensor([[1, 420, 6316, 28781]])).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_pack_cpu_linears_leaves_small_and_non_float32_layers_alone(tiny_model_dir):
    from raychat.core.model.cpu_linears import pack_cpu_linears

    model, _ = load_causal_lm(tiny_model_dir)
    assert pack_cpu_linears(model, min_weights=10**9) == 0
    bf16, _ = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    assert pack_cpu_linears(bf16) == 0
    assert (
        pack_cpu_linears(model, min_weights=1) == 1 + 2 * 7
    )  # every linear: the head, q/k/v/o and the MLP's three per layer
