"""The packed data feed of the training job: one Ray Data dataset per rank, in training order.

Exact, deterministic per ``(seed, epoch)``, resumable, no shared filesystem:

1. The driver streams only ``(file, index, length)`` of the training rows (≈16 bytes per row, no
   tokens), keys each row by a hash of its source ``(file, index)`` and plans every epoch with
   OpenChat's multipack (:func:`raychat.core.train.plan.plan_feed`): each optimizer step gives every rank
   ``grad_accum`` packs of whole conversations within ``batch_max_len`` tokens, so all ranks run
   the same number of steps (their collectives stay matched).
2. The plan, as per-row tables (rank, micro-batch, position), goes to the object store once. Each
   rank gets its own Ray Data dataset (``train_<rank>``, handed out whole by Ray Train's
   ``DataConfig``): the parquet rows joined to the plan by key, kept if they belong to that rank,
   and sorted into training order with Ray Data's distributed sort. Ray Data's
   ``streaming_split`` cannot say which row goes to which rank; this can, which is what makes the
   global plan — and so the packing efficiency and the exact data position — possible.
3. The worker regroups its sorted rows into packs (:func:`raychat.core.train.plan.group_packs`). The data
   position is the optimizer step: on resume (re-run or worker-group restart) packs of earlier
   steps are skipped, so the run sees exactly the packs it would have seen without the stop.
"""

from __future__ import annotations

import hashlib

import numpy as np
import ray


def _eval_flags(batch: dict, fraction: float) -> np.ndarray:
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") / 2**64 < fraction
            for i in batch["id"]
        ],
        dtype=bool,
    )


TRAIN_COLUMNS = ["file", "index", "length", "input_ids", "weights"]


def split_train_eval(ds, fraction: float):
    """Deterministic, streaming split by a stable hash of the row id (no materialisation, no shuffle)."""
    if fraction <= 0:
        return ds.select_columns(TRAIN_COLUMNS), None
    flagged = ds.map_batches(lambda b: {**b, "is_eval": _eval_flags(b, fraction)}, batch_format="numpy")
    train = flagged.filter(expr="is_eval == False").select_columns(TRAIN_COLUMNS)
    held_out = flagged.filter(expr="is_eval == True").select_columns(["file", "index", "input_ids", "weights"])
    return train, held_out


def per_rank_eval(eval_ds, num_ranks: int) -> dict:
    """One eval dataset per rank: the held-out rows whose key falls to it (every row exactly once;
    ``streaming_split(equal=True)`` would drop rows to even the counts out)."""

    def keep(rank: int):
        def fn(table):
            import pyarrow as pa

            from raychat.core.train.plan import row_keys

            keys = row_keys(table["file"].to_pylist(), table["index"].to_pylist())
            return table.select(["input_ids", "weights"]).filter(pa.array(keys % np.uint64(num_ranks) == rank))

        return fn

    return {f"eval_{r}": eval_ds.map_batches(keep(r), batch_format="pyarrow") for r in range(num_ranks)}


def _row_meta(batch: dict) -> dict:
    from raychat.core.train.plan import row_keys

    return {
        "key": row_keys(batch["file"], batch["index"]),
        "length": batch["length"].astype(np.int64),
        "supervised": np.array([np.count_nonzero(w) for w in batch["weights"]], dtype=np.int64),
    }


def collect_row_meta(train_ds) -> tuple[np.ndarray, np.ndarray, float]:
    """Row keys (sorted) and lengths, and the share of supervised tokens: ~16 bytes per row on the driver.

    Raises:
        SystemExit: if two rows share a key (the same source record twice).
    """
    keys, lengths, supervised = [], [], 0
    for b in train_ds.map_batches(_row_meta, batch_format="numpy").iter_batches(batch_size=65536, batch_format="numpy"):
        keys.append(b["key"])
        lengths.append(b["length"])
        supervised += int(b["supervised"].sum())
    keys_a = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
    lengths_a = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
    order = np.argsort(keys_a, kind="stable")
    keys_a, lengths_a = keys_a[order], lengths_a[order]
    if keys_a.size and (np.diff(keys_a) == 0).any():
        raise SystemExit(
            "--data has two rows from the same source record (file, index): was one parquet directory written twice?"
        )
    return keys_a, lengths_a, supervised / max(int(lengths_a.sum()), 1)


def _tag_for_rank(tables_ref, rank: int, stride: int):
    """A ``map_batches`` function keeping ``rank``'s rows, once per epoch that uses them, with ``micro`` and ``seq``."""

    def tag(table):
        import pyarrow as pa

        from raychat.core.train.plan import row_keys

        t = _cached_tables(tables_ref)
        keys = row_keys(table["file"].to_pylist(), table["index"].to_pylist())
        idx = np.searchsorted(t["keys"], keys)
        idx = np.minimum(idx, len(t["keys"]) - 1)
        if not np.array_equal(t["keys"][idx], keys):
            raise RuntimeError("a training row is missing from the packing plan (data changed since planning?)")
        rows = table.select(["input_ids", "weights"])
        parts = []
        for e in range(t["rank"].shape[0]):
            sel = np.flatnonzero(t["rank"][e, idx] == rank)
            micro = t["micro"][e, idx[sel]]
            seq = micro * stride + t["pos"][e, idx[sel]]
            parts.append(
                rows.take(pa.array(sel))
                .append_column("micro", pa.array(micro, pa.int64()))
                .append_column("seq", pa.array(seq, pa.int64()))
            )
        return pa.concat_tables(parts)

    return tag


_TABLES: dict = {}


def _cached_tables(ref) -> dict:
    """The plan tables, fetched once per worker process (zero-copy numpy from the object store)."""
    key = ref.hex()
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = ray.get(ref)
    return _TABLES[key]


def per_rank_feeds(train_ds, keys: np.ndarray, plan, num_ranks: int, batch_max_len: int) -> dict:
    """One dataset per rank: its rows of every epoch, sorted into training order (micro, position).

    The global plan (:func:`raychat.core.train.plan.plan_feed`) is joined to the streamed rows by key; the
    sort is Ray Data's distributed sort, so no node holds more than its blocks of token data.
    """
    tables_ref = ray.put({"keys": keys, "rank": plan.rank, "micro": plan.micro, "pos": plan.pos})
    stride = batch_max_len + 1
    # Range boundaries on seq: without them Ray Data samples the data and, not knowing the block
    # count of a filtered dataset, shuffles into 200 partitions — hundreds of tasks for small data.
    micros = int((plan.micro.max() + 1) if plan.micro.size else 1)
    rows_per_rank = keys.size * plan.rank.shape[0] // max(num_ranks, 1)
    parts = max(1, min(200, rows_per_rank // 8192))
    boundaries = [k * micros // parts * stride for k in range(1, parts)] or [micros * stride]
    return {
        f"train_{r}": train_ds.map_batches(_tag_for_rank(tables_ref, r, stride), batch_format="pyarrow").sort(
            "seq", boundaries=boundaries
        )
        for r in range(num_ranks)
    }
