"""Tokenizers and conversation tokenization with per-token C-RLFT loss weights.

The embedded default tokenizer is the real Mistral-7B v0.1 SentencePiece model shipped in
the ``mistral-common`` wheel, plus OpenChat's two special tokens — no network needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from libs.schema import Conversation, DroppedRow
from libs.templates import ChatTemplate, Segment

EOT_TOKEN = "<|end_of_turn|>"
PAD_TOKEN = "<|pad_0|>"
OPENCHAT_SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN)
# Ids OpenChat 3.5 checkpoints use; the embedded tokenizer must reproduce them exactly.
OPENCHAT_SPECIAL_IDS = {EOT_TOKEN: 32000, PAD_TOKEN: 32001}
EMBEDDED_TOKENIZER_NAME = "mistral-7b-v0.1+openchat"

# OpenChat 3.5's published Jinja template, so `tokenizer.apply_chat_template` agrees with raychat.
OPENCHAT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ 'GPT4 Correct ' + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)


def embedded_tokenizer_file() -> Path:
    """Path of Mistral-7B v0.1's SentencePiece model inside the installed ``mistral-common``."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the installed mistral-common does not ship tokenizer.model.v1"
        )
    return path


def _embedded_cache_dir() -> Path:
    import mistral_common
    import transformers

    root = Path(os.environ.get("RAYCHAT_CACHE", Path(tempfile.gettempdir()) / "raychat"))
    return root / "tokenizers" / f"embedded-mc{mistral_common.__version__}-tf{transformers.__version__}"


def build_embedded_tokenizer():
    """The default tokenizer: Mistral-7B v0.1 + ``<|end_of_turn|>`` (32000), ``<|pad_0|>`` (32001).

    Converting the SentencePiece model takes seconds, so the result is cached on local disk
    (``$RAYCHAT_CACHE``, default ``/tmp/raychat``) and later calls load the cached copy.
    """
    from transformers import AutoTokenizer

    cache = _embedded_cache_dir()
    if (cache / "tokenizer.json").is_file():
        try:
            tok = _check_special_ids(AutoTokenizer.from_pretrained(str(cache)))
            tok.name_or_path = EMBEDDED_TOKENIZER_NAME
            return tok
        except (OSError, ValueError, RuntimeError):
            shutil.rmtree(cache, ignore_errors=True)  # a corrupt cache is rebuilt
    tok = _convert_embedded_tokenizer()
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(cache)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def build_embedded_tokenizer_dir() -> Path:
    """Makes sure the embedded tokenizer is cached on disk and returns its directory."""
    cache = _embedded_cache_dir()
    if not (cache / "tokenizer.json").is_file():
        build_embedded_tokenizer()
    return cache


def _check_special_ids(tok):
    got = {t: tok.convert_tokens_to_ids(t) for t in OPENCHAT_SPECIAL_TOKENS}
    if got != OPENCHAT_SPECIAL_IDS:
        raise RuntimeError(f"special token ids {got} differ from OpenChat's {OPENCHAT_SPECIAL_IDS}")
    return tok


def _convert_embedded_tokenizer():
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(embedded_tokenizer_file(), os.path.join(d, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": list(OPENCHAT_SPECIAL_TOKENS)})
    _check_special_ids(tok)
    tok.pad_token = PAD_TOKEN
    tok.chat_template = OPENCHAT_CHAT_TEMPLATE
    tok.name_or_path = EMBEDDED_TOKENIZER_NAME
    return tok


class TextEncoder(Protocol):
    """What conversation tokenization needs from a tokenizer (transformers' or bare ``tokenizers``)."""

    bos_token_id: int | None
    unk_token_id: int | None

    def encode_control(self, text: str) -> list[int]:
        """Template text: special tokens in it are control tokens."""

    def encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        """User text: special tokens are escaped (plain text tokens), never control tokens."""

    def vocab(self) -> dict[str, int]:
        """Token → id, added tokens included."""


class HFEncoder:
    """:class:`TextEncoder` over a transformers tokenizer (its Rust core when it has one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.unk_token_id = tokenizer.unk_token_id
        rust = getattr(tokenizer, "_tokenizer", None)
        self._rust = rust if rust is not None and hasattr(rust, "encode_batch_fast") else None

    def encode_control(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]

    def encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        if self._rust is not None:
            # Same ids as split_special_tokens=True, without transformers' per-encoding conversion.
            return _rust_encode_escaped(self._rust, texts)
        return self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()


class RustEncoder:
    """:class:`TextEncoder` over a bare ``tokenizers.Tokenizer`` loaded from an HF directory.

    The data stage uses it: it loads in ~0.1 s where transformers (and torch) take seconds,
    and yields exactly the ids of the same directory loaded with ``AutoTokenizer``.
    """

    def __init__(self, directory: str | os.PathLike):
        import json

        from tokenizers import Tokenizer

        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (a fast tokenizer is needed)")
        self.rust = Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            if (d / name).is_file():
                cfg.update(json.loads((d / name).read_text()))
        self.bos_token_id = self._special_id(cfg.get("bos_token"))
        self.unk_token_id = self._special_id(cfg.get("unk_token"))

    def _special_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self.rust.token_to_id(token) if isinstance(token, str) else None

    def encode_control(self, text: str) -> list[int]:
        self.rust.encode_special_tokens = False
        return self.rust.encode(text, add_special_tokens=False).ids

    def encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        return _rust_encode_escaped(self.rust, texts)

    def vocab(self) -> dict[str, int]:
        return self.rust.get_vocab(with_added_tokens=True)


def _rust_encode_escaped(rust, texts: Sequence[str]) -> list[list[int]]:
    previous = rust.encode_special_tokens
    rust.encode_special_tokens = True
    try:
        return [e.ids for e in rust.encode_batch_fast(list(texts), add_special_tokens=False)]
    finally:
        rust.encode_special_tokens = previous


def as_encoder(tokenizer) -> TextEncoder:
    """A :class:`TextEncoder` for a transformers tokenizer, or the encoder itself."""
    return tokenizer if hasattr(tokenizer, "encode_plain") else HFEncoder(tokenizer)


def load_data_encoder(path: str | os.PathLike | None) -> TextEncoder:
    """The light encoder the data stage uses: ``path`` (an HF directory) or the embedded default."""
    if path is None:
        build_embedded_tokenizer_dir()
        path = _embedded_cache_dir()
    return RustEncoder(path)


@dataclass
class TokenizedConversation:
    """Token ids with unshifted weights: ``weights[t]`` weighs predicting ``input_ids[t]``."""

    input_ids: list[int]
    weights: list[float]
    truncated: bool = False

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))


class ConversationTokenizer:
    """Turns conversations (or prompts) into token ids and C-RLFT weights with a template.

    Every text segment is tokenized on its own without BOS/EOS, with special tokens escaped
    so a user who types ``<|end_of_turn|>`` gets plain-text tokens, never the control token.
    """

    def __init__(self, tokenizer, template: ChatTemplate, max_length: int | None = None):
        self.encoder = as_encoder(tokenizer)
        self.template = template
        self.max_length = max_length or template.max_context
        self.bos_id = self.encoder.bos_token_id
        if template.add_bos and self.bos_id is None:
            raise ValueError(f"template {template.name!r} needs a BOS token; the tokenizer has none")
        self.eot_ids = self.encoder.encode_control(template.eot_token)
        if len(self.eot_ids) != 1 or self.eot_ids[0] == self.encoder.unk_token_id:
            raise ValueError(
                f"tokenizer has no {template.eot_token!r} token (template {template.name!r}); add it as a special token first"
            )
        self.eot_id = self.eot_ids[0]
        self._prefix_cache: dict[str, list[int]] = {}

    def _prefix_ids(self, text: str) -> list[int]:
        ids = self._prefix_cache.get(text)
        if ids is None:
            ids = self._prefix_cache[text] = self.encoder.encode_control(text)
        return ids

    def _encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder.encode_plain(texts) if texts else []

    def encode_segments(self, segment_lists: Sequence[list[Segment]]) -> list[tuple[list[int], list[float]]]:
        """Tokenizes many segment lists with one batched tokenizer call for all user text."""
        texts = [s.text for segs in segment_lists for s in segs if s.kind in ("content", "system")]
        encoded = iter(self._encode_texts(texts))
        out = []
        for segs in segment_lists:
            ids: list[int] = []
            weights: list[float] = []
            for s in segs:
                if s.kind == "bos":
                    piece = [self.bos_id]
                elif s.kind == "eot":
                    piece = self.eot_ids
                elif s.kind == "prefix":
                    piece = self._prefix_ids(s.text)
                else:
                    piece = next(encoded)
                ids += piece
                weights += [s.weight] * len(piece)
            out.append((ids, weights))
        return out

    def conversation_segments(self, conv: Conversation) -> list[Segment]:
        return self.template.segments(
            [(m.role, m.content, m.weight) for m in conv.items],
            condition=conv.condition,
            system=conv.system,
        )

    def finalize(self, ids: list[int], weights: list[float]) -> TokenizedConversation:
        """Truncates to ``max_length`` and trims trailing zero-weight tokens.

        Raises:
            DroppedRow: ``no_supervised_tokens`` when nothing weighs more than 0 after truncation.
        """
        truncated = len(ids) > self.max_length
        ids, weights = ids[: self.max_length], weights[: self.max_length]
        end = len(weights)
        while end and weights[end - 1] == 0.0:
            end -= 1
        if end == 0:
            why = "after truncation to %d tokens" % self.max_length if truncated else "(all weights are 0)"
            raise DroppedRow("no_supervised_tokens", f"no token with weight > 0 {why}")
        return TokenizedConversation(ids[:end], weights[:end], truncated)

    def encode(self, conv: Conversation) -> TokenizedConversation:
        """Tokenizes one conversation for training."""
        ((ids, weights),) = self.encode_segments([self.conversation_segments(conv)])
        return self.finalize(ids, weights)

    def encode_prompt(
        self, messages: list[tuple[str, str]], condition: str | None = None, system: str = ""
    ) -> list[int]:
        """Tokenizes a chat prompt for generation, ending with the open assistant prefix."""
        segs = self.template.segments(
            [(role, content, 0.0) for role, content in messages],
            condition=condition,
            system=system,
            add_generation_prompt=True,
        )
        ((ids, _),) = self.encode_segments([segs])
        return ids


def tokenizer_fingerprint(tokenizer) -> str:
    """A short digest of the vocabulary (token → id), to tell tokenizers apart in data metadata."""
    import hashlib
    import json

    vocab = sorted(as_encoder(tokenizer).vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
