"""Training step time with vs without a checkpoint upload running at the same time (issue #4: ≤ 1.1×).

    .venv/bin/python -m benchmarks.checkpoint_upload            # CPU: tiny model, upload to a moto S3 server
    # on a GPU machine (torch + transformers; no Ray, DeepSpeed or S3 needed), from the repository root:
    python -m benchmarks.checkpoint_upload --device cuda --model 1b --dest /tmp/raychat-upload-sink

``raychat.jobs.train`` saves a checkpoint into a local temporary directory, then hands it to Ray Train with
``CheckpointUploadMode.ASYNC``: a background thread of the training worker copies it to
``storage_path`` with ``pyarrow.fs.copy_files`` (``use_threads=False`` for S3, 64 MiB chunks) while
the step loop goes on. This benchmark runs that upload the same way — the same call with the same
arguments, in a thread of the process that trains — without Ray, so it also runs on a GPU machine
that has only torch and transformers.

The steps are raychat's packed C-RLFT step (:func:`raychat.core.train.pack.pack` +
:func:`raychat.core.train.step.forward_packed_ce`, AdamW), the same as ``benchmarks.train_throughput``.
The checkpoint is the model written with ``save_pretrained`` (safetensors) plus the optimizer's state
(``torch.save``), i.e. what a checkpoint's model and training state weigh. Blocks of
each of ``--blocks`` checkpoint intervals starts one upload and trains on: the steps that began
before the upload ended ran *during* it; then as many steps again (at least ``--block-steps``) run
with no upload. Each step is timed alone (CUDA synchronised). Reported: median and p90 step time of
each kind, their ratio, and the upload's time.

``--dest``: an ``s3://bucket/prefix`` (endpoint from ``AWS_ENDPOINT_URL``), a local directory, or
``moto`` (the default when ``moto[server]`` is installed): a moto S3 server started in a process of
its own on 127.0.0.1, so its CPU use is not inside the training process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import make_optimizer, sync, synthetic_rows
from raychat.core.model.hf import build_model

CHUNK = 64 * 1024 * 1024  # Ray Train's copy chunk size


def copy_tree(src: str, dest: str) -> None:
    """Copies ``src`` to ``dest`` (local path or ``s3://``) as Ray Train's checkpoint upload does."""
    try:
        import pyarrow.fs as pafs
    except ImportError:  # a bare GPU machine: a plain copy (Ray Train always has pyarrow)
        if "://" in dest:
            raise
        shutil.copytree(src, dest)
        return

    from raychat.core.common.storage import resolve

    fs, path = resolve(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        src,
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
        use_threads=not isinstance(fs, pafs.S3FileSystem),
        chunk_size=CHUNK,
    )


def remove_tree(dest: str) -> None:
    if "://" not in dest:
        shutil.rmtree(dest, ignore_errors=True)
        return
    from raychat.core.common.storage import resolve

    fs, path = resolve(dest)
    fs.delete_dir(path)


class Upload:
    """One checkpoint upload in a background thread, as Ray Train's async upload runs it."""

    def __init__(self, src: str, dest: str):
        self.src, self.dest = src, dest
        self.seconds = 0.0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            copy_tree(self.src, self.dest)
        except BaseException as e:
            self.error = e
        self.seconds = time.perf_counter() - t0
        self.done.set()

    def join(self) -> float:
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"upload to {self.dest} failed: {self.error}") from self.error
        return self.seconds


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process on a free loopback port; returns it and its endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):  # up to 10 s
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="raychat-bench")
    return proc, endpoint


def write_checkpoint(model, opt, directory: Path) -> int:
    """The model (safetensors) and the optimizer state, as a checkpoint holds them; returns the bytes."""
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "training_state").mkdir()
    torch.save(opt.state_dict(), directory / "training_state" / "optimizer.pt")
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main() -> int:
    from raychat.core.model.attention import use_packed_attention
    from raychat.core.train.pack import pack
    from raychat.core.train.plan import plan_epoch
    from raychat.core.train.step import forward_packed_ce

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", choices=["tiny", "1b"], default="tiny", help="tiny: the embedded test model; 1b: 0.85B Mistral"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--batch-max-len", type=int, default=4096, help="token budget per step")
    ap.add_argument("--rows", type=int, default=600, help="synthetic ShareGPT-like rows to cycle through")
    ap.add_argument("--block-steps", type=int, default=5, help="least steps with no upload after each upload")
    ap.add_argument("--blocks", type=int, default=6, help="checkpoint intervals (one upload each)")
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument(
        "--dest", default=None, help="'moto' (default with moto installed), s3://bucket/prefix or a local directory"
    )
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.dest is None:
        try:
            import moto  # noqa: F401

            args.dest = "moto"
        except ImportError:
            args.dest = tempfile.mkdtemp(prefix="raychat-upload-sink-")

    moto_proc = None
    if args.dest == "moto":
        moto_proc, endpoint = start_moto()
        args.dest = "s3://raychat-bench/upload"
        where = f"moto S3 server (own process, {endpoint})"
    else:
        where = args.dest
    workdir = Path(tempfile.mkdtemp(prefix="raychat-ckpt-bench-"))
    try:
        vocab = 32002
        rows = synthetic_rows(args.rows, 2048, vocab)
        model = build_model(args.model, vocab, 2048, args.device, getattr(torch, args.dtype), seed=0)
        use_packed_attention(model)
        model.train()
        opt = make_optimizer(model, args.device)
        plan = plan_epoch(rows.lengths, args.batch_max_len, num_ranks=1, seed=0, epoch=0).for_rank(0)
        batches = [pack([rows.input_ids[i] for i in idx], [rows.weights[i] for i in idx]) for idx in plan]
        cursor = 0

        def step() -> float:
            nonlocal cursor
            packed = batches[cursor % len(batches)]
            cursor += 1
            sync(args.device)
            t0 = time.perf_counter()
            parts = forward_packed_ce(model, packed)
            (parts.loss_sum / parts.weight_sum.clamp_min(1e-8)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(args.device)
            return time.perf_counter() - t0

        for _ in range(args.warmup_steps):
            step()
        ckpt = workdir / "checkpoint"
        nbytes = write_checkpoint(model, opt, ckpt)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{args.model} model ({n_params / 1e6:,.1f}M parameters) on {args.device} ({args.dtype}), "
            f"{torch.get_num_threads()} torch threads; checkpoint {nbytes / 2**20:,.1f} MiB "
            f"(model + optimizer state) uploaded to {where}, {args.blocks} times",
            flush=True,
        )
        quiet: list[float] = []
        during: list[float] = []
        uploads: list[float] = []
        for b in range(args.blocks):
            # A checkpoint interval: the upload starts, training goes on; steps that began before it
            # ended overlapped it. Then as many steps again (at least --block-steps) with no upload.
            target = f"{args.dest.rstrip('/')}/{b}"
            upload = Upload(str(ckpt), target)
            block_during = []
            while not upload.done.is_set():
                block_during.append(step())
            uploads.append(upload.join())
            block_quiet = [step() for _ in range(max(args.block_steps, len(block_during)))]
            remove_tree(target)  # keep the sink small (moto holds objects in memory)
            during.extend(block_during)
            quiet.extend(block_quiet)
            print(
                f"  checkpoint {b + 1}: upload {uploads[-1]:6.2f} s; {len(block_during):3d} steps during it "
                f"(median {statistics.median(block_during) * 1e3:8.1f} ms), {len(block_quiet):3d} after "
                f"(median {statistics.median(block_quiet) * 1e3:8.1f} ms)",
                flush=True,
            )

        med_q, med_u = statistics.median(quiet), statistics.median(during)
        p90_q, p90_u = np.percentile(quiet, 90), np.percentile(during, 90)
        ratio = med_u / med_q
        print()
        print(f"{'steps':34s} {'n':>4s} {'median ms':>10s} {'p90 ms':>8s}")
        print(f"{'with no upload':34s} {len(quiet):4d} {med_q * 1e3:10.1f} {p90_q * 1e3:8.1f}")
        print(f"{'during a checkpoint upload':34s} {len(during):4d} {med_u * 1e3:10.1f} {p90_u * 1e3:8.1f}")
        print(
            f"upload of {nbytes / 2**20:,.1f} MiB: median {statistics.median(uploads):.2f} s "
            f"({nbytes / 2**20 / statistics.median(uploads):,.1f} MiB/s)"
        )
        lost = sum(during) - len(during) * med_q
        print(
            f"training time lost to the uploads: {lost:.2f} s in all, {lost / args.blocks:.2f} s per checkpoint "
            f"({lost / args.blocks / med_q:.1f} steps' worth)"
        )
        print(
            f"step time during upload / without = {ratio:.2f}x (target ≤ 1.1x on GPU) -> "
            f"{'MET' if ratio <= 1.1 else 'NOT MET'}"
        )
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if moto_proc is not None:
            moto_proc.kill()
            moto_proc.wait()


if __name__ == "__main__":
    sys.exit(main())
