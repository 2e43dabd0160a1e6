"""The conversation schema raychat trains on (OpenChat's), and row validation.

A row is one JSON object per line::

    {"items": [{"role": "user", "content": "...", "weight": 0.0},
               {"role": "assistant", "content": "...", "weight": 1.0}],
     "condition": "GPT4 Correct", "system": ""}

Validation never raises anything but :class:`InvalidRow`, whose ``reason`` is a short,
stable, machine-countable slug (``bad_json``, ``unknown_role``...) and whose ``detail``
is the human explanation. The data job quarantines such rows with both.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class InvalidRow(ValueError):
    """A row that cannot be trained on. ``reason`` is a slug, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DroppedRow(Exception):
    """A valid row left out by a documented rule (e.g. nothing to learn after truncation)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"] = Field(description="Who speaks: 'user' or 'assistant'.")
    content: str = Field(description="The turn's text; must not be empty or whitespace only.")
    weight: float = Field(
        default=1.0,
        ge=0.0,
        description="C-RLFT reward weight of this turn's tokens (assistant turns only are trained on).",
    )

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("content is empty or whitespace only")
        return v


class Conversation(BaseModel):
    """One training example in the OpenChat schema."""

    model_config = ConfigDict(extra="ignore")

    items: list[Message] = Field(min_length=1, description="The turns, in order.")
    condition: str = Field(
        default="", description="C-RLFT condition: the role-prefix tag of the data source, e.g. 'GPT4 Correct'."
    )
    system: str = Field(default="", description="Optional system prompt placed before the first turn.")

    @field_validator("items")
    @classmethod
    def _has_assistant(cls, v: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in v):
            raise ValueError("no assistant turn to learn from")
        return v


def _reason_from_validation(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "literal_error" and loc.endswith("role"):
        return "unknown_role", f"{loc}: {msg} (got {first.get('input')!r})"
    if "empty or whitespace" in msg:
        return "empty_content", f"{loc}: {msg}"
    if "no assistant turn" in msg:
        return "no_assistant_turn", msg
    if first["type"] == "missing":
        return "missing_field", f"{loc}: field required"
    return "invalid_field", f"{loc}: {msg}"


def parse_conversation(line: str | bytes) -> Conversation:
    """Parses and validates one JSONL line.

    Raises:
        InvalidRow: with a countable ``reason`` when the line is not a valid conversation.
    """
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRow("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise InvalidRow("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return Conversation.model_validate(obj)
    except ValidationError as e:
        raise InvalidRow(*_reason_from_validation(e)) from None
