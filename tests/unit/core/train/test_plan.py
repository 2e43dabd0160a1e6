"""The multipack planner and the training feed's tables (raychat.core.train.plan)."""

import time

import numpy as np
import pytest

from raychat.core.train.plan import group_packs, plan_epoch, plan_feed, row_keys

BUDGET = 65536


def sharegpt_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lognormal lengths (median 700, most 100-2000), clipped to [16, 4096]; budget/mean ≈ 60."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(700), 1.0, n), 16, 4096).astype(np.int64)


# --- plan_epoch ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lengths():
    return sharegpt_like_lengths(20_000)


def check_plan(plan, lengths, budget, num_ranks):
    seen = [i for step in plan.steps for p in step for i in p]
    assert len(seen) == len(set(seen)), "a row was used twice in one epoch"
    assert all(len(step) == num_ranks for step in plan.steps), "ranks must get the same number of steps"
    assert all(p for step in plan.steps for p in step), "empty pack"
    assert max(int(lengths[p].sum()) for step in plan.steps for p in step) <= budget
    assert plan.left_out == len(lengths) - len(seen)
    packed = sum(int(lengths[p].sum()) for step in plan.steps for p in step)
    assert plan.efficiency == pytest.approx(packed / (plan.num_steps * num_ranks * budget))
    assert plan.for_rank(num_ranks - 1) == [step[-1] for step in plan.steps]


@pytest.mark.parametrize("num_ranks", [2, 8])
@pytest.mark.parametrize("budget", [BUDGET, BUDGET // 2])
def test_plan_epoch_packs_sharegpt_like_mix_at_995_efficiency(lengths, num_ranks, budget):
    plan = plan_epoch(lengths, budget, num_ranks, seed=0, epoch=0)
    check_plan(plan, lengths, budget, num_ranks)
    print(
        f"budget={budget} ranks={num_ranks}: efficiency={plan.efficiency:.5f} steps={plan.num_steps} "
        f"left_out={plan.left_out}/{len(lengths)} (budget/mean={budget / lengths.mean():.0f})"
    )
    assert plan.efficiency >= 0.995


def test_plan_epoch_is_deterministic_and_changes_with_epoch(lengths):
    a = plan_epoch(lengths, BUDGET, 8, seed=3, epoch=1)
    b = plan_epoch(list(lengths), BUDGET, 8, seed=3, epoch=1)
    assert a == b
    assert plan_epoch(lengths, BUDGET, 8, seed=3, epoch=2).steps != a.steps
    assert plan_epoch(lengths, BUDGET, 8, seed=4, epoch=1).steps != a.steps


def test_every_row_is_used_within_three_epochs(lengths):
    used = set()
    left_out = []
    for epoch in range(3):
        plan = plan_epoch(lengths, BUDGET, 8, seed=0, epoch=epoch)
        left_out.append(plan.left_out)
        used.update(i for step in plan.steps for p in step for i in p)
    assert all(n > 0 for n in left_out), "make the test meaningful: some rows must be left out per epoch"
    assert len(used) == len(lengths)


def test_left_out_rows_are_not_biased_to_short_or_long(lengths):
    plan = plan_epoch(lengths, BUDGET, 8, seed=0, epoch=0)
    used = np.zeros(len(lengths), dtype=bool)
    used[[i for step in plan.steps for p in step for i in p]] = True
    assert plan.left_out > 50
    # Left-out rows come from the tail of the shuffle, so their median length is the mix's.
    assert np.median(lengths[~used]) == pytest.approx(np.median(lengths), rel=0.25)


def test_plan_epoch_rejects_rows_longer_than_budget():
    with pytest.raises(ValueError, match=r"5000 tokens.*batch_max_len=4096"):
        plan_epoch([100, 5000, 300], 4096, 2, seed=0, epoch=0)


def test_plan_epoch_small_inputs():
    assert plan_epoch([], 100, 2, seed=0, epoch=0).num_steps == 0
    plan = plan_epoch([60, 60, 40, 40], 100, 2, seed=0, epoch=0)
    assert plan.num_steps == 1 and plan.efficiency == 1.0 and plan.left_out == 0
    assert sorted(sorted(p) for p in plan.steps[0]) == [[0, 2], [1, 3]]
    # Not even one step's worth of tokens: everything is left out rather than padded.
    assert plan_epoch([50, 50, 50], 100, 2, seed=0, epoch=0).left_out == 3


def test_planning_100k_rows_takes_under_two_seconds():
    lengths = sharegpt_like_lengths(100_000, seed=1)
    start = time.perf_counter()
    plan = plan_epoch(lengths, BUDGET, 8, seed=0, epoch=0)
    elapsed = time.perf_counter() - start
    print(f"planned 100k rows in {elapsed:.3f}s, efficiency={plan.efficiency:.5f}")
    assert elapsed < 2.0
    assert plan.efficiency >= 0.995


# --- plan_feed / group_packs / row_keys: the training feed ---------------------------------------


def packs_of(plan, epoch, rank):
    """{micro: [rows in pack order]} of one rank in one epoch."""
    out: dict[int, list[int]] = {}
    for i in plan.rows_of(epoch, rank):
        out.setdefault(int(plan.micro[epoch, i]), []).append(int(i))
    return out


def test_plan_feed_gives_every_rank_accum_packs_per_step_within_budget():
    lengths = sharegpt_like_lengths(3000, seed=2)
    budget, ranks, accum, epochs = 16384, 2, 2, 2
    plan = plan_feed(lengths, budget, ranks, seed=1, epochs=epochs, accum=accum)
    first = 0
    for e in range(epochs):
        steps = plan.steps_per_epoch[e]
        expected_micros = list(range(first * accum, (first + steps) * accum))
        used = []
        for r in range(ranks):
            packs = packs_of(plan, e, r)
            assert sorted(packs) == expected_micros, "every rank needs one pack per micro-step"
            assert all(lengths[rows].sum() <= budget for rows in packs.values())
            assert all(plan.pos[e, rows].tolist() == list(range(len(rows))) for rows in packs.values())
            used += [i for rows in packs.values() for i in rows]
        assert len(used) == len(set(used)) == len(lengths) - plan.left_out[e]
        assert plan.efficiency[e] == pytest.approx(lengths[used].sum() / (steps * ranks * accum * budget))
        assert plan.efficiency[e] >= 0.99
        first += steps
    assert plan.total_steps == first


def test_plan_feed_uses_plan_epoch_packs_rank_major():
    lengths = sharegpt_like_lengths(2000, seed=3)
    plan = plan_feed(lengths, 8192, 2, seed=5, epochs=1, accum=3)
    reference = plan_epoch(lengths, 8192, 6, seed=5, epoch=0)
    for s, step in enumerate(reference.steps):
        for k, rows in enumerate(step):
            rank, m = divmod(k, 3)
            assert sorted(packs_of(plan, 0, rank)[s * 3 + m]) == sorted(rows)


def test_plan_feed_leaves_out_rows_longer_than_the_budget_instead_of_failing():
    lengths = np.array([60, 5000, 40, 60, 40, 30, 70])
    plan = plan_feed(lengths, 100, 1, seed=0, epochs=2)
    assert plan.too_long == 1
    assert (plan.rank[:, 1] == -1).all()
    assert all(n >= 1 for n in plan.left_out)


def test_group_packs_regroups_rows_across_batch_boundaries():
    batches = [
        {"micro": np.array([4, 4, 5]), "input_ids": [[1, 2], [1, 3], [1, 4]], "weights": [[0, 1], [0, 1], [0, 1]]},
        {"micro": np.array([5, 6]), "input_ids": [[1, 5], [1, 6]], "weights": [[0, 1], [0, 1]]},
    ]
    got = [(m, ids) for m, ids, _ in group_packs(batches)]
    assert got == [(4, [[1, 2], [1, 3]]), (5, [[1, 4], [1, 5]]), (6, [[1, 6]])]


def test_group_packs_rejects_an_unsorted_stream():
    batches = [{"micro": np.array([1, 2, 1]), "input_ids": [[1], [1], [1]], "weights": [[0], [0], [0]]}]
    with pytest.raises(ValueError, match="micro-batch 1 appears twice"):
        list(group_packs(batches))


def test_row_keys_are_stable_and_tell_rows_apart():
    a = row_keys(["/d/a.jsonl", "/d/a.jsonl", "/d/b.jsonl"], [0, 1, 0])
    assert a.dtype == np.uint64 and len(set(a.tolist())) == 3
    assert row_keys(["/d/a.jsonl"], [1])[0] == a[1]
