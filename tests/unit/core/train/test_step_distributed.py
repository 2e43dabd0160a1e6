"""The real training step — raychat.core.train.step.train_step on DeepSpeed ZeRO-2 engines with the packed
forward — takes the optimizer step of one plain-torch process on the union of the tokens: with two
gloo ranks (uneven token counts), and with two ranks × two gradient-accumulation micro-steps."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rows():
    g = torch.Generator().manual_seed(7)
    rows_ids, rows_w = [], []
    for k, n in enumerate((5, 9, 14, 11)):
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        ids[0] = 1
        w = ((torch.rand(n, generator=g) > 0.3).float() * (0.1 if k % 2 else 1.0)).tolist()  # two reward levels
        w[0] = 0.0
        rows_ids.append(ids)
        rows_w.append(w)
    return rows_ids, rows_w


PARTS = {"all": [0, 1, 2, 3], "a": [0, 1], "b": [2, 3], "a0": [0], "a1": [1], "b0": [2], "b1": [3]}


def _packs(part: str):
    from raychat.core.train.pack import pack

    ids, w = _rows()
    # Part "a" holds 14 tokens and part "b" 25: per-rank means would weigh them differently.
    return pack([ids[i] for i in PARTS[part]], [w[i] for i in PARTS[part]])


def _engine(model_dir, accum: int):
    import deepspeed

    from raychat.core.config import TrainConfig
    from raychat.core.model.hf import load_causal_lm
    from raychat.core.train.step import deepspeed_config

    model, _ = load_causal_lm(model_dir, dtype=torch.float32)
    # Plain SGD with lr 1: the parameter change is exactly minus the gradient.
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = TrainConfig(data="d", output="o", grad_accum=accum, grad_clip=1e9, zero_stage=2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, bf16=False))
    return engine


def _snapshot(engine, result) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "loss": result.loss,
        "weight_sum": result.weight_sum,
        "tokens": result.tokens,
    }


def _worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    from raychat.core.train.step import train_step

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    results = {}
    engine = _engine(model_dir, accum=1)
    results["ranks"] = _snapshot(engine, train_step(engine, [_packs("ab"[rank])], world, all_reduce))
    engine = _engine(model_dir, accum=2)
    micro = [_packs(f"{'ab'[rank]}{m}") for m in range(2)]
    results["ranks_accum"] = _snapshot(engine, train_step(engine, micro, world, all_reduce))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def steps(tiny_model_dir, tmp_path_factory):
    from raychat.core.model.hf import load_causal_lm
    from raychat.core.train.step import forward_packed_ce

    out = tmp_path_factory.mktemp("steps") / "two.pt"
    mp.spawn(_worker, args=(2, _port(), str(tiny_model_dir), str(out)), nprocs=2, join=True)
    # The reference: one process, plain torch, the C-RLFT loss of the union, SGD with lr 1.
    model, _ = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    parts = forward_packed_ce(model, _packs("all"))
    (parts.loss_sum / parts.weight_sum).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    union = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "loss": float(parts.loss_sum.detach() / parts.weight_sum),
        "weight_sum": float(parts.weight_sum),
        "tokens": 39,
    }
    return {**torch.load(out), "union": union, "base": base}


def _assert_same_update(steps, name: str) -> None:
    moved = 0
    for key, p in steps["union"]["params"].items():
        torch.testing.assert_close(steps[name]["params"][key], p, atol=2e-6, rtol=1e-4, msg=f"{name}: {key}")
        moved += int(not torch.equal(p, steps["base"][key]))
    assert moved > 0, "the step must change the weights for the comparison to mean anything"
    assert steps[name]["loss"] == pytest.approx(steps["union"]["loss"], rel=1e-5)
    assert steps[name]["weight_sum"] == pytest.approx(steps["union"]["weight_sum"])
    assert steps[name]["tokens"] == steps["union"]["tokens"] == 39


def test_two_ranks_take_the_step_of_one_process_on_the_union(steps):
    _assert_same_update(steps, "ranks")


def test_two_ranks_with_two_accumulation_micro_steps_take_the_step_of_one_process_on_the_union(steps):
    _assert_same_update(steps, "ranks_accum")
