"""Model helpers: <|end_of_turn|> added to a base model without it, LoRA checkpoints saved merged,
the benchmarks' random-init models."""

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


def test_the_1b_benchmark_model_has_787m_matrix_weights():
    from raychat.core.model.hf import build_model

    with torch.device("meta"):
        model = build_model("1b", 32002, 2048, "meta", torch.bfloat16, seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert total == 852_568_064
    assert total - model.get_input_embeddings().weight.numel() == 787_027_968


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_1b_benchmark_model_has_the_same_weights_with_heads_of_64_or_128(head_dim):
    from raychat.core.model.hf import build_model

    with torch.device("meta"):
        model = build_model("1b", 32002, 2048, "meta", torch.bfloat16, seed=0, head_dim=head_dim)
    assert model.config.num_attention_heads * head_dim == 2048
    assert model.config.num_attention_heads == 4 * model.config.num_key_value_heads
    assert sum(p.numel() for p in model.parameters()) == 852_568_064
