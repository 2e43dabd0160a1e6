"""Two real ranks (torch.distributed, gloo, no Ray) give the C-RLFT gradients of one process."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raychat.core.train.loss import crlft_loss, weighted_cross_entropy


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, 8, generator=g)
    ids = torch.randint(0, 13, (6, 7), generator=g)
    w = torch.rand(6, 7, generator=g) * (torch.rand(6, 7, generator=g) > 0.3)
    w[:4] *= 0.1  # a low-reward source next to an expert one
    return x, ids, w


def _layer():
    torch.manual_seed(1)
    return torch.nn.Linear(8, 13)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, ids, w = _data()
    rows = [slice(0, 1), slice(1, 6)][rank]  # deliberately uneven token counts per rank
    layer = _layer()
    parts = weighted_cross_entropy(layer(x[rows]), ids[rows], w[rows])
    global_w = parts.weight_sum.clone()
    dist.all_reduce(global_w)
    crlft_loss(parts, global_w, world).backward()
    grad = layer.weight.grad
    dist.all_reduce(grad)
    grad /= world  # what data-parallel engines (DDP, DeepSpeed) do
    if rank == 0:
        torch.save(grad, out)
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grad.pt")
    mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)

    x, ids, w = _data()
    layer = _layer()
    parts = weighted_cross_entropy(layer(x), ids, w)
    crlft_loss(parts, parts.weight_sum, 1).backward()
    assert torch.allclose(torch.load(out), layer.weight.grad, atol=1e-6)
