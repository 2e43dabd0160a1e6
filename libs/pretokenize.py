"""Row-level logic of the data stage: JSONL lines in, training rows / quarantine records out.

Every line ends in exactly one of three places — a written row, a quarantine record
(the original line, its file, and a reason), or a documented drop counted by reason — so
``read = written + quarantined + dropped`` always holds.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from libs.schema import DroppedRow, InvalidRow, parse_conversation
from libs.tokenization import ConversationTokenizer

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("condition", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("length", pa.int32()),
        ("total_weight", pa.float32()),
    ]
)


@dataclass
class BatchResult:
    """What one batch of lines became."""

    table: pa.Table
    quarantined: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    read: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0

    def counts(self) -> dict:
        return {
            "read": self.read,
            "written": self.table.num_rows,
            "quarantined": len(self.quarantined),
            "quarantined_by_reason": dict(Counter(q["reason"] for q in self.quarantined)),
            "dropped_by_reason": dict(self.dropped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
        }


def batch_key(lines: list[str], sources: list[str]) -> str:
    """A deterministic name for a batch's side files, so a retried task overwrites, not duplicates."""
    h = hashlib.sha1()
    for s, line in zip(sources, lines):
        h.update(s.encode())
        h.update(b"\0")
        h.update(line.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()[:20]


def process_lines(lines: list[str], sources: list[str], ct: ConversationTokenizer) -> BatchResult:
    """Validates and tokenizes a batch of JSONL lines (one batched tokenizer call)."""
    res = BatchResult(table=ROW_SCHEMA.empty_table(), read=len(lines))
    convs, kept = [], []
    for line, src in zip(lines, sources):
        try:
            conv = parse_conversation(line)
        except InvalidRow as e:
            res.quarantined.append({"source": src, "reason": e.reason, "detail": e.detail, "record": line})
            continue
        convs.append(conv)
        kept.append((line, src))
    encoded = ct.encode_segments([ct.conversation_segments(c) for c in convs])
    cols: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    for conv, (line, src), (ids, weights) in zip(convs, kept, encoded):
        try:
            tc = ct.finalize(ids, weights)
        except DroppedRow as e:
            res.dropped[e.reason] += 1
            continue
        raw_id = _row_id(line)
        cols["id"].append(raw_id if raw_id is not None else f"{src}#{batch_key([line], [src])}")
        cols["source"].append(src)
        cols["condition"].append(conv.condition)
        cols["input_ids"].append(tc.input_ids)
        cols["weights"].append(tc.weights)
        cols["length"].append(len(tc.input_ids))
        cols["total_weight"].append(tc.total_weight)
        res.truncated += tc.truncated
        res.tokens += len(tc.input_ids)
        res.supervised_tokens += sum(1 for w in tc.weights if w > 0)
    res.table = pa.table(cols, schema=ROW_SCHEMA)
    return res


def _row_id(line: str) -> str | None:
    import json

    obj = json.loads(line)
    rid = obj.get("id")
    return str(rid) if rid is not None else None


def merge_counts(parts: list[dict]) -> dict:
    """Sums per-batch :meth:`BatchResult.counts` into a job report."""
    total: dict = {"read": 0, "written": 0, "quarantined": 0, "truncated": 0, "tokens": 0, "supervised_tokens": 0}
    by_q, by_d = Counter(), Counter()
    for p in parts:
        for k in total:
            total[k] += p[k]
        by_q.update(p["quarantined_by_reason"])
        by_d.update(p["dropped_by_reason"])
    total["quarantined_by_reason"] = dict(by_q)
    total["dropped_by_reason"] = dict(by_d)
    total["dropped"] = sum(by_d.values())
    return total
