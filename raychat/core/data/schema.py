"""The canonical conversation raychat trains on (OpenChat's schema) and the row outcomes.

Every input format is normalised into :class:`Conversation` by :mod:`raychat.core.data.formats`::

    {"items": [{"role": "user", "content": "...", "weight": 0.0},
               {"role": "assistant", "content": "...", "weight": 1.0}],
     "condition": "GPT4 Correct", "system": ""}

A row that cannot be used raises :class:`InvalidRow` (it is quarantined) or :class:`DroppedRow`
(a documented rule leaves it out); both carry a short, countable ``reason`` slug and a ``detail``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
