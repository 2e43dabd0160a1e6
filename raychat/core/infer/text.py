"""The text side of generation: token ids to streamed text, cut at stop strings (no torch, no Ray).

:class:`CompletionText` is one request's text: an :class:`IncrementalDetokenizer` (never splits a
character) feeding a :class:`StopStringMatcher` (stop strings may span tokens; streamed text that
could be the start of a stop string is held back until it is known not to be). The Serve engine
replica runs one per request on the tokens :class:`raychat.core.infer.batcher.ContinuousBatcher`
produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raychat.core.infer.batcher import StepToken


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting characters.

    With a fast tokenizer this is the tokenizers library's own ``DecodeStream`` (one Rust call
    per token: it keeps the few ids before the last emitted text, so SentencePiece's leading
    spaces come out right, and holds back a piece that ends mid-UTF-8-character). Otherwise it
    decodes a short window in Python the same way, so each token costs O(1) instead of
    re-decoding the whole completion.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start (Python path)
        self.read_offset = 0  # ids before this are emitted (Python path)
        self.emitted = 0  # characters handed out so far
        # The Rust decoder gives the same text as transformers' decode, unless decode also cleans up spaces.
        rust = getattr(tokenizer, "_tokenizer", None)
        self._rust = (
            rust if rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False) else None
        )
        self._stream = None
        if self._rust is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers < 0.21
                DecodeStream = None
            if DecodeStream is not None:
                self._stream = DecodeStream(skip_special_tokens=True)

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int | None) -> str:
        """Adds a token (None adds nothing) and returns the newly completed text."""
        if token_id is None:
            return ""
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._rust, token_id) or ""
            self.emitted += len(delta)
            return delta
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = max(self.read_offset - 4, self.prefix_offset)
        self.read_offset = len(self.ids)
        self.emitted += len(delta)
        return delta

    def flush(self) -> str:
        """Whatever text remains at the end (including a trailing partial character)."""
        if self._stream is not None:
            full = self._decode(self.ids)
            rest = full[self.emitted :] if len(full) > self.emitted else ""
        else:
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            self.read_offset = len(self.ids)
            rest = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.emitted += len(rest)
        return rest


class StopStringMatcher:
    """Cuts a streamed text at the first stop string, holding back what could start one.

    ``push`` returns the text that is safe to emit now; text that might be the beginning of a
    stop string stays pending until later text decides. Once a stop string matched, the text
    before it has been emitted and :attr:`stopped` is True.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation (it did not turn into a stop string)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass
class TextDelta:
    """What a request's client sees from one :class:`StepToken`: new text, and the finish reason once done."""

    text: str
    finish_reason: str | None
    completion_tokens: int


class CompletionText:
    """One request's text side: detokenizes its tokens and applies its stop strings.

    ``push`` returns a :class:`TextDelta`; when a stop string matched, its ``finish_reason`` is
    ``"stop"`` even though the model did not stop — the caller aborts the request then.

    ``incremental=False`` (a non-streamed request): nobody reads the text before the end, so
    without stop strings to watch for, the ids are only collected and decoded once, in the last
    delta — the same text as the incremental path, for a fraction of its cost.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), incremental: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stop)
        self.whole = not incremental and not self.matcher.stops
        self.completion_tokens = 0
        self.finished = False

    def push(self, step: StepToken) -> TextDelta:
        if self.finished:
            return TextDelta("", None, self.completion_tokens)
        if step.token_id is not None:
            self.completion_tokens += 1
        if self.whole:
            if step.token_id is not None:
                self.detok.ids.append(step.token_id)
            self.finished = step.finish_reason is not None
            text = self.detok._decode(self.detok.ids) if self.finished else ""
            return TextDelta(text, step.finish_reason, self.completion_tokens)
        raw = self.detok.push(step.token_id)
        if step.finish_reason:
            raw += self.detok.flush()
        text = self.matcher.push(raw)
        finish = step.finish_reason
        if self.matcher.stopped:
            finish = "stop"
        elif finish:
            text += self.matcher.flush()
        self.finished = finish is not None
        return TextDelta(text, finish, self.completion_tokens)
