"""Model construction and checkpoints: the embedded tiny Mistral, the benchmarks' 0.85B one, loading and
saving HF models (LoRA merged on save)."""

from __future__ import annotations

import os
from pathlib import Path

from raychat.core.data.tokenizer import EOT_TOKEN, build_embedded_tokenizer
from raychat.core.model.cpu_linears import pack_cpu_linears

EMBEDDED_MODEL_NAME = "raychat-tiny-mistral"


def tiny_mistral_config(vocab_size: int = 32002, max_position_embeddings: int = 2048):
    """A random-init Mistral small enough to train and serve on 2 CPU cores in seconds."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        # Heads of 32 (not 16): vLLM's CPU attention refuses head_dim 16. GQA 2:1 as in Mistral's 4:1.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
    )


def build_model(size: str, vocab: int, max_len: int, device: str, dtype, seed: int, head_dim: int = 64):
    """A random-init ``MistralForCausalLM`` for the benchmarks: the tiny embedded shape or a 0.85B one.

    Args:
        size: ``tiny`` (:func:`tiny_mistral_config`) or ``1b`` (0.85B parameters, Mistral's shape:
            hidden 2048, 16 layers, MLP 5632, GQA 4:1).
        vocab: Vocabulary size.
        max_len: Longest sequence it must take (``max_position_embeddings`` is at least this).
        device: Where to initialise it (``cuda``: on the accelerator, and on flash-attention-2 when
            ``flash_attn`` is installed, else SDPA).
        dtype: The torch dtype of its weights.
        seed: Seed of the random init.
        head_dim: ``1b`` only: heads of 64 (32 query / 8 key-value) or of 128 as in every Mistral
            release (16 / 4): the same weights and FLOPs either way, only the attention kernels'
            shapes differ.
    """
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if size == "tiny":
        config = tiny_mistral_config(vocab_size=vocab, max_position_embeddings=max(2048, max_len))
    else:
        heads = 2048 // head_dim
        config = MistralConfig(
            vocab_size=vocab,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=heads,
            num_key_value_heads=heads // 4,
            head_dim=head_dim,
            max_position_embeddings=max(4096, max_len),
            sliding_window=None,
            tie_word_embeddings=False,
        )
    if device == "cuda":
        config._attn_implementation = "flash_attention_2" if _has_flash_attn() else "sdpa"
    torch.manual_seed(seed)
    if device == "cpu":
        return MistralForCausalLM(config).to(dtype=dtype)
    with torch.device(device):  # initialise on the accelerator: a 1B model's init on the CPU takes seconds
        return MistralForCausalLM(config).to(dtype=dtype)


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


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
    """:func:`load_causal_lm` for generation: in eval mode on ``device``, with
    :func:`raychat.core.model.cpu_linears.pack_cpu_linears` applied (it packs nothing off the CPU)
    unless ``pack_linears`` is False. What the serving engine (in its replica or its child process)
    and the serving benchmark's baselines run."""
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
