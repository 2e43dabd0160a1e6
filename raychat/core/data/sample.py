"""A small synthetic C-RLFT dataset written by raychat itself (no external data).

Two sources, as in OpenChat: an *expert* source (condition ``GPT4 Correct``, weight 1.0)
whose answers are complete and correct, and a *sub-optimal* source (condition ``GPT3``,
weight 0.1) whose answers are terse and sometimes wrong. Optionally a few malformed rows
are appended so the demo shows quarantine at work.
"""

from __future__ import annotations

import json
import random

EXPERT = ("GPT4 Correct", 1.0)
SUBOPTIMAL = ("GPT3", 0.1)

_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
_ANIMALS = ["cat", "dog", "owl", "fox", "horse", "whale"]

# Malformed rows: each exercises one validation rule and must end up quarantined.
BAD_ROWS = [
    '{"items": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel',  # cut off
    '{"items": [{"role": "wizard", "content": "abracadabra"}, {"role": "assistant", "content": "ok"}]}',
    '{"items": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}]}',
    '{"items": [{"role": "user", "content": "only a question"}]}',
    '["not", "an", "object"]',
]


def _qa(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a + b + rng.choice([-1, 1])}"
    if kind == 1:
        c, an = rng.choice(_COLORS), rng.choice(_ANIMALS)
        return (
            f"Write one sentence about a {c} {an}.",
            f"The {c} {an} rested quietly in the afternoon sun.",
            f"{an} is {c}",
        )
    n = rng.randrange(2, 9)
    return (
        f"Count from 1 to {n}.",
        ", ".join(str(i) for i in range(1, n + 1)) + ".",
        " ".join(str(i) for i in range(1, n)),
    )


#: The C-RLFT sources of the sample data, as ``raychat.jobs.pretokenize --sources`` takes them.
SAMPLE_SOURCES = {
    "gpt4": {"condition": EXPERT[0], "weight": EXPERT[1]},
    "gpt35": {"condition": SUBOPTIMAL[0], "weight": SUBOPTIMAL[1]},
}


def make_conversations(n: int, seed: int = 0, expert_fraction: float = 0.5) -> list[dict]:
    """``n`` distinct conversations in the OpenChat schema, mixing both sources (``model`` field)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(50 * n):  # bounded: the question space is far larger than any sample size
        if len(rows) == n:
            break
        i = len(rows)
        question, good, poor = _qa(rng)
        expert = rng.random() < expert_fraction
        condition, weight = EXPERT if expert else SUBOPTIMAL
        items = [
            {"role": "user", "content": question, "weight": 0.0},
            {"role": "assistant", "content": good if expert else poor, "weight": weight},
        ]
        if rng.random() < 0.3:
            q2, g2, p2 = _qa(rng)
            items += [
                {"role": "user", "content": q2, "weight": 0.0},
                {"role": "assistant", "content": g2 if expert else p2, "weight": weight},
            ]
        system = "You are a helpful assistant." if i % 4 == 0 else ""
        key = json.dumps([system, items])
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "id": f"sample-{i}",
                "model": "gpt4" if expert else "gpt35",
                "items": items,
                "condition": condition,
                "system": system,
            }
        )
    if len(rows) < n:
        raise ValueError(f"could not make {n} distinct sample conversations")
    return rows


def sample_jsonl(n: int = 200, seed: int = 0, include_bad_rows: bool = True) -> str:
    """The sample dataset as JSONL text (bad rows, if any, interleaved at fixed places)."""
    lines = [json.dumps(r) for r in make_conversations(n, seed)]
    if include_bad_rows:
        for k, bad in enumerate(BAD_ROWS):
            lines.insert(min(len(lines), (k + 1) * max(1, n // (len(BAD_ROWS) + 1))), bad)
    return "\n".join(lines) + "\n"
