"""Model construction: the embedded tiny Mistral and loading real HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from raychat.core.data.tokenizer import EOT_TOKEN, build_embedded_tokenizer

EMBEDDED_MODEL_NAME = "raychat-tiny-mistral"


def tiny_mistral_config(vocab_size: int = 32002, max_position_embeddings: int = 2048):
    """A random-init Mistral small enough to train and serve on 2 CPU cores in seconds."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
    )


def set_generation_stop(model, tokenizer) -> None:
    """Makes generation stop at ``<|end_of_turn|>`` (and EOS) for any HF consumer of the checkpoint."""
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    stops = [i for i in (eot, tokenizer.eos_token_id) if i is not None]
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def create_embedded_base_model(
    dest: str | os.PathLike, seed: int = 0, build=None, name: str = EMBEDDED_MODEL_NAME
) -> Path:
    """Writes a tiny random-init ``MistralForCausalLM`` + the embedded tokenizer to ``dest`` (HF format).

    ``build(vocab_size)`` makes another random-init model instead (the benchmarks' 0.85B one), saved
    the same way under ``name``.
    """
    import torch
    from transformers import MistralForCausalLM

    dest = Path(dest)
    tok = build_embedded_tokenizer()
    torch.manual_seed(seed)
    model = build(len(tok)) if build is not None else MistralForCausalLM(tiny_mistral_config(vocab_size=len(tok)))
    model.config.name_or_path = name
    set_generation_stop(model, tok)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def load_causal_lm(path: str | os.PathLike, dtype=None):
    """Loads an HF causal LM (safetensors only — never pickle) and its tokenizer from a local dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def load_inference_model(path: str | os.PathLike, dtype=None, device: str = "cpu", pack_linears: bool = True):
    """:func:`load_causal_lm` for generation: in eval mode on ``device``, with :func:`pack_cpu_linears`
    applied (it packs nothing off the CPU) unless ``pack_linears`` is False. What the serving engine
    (in its replica or its child process) and the serving benchmark's baselines run."""
    model, tok = load_causal_lm(path, dtype=dtype)
    model.to(device).eval()
    if pack_linears:
        pack_cpu_linears(model)
    return model, tok


def add_missing_eot(model, tokenizer) -> bool:
    """Adds ``<|end_of_turn|>`` to a base model that lacks it; its embedding is the mean of the others.

    The new token gets the next id (``len(tokenizer)`` before adding), the id the tokenizers
    library gives it in the data check of ``raychat.jobs.train`` as well, and its
    input (and untied output) embedding row is set to the mean of the existing rows — a neutral
    start that does not disturb the existing tokens' distribution.

    Returns:
        Whether the token was added.
    """
    import torch

    if EOT_TOKEN in tokenizer.get_vocab():
        return False
    old = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"additional_special_tokens": [EOT_TOKEN]})
    new = len(tokenizer)
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        for emb in {
            id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
        }.values():
            emb.weight[old:new] = emb.weight[:old].mean(dim=0, keepdim=True)
    return True


def lora_model(model, r: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wraps ``model`` with PEFT LoRA adapters (only they train); needs the ``lora`` extra."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit("--lora-r needs peft: pip install 'raychat[lora]'") from e
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def merged_state_dict(model) -> dict:
    """The plain-HF state dict of ``model``, with any LoRA adapters merged into the base weights.

    Computed out of place (W + ΔW per adapted layer): the training model keeps its unmerged
    weights, so no rounding drift accumulates across checkpoints (merging in place and unmerging
    would not give W back exactly in bf16).
    """
    if not hasattr(model, "get_base_model"):
        return model.state_dict()
    base = model.get_base_model()
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        if ".base_layer." in key:
            path, leaf = key.rsplit(".base_layer.", 1)
            if leaf == "weight":
                layer = base.get_submodule(path)
                for adapter in layer.active_adapters:
                    value = value + layer.get_delta_weight(adapter).to(value.dtype)
            key = f"{path}.{leaf}"
        out[key] = value.detach().contiguous()
    return out


def save_hf_model(model, tokenizer, directory: str | os.PathLike) -> None:
    """Writes a plain HF model directory (safetensors; LoRA merged) that ``from_pretrained`` loads."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.save_pretrained(directory, state_dict=merged_state_dict(model), safe_serialization=True)
    tokenizer.save_pretrained(directory)


#: What :func:`compile_blocks` compiles: ``norms-mlps`` (each RMSNorm and MLP) or ``layers``
#: (each whole decoder layer, the attention kernel call excepted, and the final norm).
COMPILE_SCOPES = ("norms-mlps", "layers")


def enable_activation_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (what DeepSpeed and
    LoRA need). transformers 5.2x renamed ``gradient_checkpointing_enable`` (which now warns) to
    ``activation_checkpointing_enable``; older 5.x releases (the lent GPU machine's 5.17) lack the new name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model, scope: str = "norms-mlps", backend: str = "inductor") -> int:
    """``torch.compile`` parts of a causal LM, in place; returns how many modules.

    Their element-wise work (RMSNorm's casts and scaling, SwiGLU's ``silu(gate) * up``; with
    ``layers`` also the rotary embedding, the head reshapes and the residual adds) becomes a few
    fused kernels instead of one memory pass per operation; the matrix products stay cuBLAS calls.
    Packed attention (:func:`raychat.core.train.pack.packed_sdpa_attention`) is never traced: it reads row
    bounds on the host, so a compiled layer runs as a graph before it and one after it. Shapes are
    compiled as dynamic: every pack has a length of its own. Parameter names do not change, so
    state dicts and checkpoints are those of the plain model.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: one of {COMPILE_SCOPES}")
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if scope == "layers":
            hit = name.endswith("DecoderLayer") or (name.endswith("RMSNorm") and module is _final_norm(model))
        else:
            hit = name.endswith("RMSNorm") or name.endswith("MLP")
        if hit:
            module.compile(dynamic=True, backend=backend)
            n += 1
    return n


def _final_norm(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return getattr(decoder, "norm", None)


#: Linear layers with at least this many weights get oneDNN-packed weights on CPU; below it MKL's
#: plain call is as fast (break-even measured on a 2-core AMD EPYC: ~256k weights at 1-16 rows).
PACK_MIN_WEIGHTS = 1 << 18


def _packed_linear_op():
    """oneDNN's linear over a pre-packed weight (what inductor's CPU weight freezing calls), or None."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    ops = torch.ops.mkldnn
    try:
        return ops._reorder_linear_weight, ops._linear_pointwise
    except (AttributeError, RuntimeError):  # a build without these private ops
        return None


def pack_cpu_linears(model, min_weights: int = PACK_MIN_WEIGHTS) -> int:
    """Inference on CPU: each large float32 ``nn.Linear`` runs on a weight pre-packed for oneDNN.

    torch's CPU ``F.linear`` in float32 calls MKL's sgemm, which on the skinny products of decoding
    (a few rows times a large weight) scales badly with the row count on some CPUs: on this
    workplace's AMD EPYC, the tiny model's 64 × 32k output projection takes 0.20 ms for one row and
    1.1-1.8 ms for 16, against 0.17 and 0.7 ms with the weight packed once into oneDNN's blocked
    layout (a 2048 × 5632 MLP weight: 10.4 vs 5.0 ms at 16 rows). Batches of decoding rows are what
    a serving engine runs, so they gain most. Same float32 arithmetic (results agree to ~1e-6
    relative; only the summation order differs), checked against ``F.linear`` on each layer when
    it is packed; a layer where that check fails, or a torch build without the ops, stays as is.

    The packed copy sits beside the original weight (which tied embeddings and ``state_dict``
    still use): the packed layers' weights take twice their memory. For inference only — the packed
    forward has no backward. Returns how many layers were packed.
    """
    import torch

    ops = _packed_linear_op()
    if ops is None:
        return 0
    reorder, linear = ops
    n = 0
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (
                not isinstance(module, torch.nn.Linear)
                or w is None
                or w.device.type != "cpu"
                or w.dtype != torch.float32
                or w.numel() < min_weights
            ):
                continue
            try:
                packed = reorder(w.detach(), None)
                probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
                got = linear(probe, packed, module.bias, "none", [], "")
                ok = torch.allclose(got, torch.nn.functional.linear(probe, w, module.bias), rtol=1e-4, atol=1e-5)
            except RuntimeError:
                ok = False
            if ok:
                module.forward = _PackedForward(module, packed, linear)
                n += 1
    return n


class _PackedForward:
    """``forward`` of a packed ``nn.Linear``: oneDNN on the packed weight for float32 CPU input, else the plain one."""

    def __init__(self, module, packed, linear):
        self.module, self.packed, self.linear = module, packed, linear

    def __call__(self, x):
        import torch

        m = self.module
        if (
            x.numel() == x.shape[-1]
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return torch.nn.functional.linear(x, m.weight, m.bias)
        return self.linear(x, self.packed, m.bias, "none", [], "")
