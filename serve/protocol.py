"""The OpenAI HTTP protocol: request/response models and the error format (no Ray, no engine)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Who wrote the message.")
    content: str = Field(description="The message text.")


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Model id from /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, gt=0, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(default=None, gt=0, description="Alias of max_tokens (newer clients).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool = Field(default=False, description="Stream chunks as server-sent events.")
    condition: str | None = Field(default=None, description="OpenChat extension: C-RLFT condition, e.g. 'GPT4 Correct'.")


class EngineRequest(BaseModel):
    """What the router asks of the engine (transport between deployments)."""

    messages: list[tuple[str, str]]
    system: str = ""
    condition: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class EngineChunk(BaseModel):
    """One streamed piece from the engine; the last one carries ``finish_reason``."""

    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: dict | None = None  # OpenAI error object for user errors (e.g. context length)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "raychat"
    root: str | None = Field(default=None, description="Where the weights came from (checkpoint URI).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-format error object (wrapped as ``{"error": ...}`` in responses)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
