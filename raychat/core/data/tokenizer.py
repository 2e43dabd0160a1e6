"""Tokenizers and conversation tokenization with per-token C-RLFT loss weights.

The embedded default tokenizer is the real Mistral-7B v0.1 SentencePiece model shipped in
the ``mistral-common`` wheel, plus OpenChat's two special tokens — no network needed.
"""

from __future__ import annotations

import array
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from raychat.core.data.templates import ChatTemplate, Segment

if (
    TYPE_CHECKING
):  # raychat.core.data.schema needs pydantic; tokenizing token ids (a GPU box: torch + transformers only) does not
    from raychat.core.data.schema import Conversation, DroppedRow

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
    """Path of Mistral-7B v0.1's SentencePiece model: ``$RAYCHAT_TOKENIZER_MODEL`` when set (a machine
    without ``mistral-common``, e.g. a GPU box with torch and transformers only), else the file inside
    the installed ``mistral-common``.

    Raises:
        FileNotFoundError: the file named by the variable, or mistral-common's copy, is missing.
    """
    named = os.environ.get("RAYCHAT_TOKENIZER_MODEL")
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"RAYCHAT_TOKENIZER_MODEL={named}: no such file")
        return Path(named)
    try:
        import mistral_common
    except ImportError:
        raise FileNotFoundError(
            "the embedded tokenizer needs the mistral-common package (pip install mistral-common), or "
            "RAYCHAT_TOKENIZER_MODEL naming a copy of its data/tokenizer.model.v1"
        ) from None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed mistral-common does not ship tokenizer.model.v1")
    return path


def _embedded_cache_dir() -> Path:
    import hashlib
    from importlib.metadata import version  # not ``import transformers``: that alone takes ~0.7 s

    root = Path(os.environ.get("RAYCHAT_CACHE", Path(tempfile.gettempdir()) / "raychat"))
    if os.environ.get("RAYCHAT_TOKENIZER_MODEL"):
        source = "sp" + hashlib.sha256(embedded_tokenizer_file().read_bytes()).hexdigest()[:12]
    else:
        source = f"mc{version('mistral-common')}"
    return root / "tokenizers" / f"embedded-{source}-tf{version('transformers')}"


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


_TEXT_KINDS = frozenset(("content", "system"))


@dataclass
class EncodedBatch:
    """Many tokenized conversations as flat arrays (what the data stage writes as Arrow lists).

    Row ``k`` (conversation ``rows[k]`` of the input) is ``input_ids[offsets[k]:offsets[k + 1]]``
    with the same slice of ``weights``; ``weights[t]`` weighs predicting ``input_ids[t]`` (unshifted).
    """

    rows: np.ndarray  # input positions of the kept rows
    dropped: list[tuple[int, DroppedRow]]  # input positions left out, and why
    input_ids: np.ndarray  # int32
    weights: np.ndarray  # float32
    offsets: np.ndarray  # int32, len(rows) + 1
    truncated: np.ndarray  # bool per kept row
    total_weight: np.ndarray  # float64 per kept row
    supervised: np.ndarray  # tokens with weight > 0 per kept row


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

    def _render(self, segment_lists: Sequence[list[Segment]]) -> tuple[list[int], list[float], list[int], list[int]]:
        """Tokenizes segment lists with one batched call for all user text.

        Returns the ids of all lists back to back, then one ``(weight, length)`` run per segment
        and the number of runs and tokens of each list — weights stay run-length encoded.
        """
        texts = [s.text for segs in segment_lists for s in segs if s.kind in _TEXT_KINDS]
        encoded = iter(self.encoder.encode_plain(texts) if texts else ())
        bos, eot, prefix = [self.bos_id], self.eot_ids, self._prefix_ids
        ids: list[int] = []
        run_w: list[float] = []
        run_len: list[int] = []
        row_len: list[int] = []
        for segs in segment_lists:
            start = len(ids)
            for kind, text, weight in segs:
                piece = (
                    next(encoded)
                    if kind in _TEXT_KINDS
                    else eot
                    if kind == "eot"
                    else bos
                    if kind == "bos"
                    else prefix(text)
                )
                ids += piece
                run_w.append(weight)
                run_len.append(len(piece))
            row_len.append(len(ids) - start)
        return ids, run_w, run_len, row_len

    def encode_batch(self, convs: Sequence[Conversation]) -> EncodedBatch:
        """Tokenizes, truncates and trims many conversations at once into flat arrays.

        Each row is cut to ``max_length`` and loses its trailing zero-weight tokens; a row with
        nothing weighing more than 0 left is dropped (``no_supervised_tokens``).
        """
        segment_lists = [self.conversation_segments(c) for c in convs]
        ids, run_w, run_len, row_len = self._render(segment_lists)
        n = len(segment_lists)
        runs_per_row = np.fromiter((len(s) for s in segment_lists), dtype=np.int64, count=n)
        w = np.asarray(run_w, dtype=np.float64)
        length = np.asarray(run_len, dtype=np.int64)
        lengths = np.asarray(row_len, dtype=np.int64)
        row_of_run = np.repeat(np.arange(n), runs_per_row)
        row_start = np.cumsum(lengths) - lengths
        run_end = np.cumsum(length) - row_start[row_of_run]  # within its row
        run_start = run_end - length
        # A row ends after its last weighted token that fits in max_length.
        fits = (w > 0) & (length > 0) & (run_start < self.max_length)
        candidate = np.where(fits, np.minimum(run_end, self.max_length), 0)
        ends = np.zeros(n, dtype=np.int64)
        np.maximum.at(ends, row_of_run, candidate)
        keep = ends > 0
        # Token t of row r survives when its position in the row is below ends[r].
        pos = np.arange(len(ids)) - np.repeat(row_start, lengths)
        mask = pos < np.repeat(ends, lengths)
        all_ids = np.frombuffer(array.array("i", ids), dtype=np.int32) if ids else np.zeros(0, np.int32)
        all_weights = np.repeat(w.astype(np.float32), length)
        kept_len = ends[keep]
        offsets = np.zeros(len(kept_len) + 1, dtype=np.int32)
        np.cumsum(kept_len, out=offsets[1:])
        weights = all_weights[mask]
        starts = offsets[:-1]
        return EncodedBatch(
            rows=np.flatnonzero(keep),
            dropped=[(int(i), self._drop_reason(int(lengths[i]))) for i in np.flatnonzero(~keep)],
            input_ids=all_ids[mask],
            weights=weights,
            offsets=offsets,
            truncated=lengths[keep] > self.max_length,
            total_weight=np.add.reduceat(weights.astype(np.float64), starts) if len(starts) else np.zeros(0),
            supervised=np.add.reduceat((weights != 0).astype(np.int64), starts)
            if len(starts)
            else np.zeros(0, np.int64),
        )

    def _drop_reason(self, length: int) -> DroppedRow:
        from raychat.core.data.schema import DroppedRow

        why = f"after truncation to {self.max_length} tokens" if length > self.max_length else "(all weights are 0)"
        return DroppedRow("no_supervised_tokens", f"no token with weight > 0 {why}")

    def conversation_segments(self, conv: Conversation) -> list[Segment]:
        return self.template.segments(
            [(m.role, m.content, m.weight) for m in conv.items],
            condition=conv.condition,
            system=conv.system,
        )

    def encode(self, conv: Conversation) -> TokenizedConversation:
        """Tokenizes one conversation for training.

        Raises:
            DroppedRow: ``no_supervised_tokens`` when nothing weighs more than 0 after truncation.
        """
        b = self.encode_batch([conv])
        if b.dropped:
            raise b.dropped[0][1]
        return TokenizedConversation(b.input_ids.tolist(), b.weights.tolist(), bool(b.truncated[0]))

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
        return self._render([segs])[0]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short digest of the vocabulary (token → id), to tell tokenizers apart in data metadata."""
    import hashlib
    import json

    vocab = sorted(as_encoder(tokenizer).vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
