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


Opened: TypeAlias = tuple[EngineChunk, AsyncIterator[EngineChunk] | None]
"""One choice once the engine answered: its first chunk, and the stream of the rest (None when
the first chunk is the whole answer, i.e. a non-streaming request)."""
