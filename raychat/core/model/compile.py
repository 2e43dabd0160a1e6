"""``torch.compile`` of a causal LM's blocks, and activation checkpointing, for training.

Both change how a model's forward and backward run, never its parameters: state dicts and
checkpoints stay those of the plain model.
"""

from __future__ import annotations

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
    Packed attention (:func:`raychat.core.model.attention.packed_sdpa_attention`) is never traced: it reads row
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
