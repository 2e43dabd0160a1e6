"""Planning which rows go into which pack (OpenChat's multipack idea), and the training feed's tables.

Planning (:func:`plan_epoch`)
    Every optimizer step gives each of ``num_ranks`` ranks one *pack*: a list of whole rows whose
    total length is at most ``batch_max_len`` tokens. Following OpenChat's
    ``MultipackDistributedSampler``:

    1. Rows are shuffled with a numpy ``Generator`` seeded by ``(seed, epoch)``.
    2. The shuffled order is consumed in large groups of ``B`` bins of capacity ``batch_max_len``
       (``group_bins`` rounded down to whole steps, i.e. a multiple of ``num_ranks``; fewer at the
       end of the epoch). For each group a binary search finds the longest
       *prefix* of the not-yet-packed rows that best-fit-decreasing (BFD: first-fit-decreasing,
       but into the tightest bin that fits, found with ``bisect`` in O(log B)) can fit into the
       ``B`` bins. Rows after that prefix simply stay first in line for the next group, so which
       rows wait (and, at the end of the epoch, which rows are left out) is decided by the
       shuffle, never by row length: short or long rows are not systematically starved.
    3. The ``B`` bins of a group are shuffled and dealt out ``num_ranks`` at a time, so every
       rank gets exactly the same number of steps.
    4. When less than one step's worth of tokens remains, the rest of the epoch's rows are left
       out (``PackingPlan.left_out``); a fresh shuffle next epoch makes them as likely to be used
       as any other row.

    Packing a group of many bins at once (rather than OpenChat's one step at a time) gives BFD
    plenty of small rows to fill gaps with, which is what keeps efficiency above ~99.5%.

The training feed (:func:`plan_feed`, :func:`row_keys`, :func:`group_packs`)
    A multi-epoch plan as per-row tables (rank, micro-batch, position) that the data feed joins
    rows against, and the regrouping of a rank's sorted row stream back into whole packs.
    :func:`raychat.core.train.pack.pack` then turns each pack's rows into one sequence.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_GROUP_BINS = 128

# Lower bounds tried (as a fraction of the group's capacity) before bisecting on the prefix
# length: the best prefix nearly always fills the bins to >99.5%, so bracketing it closely
# first saves most of the BFD runs.
_GALLOP_FILL = (0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.6, 0.3)


@dataclass
class PackingPlan:
    """One epoch of packs.

    Attributes:
        steps: ``steps[s][rank]`` is the list of row indices that ``rank`` packs at step ``s``.
        efficiency: Σ packed tokens / (num_steps · num_ranks · batch_max_len).
        left_out: Number of rows not used in this epoch.
    """

    steps: list[list[list[int]]]
    efficiency: float
    left_out: int

    @property
    def num_steps(self) -> int:
        """Number of optimizer steps in the epoch (identical for every rank)."""
        return len(self.steps)

    def for_rank(self, rank: int) -> list[list[int]]:
        """The packs (lists of row indices) of one rank, one per step."""
        return [step[rank] for step in self.steps]


def _best_fit_decreasing(sizes: list[int], ids: list[int], capacity: int, num_bins: int) -> list[list[int]] | None:
    """Packs items (already sorted by decreasing size) into ``num_bins`` bins, tightest fit first.

    Returns:
        The item ids per bin, or ``None`` as soon as one item fits in no bin.
    """
    # Each bin is the int ``remaining * num_bins + bin``: sorting these sorts by remaining capacity,
    # and ``bisect_left(keys, size * num_bins)`` finds the tightest bin with remaining >= size.
    keys = list(range(capacity * num_bins, capacity * num_bins + num_bins))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for size, item in zip(sizes, ids):
        i = bisect_left(keys, size * num_bins)
        if i == num_bins:
            return None
        key = keys.pop(i)
        bins[key % num_bins].append(item)
        insort(keys, key - size * num_bins)
    return bins


def _pack_prefix(window: np.ndarray, capacity: int, num_bins: int) -> tuple[int, list[list[int]]]:
    """The longest prefix of ``window`` (row lengths) that BFD fits into ``num_bins`` bins.

    Returns:
        ``(m, bins)``: the prefix length and its packing (positions within ``window``).
    """
    cum = np.cumsum(window)
    # Stable sort on -length: ties keep shuffled order, so the result is deterministic.
    desc = np.argsort(-window, kind="stable")
    desc_sizes = window[desc]

    def attempt(m: int) -> list[list[int]] | None:
        keep = desc < m
        return _best_fit_decreasing(desc_sizes[keep].tolist(), desc[keep].tolist(), capacity, num_bins)

    total = num_bins * capacity
    hi = int(np.searchsorted(cum, total, side="right"))  # no longer prefix can fit by token count
    best = attempt(hi)
    if best is not None:
        return hi, best
    lo, lo_bins = 0, [[] for _ in range(num_bins)]
    for fill in _GALLOP_FILL:
        m = min(int(np.searchsorted(cum, total * fill, side="right")), hi - 1)
        if m <= lo:
            continue
        found = attempt(m)
        if found is not None:
            lo, lo_bins = m, found
            break
        hi = m
    # Invariant: prefix lo fits, prefix hi does not (BFD is not strictly monotone in the prefix
    # length, so this is a very good prefix rather than provably the longest one).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = attempt(mid)
        if found is None:
            hi = mid
        else:
            lo, lo_bins = mid, found
    return lo, lo_bins


def plan_epoch(
    lengths: Sequence[int],
    batch_max_len: int,
    num_ranks: int,
    seed: int,
    epoch: int,
    *,
    group_bins: int = DEFAULT_GROUP_BINS,
) -> PackingPlan:
    """Plans one epoch of multipack steps; see the module docstring for the algorithm.

    Args:
        lengths: Token count of every row (row index = position in this sequence).
        batch_max_len: Token budget of one pack (one rank, one step).
        num_ranks: Data-parallel world size; every step has exactly one pack per rank.
        seed: Shuffle seed (non-negative).
        epoch: Epoch number (non-negative); each epoch gets a different shuffle.
        group_bins: Packs solved together as one bin-packing problem (rounded to whole steps,
            at least one); larger packs tighter.

    Returns:
        The epoch's plan. Deterministic in all arguments.

    Raises:
        ValueError: On a row longer than ``batch_max_len``, a non-positive row length, or
            non-positive ``batch_max_len`` / ``num_ranks`` / ``group_bins``.
    """
    if batch_max_len < 1 or num_ranks < 1 or group_bins < 1:
        raise ValueError(
            f"batch_max_len, num_ranks and group_bins must be >= 1, got {batch_max_len}, {num_ranks}, {group_bins}"
        )
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lens.size and lens.max() > batch_max_len:
        raise ValueError(
            f"a row of {int(lens.max())} tokens is longer than batch_max_len={batch_max_len}; "
            "truncate or drop such rows, or raise the budget"
        )
    if lens.size and lens.min() < 1:
        raise ValueError(f"row lengths must be >= 1, got {int(lens.min())}")

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lens.size)
    shuffled = lens[order]
    cum = np.cumsum(shuffled)
    total = int(cum[-1]) if lens.size else 0
    step_tokens = num_ranks * batch_max_len
    group_steps = max(1, group_bins // num_ranks)

    steps: list[list[list[int]]] = []
    packed_tokens = 0
    # Rows (positions in the shuffled order) that did not make it into the previous group; they go
    # first in the next one, followed by fresh rows from ``pos`` on.
    carry = np.empty(0, dtype=np.int64)
    carry_tokens = 0
    pos = 0
    while True:
        done = int(cum[pos - 1]) if pos else 0
        available = carry_tokens + total - done
        if available < step_tokens:
            break
        num_bins = num_ranks * min(group_steps, available // step_tokens)
        # Fresh rows up to one past the group's token capacity: no longer prefix can fit.
        end = int(np.searchsorted(cum, done + num_bins * batch_max_len - carry_tokens, side="right")) + 1
        end = max(pos, min(end, lens.size))
        window_pos = np.concatenate([carry, np.arange(pos, end)])
        m, bins = _pack_prefix(shuffled[window_pos], batch_max_len, num_bins)
        bins = [b for b in bins if b]
        # Normally all bins are used; if not, keep whole steps and carry the other rows over.
        kept = len(bins) - len(bins) % num_ranks
        if kept == 0:
            break
        perm = rng.permutation(kept)
        for s in range(0, kept, num_ranks):
            step = [sorted(order[window_pos[bins[b]]].tolist()) for b in perm[s : s + num_ranks]]
            steps.append(step)
            packed_tokens += int(sum(lens[p].sum() for p in step))
        dropped = [j for b in bins[kept:] for j in b]
        carry = np.concatenate([window_pos[dropped], window_pos[m:]]).astype(np.int64)
        carry_tokens = int(shuffled[carry].sum())
        pos = end

    used = sum(len(p) for step in steps for p in step)
    capacity = len(steps) * step_tokens
    return PackingPlan(steps=steps, efficiency=packed_tokens / capacity if capacity else 0.0, left_out=lens.size - used)


# --- the training feed: a multi-epoch plan as per-row tables, and regrouping rows into packs ------


@dataclass
class FeedPlan:
    """Every epoch's packs for every rank, as per-row tables (what the data feed joins rows against).

    Rows are addressed by their position ``i`` in the ``lengths`` given to :func:`plan_feed`. For
    epoch ``e``, row ``i`` goes to rank ``rank[e, i]`` (-1: not used that epoch) as position
    ``pos[e, i]`` of *micro-batch* ``micro[e, i]``. Micro-batches are numbered globally across
    epochs, ``micro = optimizer_step * accum + m`` with ``m < accum``, so a rank's rows sorted by
    ``(micro, pos)`` are exactly its packs in training order, and resuming at optimizer step ``s``
    means skipping micro-batches below ``s * accum``.

    Attributes:
        steps_per_epoch: Optimizer steps of each epoch (identical for every rank).
        efficiency: Packing efficiency of each epoch (real tokens / token budget).
        left_out: Rows not used in each epoch (they get a fresh chance in the next shuffle).
        too_long: Rows longer than ``batch_max_len`` (never used).
        rank, micro, pos: ``[epochs, rows]`` tables (int16, int64, int32).
    """

    steps_per_epoch: list[int]
    efficiency: list[float]
    left_out: list[int]
    too_long: int
    rank: np.ndarray
    micro: np.ndarray
    pos: np.ndarray

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all epochs."""
        return sum(self.steps_per_epoch)

    def rows_of(self, epoch: int, rank: int) -> np.ndarray:
        """Row indices ``rank`` trains on in ``epoch``, in training order."""
        sel = np.flatnonzero(self.rank[epoch] == rank)
        return sel[np.lexsort((self.pos[epoch, sel], self.micro[epoch, sel]))]


def plan_feed(
    lengths: Sequence[int],
    batch_max_len: int,
    num_ranks: int,
    seed: int,
    epochs: int,
    *,
    accum: int = 1,
    group_bins: int = DEFAULT_GROUP_BINS,
) -> FeedPlan:
    """Plans ``epochs`` epochs of packs with :func:`plan_epoch` and turns them into row tables.

    Each optimizer step gives every rank ``accum`` packs (gradient accumulation): the epoch is
    planned for ``num_ranks * accum`` packs per step and rank ``r`` takes packs
    ``r * accum ... r * accum + accum - 1`` of each step. Rows longer than ``batch_max_len`` are
    never used (counted in ``too_long``) instead of failing the run.

    Returns:
        The :class:`FeedPlan`; deterministic in all arguments.
    """
    if accum < 1 or epochs < 1:
        raise ValueError(f"accum and epochs must be >= 1, got {accum}, {epochs}")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    eligible = np.flatnonzero((lens <= batch_max_len) & (lens >= 1))
    n = lens.size
    rank = np.full((epochs, n), -1, dtype=np.int16)
    micro = np.full((epochs, n), -1, dtype=np.int64)
    pos = np.full((epochs, n), -1, dtype=np.int32)
    steps_per_epoch, efficiency, left_out = [], [], []
    done_steps = 0
    for e in range(epochs):
        plan = plan_epoch(lens[eligible], batch_max_len, num_ranks * accum, seed, e, group_bins=group_bins)
        for s, step in enumerate(plan.steps):
            for k, rows in enumerate(step):
                idx = eligible[np.asarray(rows, dtype=np.int64)]
                rank[e, idx] = k // accum
                micro[e, idx] = (done_steps + s) * accum + k % accum
                pos[e, idx] = np.arange(idx.size, dtype=np.int32)
        steps_per_epoch.append(plan.num_steps)
        efficiency.append(plan.efficiency)
        left_out.append(plan.left_out + (n - eligible.size))
        done_steps += plan.num_steps
    return FeedPlan(steps_per_epoch, efficiency, left_out, int(n - eligible.size), rank, micro, pos)


def row_keys(files: Sequence[str], indices: Sequence[int]) -> np.ndarray:
    """A stable 64-bit key per training row from its source ``(file, index)`` (unique per data run).

    The data stage writes one row per source record, so ``(file, index)`` identifies a row
    whatever order a reader yields rows in; the key is what the feed joins rows to the plan on.
    """
    import hashlib

    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(f"{f}\x00{i}".encode(), digest_size=8).digest(), "little")
            for f, i in zip(files, indices)
        ),
        dtype=np.uint64,
        count=len(files),
    )


def group_packs(batches) -> Iterator[tuple[int, list, list]]:
    """Regroups a rank's row stream (sorted by micro-batch, then position) into whole packs.

    Args:
        batches: Iterable of dicts with ``micro`` (int array), ``input_ids`` and ``weights``
            (sequences of per-row arrays), as Ray Data's ``iter_batches(batch_format="numpy")``
            yields them; a pack may span batch boundaries.

    Yields:
        ``(micro, rows_ids, rows_weights)`` per pack, in stream order.

    Raises:
        ValueError: If a micro-batch number reappears after another one (the stream is not sorted).
    """
    current, ids, ws = None, [], []
    seen: set[int] = set()
    for batch in batches:
        for m, row_ids, row_w in zip(batch["micro"], batch["input_ids"], batch["weights"]):
            m = int(m)
            if m != current:
                if current is not None:
                    yield current, ids, ws
                if m in seen:
                    raise ValueError(
                        f"micro-batch {m} appears twice in the stream: rows are not sorted by (micro, pos)"
                    )
                seen.add(m)
                current, ids, ws = m, [], []
            ids.append(row_ids)
            ws.append(row_w)
    if current is not None:
        yield current, ids, ws
