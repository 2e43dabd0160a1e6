"""Compiled blocks and activation checkpointing (raychat.core.model.compile) train like the eager model."""

import pytest
import torch

from raychat.core.model.hf import load_causal_lm


def _random_packs(*row_lengths: tuple[int, ...]) -> list[dict]:
    from raychat.core.train.pack import pack

    g = torch.Generator().manual_seed(0)
    packs = []
    for lens in row_lengths:
        ids = [[1] + torch.randint(3, 32000, (n - 1,), generator=g).tolist() for n in lens]
        packs.append(pack(ids, [[0.0] + [1.0] * (n - 1) for n in lens]))
    return packs


def _losses_and_grads(model, packs) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The packed C-RLFT step's Σ w·CE and every parameter's gradient (fp32), pack by pack."""
    from raychat.core.train.step import forward_packed_ce

    out = []
    for p in packs:
        model.zero_grad(set_to_none=True)
        parts = forward_packed_ce(model, p)
        parts.loss_sum.backward()
        out.append((parts.loss_sum.detach().float(), [q.grad.float().clone() for q in model.parameters()]))
    return out


def _compiled_vs_eager(tiny_model_dir, packs, prepare, compile_model, rtol, atol) -> None:
    from raychat.core.model.attention import use_packed_attention

    results = []
    for compiled in (True, False):
        model, _ = load_causal_lm(tiny_model_dir)
        model = prepare(model)
        use_packed_attention(model)
        if compiled:
            compile_model(model)
        results.append(_losses_and_grads(model, packs))
    for (loss_c, grads_c), (loss_e, grads_e) in zip(*results):
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol)


@pytest.mark.parametrize(
    ("scope", "backend", "modules"),
    [
        ("norms-mlps", "inductor", 2 * 3 + 1),  # per layer: 2 norms + MLP; the final norm
        ("layers", "aot_eager", 2 + 1),  # both decoder layers (around the attention call); the final norm
    ],
)
def test_compiled_blocks_train_like_eager_ones(tiny_model_dir, scope, backend, modules):
    """compile_blocks (TrainConfig.compile_blocks): same loss and gradients over two packs of
    different lengths (dynamic shapes). ``layers`` is traced by dynamo and autograd as on a GPU,
    but not code-generated (inductor's CPU compile of whole layers takes a minute here)."""
    from raychat.core.model.compile import compile_blocks

    def compile_model(model):
        assert compile_blocks(model, scope, backend=backend) == modules
        compiled = model.model.layers[0] if scope == "layers" else model.model.layers[0].mlp
        assert compiled._compiled_call_impl is not None and model.model.norm._compiled_call_impl is not None

    _compiled_vs_eager(
        tiny_model_dir, _random_packs((7, 12, 5), (30, 9)), lambda m: m, compile_model, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("scope", "backend"), [("norms-mlps", "inductor"), ("layers", "aot_eager")])
def test_compiled_blocks_with_gradient_checkpointing_train_like_eager_ones(tiny_model_dir, scope, backend):
    """As raychat.jobs.train sets them up (compile_blocks, then gradient checkpointing, as the 7B config
    would with compile_blocks on): the recomputed compiled blocks give eager's loss and gradients."""
    import warnings

    from raychat.core.model.compile import compile_blocks, enable_activation_checkpointing

    def checkpointing(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # not the deprecated name on transformers 5.2x
            enable_activation_checkpointing(model)
        assert model.is_gradient_checkpointing
        return model.train()

    def compile_then_checkpoint(model):
        compile_blocks(model, scope, backend=backend)
        checkpointing(model)
        assert model.is_gradient_checkpointing

    # Eager: checkpointing only (prepare); compiled: compile first, then checkpointing, as the job does.
    _compiled_vs_eager(
        tiny_model_dir,
        _random_packs((7, 12, 5), (30, 9)),
        lambda m: m.train(),
        compile_then_checkpoint,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["norms-mlps", "layers"])
def test_compiled_blocks_on_gpu_in_bf16_train_like_eager_ones(tiny_model_dir, scope):
    """Inductor's Triton kernels for the compiled parts, varlen flash attention between them."""
    from raychat.core.model.compile import compile_blocks

    _compiled_vs_eager(
        tiny_model_dir,
        _random_packs((70, 120, 50), (300, 90)),
        lambda m: m.cuda().to(torch.bfloat16),
        lambda m: compile_blocks(m, scope),
        rtol=1e-2,
        atol=5e-2,
    )
