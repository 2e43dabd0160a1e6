"""Chat templates as data, shared by the data stage (training rows) and serving (prompts).

A conversation renders as a list of :class:`Segment` s — BOS, role prefixes, contents and
end-of-turn markers — each tokenized on its own, which is how OpenChat's reference
tokenizer builds its sequences (prefix and content are never merged across a boundary).
For OpenChat 3.5 a two-turn chat reads::

    <s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello<|end_of_turn|>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SegmentKind = Literal["bos", "eot", "prefix", "system", "content"]


@dataclass(frozen=True)
class Segment:
    """A run of text tokenized on its own.

    Attributes:
        kind: what the run is; ``bos``/``eot`` are control tokens, ``content`` is user text
            (tokenized with special tokens escaped), the rest is template text.
        text: the text (empty for ``bos``).
        weight: loss weight of every token of the run (unshifted: weighs predicting it).
    """

    kind: SegmentKind
    text: str
    weight: float = 0.0


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format.

    Attributes:
        name: registry key, recorded in data metadata.
        user_role: the word after the condition in a user prefix ("User").
        assistant_role: the word after the condition in an assistant prefix ("Assistant").
        eot_token: the end-of-turn control token; generation stops on it.
        default_condition: condition used when a row or request names none.
        add_bos: whether sequences start with the tokenizer's BOS token.
    """

    name: str
    user_role: str = "User"
    assistant_role: str = "Assistant"
    eot_token: str = "<|end_of_turn|>"
    default_condition: str = "GPT4 Correct"
    add_bos: bool = True

    def role_prefix(self, role: str, condition: str | None) -> str:
        """The prefix text, e.g. ``"GPT4 Correct User:"``; stripped, so an empty condition gives ``"User:"``."""
        word = self.user_role if role == "user" else self.assistant_role
        cond = self.default_condition if condition is None else condition
        return f"{cond} {word}:".strip()

    def segments(
        self,
        messages: list[tuple[str, str, float]],
        condition: str | None = None,
        system: str = "",
        add_generation_prompt: bool = False,
    ) -> list[Segment]:
        """Renders a conversation into tokenizable segments with loss weights.

        Args:
            messages: ``(role, content, weight)`` triples; only assistant turns keep their
                weight, user turns always weigh 0.
            condition: the C-RLFT condition; ``None`` means :attr:`default_condition`.
            system: optional system prompt (followed by an end-of-turn token).
            add_generation_prompt: end with an open assistant prefix (for serving).
        """
        segs: list[Segment] = []
        if self.add_bos:
            segs.append(Segment("bos", ""))
        if system:
            segs += [Segment("system", system), Segment("eot", self.eot_token)]
        for role, content, weight in messages:
            w = float(weight) if role == "assistant" else 0.0
            segs.append(Segment("prefix", self.role_prefix(role, condition)))
            segs.append(Segment("content", content, w))
            # The assistant learns to emit end-of-turn, so it carries the message weight.
            segs.append(Segment("eot", self.eot_token, w))
        if add_generation_prompt:
            segs.append(Segment("prefix", self.role_prefix("assistant", condition)))
        return segs

    def render(self, segments: list[Segment], bos_text: str = "<s>") -> str:
        """Human-readable text of segments (for logs and docs; tokenization uses segments)."""
        out = []
        for s in segments:
            if s.kind == "bos":
                out.append(bos_text)
            elif s.kind == "content":
                out.append(" " + s.text)
            else:
                out.append(s.text)
        return "".join(out)


TEMPLATES: dict[str, ChatTemplate] = {
    "openchat_3.5": ChatTemplate(name="openchat_3.5"),
}


def get_template(name: str) -> ChatTemplate:
    """Looks up a template by name with an error that lists the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None
