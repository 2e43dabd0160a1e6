"""Chat templates as data, shared by the data stage (training rows) and serving (prompts).

A conversation renders as a list of :class:`Segment` s — BOS, role prefixes, contents and
end-of-turn markers — each tokenized on its own, which is how OpenChat's reference
tokenizer builds its sequences (prefix and content are never merged across a boundary).
For OpenChat 3.5 a two-turn chat reads::

    <s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello<|end_of_turn|>
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

SegmentKind = Literal["bos", "eot", "prefix", "system", "content"]


class Segment(NamedTuple):
    """A run of text tokenized on its own (a tuple: cheap to make by the hundred thousand).

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
    """A conversation format, as data (the data stage and serving share it).

    Attributes:
        name: registry key, recorded in the data's metadata.
        prefix: role prefix format with ``{condition}`` and ``{role}``; tokenized on its own with
            special tokens recognised (ChatML's ``<|im_start|>`` is a control token there).
        role_names: what ``{role}`` becomes for ``user`` / ``assistant``.
        strip_prefix: strip the formatted prefix (so an empty condition gives ``"User:"``).
        eot_token: end-of-turn text (tokenized with special tokens recognised); generation stops on it.
        default_condition: condition used when serving and for rows with no source.
        add_bos: whether sequences start with the tokenizer's BOS token.
        max_context: the model family's context length, the default truncation length.
    """

    name: str
    prefix: str = "{condition} {role}:"
    role_names: tuple[tuple[str, str], ...] = (("user", "User"), ("assistant", "Assistant"))
    strip_prefix: bool = True
    eot_token: str = "<|end_of_turn|>"
    default_condition: str = "GPT4 Correct"
    add_bos: bool = True
    max_context: int = 8192

    def role_prefix(self, role: str, condition: str | None) -> str:
        """The prefix text, e.g. ``"GPT4 Correct User:"``; ``None`` condition means the default."""
        return _role_prefix(self, role, self.default_condition if condition is None else condition)

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
            system: optional system prompt (followed by an end-of-turn).
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
            elif s.kind == "content" and self.strip_prefix:
                out.append(" " + s.text)
            else:
                out.append(s.text)
        return "".join(out)


@functools.lru_cache(maxsize=4096)
def _role_prefix(template: ChatTemplate, role: str, condition: str) -> str:
    text = template.prefix.format(condition=condition, role=dict(template.role_names)[role])
    return text.strip() if template.strip_prefix else text


TEMPLATES: dict[str, ChatTemplate] = {
    # OpenChat 3.5 (Mistral 7B): "GPT4 Correct User: ...<|end_of_turn|>GPT4 Correct Assistant:"
    "openchat_3.5": ChatTemplate(name="openchat_3.5"),
    # OpenChat 3.2 (Llama 2 13B): same prefixes, condition "GPT4", 4k context.
    "openchat_3.2": ChatTemplate(name="openchat_3.2", default_condition="GPT4", max_context=4096),
    # ChatML as OpenChat trains it: "<|im_start|>user\n...<|im_end|>"; conditions are not used.
    "chatml": ChatTemplate(
        name="chatml",
        prefix="<|im_start|>{role}\n",
        role_names=(("user", "user"), ("assistant", "assistant")),
        strip_prefix=False,
        eot_token="<|im_end|>",
        default_condition="",
    ),
}


def get_template(name: str) -> ChatTemplate:
    """Looks up a template by name with an error that lists the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None
