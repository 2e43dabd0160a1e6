"""Load benchmark of the OpenAI endpoint vs sequential in-process generation, in one run.

    .venv/bin/python -m benchmarks.serve_load                       # tiny embedded model, CPU
    .venv/bin/python -m benchmarks.serve_load --checkpoint s3://bucket/runs/crlft --num-gpus 1
    python -m benchmarks.serve_load --model 1b --num-gpus 1 --arms combined      # a random-init 0.85B checkpoint, one GPU
    python -m benchmarks.serve_load --engine-only --device cuda --model 1b   # a GPU machine without Ray

1. In-process baselines: the same checkpoint loaded here, the same requests generated one after
   another, right before and right after each Serve run, each time twice: through raychat's
   ``ContinuousBatcher`` with one request at a time (the stricter baseline: raychat's own engine, ~10-25% faster than ``generate``
   on this model), and through transformers' ``model.generate`` (the issue's "sequential
   ``generate``"). Both greedy with the same stop ids, so they generate the same tokens.
2. The Serve path: a local Ray instance runs the raychat app on 127.0.0.1 (API key on), once per
   ``--arms`` layout (``split`` and ``combined`` by default, measured in turn); the official async
   ``openai`` client sends chat completions, streamed and not, at each concurrency level (1, 4,
   16, 64 by default), a bounded number of requests per level and a time cap.

Reported per level: generated tokens/s, p50/p99 latency and time to first token (TTFT);
throughput relative to sequential, and the TTFT overhead of the Serve path at concurrency 1.
Medians over ``--repeats`` runs. Loopback only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from raychat.core.model.attention import DEFAULT_KERNELS, KernelOptions

QUESTIONS = [
    "What is 2 + 3?",
    "Name three colours.",
    "Write a haiku about Ray.",
    "Why is the sky blue?",
    "Translate 'good morning' to French.",
    "List four prime numbers.",
    "What does a GPU do?",
    "Summarise C-RLFT in one sentence.",
]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class Sequential:
    """Sequential generation in this process: one request at a time, no Ray, no HTTP.

    ``prompt(i)`` gives request ``i``'s token ids: the chat template applied to QUESTIONS, or
    (``synthetic``) fixed random ids, for a model without the tokenizer (``--engine-only --model 1b``)."""

    def __init__(self, batcher, prompt):
        self.b, self.prompt = batcher, prompt

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        threads: int,
        device: str = "cpu",
        dtype=None,
        pack_linears: bool = True,
        kernels: KernelOptions = DEFAULT_KERNELS,
    ) -> Sequential:
        import torch

        from raychat.core.common.node_cache import MODEL_CACHE
        from raychat.core.data.templates import get_template
        from raychat.core.data.tokenizer import ConversationTokenizer
        from raychat.core.infer.batcher import ContinuousBatcher
        from raychat.core.infer.checkpoint_cache import fetch_checkpoint
        from raychat.core.model.hf import load_inference_model
        from raychat.core.run_dir import resolve_checkpoint

        torch.set_num_threads(threads)  # what the engine replica gets (Ray sets OMP_NUM_THREADS = num_cpus)
        local = fetch_checkpoint(resolve_checkpoint(checkpoint).uri, MODEL_CACHE)
        # As the engine replica loads it (ServeConfig.cpu_packed_linears); the `generate` baseline runs
        # this same model, so the same kernels.
        model, tok = load_inference_model(local, dtype, device, pack_linears)
        ct = ConversationTokenizer(tok, get_template("openchat_3.5"))
        b = ContinuousBatcher(
            model,
            stop_ids=[ct.eot_id, tok.eos_token_id],
            pad_id=tok.pad_token_id or 0,
            max_context=int(model.config.max_position_embeddings),
            max_batch_size=1,
            kernels=kernels,
        )
        return cls(b, lambda i: ct.encode_prompt([("user", QUESTIONS[i % len(QUESTIONS)])]))

    @classmethod
    def synthetic(cls, model, prompt_len: int = 32, kernels: KernelOptions = DEFAULT_KERNELS) -> Sequential:
        """A random-init model (:func:`raychat.core.model.hf.build_model`) and fixed random prompts: no stop token."""
        import random

        from raychat.core.infer.batcher import ContinuousBatcher

        rng = random.Random(0)
        prompts = [
            [1] + [rng.randrange(100, model.config.vocab_size) for _ in range(prompt_len - 1)]
            for _ in range(len(QUESTIONS))
        ]
        b = ContinuousBatcher(
            model,
            stop_ids=[],
            pad_id=0,
            max_context=int(model.config.max_position_embeddings),
            max_batch_size=1,
            kernels=kernels,
        )
        return cls(b, lambda i: prompts[i % len(prompts)])

    def run_batched(self, n: int, max_tokens: int, batch: int) -> dict:
        """``n`` requests submitted at once, ``batch`` in the running batch: the engine's own batching
        gain, with no Ray, HTTP or text handling — the ceiling of what the endpoint can reach."""
        from raychat.core.infer.batcher import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0)
        self.b.max_batch_size = batch
        tokens, t0 = 0, time.perf_counter()
        for i in range(n):
            self.b.submit(i, self.prompt(i), sp)
        while self.b.has_work():
            tokens += sum(s.token_id is not None for _, s in self.b.step())
        wall = time.perf_counter() - t0
        self.b.max_batch_size = 1
        return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}

    def run_generate(self, n: int, max_tokens: int) -> dict:
        """The same ``n`` requests one after another through transformers' own ``model.generate``
        (greedy, the same stop ids): the issue's baseline, "sequential ``generate``"."""
        import torch

        model, stops = self.b.model, sorted(self.b.stop_ids)
        tokens, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            for i in range(n):
                ids = torch.tensor([self.prompt(i)], device=self.b.device)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=stops or None,
                    pad_token_id=self.b.pad_id,
                )
                tokens += sum(t not in self.b.stop_ids for t in out[0, ids.shape[1] :].tolist())
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}

    def run(self, n: int, max_tokens: int) -> dict:
        from raychat.core.infer.batcher import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0)
        prompts = [self.prompt(i) for i in range(n)]
        lat, ttft, tokens = [], [], 0
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            t = time.perf_counter()
            self.b.submit(i, p, sp)
            first = None
            while self.b.has_work():
                for _, s in self.b.step():
                    if first is None:
                        first = time.perf_counter() - t
                    tokens += s.token_id is not None
            lat.append(time.perf_counter() - t)
            ttft.append(first)
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "lat": lat, "ttft": ttft}


async def drive(
    url: str, key: str, model: str, concurrency: int, n: int, max_tokens: int, time_cap: float, stream: bool = True
) -> dict:
    """``n`` chat completions, ``concurrency`` at a time; stops starting new ones after ``time_cap``.
    Streamed ones give the time to the first content chunk (TTFT)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
    lat, ttft, tokens, errors = [], [], 0, 0
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal tokens, errors
        async with sem:
            if time.perf_counter() - t0 > time_cap:
                return
            t = time.perf_counter()
            first = None
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            try:
                if not stream:
                    r = await client.chat.completions.create(
                        model=model, messages=messages, max_tokens=max_tokens, temperature=0
                    )
                    tokens += r.usage.completion_tokens
                    lat.append(time.perf_counter() - t)
                    return
                chunks = await client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in chunks:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens
            except openai.APIError:
                errors += 1
                return
            lat.append(time.perf_counter() - t)
            ttft.append(first if first is not None else lat[-1])

    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "lat": lat, "ttft": ttft, "errors": errors}


class BareVLLM:
    """vLLM's ``AsyncLLM`` in this process, no Ray and no HTTP: the ceiling of the ``vllm`` arms.

    Built with the settings the engine replica uses (:class:`raychat.serve.vllm_engine.VLLMEngine`)
    and fed the same template token ids; runs on one event loop of its own for its whole life.
    """

    def __init__(self, checkpoint_dir: str, max_batch_size: int, max_context: int, eager: bool, kv_cache_gb: float):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.new_event_loop()
        args = AsyncEngineArgs(
            model=checkpoint_dir,
            dtype="float32",
            max_model_len=max_context,
            max_num_seqs=max_batch_size,
            max_num_batched_tokens=max(8192, max_context),
            seed=0,
            enforce_eager=eager,
            enable_prefix_caching=True,
            kv_cache_memory_bytes=int(kv_cache_gb * 2**30),
        )
        self.llm = AsyncLLM.from_engine_args(args)

    def run(self, prompts: list[list[int]], concurrency: int, max_tokens: int, stop_ids: list[int]) -> dict:
        return self.loop.run_until_complete(self._run(prompts, concurrency, max_tokens, stop_ids))

    async def _run(self, prompts, concurrency, max_tokens, stop_ids) -> dict:
        import uuid

        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(
            max_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids, output_kind=RequestOutputKind.DELTA
        )
        sem = asyncio.Semaphore(concurrency)
        lat, ttft, tokens = [], [], 0
        t0 = time.perf_counter()

        async def one(p: list[int]) -> None:
            nonlocal tokens
            async with sem:
                t, first = time.perf_counter(), None
                async for out in self.llm.generate(TokensPrompt(prompt_token_ids=p), sp, request_id=uuid.uuid4().hex):
                    new = len(out.outputs[0].token_ids)
                    if first is None and new:
                        first = time.perf_counter() - t
                    tokens += new
                lat.append(time.perf_counter() - t)
                ttft.append(first if first is not None else lat[-1])

        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "lat": lat, "ttft": ttft, "errors": 0}

    def close(self) -> None:
        self.llm.shutdown()
        pending = asyncio.all_tasks(self.loop)  # vLLM's output handler: ended here, not by a closed loop
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    return {
        "tok_s": med(r["tok_s"] for r in runs),
        "p50_latency_ms": med(percentile(r["lat"], 50) for r in runs) * 1e3,
        "p99_latency_ms": med(percentile(r["lat"], 99) for r in runs) * 1e3,
        "p50_ttft_ms": med(percentile(r["ttft"], 50) for r in runs) * 1e3 if runs[0]["ttft"] else None,
        "p99_ttft_ms": med(percentile(r["ttft"], 99) for r in runs) * 1e3 if runs[0]["ttft"] else None,
        "requests": med(len(r["lat"]) for r in runs),
        "errors": sum(r.get("errors", 0) for r in runs),
    }


# App configurations the benchmark can compare in one run (ServeConfig fields on top of the common ones).
ARMS = {
    "combined": {"layout": "combined"},
    "vllm": {"layout": "combined", "engine": "vllm"},  # vLLM's AsyncLLM in the replica (bare: BareVLLM)
    "vllm-split": {"layout": "split", "engine": "vllm"},
    "split": {"layout": "split"},
    "combined-threads": {"layout": "combined", "same_event_loop": False},
    "split-threads": {"layout": "split", "same_event_loop": False},
    "combined-inline": {"layout": "combined", "engine_process": False},  # the batching loop in the replica
    "split-inline": {"layout": "split", "engine_process": False},
}


def make_checkpoint(size: str, dest: Path, device: str) -> Path:
    """A random-init checkpoint with the embedded tokenizer: the tiny embedded model, or the 0.85B
    Mistral of :func:`raychat.core.model.hf.build_model` (saved in bfloat16, as a real checkpoint of that size would be)."""
    from raychat.core.model.hf import build_model, create_embedded_base_model

    if size == "tiny":
        return create_embedded_base_model(dest)
    import torch

    return create_embedded_base_model(
        dest,
        build=lambda vocab: build_model(size, vocab, 4096, device, torch.bfloat16, seed=0),
        name=f"raychat-random-mistral-{size}",
    )


def batched_vs_sequential(seq: Sequential, args, c: int) -> tuple[dict, dict]:
    """A sequential run, then the engine's own batches of ``c`` right after it (the ceiling for concurrency ``c``)."""
    base = seq.run(args.requests or 16, args.max_tokens)
    return base, seq.run_batched(args.requests or max(16, 4 * c), args.max_tokens, min(c, args.max_batch_size))


def engine_only(args, levels: list[int]) -> int:
    """Sequential generation vs the engine's own batches, in this process — no Ray, HTTP or text
    handling, so it runs where Ray is not installed (a lent GPU machine)."""
    import torch

    # --sdpa-backends torch: torch's own attention kernels (cuDNN included) for the engine's forward passes.
    kernels = KernelOptions(sdpa_backends=None) if args.sdpa_backends == "torch" else DEFAULT_KERNELS

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.checkpoint:
        seq = Sequential.from_checkpoint(
            args.checkpoint,
            max(1, int(args.num_cpus)),
            args.device,
            dtype,
            pack_linears=args.cpu_linears == "packed",
            kernels=kernels,
        )
        what = args.checkpoint
    else:
        from raychat.core.model.cpu_linears import pack_cpu_linears
        from raychat.core.model.hf import build_model

        torch.set_num_threads(max(1, int(args.num_cpus)))
        model = build_model(args.model, 32002, 4096, args.device, dtype, seed=0).eval()
        if args.cpu_linears == "packed":
            pack_cpu_linears(model)  # packs nothing on CUDA
        seq = Sequential.synthetic(model, kernels=kernels)
        what = f"random-init {args.model} model, 32-token random prompts"
    n_params = sum(p.numel() for p in seq.b.model.parameters())
    print(
        f"engine only: {what} ({n_params / 1e6:,.1f}M parameters) on {args.device} ({str(dtype).removeprefix('torch.')}), "
        f"{args.max_tokens} tokens per request",
        flush=True,
    )
    seq.run(2, 8)  # warm-up
    base_runs, ratios, tok_s = [], {c: [] for c in levels if c > 1}, {c: [] for c in levels if c > 1}
    for rep in range(args.repeats):
        for c in ratios:
            base, r = batched_vs_sequential(seq, args, c)
            base_runs.append(base)
            tok_s[c].append(r["tok_s"])
            ratios[c].append(r["tok_s"] / base["tok_s"])
            print(
                f"[{rep + 1}/{args.repeats}] batch of {min(c, args.max_batch_size)}: {r['tok_s']:.0f} tok/s vs sequential "
                f"just before {base['tok_s']:.0f} ({ratios[c][-1]:.1f}x)",
                flush=True,
            )
    seq_sum = summarise(base_runs)
    print("\n| path | generated tok/s | vs sequential | p50 / p99 latency (ms) | p50 / p99 TTFT (ms) |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| sequential in-process | {seq_sum['tok_s']:.0f} | 1.0× | {seq_sum['p50_latency_ms']:.0f} / "
        f"{seq_sum['p99_latency_ms']:.0f} | {seq_sum['p50_ttft_ms']:.1f} / {seq_sum['p99_ttft_ms']:.1f} |"
    )
    for c in ratios:
        print(
            f"| in-process, batch of {min(c, args.max_batch_size)} | {statistics.median(tok_s[c]):.0f} | "
            f"{statistics.median(ratios[c]):.1f}× | – | – |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint or run URI; default: a fresh tiny embedded model")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(16, 4 x concurrency))")
    ap.add_argument(
        "--baseline-requests",
        type=int,
        default=0,
        help="requests of each sequential run around a Serve run (default: --requests, else 16; fewer on a "
        "GPU, where one request of a large model takes seconds)",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per level before no new request starts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--num-cpus", type=float, default=1.0)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument(
        "--arms", default="split,combined", help=f"comma-separated app layouts to compare, of {sorted(ARMS)}"
    )
    ap.add_argument("--modes", default="stream,whole", help="streamed and/or non-streamed requests")
    ap.add_argument("--stream-interval-s", type=float, help="ServeConfig.stream_interval_s (default: the config's)")
    ap.add_argument(
        "--stream-chunk-rate", type=float, help="ServeConfig.stream_chunk_rate (default: the config's; 0 = off)"
    )
    ap.add_argument(
        "--cpu-linears",
        choices=["packed", "plain"],
        default="packed",
        help="CPU: linear layers on oneDNN-packed weights (ServeConfig.cpu_packed_linears, the default) or "
        "torch's plain F.linear — in the replicas and both sequential baselines alike",
    )
    ap.add_argument(
        "--vllm-eager",
        action="store_true",
        help="vllm arms: ServeConfig.vllm_enforce_eager (starts faster, decodes slower); the bare vLLM ceiling too",
    )
    ap.add_argument("--vllm-kv-cache-gb", type=float, default=1.0, help="vllm arms: ServeConfig.vllm_kv_cache_gb")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument(
        "--engine-only",
        action="store_true",
        help="no Ray or HTTP: only sequential vs in-process batches (for machines without Ray)",
    )
    ap.add_argument("--device", default="cpu", help="--engine-only: cpu or cuda")
    ap.add_argument(
        "--model",
        choices=["tiny", "1b"],
        default="tiny",
        help="without --checkpoint: a random-init tiny or 0.85B Mistral (Serve runs: written as a checkpoint first)",
    )
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="--engine-only: default bfloat16 on cuda, else float32"
    )
    ap.add_argument(
        "--sdpa-backends",
        choices=["raychat", "torch"],
        default="raychat",
        help="--engine-only on CUDA: attention kernels of the engine's forward passes: raychat's "
        "(KernelOptions.sdpa_backends' default, cuDNN left out: it plans anew for every sequence length) "
        "or torch's own choice",
    )
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.engine_only:
        return engine_only(args, levels)
    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        ap.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; choose from {sorted(ARMS)}")
    bad = sorted(set(args.modes.split(",")) - {"stream", "whole"})
    if bad:
        ap.error(f"--modes: unknown {bad}; use stream and/or whole, comma-separated")
    modes = [m == "stream" for m in args.modes.split(",")]

    import ray
    from ray import serve

    from raychat.core.common.node_cache import MODEL_CACHE
    from raychat.core.run_dir import resolve_checkpoint
    from raychat.serve.app import build_app
    from tests.conftest import free_port

    tmp = Path(tempfile.mkdtemp(prefix="raychat-bench-"))
    # With GPUs the replicas run on CUDA in bfloat16 (ServeConfig dtype auto), and so do the baselines.
    device = "cuda" if args.num_gpus else "cpu"
    checkpoint = args.checkpoint or str(make_checkpoint(args.model, tmp / args.model, device))
    import torch

    seq = Sequential.from_checkpoint(
        checkpoint,
        threads=max(1, int(args.num_cpus)),
        device=device,
        dtype=torch.bfloat16 if device == "cuda" else None,
        pack_linears=args.cpu_linears == "packed",
    )
    print(
        f"model: {checkpoint} ({sum(p.numel() for p in seq.b.model.parameters()) / 1e6:,.1f}M parameters) on {device}, "
        f"{args.cpu_linears} CPU linears",
        flush=True,
    )
    seq.run(2, 8)  # warm-up

    key = "sk-bench"
    (tmp / "keys").write_text(key + "\n")
    from raychat.core.common.ray_env import apply_local_ray_env

    runtime = apply_local_ray_env()  # as `python -m raychat.serve` / start-local.sh run it (env vars override)
    print("Serve runtime: " + ", ".join(f"{k}={v}" for k, v in runtime.items()), flush=True)
    # Logical CPUs: one engine replica of num_cpus per arm (they take turns; an idle one only waits).
    ray.init(
        num_cpus=max(2, args.num_cpus * len(arms)) if not args.num_gpus else None,
        include_dashboard=False,
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    extra = {
        k: v
        for k, v in (("stream_interval_s", args.stream_interval_s), ("stream_chunk_rate", args.stream_chunk_rate))
        if v is not None
    }
    urls = {}
    for arm in arms:
        serve.run(
            build_app(
                {
                    "checkpoint": checkpoint,
                    "model_id": "bench",
                    "api_keys_file": str(tmp / "keys"),
                    "num_replicas": 1,
                    "num_cpus": args.num_cpus,
                    "num_gpus": args.num_gpus,
                    "max_batch_size": args.max_batch_size,
                    "max_ongoing_requests": max(args.max_batch_size, 64) * 2,
                    "max_queued_requests": -1,
                    "cpu_packed_linears": args.cpu_linears == "packed",
                    "vllm_enforce_eager": args.vllm_eager,
                    "vllm_kv_cache_gb": args.vllm_kv_cache_gb,
                    **ARMS[arm],
                    **extra,
                }
            ),
            name=f"bench-{arm}",
            route_prefix=f"/{arm}",
        )
        urls[arm] = f"http://127.0.0.1:{port}/{arm}/v1"
        asyncio.run(drive(urls[arm], key, "bench", 4, 8, 8, 30))  # warm-up
    # Every Serve run sits between sequential runs of its own, and is compared with their mean: a
    # shared machine's speed drifts (here the sequential figure moved by 2x within one session), so a
    # ratio of two figures taken minutes apart would measure the drift as much as the endpoint.
    seq_runs, gen_runs, serve_runs = [], [], {(arm, c, st): [] for arm in arms for c in levels for st in modes}
    ratios = {k: [] for k in serve_runs}
    gen_ratios = {k: [] for k in serve_runs}
    ttft_overheads = {k: [] for k in serve_runs}
    ceiling = {c: [] for c in levels if c > 1}
    # The vllm arms are compared with bare vLLM too, run right before and after each of their Serve runs.
    bare = None
    bare_runs = {k: [] for k in serve_runs if ARMS[k[0]].get("engine") == "vllm"}
    bare_ratios = {k: [] for k in bare_runs}
    bare_ttft_overheads = {k: [] for k in bare_runs}
    if bare_runs:
        from raychat.core.infer.checkpoint_cache import fetch_checkpoint

        local = fetch_checkpoint(resolve_checkpoint(checkpoint).uri, MODEL_CACHE)
        max_context = int(seq.b.max_context)
        bare = BareVLLM(str(local), args.max_batch_size, max_context, args.vllm_eager, args.vllm_kv_cache_gb)
        stop_ids = sorted(seq.b.stop_ids)
        bare.run([seq.prompt(i) for i in range(8)], 8, 8, stop_ids)  # warm-up
    for rep in range(args.repeats):
        for c in ceiling:
            base, batched = batched_vs_sequential(seq, args, c)
            ceiling[c].append(batched["tok_s"] / base["tok_s"])
            print(f"[{rep + 1}/{args.repeats}] in-process batch of {c}: {ceiling[c][-1]:.1f}x sequential", flush=True)
        for arm, c, st in serve_runs:
            # Sequential runs on both sides of the Serve run (generate, engine | Serve | engine, generate),
            # compared with their mean: drift during the Serve run cancels to first order.
            nb = args.baseline_requests or args.requests or 16
            gen_before = seq.run_generate(nb, args.max_tokens)
            before = seq.run(nb, args.max_tokens)
            n = args.requests or max(16, 4 * c)
            if (arm, c, st) in bare_runs:
                bare_before = bare.run([seq.prompt(i) for i in range(n)], c, args.max_tokens, stop_ids)
            r = asyncio.run(drive(urls[arm], key, "bench", c, n, args.max_tokens, args.time_cap, st))
            if (arm, c, st) in bare_runs:
                bare_after = bare.run([seq.prompt(i) for i in range(n)], c, args.max_tokens, stop_ids)
                bare_runs[arm, c, st] += [bare_before, bare_after]
                bare_ratios[arm, c, st].append(2 * r["tok_s"] / (bare_before["tok_s"] + bare_after["tok_s"]))
                bare_ttft = (percentile(bare_before["ttft"], 50) + percentile(bare_after["ttft"], 50)) / 2
                if r["ttft"]:
                    bare_ttft_overheads[arm, c, st].append((percentile(r["ttft"], 50) - bare_ttft) * 1e3)
                print(
                    f"[{rep + 1}/{args.repeats}] bare vLLM concurrency {c:>3}: {bare_before['tok_s']:.0f} / "
                    f"{bare_after['tok_s']:.0f} tok/s before / after; {arm} is {bare_ratios[arm, c, st][-1]:.2f}x of it",
                    flush=True,
                )
            after = seq.run(nb, args.max_tokens)
            gen_after = seq.run_generate(nb, args.max_tokens)
            seq_runs += [before, after]
            gen_runs += [gen_before, gen_after]
            serve_runs[arm, c, st].append(r)
            base_tok_s = (before["tok_s"] + after["tok_s"]) / 2
            gen_tok_s = (gen_before["tok_s"] + gen_after["tok_s"]) / 2
            ratios[arm, c, st].append(r["tok_s"] / base_tok_s)
            gen_ratios[arm, c, st].append(r["tok_s"] / gen_tok_s)
            base_ttft = (percentile(before["ttft"], 50) + percentile(after["ttft"], 50)) / 2
            if r["ttft"]:
                ttft_overheads[arm, c, st].append((percentile(r["ttft"], 50) - base_ttft) * 1e3)
            print(
                f"[{rep + 1}/{args.repeats}] {arm} concurrency {c:>3} {'stream' if st else 'whole '}: {r['tok_s']:.0f} tok/s "
                f"vs sequential around it {base_tok_s:.0f} ({before['tok_s']:.0f} before, {after['tok_s']:.0f} after: "
                f"{ratios[arm, c, st][-1]:.1f}x; transformers generate {gen_tok_s:.0f}: {gen_ratios[arm, c, st][-1]:.1f}x; "
                f"tokens {before['tokens']} / {gen_before['tokens']}), "
                f"p50 TTFT {percentile(r['ttft'], 50) * 1e3 if r['ttft'] else float('nan'):.1f} ms "
                f"(sequential {base_ttft * 1e3:.1f}), errors {r['errors']}",
                flush=True,
            )
    serve.shutdown()
    ray.shutdown()
    if bare is not None:
        bare.close()
    seq = summarise(seq_runs)
    gen_tok_s = statistics.median(g["tok_s"] for g in gen_runs)
    results = {k: summarise(runs) for k, runs in serve_runs.items()}

    def ms(x):
        return "–" if x is None else f"{x:.1f}"

    print(
        f"\nMedians of {args.repeats} repeats; 'vs sequential' is the median of each run's ratio to the mean of the "
        "sequential runs just before and just after it (the sequential rows: all those runs): raychat's engine with "
        "one request at a time, and transformers' own `model.generate` (the issue's baseline)."
    )
    print(
        "\n| path | generated tok/s | vs sequential (engine) | vs sequential `generate` | p50 / p99 latency (ms) | p50 / p99 TTFT (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| sequential in-process, raychat's engine | {seq['tok_s']:.0f} | 1.0× | – | {seq['p50_latency_ms']:.0f} / {seq['p99_latency_ms']:.0f} | "
        f"{ms(seq['p50_ttft_ms'])} / {ms(seq['p99_ttft_ms'])} |"
    )
    print(f"| sequential in-process, transformers `generate` | {gen_tok_s:.0f} | – | 1.0× | – | – |")
    for c, xs in ceiling.items():
        print(
            f"| in-process, batch of {min(c, args.max_batch_size)} (ceiling for concurrency {c}) | – | {statistics.median(xs):.1f}× | – | – | – |"
        )
    for (arm, c, st), r in results.items():
        print(
            f"| {arm}, concurrency {c}, {'streamed' if st else 'non-streamed'} | {r['tok_s']:.0f} | "
            f"{statistics.median(ratios[arm, c, st]):.1f}× | {statistics.median(gen_ratios[arm, c, st]):.1f}× | "
            f"{r['p50_latency_ms']:.0f} / {r['p99_latency_ms']:.0f} | {ms(r['p50_ttft_ms'])} / {ms(r['p99_ttft_ms'])} |"
        )
    if bare_runs:
        print(
            "\n| vLLM arm | bare vLLM tok/s (in-process) | through raychat's Serve layer tok/s | ratio (target ≥ 0.9 at 64) "
            "| p50 TTFT bare / Serve (ms) |"
        )
        print("|---|---:|---:|---:|---:|")
        for (arm, c, st), runs in bare_runs.items():
            b, r = summarise(runs), results[arm, c, st]
            print(
                f"| {arm}, concurrency {c}, {'streamed' if st else 'non-streamed'} | {b['tok_s']:.0f} | {r['tok_s']:.0f} | "
                f"{statistics.median(bare_ratios[arm, c, st]):.2f}× | {ms(b['p50_ttft_ms'])} / {ms(r['p50_ttft_ms'])} |"
            )
        for (arm, c, st), xs in bare_ttft_overheads.items():
            if c == 1 and st and xs:
                print(f"TTFT overhead over bare vLLM at concurrency 1, {arm}: {statistics.median(xs):.1f} ms")
    for arm in arms:
        if (arm, 1, True) in results:
            print(
                f"TTFT overhead of the Serve path at concurrency 1 (p50 minus the mean p50 of the sequential "
                f"runs around it, median), {arm}: {statistics.median(ttft_overheads[arm, 1, True]):.1f} ms"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "sequential": seq,
                    "sequential_generate_tok_s": gen_tok_s,
                    "serve": {
                        f"{arm}-{c}-{'stream' if st else 'whole'}": {
                            **r,
                            "ratios": ratios[arm, c, st],
                            "generate_ratios": gen_ratios[arm, c, st],
                            "ttft_overheads_ms": ttft_overheads[arm, c, st],
                        }
                        for (arm, c, st), r in results.items()
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
