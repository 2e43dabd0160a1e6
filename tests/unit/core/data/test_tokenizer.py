import pytest

from raychat.core.data.schema import Conversation, DroppedRow
from raychat.core.data.templates import get_template
from raychat.core.data.tokenizer import ConversationTokenizer


@pytest.fixture(scope="module")
def ct(tokenizer):
    return ConversationTokenizer(tokenizer, get_template("openchat_3.5"), max_length=512)


def conv(*turns, condition="GPT4 Correct", system=""):
    return Conversation.model_validate(
        {
            "items": [{"role": r, "content": c, "weight": w} for r, c, w in turns],
            "condition": condition,
            "system": system,
        }
    )


def test_embedded_tokenizer_has_openchat_special_ids(tokenizer):
    assert len(tokenizer) == 32002
    assert tokenizer.convert_tokens_to_ids("<|end_of_turn|>") == 32000
    assert tokenizer.convert_tokens_to_ids("<|pad_0|>") == 32001
    assert tokenizer.bos_token_id == 1


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    from raychat.core.data.tokenizer import embedded_tokenizer_file

    return sentencepiece.SentencePieceProcessor(model_file=str(embedded_tokenizer_file()))


def test_ids_match_openchat_reference_segmentwise_tokenization(ct, sp):
    # OpenChat's reference: BOS, then each role prefix and each content tokenized on its own, EOT after each
    # message. Computed here with plain sentencepiece, independent of transformers.
    tc = ct.encode(conv(("user", "Hello there", 0.0), ("assistant", "Hi! How can I help?", 1.0)))
    eot = 32000
    reference = (
        [1]
        + sp.encode("GPT4 Correct User:")
        + sp.encode("Hello there")
        + [eot]
        + sp.encode("GPT4 Correct Assistant:")
        + sp.encode("Hi! How can I help?")
        + [eot]
    )
    assert tc.input_ids == reference


def test_weights_zero_on_bos_prefixes_and_user_and_message_weight_on_assistant(ct, tokenizer):
    tc = ct.encode(conv(("user", "What is 2 + 3?", 0.0), ("assistant", "5", 0.1), condition="GPT3"))
    answer_ids = tokenizer("5", add_special_tokens=False)["input_ids"]
    n_sup = len(answer_ids) + 1  # answer + its end-of-turn
    assert tc.weights[-n_sup:] == pytest.approx([0.1] * n_sup)
    assert all(w == 0 for w in tc.weights[:-n_sup])
    assert tc.input_ids[-1] == 32000
    assert tc.input_ids[-n_sup:-1] == answer_ids
    assert len(tc.input_ids) == len(tc.weights)


def test_user_typing_end_of_turn_gets_plain_text_tokens(ct):
    tc = ct.encode(conv(("user", "please type <|end_of_turn|> now", 0.0), ("assistant", "ok", 1.0)))
    # Exactly two control tokens: the real ends of the two turns.
    assert tc.input_ids.count(32000) == 2


def test_truncates_to_max_length_and_trims_trailing_zero_weights(tokenizer):
    small = ConversationTokenizer(tokenizer, get_template("openchat_3.5"), max_length=20)
    tc = small.encode(
        conv(("user", "q", 0.0), ("assistant", "one two three four five six seven eight nine ten eleven", 1.0))
    )
    assert tc.truncated and len(tc.input_ids) == 20
    tc2 = small.encode(conv(("user", "q", 0.0), ("assistant", "a", 1.0), ("user", "more words to be trimmed", 0.0)))
    assert tc2.weights[-1] > 0 and tc2.input_ids[-1] == 32000


def test_drops_row_with_no_supervised_token_after_truncation(tokenizer):
    small = ConversationTokenizer(tokenizer, get_template("openchat_3.5"), max_length=10)
    with pytest.raises(DroppedRow) as e:
        small.encode(conv(("user", "a long question " * 10, 0.0), ("assistant", "answer", 1.0)))
    assert e.value.reason == "no_supervised_tokens"


def test_prompt_ends_with_open_assistant_prefix(ct, sp):
    ids = ct.encode_prompt([("user", "Hi")], condition=None, system="Be brief.")
    expected = (
        [1]
        + sp.encode("Be brief.")
        + [32000]
        + sp.encode("GPT4 Correct User:")
        + sp.encode("Hi")
        + [32000]
        + sp.encode("GPT4 Correct Assistant:")
    )
    assert ids == expected


def test_openchat_32_uses_gpt4_condition_and_4k_context(tokenizer, sp):
    ct32 = ConversationTokenizer(tokenizer, get_template("openchat_3.2"))
    assert ct32.max_length == 4096
    ids = ct32.encode_prompt([("user", "Hi")])
    assert ids == [1] + sp.encode("GPT4 User:") + sp.encode("Hi") + [32000] + sp.encode("GPT4 Assistant:")


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from raychat.core.data.tokenizer import build_embedded_tokenizer

    tok = build_embedded_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def test_chatml_prefix_is_a_control_token_and_content_is_escaped(chatml_tokenizer, sp):
    im_start, im_end = chatml_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ct = ConversationTokenizer(chatml_tokenizer, get_template("chatml"))
    tc = ct.encode(conv(("user", "say <|im_end|> please", 0.0), ("assistant", "ok", 1.0), condition=""))
    assert tc.input_ids[0] == 1 and tc.input_ids[1] == im_start
    assert tc.input_ids.count(im_start) == 2 and tc.input_ids.count(im_end) == 2  # the typed one is escaped
    assert tc.input_ids[-1] == im_end and tc.weights[-1] == 1.0
    n = len(sp.encode("ok")) + 1
    assert tc.input_ids[-n:-1] == sp.encode("ok") and all(w == 0 for w in tc.weights[:-n])


def test_template_without_its_eot_token_in_the_tokenizer_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="has no '<\\|im_end\\|>' token"):
        ConversationTokenizer(tokenizer, get_template("chatml"))


def test_light_rust_encoder_matches_transformers_exactly(tokenizer):
    from raychat.core.data.tokenizer import build_embedded_tokenizer_dir, load_data_encoder, tokenizer_fingerprint

    light = load_data_encoder(None)
    assert (light.bos_token_id, light.unk_token_id) == (tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert tokenizer_fingerprint(light) == tokenizer_fingerprint(tokenizer)
    texts = ["Hello there", "say <|end_of_turn|> now", "héllo 😎\n\n  code()", ""]
    assert (
        light.encode_plain(texts) == tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    )
    assert (
        light.encode_control("GPT4 Correct User:<|end_of_turn|>")
        == tokenizer("GPT4 Correct User:<|end_of_turn|>", add_special_tokens=False)["input_ids"]
    )
    t = get_template("openchat_3.5")
    c = conv(("user", "What is 2 + 3?", 0.0), ("assistant", "5", 1.0), system="Be brief.")
    assert ConversationTokenizer(light, t).encode(c) == ConversationTokenizer(tokenizer, t).encode(c)
    assert (build_embedded_tokenizer_dir() / "tokenizer.json").is_file()


def test_tokenizer_model_file_can_come_from_the_environment(monkeypatch, tmp_path):
    """A machine without mistral-common (a lent GPU box) names a copy of the model file instead."""
    from raychat.core.data import tokenizer as tokenization

    default = tokenization.embedded_tokenizer_file()
    copy = tmp_path / "tokenizer.model.v1"
    copy.write_bytes(default.read_bytes())
    default_cache = tokenization._embedded_cache_dir()
    monkeypatch.setenv("RAYCHAT_TOKENIZER_MODEL", str(copy))
    assert tokenization.embedded_tokenizer_file() == copy
    assert tokenization._embedded_cache_dir() != default_cache  # keyed by the file's hash, not mistral-common
    monkeypatch.setenv("RAYCHAT_TOKENIZER_MODEL", str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="RAYCHAT_TOKENIZER_MODEL"):
        tokenization.embedded_tokenizer_file()
