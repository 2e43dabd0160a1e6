"""CPU inference on oneDNN-packed weights: :func:`pack_cpu_linears` (``ServeConfig.cpu_packed_linears``)."""

from __future__ import annotations

#: Linear layers with at least this many weights get oneDNN-packed weights on CPU; below it MKL's
#: plain call is as fast (the measured break-even: docs/performance/serving.md).
PACK_MIN_WEIGHTS = 1 << 18


def _packed_linear_op():
    """oneDNN's linear over a pre-packed weight (what inductor's CPU weight freezing calls), or None."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    ops = torch.ops.mkldnn
    try:
        return ops._reorder_linear_weight, ops._linear_pointwise
    except (AttributeError, RuntimeError):  # a build without these private ops
        return None


def pack_cpu_linears(model, min_weights: int = PACK_MIN_WEIGHTS) -> int:
    """Inference on CPU: each large float32 ``nn.Linear`` runs on a weight pre-packed for oneDNN.

    torch's CPU ``F.linear`` in float32 calls MKL's sgemm, which on the skinny products of decoding
    (a few rows times a large weight) scales badly with the row count on some CPUs (AMD EPYC, for
    one), while a weight packed once into oneDNN's blocked layout does not (measurements:
    docs/performance/serving.md). Batches of decoding rows are what a serving engine runs, so they
    gain most. Same float32 arithmetic (results agree to ~1e-6
    relative; only the summation order differs), checked against ``F.linear`` on each layer when
    it is packed; a layer where that check fails, or a torch build without the ops, stays as is.

    The packed copy sits beside the original weight (which tied embeddings and ``state_dict``
    still use): the packed layers' weights take twice their memory. For inference only — the packed
    forward has no backward. Returns how many layers were packed.
    """
    import torch

    ops = _packed_linear_op()
    if ops is None:
        return 0
    reorder, linear = ops
    n = 0
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (
                not isinstance(module, torch.nn.Linear)
                or w is None
                or w.device.type != "cpu"
                or w.dtype != torch.float32
                or w.numel() < min_weights
            ):
                continue
            try:
                packed = reorder(w.detach(), None)
                probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
                got = linear(probe, packed, module.bias, "none", [], "")
                ok = torch.allclose(got, torch.nn.functional.linear(probe, w, module.bias), rtol=1e-4, atol=1e-5)
            except RuntimeError:
                ok = False
            if ok:
                module.forward = _PackedForward(module, packed, linear)
                n += 1
    return n


class _PackedForward:
    """``forward`` of a packed ``nn.Linear``: oneDNN on the packed weight for float32 CPU input, else the plain one."""

    def __init__(self, module, packed, linear):
        self.module, self.packed, self.linear = module, packed, linear

    def __call__(self, x):
        import torch

        m = self.module
        if (
            x.numel() == x.shape[-1]
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return torch.nn.functional.linear(x, m.weight, m.bias)
        return self.linear(x, self.packed, m.bias, "none", [], "")
