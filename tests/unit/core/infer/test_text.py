"""raychat.core.infer.text: token ids to streamed text and stop strings, with the real Mistral tokenizer."""

import pytest

from raychat.core.infer.batcher import StepToken
from raychat.core.infer.text import CompletionText, IncrementalDetokenizer, StopStringMatcher


def test_detokenizer_never_splits_multibyte_characters(tokenizer):
    text = "héllo 😎 wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in x for x in deltas)


def test_detokenizer_keeps_spaces_between_words_of_a_long_text(tokenizer):
    text = "The quick brown fox jumps over the lazy dog, then naps under 3 old trees until sunset."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer)
    assert "".join(d.push(i) for i in ids) + d.flush() == tokenizer.decode(ids)


@pytest.mark.parametrize(
    "pieces,stops,emitted,stopped",
    [
        (["Hello wor", "ld! STO", "P now"], ["STOP"], "Hello world! ", True),  # spans pieces
        (["abc", "de"], ["x"], "abcde", False),
        (["one two", " three"], ["three", "two"], "one ", True),  # the earliest stop wins
        (["a##", "#b"], ["###"], "a", True),
        (["end S"], ["STOP"], "end S", False),  # held back, then released at the end
    ],
)
def test_stop_strings_are_cut_even_across_pieces(pieces, stops, emitted, stopped):
    m = StopStringMatcher(stops)
    out = [m.push(p) for p in pieces]
    assert "".join(out) + m.flush() == emitted and m.stopped == stopped


def test_streamed_text_never_shows_the_start_of_a_stop_string_before_it_is_decided():
    m = StopStringMatcher(["</answer>"])
    assert m.push("42 </ans") == "42 "
    assert m.push("wer> more") == "" and m.stopped


def test_completion_text_cuts_stop_string_spanning_tokens_and_reports_stop(tokenizer):
    ids = tokenizer("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    c = CompletionText(tokenizer, stop=["capital of"])
    deltas = [c.push(StepToken(i)) for i in ids]
    assert "".join(d.text for d in deltas) == "Paris is the "
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]


@pytest.mark.parametrize(
    "text", ["héllo 😎 wörld", "The quick brown fox jumps over the lazy dog.", "  two  spaces\nand 中文字符"]
)
def test_detokenizer_paths_agree_with_one_decode(tokenizer, text):
    """DecodeStream (fast tokenizers), the Python window and a whole non-streamed text give decode()'s text."""
    import random

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    noise = [rng.randrange(3, tokenizer.vocab_size) for _ in range(40)]  # random ids: partial characters, odd pieces
    for seq in (ids, noise, ids + noise):
        want = tokenizer.decode(seq, skip_special_tokens=True)
        fast = IncrementalDetokenizer(tokenizer)
        assert fast._stream is not None  # the test tokenizer is a fast one: DecodeStream is used
        slow = IncrementalDetokenizer(tokenizer)
        slow._stream = None
        for d in (fast, slow):
            assert "".join(d.push(i) for i in seq) + d.flush() == want
        whole = CompletionText(tokenizer, incremental=False)
        deltas = [whole.push(StepToken(i)) for i in seq[:-1]] + [whole.push(StepToken(seq[-1], "length"))]
        assert [d.text for d in deltas[:-1]] == [""] * (len(seq) - 1) and deltas[-1].text == want
        assert deltas[-1].completion_tokens == len(seq) and deltas[-1].finish_reason == "length"


def test_non_streamed_text_with_stop_strings_still_stops_early(tokenizer):
    ids = tokenizer("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    c = CompletionText(tokenizer, stop=["capital of"], incremental=False)
    deltas = [c.push(StepToken(i)) for i in ids]
    assert "".join(d.text for d in deltas) == "Paris is the "
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
