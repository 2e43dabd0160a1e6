"""Input formats → the canonical :class:`~raychat.core.data.schema.Conversation`, with C-RLFT sources applied.

Three formats are recognised per row (or forced by config):

============  =====================================================================
``openchat``  ``{"items": [{"role", "content", "weight"}], "condition", "system"}``
``openai``    ``{"messages": [{"role", "content"}]}`` (content may be a list of text parts)
``sharegpt``  ``{"conversations": [{"from", "value"}]}`` (optionally ``"model"``, ``"system"``)
============  =====================================================================

Cleaning rules (each rejection is an :class:`InvalidRow` with a countable reason):

* roles are normalised through :data:`ROLE_MAP`; anything else → ``unknown_role``;
* leading system turns become the system prompt; a system turn later on → ``misplaced_system``;
* consecutive turns of one role are merged (contents joined by a blank line, the larger
  weight kept) or, with ``same_role="quarantine"``, → ``repeated_role``;
* empty or whitespace-only content → ``empty_content``; no turns → ``empty_conversation``;
  no assistant turn → ``no_assistant_turn``; a non-string content → ``invalid_field``.

The C-RLFT source of a row comes from its ``source_field`` (e.g. ``model``), else from the
first matching file pattern, else ``default_source``; its :class:`SourceSpec` gives the
condition and the weight of assistant turns. OpenChat rows keep their own condition and
per-message weights when they have them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from raychat.core.data.schema import Conversation, InvalidRow

Format = Literal["auto", "openchat", "openai", "sharegpt"]
SameRolePolicy = Literal["merge", "quarantine"]

#: Documented role mapping (case-insensitive). ShareGPT's assistants are gpt/chatgpt/bard/bing.
ROLE_MAP: dict[str, str] = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}

_FORMAT_KEYS = {"openchat": "items", "openai": "messages", "sharegpt": "conversations"}


@dataclass(frozen=True)
class SourceSpec:
    """A C-RLFT data source: the condition its rows are tagged with and its reward weight."""

    condition: str
    weight: float


@dataclass(frozen=True)
class SourceRules:
    """How a row's source is found.

    Attributes:
        sources: source name → spec. Empty means "no source mapping": every row is ``default``.
        source_field: row field naming the source (e.g. ``model``), or None.
        file_sources: ``(glob pattern, source name)`` pairs matched against the file path.
        default_source: source of rows with none of the above; None → :attr:`fallback`.
        fallback: spec for rows with no source at all (template's default condition, weight 1).
    """

    sources: Mapping[str, SourceSpec]
    source_field: str | None
    file_sources: tuple[tuple[str, str], ...]
    default_source: str | None
    fallback: SourceSpec

    def resolve(self, obj: dict, file: str) -> tuple[str, SourceSpec]:
        name = None
        if self.source_field and self.source_field in obj and obj[self.source_field] is not None:
            name = str(obj[self.source_field])
        if name is None:
            name = next((src for pat, src in self.file_sources if fnmatch.fnmatch(file, pat)), None)
        if name is None:
            name = self.default_source
        if name is None:
            return "default", self.fallback
        if name not in self.sources:
            if not self.sources:
                return name, self.fallback
            raise InvalidRow(
                "unknown_source", f"source {name!r} is not in the configured sources {sorted(self.sources)}"
            )
        return name, self.sources[name]


def detect_format(obj: dict) -> str:
    """The row's format by its key, or raises ``unknown_format``."""
    for fmt, key in _FORMAT_KEYS.items():
        if key in obj:
            return fmt
    raise InvalidRow("unknown_format", f"none of {sorted(_FORMAT_KEYS.values())} in keys {sorted(obj)[:10]}")


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise InvalidRow("unsupported_content", f"{where}: only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise InvalidRow("invalid_field", f"{where}: content must be a string, got {type(content).__name__}")


def _turns(obj: dict, fmt: str) -> tuple[list[tuple[str, str, float | None]], str]:
    """(role, text, weight or None) triples with normalised roles, plus an explicit system prompt."""
    key = _FORMAT_KEYS[fmt]
    raw = obj.get(key)
    if not isinstance(raw, list):
        raise InvalidRow("invalid_field", f"{key}: expected a list, got {type(raw).__name__}")
    role_key, text_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    turns = []
    for i, t in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise InvalidRow("invalid_field", f"{where}: expected an object, got {type(t).__name__}")
        role_raw = t.get(role_key)
        if not isinstance(role_raw, str):
            raise InvalidRow(
                "missing_field" if role_raw is None else "invalid_field", f"{where}.{role_key}: expected a string"
            )
        role = ROLE_MAP.get(role_raw.strip().lower())
        if role is None:
            raise InvalidRow("unknown_role", f"{where}.{role_key}: {role_raw!r} (known: {sorted(ROLE_MAP)})")
        if text_key not in t:
            raise InvalidRow("missing_field", f"{where}.{text_key}: field required")
        weight = t.get("weight") if fmt == "openchat" else None
        if weight is not None and (
            not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < math.inf
        ):
            raise InvalidRow("invalid_field", f"{where}.weight: expected a number >= 0, got {weight!r}")
        turns.append((role, _text(t[text_key], where), None if weight is None else float(weight)))
    system = obj.get("system") or ""
    if not isinstance(system, str):
        raise InvalidRow("invalid_field", f"system: expected a string, got {type(system).__name__}")
    return turns, system


def normalize(
    obj: object,
    file: str,
    rules: SourceRules,
    fmt: Format = "auto",
    same_role: SameRolePolicy = "merge",
) -> tuple[Conversation, str]:
    """Turns one parsed JSON row into a canonical conversation and its source name.

    Raises:
        InvalidRow: with a countable reason (see the module docstring).
    """
    if not isinstance(obj, dict):
        raise InvalidRow("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    kind = detect_format(obj) if fmt == "auto" else fmt
    if _FORMAT_KEYS[kind] not in obj:
        raise InvalidRow("missing_field", f"{_FORMAT_KEYS[kind]}: field required for format {kind!r}")
    turns, system = _turns(obj, kind)
    source, spec = rules.resolve(obj, file)

    leading_system = []
    while turns and turns[0][0] == "system":
        leading_system.append(turns.pop(0)[1])
    if any(r == "system" for r, _, _ in turns):
        raise InvalidRow("misplaced_system", "a system turn after the conversation started")
    system = "\n".join([s for s in [system, *leading_system] if s])
    if not turns:
        raise InvalidRow("empty_conversation", "no user or assistant turns")
    for i, (_, text, _) in enumerate(turns):
        if not text.strip():
            raise InvalidRow("empty_content", f"turn {i}: content is empty or whitespace only")

    merged: list[list] = []
    for role, text, weight in turns:
        if merged and merged[-1][0] == role:
            if same_role == "quarantine":
                raise InvalidRow("repeated_role", f"two consecutive {role} turns")
            prev = merged[-1]
            prev[1] = prev[1] + "\n\n" + text
            prev[2] = weight if prev[2] is None else (prev[2] if weight is None else max(prev[2], weight))
        else:
            merged.append([role, text, weight])
    if not any(r == "assistant" for r, _, _ in merged):
        raise InvalidRow("no_assistant_turn", "no assistant turn to learn from")

    condition = spec.condition
    if kind == "openchat" and isinstance(obj.get("condition"), str) and obj["condition"]:
        condition = obj["condition"]
    # One validation call per row (pydantic-core validates the nested items in Rust).
    return Conversation.model_validate(
        {
            "items": [{"role": r, "content": t, "weight": spec.weight if w is None else w} for r, t, w in merged],
            "condition": condition,
            "system": system,
        }
    ), source


def content_hash(conv: Conversation) -> bytes:
    """16-byte digest of what the model sees (system, roles, contents) for exact-duplicate detection."""
    h = hashlib.blake2b(digest_size=16)
    h.update(conv.system.encode("utf-8", "surrogatepass"))
    for m in conv.items:
        h.update(b"\x00" + m.role.encode() + b"\x01" + m.content.encode("utf-8", "surrogatepass"))
    return h.digest()
