"""Model construction: the embedded tiny Mistral and loading real HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from libs.tokenization import EOT_TOKEN, build_embedded_tokenizer

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


def create_embedded_base_model(dest: str | os.PathLike, seed: int = 0) -> Path:
    """Writes a tiny random-init ``MistralForCausalLM`` + the embedded tokenizer to ``dest`` (HF format)."""
    import torch
    from transformers import MistralForCausalLM

    dest = Path(dest)
    tok = build_embedded_tokenizer()
    torch.manual_seed(seed)
    model = MistralForCausalLM(tiny_mistral_config(vocab_size=len(tok)))
    model.config.name_or_path = EMBEDDED_MODEL_NAME
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
