"""The OpenAI HTTP protocol: request/response models (no Ray, no engine).

Requests accept and ignore OpenAI fields raychat has no use for (``user``, ``parallel_tool_calls``…)
but reject, naming the parameter, those whose meaning it cannot honour (``tools``, ``suffix``): a
client silently getting something else is worse than a 400. ``logprobs``, ``echo`` and
``response_format`` are passed to the engine, which answers 400 naming them when it cannot honour them.

The error format is :mod:`raychat.serve.errors`; what the router and the engine send each other is
:mod:`raychat.serve.engine_protocol`.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who wrote the message ('developer' is OpenAI's newer name for 'system')."
    )
    content: str | list[TextPart] = Field(description="The message text, or a list of text parts (joined).")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, description="Send a last chunk with usage and no choices.")


class _SamplingRequest(BaseModel):
    """Fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Model id from /v1/models.")
    max_tokens: int | None = Field(default=None, gt=0, description="Most tokens to generate per choice.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices to generate for each prompt.")
    stop: str | list[str] | None = Field(
        default=None, validate_default=True, description="Up to 16 strings that end the completion (not returned)."
    )
    seed: int | None = Field(default=None, description="Seed for reproducible sampling (choice i uses seed + i).")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Penalty on tokens already generated.")
    frequency_penalty: float = Field(
        default=0.0, ge=-2.0, le=2.0, description="Penalty per time a token was generated."
    )
    stream: bool = Field(default=False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options (include_usage).")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _unsupported(value, name: str):
    if value not in (None, False, 0, [], ""):
        raise ValueError(f"{name} is not supported by this server")
    return value


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="response", description="The schema's name.")
    json_schema: dict = Field(alias="schema", description="The JSON Schema the output must validate against.")
    strict: bool | None = Field(default=None, description="Accepted; the output always follows the schema.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = Field(description="What the output must be.")
    json_schema: JSONSchemaFormat | None = Field(default=None, description="With type json_schema: the schema.")

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: type json_schema needs a json_schema object")
        return self

    def for_engine(self) -> dict | None:
        """What the engine is asked for: None for free text."""
        if self.type == "json_schema":
            return {"type": "json_schema", "schema": self.json_schema.json_schema}
        return None if self.type == "text" else {"type": self.type}


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(default=None, gt=0, description="Alias of max_tokens (newer clients).")
    condition: str | None = Field(
        default=None, description="OpenChat extension: C-RLFT condition, e.g. 'GPT4 Correct'."
    )
    logprobs: bool | None = Field(default=None, description="Return the logprob of each generated token.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: also the N most likely alternatives."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="'text', 'json_object' or 'json_schema' (the output parses and validates)."
    )
    tools: list | None = Field(
        default=None,
        description="Not supported (400 when non-empty): the OpenChat template has no tool-call format to parse.",
    )
    tool_choice: str | dict | None = Field(default=None, description="Only 'none' (or unset) is supported.")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError(
                "tools are not supported: the model's chat template (OpenChat) has no tool-call format to parse"
            )
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none"):
            raise ValueError("tool_choice: only 'none' is supported (this model's template has no tool calls)")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return v

    def engine_logprobs(self) -> int | None:
        """What the engine is asked for: None, or how many alternatives per token (0: none)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _needs_a_turn(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role in ("user", "assistant") for m in v):
            raise ValueError("need at least one user message")
        return v


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` body (legacy text completions)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt text, several prompts, or token ids (one list or several)."
    )
    max_tokens: int | None = Field(
        default=16, gt=0, description="Most tokens to generate per choice (OpenAI's default: 16)."
    )
    echo: bool = Field(default=False, description="Return the prompt before the completion (with its logprobs).")
    suffix: str | None = Field(default=None, description="Not supported (400 when set).")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return each token's logprob and the N most likely alternatives (0: the token's own only).",
    )
    best_of: int | None = Field(default=None, description="Only best_of == n (or unset) is supported.")

    @field_validator("suffix")
    @classmethod
    def _reject(cls, v, info):
        return _unsupported(v, info.field_name)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict | None = None


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
    logprobs: dict | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None


class Completion(BaseModel):
    """A text completion; streamed chunks have the same shape (``object`` is ``text_completion`` in both)."""

    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "raychat"
    root: str | None = Field(default=None, description="Where the weights came from (checkpoint URI).")
    checkpoint: dict | None = Field(
        default=None, description="raychat: the checkpoint's run, selection, step and eval loss."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list) -> dict:
    """A chat choice's ``logprobs`` (``{"content": [...]}``) from the engine's ``(token, logprob, top)`` entries."""
    return {
        "content": [
            {
                "token": tok,
                "logprob": lp,
                "bytes": _token_bytes(tok),
                "top_logprobs": [{"token": t, "logprob": x, "bytes": _token_bytes(t)} for t, x in top],
            }
            for tok, lp, top in entries
        ]
    }


def completion_logprobs(entries: list, text_offset: int = 0) -> dict:
    """A text completion choice's ``logprobs`` (tokens, token_logprobs, top_logprobs, text_offset).

    ``text_offset`` is where the first entry's token starts in the choice's text (streams: the text sent before).
    """
    offsets = []
    for tok, _, _ in entries:
        offsets.append(text_offset)
        text_offset += len(tok)
    return {
        "tokens": [tok for tok, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if lp is None else dict(top) for _, lp, top in entries],
        "text_offset": offsets,
    }
