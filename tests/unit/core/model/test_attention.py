"""Per-row attention over packs, and the kernel choice (raychat.core.model.attention)."""

import pytest
import torch

from raychat.core.model.attention import PACKED_SDPA
from raychat.core.train.pack import pack, packed_forward
from tests.unit.core.packed_rows import RecordingLM, rows_alone, three_rows

# --- per-row attention (the CPU training path): no T×T mask, Σ Lᵢ² scores -------------------------


def test_per_row_attention_logits_equal_each_row_run_alone(tiny_model):
    from raychat.core.model.attention import use_packed_attention

    rows_ids, rows_w = three_rows()
    expected = torch.cat(rows_alone(tiny_model, rows_ids))
    try:
        assert use_packed_attention(tiny_model) == PACKED_SDPA
        with torch.no_grad():
            logits = packed_forward(tiny_model, pack(rows_ids, rows_w))[0]
    finally:
        tiny_model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_per_row_attention_keeps_mistral_sliding_window_within_each_row():
    from transformers import MistralForCausalLM

    from raychat.core.model.attention import use_packed_attention
    from raychat.core.model.hf import tiny_mistral_config

    config = tiny_mistral_config(vocab_size=64)
    config.sliding_window, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    rows_ids = [[1] + torch.randint(3, 64, (n - 1,), generator=g).tolist() for n in (8, 2, 6)]
    packed = pack(rows_ids, [[0.0] * len(r) for r in rows_ids])
    with torch.no_grad():
        dense = packed_forward(model, packed)  # the document mask, windowed
        use_packed_attention(model)
        per_row = packed_forward(model, packed)
        model.config.sliding_window = None
        per_row_unwindowed = packed_forward(model, packed)
    torch.testing.assert_close(per_row, dense, atol=1e-5, rtol=1e-5)
    # The 8-token row is longer than the window: dropping the window would change its logits.
    assert not torch.allclose(per_row_unwindowed[0, :8], per_row[0, :8], atol=1e-4)


def test_per_row_attention_refuses_a_call_that_is_not_a_pack(tiny_model):
    from raychat.core.model.attention import use_packed_attention

    try:
        use_packed_attention(tiny_model)
        with pytest.raises(ValueError, match="only runs packs"), torch.no_grad():
            tiny_model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=False)
    finally:
        tiny_model.set_attn_implementation("sdpa")


def test_varlen_kernels_are_kept_by_use_packed_attention():
    from raychat.core.model.attention import use_packed_attention

    model = RecordingLM("flash_attention_2")
    assert use_packed_attention(model) == "flash_attention_2"
    assert model.config._attn_implementation == "flash_attention_2"


def test_checkpoint_of_a_per_row_attention_model_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from raychat.core.model.attention import use_packed_attention
    from raychat.core.model.hf import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir)
    use_packed_attention(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert reloaded(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 32002)


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["per-row-sdpa", "varlen-flash"])
def test_per_row_attention_on_gpu_in_bf16_matches_rows_alone(tiny_model_dir, varlen):
    from raychat.core.model.attention import KernelOptions, use_packed_attention
    from raychat.core.model.hf import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    model = model.cuda().eval()
    rows_ids, rows_w = three_rows()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float() for ids in rows_ids])
        use_packed_attention(model)
        logits = packed_forward(model, pack(rows_ids, rows_w), kernels=KernelOptions(varlen_flash=varlen))[0].float()
    torch.testing.assert_close(logits, alone, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_varlen_flash_gradients_match_per_row_sdpa(tiny_model_dir):
    """One varlen kernel for the whole pack trains exactly like one SDPA call per row."""
    from raychat.core.model.attention import KernelOptions, use_packed_attention
    from raychat.core.model.hf import load_causal_lm
    from raychat.core.train.step import forward_packed_ce

    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    model = model.cuda().to(torch.bfloat16)
    use_packed_attention(model)
    packed = pack(*three_rows())
    grads = {}
    for varlen in (False, True):
        model.zero_grad(set_to_none=True)
        parts = forward_packed_ce(model, packed, KernelOptions(varlen_flash=varlen))
        parts.loss_sum.backward()
        grads[varlen] = (parts.loss_sum.detach().float(), [p.grad.float().clone() for p in model.parameters()])
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=2e-2, rtol=1e-2)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "capability", "ok"),
    [
        ("cuda", torch.bfloat16, 128, (9, 0), True),  # H100 / H200
        ("cuda", torch.float16, 64, (8, 0), True),  # A100
        ("cuda", torch.float32, 128, (9, 0), False),  # fp32 training on a GPU: per-row SDPA
        ("cuda", torch.bfloat16, 128, (7, 0), False),  # V100: no flash kernel
        ("cuda", torch.bfloat16, 20, (9, 0), False),
        ("cuda", torch.bfloat16, 512, (9, 0), False),
        ("cpu", torch.bfloat16, 128, None, False),
    ],
)
def test_varlen_flash_only_where_the_flash_kernel_runs(device, dtype, head_dim, capability, ok):
    from raychat.core.model.attention import varlen_flash_supported

    assert varlen_flash_supported(device, dtype, head_dim, capability) is ok


# --- KernelOptions: the kernel choice travels as a value ------------------------------------------


def _cuda_query(dtype=torch.bfloat16, head_dim: int = 64):
    """What ``_use_varlen_flash`` reads of a query on a GPU, without a GPU."""
    import types

    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, shape=(1, 4, 10, head_dim))


def test_varlen_flash_false_keeps_a_cuda_query_on_the_per_row_path(monkeypatch):
    from raychat.core.model.attention import KernelOptions, _use_varlen_flash

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100/H200
    assert _use_varlen_flash(_cuda_query(), KernelOptions()) is True
    assert _use_varlen_flash(_cuda_query(), KernelOptions(varlen_flash=False)) is False
    assert _use_varlen_flash(_cuda_query(torch.float32), KernelOptions()) is False


def test_sdpa_backend_scope_follows_the_options_on_a_cuda_device():
    import contextlib

    from raychat.core.model.attention import KernelOptions, sdpa_backend_scope

    cuda = torch.device("cuda", 0)
    assert isinstance(sdpa_backend_scope(cuda, KernelOptions(sdpa_backends=None)), contextlib.nullcontext)
    assert isinstance(sdpa_backend_scope(torch.device("cpu")), contextlib.nullcontext)
    with sdpa_backend_scope(cuda):  # the default: flash, memory-efficient and math; no cuDNN
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_backend_scope(cuda, KernelOptions(sdpa_backends=("MATH",))):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()


def test_packed_forward_hands_its_kernel_options_to_every_layers_attention(tiny_model, monkeypatch):
    import raychat.core.model.attention as attention

    seen = []
    real = attention._use_varlen_flash

    def spy(query, kernels):
        seen.append(kernels)
        return real(query, kernels)

    monkeypatch.setattr(attention, "_use_varlen_flash", spy)
    kernels = attention.KernelOptions(sdpa_backends=("MATH",), varlen_flash=False)
    try:
        attention.use_packed_attention(tiny_model)
        with torch.no_grad():
            packed_forward(tiny_model, pack(*three_rows()), kernels=kernels)
            packed_forward(tiny_model, pack(*three_rows()))
    finally:
        tiny_model.set_attn_implementation("sdpa")
    layers = tiny_model.config.num_hidden_layers
    assert seen == [kernels] * layers + [attention.KernelOptions()] * layers


def test_kernel_options_are_frozen_and_refuse_unknown_backends():
    import dataclasses

    from raychat.core.model.attention import KernelOptions

    assert KernelOptions(sdpa_backends=["MATH"]).sdpa_backends == ("MATH",)
    with pytest.raises(ValueError, match="CUDNN"):
        KernelOptions(sdpa_backends=("CUDNN",))  # the name is CUDNN_ATTENTION
    with pytest.raises(ValueError, match="sdpa_backends"):
        KernelOptions(sdpa_backends=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelOptions().varlen_flash = False
