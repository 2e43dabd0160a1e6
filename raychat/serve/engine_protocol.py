"""The ingress ↔ engine contract: what the router asks of an engine replica and what comes back (no Ray).

In the ``split`` layout both cross a deployment handle (pickled); in ``combined`` they stay in
the replica. User errors the engine finds come back as an :class:`EngineChunk` carrying an OpenAI
error body (:func:`raychat.serve.errors.error_body`), never as an exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, TypeAlias

from pydantic import BaseModel, Field


class EngineRequest(BaseModel):
    """What the router asks of the engine (transport between deployments).

    Exactly one of ``messages`` (chat: rendered with the chat template) and ``prompt`` (text or
    token ids, used as is) is set.
    """

    messages: list[tuple[str, str]] | None = None
    system: str = ""
    condition: str | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = Field(default_factory=list)
    stream: bool = True  # False: the engine sends one chunk with the whole text
    # Logprobs of each generated token and of its `logprobs` most likely alternatives (0: the token's
    # own only); None: no logprobs.
    logprobs: int | None = None
    echo: bool = False  # completions: the prompt's text (and, with logprobs, its tokens' logprobs) come first
    # None (free text), {"type": "json_object"} or {"type": "json_schema", "schema": {...}}.
    response_format: dict | None = None

    def sampling(self) -> dict:
        """The sampling options every engine's sampling parameters take under these names."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


@dataclass(slots=True)
class EngineChunk:
    """One piece from the engine; the last one carries ``finish_reason``.

    A plain dataclass, not a pydantic model: one is built, pickled between replicas and read per
    streamed chunk, where pydantic's validation and pickling cost shows at high concurrency.
    """

    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: dict | None = None  # OpenAI error body for user errors (e.g. context length)
    # With EngineRequest.logprobs: one TokenLogprob per token of `text` (with echo, the prompt's first).
    logprobs: list[TokenLogprob] | None = None


TokenLogprob: TypeAlias = tuple[str, float | None, list[tuple[str, float]]]
"""A token's text, its logprob (None for a prompt's first token) and the most likely alternatives
(text, logprob), most likely first. Plain tuples: one per token crosses the handle in ``split``."""


Opened: TypeAlias = tuple[EngineChunk, AsyncIterator[EngineChunk] | None]
"""One choice once the engine answered: its first chunk, and the stream of the rest (None when
the first chunk is the whole answer, i.e. a non-streaming request)."""


async def last_chunk(chunks: AsyncIterator[EngineChunk]) -> EngineChunk:
    """The last chunk of a non-streamed request's generator: the whole answer."""
    last = None
    async for chunk in chunks:
        last = chunk
    return last
