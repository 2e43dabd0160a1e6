"""Ray Train job: C-RLFT fine-tuning with DeepSpeed on a ``TorchTrainer``.

    python -m raychat.jobs.train --data runs/demo/tokenized --output runs/demo/train

Checkpoints (every ``--checkpoint-every`` steps and at each epoch end) hold an HF model directory
(safetensors, config, tokenizer, generation config stopping at ``<|end_of_turn|>``) plus the
training state (DeepSpeed optimizer/scheduler shards, step, epoch, data position) under
``training_state/``. They go to ``<output>/<name>/`` through Ray Train (uploaded asynchronously);
``<output>/<name>/manifest.json`` lists them with step and eval loss for serving to pick
``best`` or ``latest``. Re-running the same command resumes from the latest checkpoint, and a
failed worker group is restarted from it (``--max-failures``).

The packed data feed (exact, deterministic per ``(seed, epoch)``, resumable, no shared filesystem):

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

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raychat.core.common import storage
from raychat.core.common.cli import parse_config
from raychat.core.common.report import format_table
from raychat.core.config import TrainConfig
from raychat.core.data.tokenizer import EOT_TOKEN
from raychat.jobs._ray import init_ray, log, setup_logging

BASE_MODEL_DIR = "base_model"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
DS_TAG = "state"
MANIFEST = "manifest.json"


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed engine, packed feed, C-RLFT steps, eval, checkpoints."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from raychat.core.model.attention import KernelOptions, use_packed_attention
    from raychat.core.model.hf import add_missing_eot, load_causal_lm, lora_model, set_generation_stop
    from raychat.core.train.pack import pack
    from raychat.core.train.plan import group_packs
    from raychat.core.train.step import deepspeed_config, lr_multiplier, train_step

    setup_logging()
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    total_steps: int = loop_config["total_steps"]
    epoch_ends: list[int] = loop_config["epoch_ends"]  # cumulative optimizer steps at each epoch's end
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    base = storage.local_or_download(loop_config["base_model_uri"], "/tmp/raychat/models")
    model, tokenizer = load_causal_lm(base)
    if add_missing_eot(model, tokenizer) and rank == 0:
        log.info("added %s to the base model (embedding = mean of the others)", EOT_TOKEN)
    set_generation_stop(model, tokenizer)
    # Per-row attention over packs (no T² mask) unless the model already runs a varlen kernel.
    use_packed_attention(model)
    kernels = KernelOptions()  # the CUDA kernels of the packed step (defaults; no config field)
    if cfg.compile_blocks != "off":
        from raychat.core.model.compile import compile_blocks

        n = compile_blocks(model, cfg.compile_blocks)
        if rank == 0:
            log.info("compiling %d modules (%s; torch.compile, dynamic shapes)", n, cfg.compile_blocks)
    if cfg.gradient_checkpointing:
        from raychat.core.model.compile import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if cfg.lora_r is not None:
        model = lora_model(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else cfg.use_gpu
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=loop_config["learning_rate"], betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_bf16)
    )

    state = {"step": 0, "epoch": 0, "plan": loop_config["plan_signature"], "history": [], "evals": []}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, TRAINING_STATE_DIR), tag=DS_TAG)
            with open(os.path.join(d, TRAINER_STATE)) as f:
                state = json.load(f)["state"]
        if state.get("plan") != loop_config["plan_signature"]:
            raise RuntimeError(
                f"cannot resume: the checkpoint's data plan {state.get('plan')} differs from this run's "
                f"{loop_config['plan_signature']} (same data, workers, batch_max_len, grad_accum and seed are needed)"
            )
        if rank == 0:
            log.info("resumed from step %d (epoch %d)", state["step"], state["epoch"])

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t)
        return t

    feed = ray.train.get_dataset_shard(f"train_{rank}")
    eval_shard = ray.train.get_dataset_shard(f"eval_{rank}") if loop_config["has_eval"] else None
    metrics_out = _MetricsSink(cfg, rank)
    t_start, tokens_seen = time.time(), 0
    last = {"loss": float("nan")}

    def checkpoint() -> None:
        metrics = {
            "step": state["step"],
            "epoch": state["epoch"],
            "loss": last["loss"],
            "tokens_per_s": tokens_seen / max(time.time() - t_start, 1e-6),
        }
        if eval_shard is not None:
            metrics["eval_loss"] = _evaluate(engine, eval_shard, cfg.batch_max_len, all_reduce, state, rank, kernels)
            metrics_out.gauges({"eval_loss": metrics["eval_loss"]})
        _save_and_report(engine, tokenizer, cfg, rank, state, metrics)

    accum = cfg.grad_accum
    packs: list[dict] = []
    checkpointed_at = state["step"]
    for micro, rows_ids, rows_w in group_packs(feed.iter_batches(batch_size=256, batch_format="numpy")):
        if state["step"] >= total_steps:
            break
        if micro < state["step"] * accum:
            continue  # trained on before the resume: the data position is exact, to the pack
        packs.append(pack(rows_ids, rows_w))
        if len(packs) < accum:
            continue
        t_step = time.time()
        result = train_step(engine, packs, world, all_reduce, kernels=kernels)
        packs = []
        tokens_seen += result.tokens
        state["step"] += 1
        while state["epoch"] < len(epoch_ends) and state["step"] >= epoch_ends[state["epoch"]]:
            state["epoch"] += 1
        record = {
            "step": state["step"],
            "epoch": state["epoch"],
            **result.as_dict(),
            "lr": engine.lr_scheduler.get_last_lr()[0],
            "grad_norm": _grad_norm(engine),
            "tokens": result.tokens,
            "packing_efficiency": result.tokens / (world * accum * cfg.batch_max_len),
            "tokens_per_s": result.tokens / max(time.time() - t_step, 1e-6),
        }
        state["history"].append(record)
        last["loss"] = record["loss"]
        if state["step"] % cfg.log_every == 0 or state["step"] == 1:
            if rank == 0:
                log.info(
                    "step %d/%d epoch %d loss %.4f acc %.3f lr %.2e grad norm %.3f packing %.4f tokens/s %.0f",
                    state["step"],
                    total_steps,
                    state["epoch"],
                    record["loss"],
                    record["weighted_accuracy"],
                    record["lr"],
                    record["grad_norm"],
                    record["packing_efficiency"],
                    record["tokens_per_s"],
                )
            metrics_out.step(record)
        epoch_end = state["step"] in epoch_ends
        if (
            epoch_end
            or state["step"] == total_steps
            or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0)
        ):
            checkpoint()
            checkpointed_at = state["step"]
        elif eval_shard is not None and cfg.eval_every and state["step"] % cfg.eval_every == 0:
            metrics_out.gauges({"eval_loss": _evaluate(engine, eval_shard, cfg.batch_max_len, all_reduce, state, rank)})
    if checkpointed_at != state["step"]:
        checkpoint()
    metrics_out.close()


def _grad_norm(engine) -> float:
    """Global gradient norm before clipping of the last optimizer step (DeepSpeed computes it)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)


class _MetricsSink:
    """Step metrics to Ray Train (every rank reports, rank 0's are kept), Prometheus and TensorBoard (rank 0)."""

    def __init__(self, cfg: TrainConfig, rank: int):
        self.rank, self.tags = rank, {"run": cfg.name}
        self._gauges: dict = {}
        self._tb = None
        if rank != 0:
            return
        from ray.util.metrics import Gauge

        from raychat.core.common.metric_specs import TRAIN_METRICS

        self._gauges = {s.name: Gauge(s.name, description=s.description, tag_keys=s.tag_keys) for s in TRAIN_METRICS}
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=cfg.tensorboard_dir)

    def gauges(self, values: dict) -> None:
        if self.rank != 0:
            return
        for key, value in values.items():
            gauge = self._gauges.get(_GAUGE_OF.get(key, ""))
            if gauge is not None and value is not None and math.isfinite(value):
                gauge.set(value, tags=self.tags)
        if self._tb is not None and "step" in values:
            for key, value in values.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, values["step"])

    def step(self, record: dict) -> None:
        self.gauges(record)
        ray.train.report({k: v for k, v in record.items()})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# Record keys → TRAIN_METRICS names (raychat/core/common/metric_specs.py, the one list the dashboards read).
_GAUGE_OF = {
    "loss": "raychat_train_loss",
    "eval_loss": "raychat_train_eval_loss",
    "lr": "raychat_train_learning_rate",
    "grad_norm": "raychat_train_grad_norm",
    "tokens_per_s": "raychat_train_tokens_per_second",
    "packing_efficiency": "raychat_train_packing_efficiency",
    "step": "raychat_train_step",
}


def _evaluate(engine, shard, batch_max_len: int, all_reduce, state: dict, rank: int, kernels) -> float:
    """Weighted held-out loss: Σ w·CE / Σ w over every rank's eval rows, packed like training.

    Ranks may pack their rows into different numbers of packs; under ZeRO-3 every forward is a
    collective, so ranks with fewer packs run zero-weight dummy packs until all have done as many.
    """
    import torch

    from raychat.core.train.pack import pack
    from raychat.core.train.step import eval_sums

    engine.eval()
    sums = [0.0, 0.0]
    forwards = 0
    rows_ids, rows_w, tokens = [], [], 0

    def flush() -> None:
        nonlocal rows_ids, rows_w, tokens, forwards
        loss_sum, w = eval_sums(engine, pack(rows_ids, rows_w), kernels)
        sums[0] += loss_sum
        sums[1] += w
        forwards += 1
        rows_ids, rows_w, tokens = [], [], 0

    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for ids, w in zip(batch["input_ids"], batch["weights"]):
            if rows_ids and tokens + len(ids) > batch_max_len:
                flush()
            rows_ids.append(ids)
            rows_w.append(w)
            tokens += len(ids)
    if rows_ids:
        flush()
    most = all_reduce(torch.tensor([forwards], dtype=torch.float64, device=engine.device))
    for _ in range(int(most[0]) - forwards):
        eval_sums(engine, pack([[0]], [[0.0]]), kernels)
    total = all_reduce(torch.tensor(sums, dtype=torch.float64, device=engine.device))
    engine.train()
    eval_loss = float(total[0]) / max(float(total[1]), 1e-8)
    state["evals"].append({"step": state["step"], "eval_loss": eval_loss})
    if rank == 0:
        log.info("step %d eval loss %.4f", state["step"], eval_loss)
    return eval_loss


def _save_and_report(engine, tokenizer, cfg: TrainConfig, rank: int, state: dict, metrics: dict) -> None:
    """Every rank writes its DeepSpeed shard, rank 0 the HF model; Ray Train merges and uploads them."""
    import deepspeed
    from ray.train import CheckpointUploadMode

    from raychat.core.model.hf import save_hf_model

    tmp = tempfile.mkdtemp(prefix="raychat-ckpt-")  # Ray deletes it after the (async) upload
    engine.save_checkpoint(os.path.join(tmp, TRAINING_STATE_DIR), tag=DS_TAG)
    params = list(engine.module.parameters())
    # ZeRO-3 shards parameters; gather them (collectively) so rank 0 can write a full model.
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if cfg.zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            save_hf_model(engine.module, tokenizer, tmp)
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump({"metrics": metrics, "state": state}, f)
    mode = CheckpointUploadMode.ASYNC if cfg.async_checkpoint else CheckpointUploadMode.SYNC
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(tmp),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


def _stage_base_model(cfg: TrainConfig, run_uri: str) -> str:
    """The base model's URI; the embedded tiny model is created and stored with the run."""
    if cfg.base_model:
        return cfg.base_model
    from raychat.core.model.hf import create_embedded_base_model

    uri = storage.join(run_uri, BASE_MODEL_DIR)
    if not storage.exists(storage.join(uri, "config.json")):
        with tempfile.TemporaryDirectory() as tmp:
            create_embedded_base_model(tmp, seed=cfg.seed)
            storage.upload_dir(tmp, uri)
    return uri


def check_data_matches_model(data_uri: str, base_uri: str) -> dict:
    """Refuses data tokenized with another tokenizer than the model's (vocabulary fingerprints differ).

    A base model without ``<|end_of_turn|>`` gets it added for training (see
    :func:`raychat.core.model.hf.add_missing_eot`), so its fingerprint is taken with that token added too.
    """
    import pyarrow.parquet as pq
    from tokenizers import AddedToken

    from raychat.core.data.rows import METADATA_KEY
    from raychat.core.data.tokenizer import RustEncoder, tokenizer_fingerprint

    fs, _ = storage.resolve(data_uri)
    files = storage.list_files(data_uri, ".parquet")
    if not files:
        raise SystemExit(f"--data {data_uri}: no parquet files (run raychat.jobs.pretokenize first)")
    raw = (pq.read_schema(files[0], filesystem=fs).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SystemExit(
            f"--data {data_uri}: no raychat metadata in the parquet schema; re-run raychat.jobs.pretokenize"
        )
    meta = json.loads(raw)
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_files(base_uri, tmp, ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
        encoder = RustEncoder(tmp)
        if EOT_TOKEN not in encoder.vocab():
            encoder.rust.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
        model_fp = tokenizer_fingerprint(encoder)
    if meta.get("tokenizer_fingerprint") != model_fp:
        raise SystemExit(
            f"--data {data_uri} was tokenized with tokenizer {meta.get('tokenizer')!r} "
            f"(fingerprint {meta.get('tokenizer_fingerprint')}), but the model {base_uri} has tokenizer fingerprint {model_fp}: "
            "re-run raychat.jobs.pretokenize with --tokenizer pointing at the model"
        )
    return meta


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


def write_manifest(result, cfg: TrainConfig, run_uri: str) -> dict:
    """``manifest.json``: every kept checkpoint with step and eval loss, plus ``best`` and ``latest``."""
    entries = []
    for ckpt, metrics in result.best_checkpoints:
        entries.append(
            {
                "uri": storage.display_uri(ckpt.filesystem, ckpt.path),
                "step": metrics.get("step"),
                "epoch": metrics.get("epoch"),
                "loss": metrics.get("loss"),
                "eval_loss": metrics.get("eval_loss"),
            }
        )
    entries.sort(key=lambda e: e["step"])
    latest = entries[-1]["uri"] if entries else None
    scored = [e for e in entries if e["eval_loss"] is not None and math.isfinite(e["eval_loss"])]
    best = min(scored, key=lambda e: e["eval_loss"])["uri"] if scored else latest
    manifest = {"run": run_uri, "checkpoints": entries, "latest": latest, "best": best}
    storage.write_text(storage.join(run_uri, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def _model_type(base_uri: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_files(base_uri, tmp, ["config.json"])
        return json.loads(open(os.path.join(tmp, "config.json")).read()).get("model_type", "")


def run(cfg: TrainConfig) -> dict:
    """Trains (or resumes) and returns a summary (checkpoint URIs, loss first → last, steps, packing, wall time)."""
    from raychat.core.train.plan import plan_feed
    from raychat.core.train.step import openchat_auto_lr

    init_ray()
    t0 = time.time()
    if cfg.tensorboard_dir:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise SystemExit("--tensorboard-dir needs the tensorboard package: pip install 'raychat[tensorboard]'")
    run_uri = storage.join(cfg.output, cfg.name)
    base_uri = _stage_base_model(cfg, run_uri)
    check_data_matches_model(cfg.data, base_uri)

    data_fs, data_path = storage.resolve(cfg.data)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True  # deterministic, resumable feed
    # Ray Train copies this context to the workers. Their per-rank feeds would each draw Ray Data
    # progress bars, relayed to the driver line by line (2,400 lines for the tiny demo) around the
    # step log, which already reports progress.
    data_ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, columns=["id", *TRAIN_COLUMNS])
    train_ds, eval_ds = split_train_eval(ds, cfg.eval_fraction)
    keys, lengths, supervised_ratio = collect_row_meta(train_ds)
    rows = int(keys.size)
    eval_rows = eval_ds.count() if eval_ds is not None else 0
    if eval_ds is not None and eval_rows == 0:
        log.warning(
            "--eval-fraction %s selected no rows of this small dataset: training without eval", cfg.eval_fraction
        )
        eval_ds = None
    plan = plan_feed(lengths, cfg.batch_max_len, cfg.num_workers, cfg.seed, cfg.epochs, accum=cfg.grad_accum)
    if plan.too_long:
        log.warning("%d rows are longer than --batch-max-len %d and are left out", plan.too_long, cfg.batch_max_len)
    total_steps = plan.total_steps if not cfg.max_steps else min(plan.total_steps, cfg.max_steps)
    if total_steps == 0:
        raise SystemExit(
            f"--data has {int(lengths.sum())} training tokens in {rows} rows: not enough for one step of "
            f"{cfg.num_workers} worker(s) × {cfg.grad_accum} pack(s) × --batch-max-len {cfg.batch_max_len}"
        )
    lr = cfg.learning_rate
    if cfg.auto_lr:
        lr = openchat_auto_lr(
            cfg.batch_max_len, cfg.num_workers, supervised_ratio, _model_type(base_uri), cfg.grad_accum
        )
        log.info("automatic learning rate %.3g (supervised share %.3f)", lr, supervised_ratio)
    log.info(
        "%d train + %d eval rows, %d worker(s), steps per epoch %s, %d steps, packing efficiency %s",
        rows,
        eval_rows,
        cfg.num_workers,
        plan.steps_per_epoch,
        total_steps,
        [round(e, 4) for e in plan.efficiency],
    )

    out_fs, out_path = storage.resolve(cfg.output)
    datasets = per_rank_feeds(train_ds, keys, plan, cfg.num_workers, cfg.batch_max_len)
    if eval_ds is not None:
        datasets |= per_rank_eval(eval_ds, cfg.num_workers)
    score = {"checkpoint_score_attribute": "eval_loss", "checkpoint_score_order": "min"} if eval_ds is not None else {}
    signature = {
        "rows": rows,
        "num_workers": cfg.num_workers,
        "batch_max_len": cfg.batch_max_len,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
    }
    epoch_ends = np.cumsum(plan.steps_per_epoch).tolist()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "base_model_uri": base_uri,
            "total_steps": total_steps,
            "epoch_ends": epoch_ends,
            "has_eval": eval_ds is not None,
            "learning_rate": lr,
            "plan_signature": signature,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=out_path,
            storage_filesystem=out_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, **score),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # every rank reads its own train_<rank> / eval_<rank>
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    manifest = write_manifest(result, cfg, run_uri)
    with result.checkpoint.as_directory() as d, open(os.path.join(d, TRAINER_STATE)) as f:
        final = json.load(f)
    history = final["state"]["history"]
    return {
        "checkpoint": manifest["latest"],
        "best_checkpoint": manifest["best"],
        "manifest": storage.join(run_uri, MANIFEST),
        "run": run_uri,
        "base_model": base_uri,
        "rows": rows,
        "eval_rows": eval_rows,
        "steps": final["state"]["step"],
        "steps_per_epoch": plan.steps_per_epoch,
        "packing_efficiency": plan.efficiency,
        "rows_left_out": plan.left_out,
        "rows_too_long": plan.too_long,
        "learning_rate": lr,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "eval_loss": final["metrics"].get("eval_loss"),
        "history": history,
        "evals": final["state"]["evals"],
        "tokens_per_s": final["metrics"]["tokens_per_s"],
        "wall_time_s": round(time.time() - t0, 2),
    }


def summary_table(s: dict) -> str:
    return format_table(
        "train summary",
        [
            ("rows (train / eval)", f"{s['rows']} / {s['eval_rows']}"),
            ("steps (per epoch)", f"{s['steps']} ({', '.join(map(str, s['steps_per_epoch']))})"),
            ("packing efficiency per epoch", ", ".join(f"{e:.4f}" for e in s["packing_efficiency"])),
            ("rows left out per epoch", ", ".join(map(str, s["rows_left_out"]))),
            ("learning rate (peak)", f"{s['learning_rate']:.3g}"),
            ("loss first → last", f"{s['loss_first']:.3f} → {s['loss_last']:.3f}"),
            ("eval loss (last)", "-" if s["eval_loss"] is None else round(s["eval_loss"], 4)),
            ("tokens/s", round(s["tokens_per_s"], 1)),
            ("wall time (s)", s["wall_time_s"]),
            ("checkpoint (latest)", s["checkpoint"]),
            ("checkpoint (best)", s["best_checkpoint"]),
            ("manifest", s["manifest"]),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(TrainConfig, argv, prog="raychat train")
    print(summary_table(run(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
