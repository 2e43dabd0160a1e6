"""Model helpers: <|end_of_turn|> added to a base model without it, LoRA checkpoints saved merged,
compiled blocks, CPU linears on packed weights."""

import shutil
import tempfile

import pytest
import torch

from raychat.core.data.tokenizer import EOT_TOKEN, RustEncoder, embedded_tokenizer_file, tokenizer_fingerprint
from raychat.core.model.hf import add_missing_eot, load_causal_lm, save_hf_model, tiny_mistral_config


@pytest.fixture(scope="module")
def base_without_eot(tmp_path_factory):
    """A Mistral-vocabulary (32000) base model and tokenizer saved without OpenChat's tokens."""
    from transformers import LlamaTokenizer, MistralForCausalLM

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(embedded_tokenizer_file(), f"{d}/tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    config = tiny_mistral_config(vocab_size=32000)
    config.pad_token_id = None  # the base vocabulary has no pad token either
    model = MistralForCausalLM(config)
    out = tmp_path_factory.mktemp("base-no-eot")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_missing_eot_is_added_with_the_mean_embedding(base_without_eot):
    model, tok = load_causal_lm(base_without_eot)
    assert EOT_TOKEN not in tok.get_vocab()
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    assert add_missing_eot(model, tok) is True
    eot = tok.convert_tokens_to_ids(EOT_TOKEN)
    assert eot == 32000 and len(tok) == 32001
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb_in.shape[0] == emb_out.shape[0] == 32001
    torch.testing.assert_close(emb_in[eot], before_in.mean(0))
    torch.testing.assert_close(emb_out[eot], before_out.mean(0))
    torch.testing.assert_close(emb_in[:32000], before_in)  # existing tokens untouched
    assert tok.tokenize(f"Hi{EOT_TOKEN}")[-1] == EOT_TOKEN  # one special token, not split text
    assert add_missing_eot(model, tok) is False


def test_training_data_check_sees_the_same_vocabulary_as_the_trained_model(base_without_eot, tmp_path):
    """raychat.jobs.train fingerprints the base tokenizer with <|end_of_turn|> added the tokenizers way."""
    from tokenizers import AddedToken

    model, tok = load_causal_lm(base_without_eot)
    add_missing_eot(model, tok)
    tok.save_pretrained(tmp_path)
    encoder = RustEncoder(base_without_eot)
    encoder.rust.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    assert tokenizer_fingerprint(encoder) == tokenizer_fingerprint(RustEncoder(tmp_path))


def test_lora_checkpoint_is_a_plain_merged_model(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from raychat.core.model.hf import lora_model

    model, tok = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    peft_model = lora_model(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained (LoRA starts with B = 0)
    save_hf_model(peft_model, tok, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    peft_model.eval()
    ids = torch.tensor([[1, 420, 6316, 28781, 3198, 32000]])
    with torch.no_grad():
        merged_logits = loaded(input_ids=ids).logits
        adapter_logits = peft_model(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)


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
    from raychat.core.train.pack import use_packed_attention

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
    from raychat.core.model.hf import compile_blocks

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

    from raychat.core.model.hf import compile_blocks, enable_activation_checkpointing

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
    from raychat.core.model.hf import compile_blocks

    _compiled_vs_eager(
        tiny_model_dir,
        _random_packs((70, 120, 50), (300, 90)),
        lambda m: m.cuda().to(torch.bfloat16),
        lambda m: compile_blocks(m, scope),
        rtol=1e-2,
        atol=5e-2,
    )


def test_packed_cpu_linears_decode_what_plain_ones_do(tiny_model_dir):
    """ServeConfig.cpu_packed_linears: the output projection (the tiny model's one layer over the
    size threshold) runs on oneDNN-packed weights and the batcher generates the same greedy tokens."""
    from raychat.core.infer.batcher import ContinuousBatcher, SamplingParams
    from raychat.core.model.hf import pack_cpu_linears

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
    from raychat.core.model.hf import pack_cpu_linears

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
    from raychat.core.model.hf import pack_cpu_linears

    model, _ = load_causal_lm(tiny_model_dir)
    assert pack_cpu_linears(model, min_weights=10**9) == 0
    bf16, _ = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    assert pack_cpu_linears(bf16) == 0
    assert (
        pack_cpu_linears(model, min_weights=1) == 1 + 2 * 7
    )  # every linear: the head, q/k/v/o and the MLP's three per layer
