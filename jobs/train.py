"""Ray Train job: C-RLFT fine-tuning with DeepSpeed on a ``TorchTrainer``.

    python -m jobs.train --data runs/demo/tokenized --output runs/demo/train

Checkpoints (every ``--checkpoint-every`` steps and at each epoch end) hold an HF model directory
(safetensors, config, tokenizer, generation config stopping at ``<|end_of_turn|>``) plus the
training state (DeepSpeed optimizer/scheduler shards, step, epoch, data position) under
``training_state/``. They go to ``<output>/<name>/`` through Ray Train (uploaded asynchronously);
``<output>/<name>/manifest.json`` lists them with step and eval loss for serving to pick
``best`` or ``latest``. Re-running the same command resumes from the latest checkpoint, and a
failed worker group is restarted from it (``--max-failures``).
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
from typing import Sequence

import numpy as np
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs._ray import init_ray, log, setup_logging
from libs import storage
from libs.cli import parse_config
from libs.config import TrainConfig
from libs.report import format_table

BASE_MODEL_DIR = "base_model"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
DS_TAG = "state"
MANIFEST = "manifest.json"


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed engine, data shards, C-RLFT steps, eval, checkpoints."""
    import deepspeed
    import torch

    from libs.model import load_causal_lm, set_generation_stop
    from libs.training import deepspeed_config, lr_multiplier

    setup_logging()
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    total_steps: int = loop_config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    base = storage.local_or_download(loop_config["base_model_uri"], "/tmp/raychat/models")
    model, tokenizer = load_causal_lm(base)
    set_generation_stop(model, tokenizer)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else cfg.use_gpu
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_bf16))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    state = {"step": 0, "epoch": 0, "batches_done": 0, "history": [], "evals": []}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, TRAINING_STATE_DIR), tag=DS_TAG)
            with open(os.path.join(d, TRAINER_STATE)) as f:
                state = json.load(f)["state"]
        if rank == 0:
            log.info("resumed from step %d (epoch %d, %d batches into it)", state["step"], state["epoch"], state["batches_done"])

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop_config["has_eval"] else None
    step_fn = _StepRunner(engine, pad_id, world)
    t_start, tokens_seen = time.time(), 0

    def checkpoint() -> None:
        metrics = {"step": state["step"], "epoch": state["epoch"],
                   "loss": state["history"][-1]["loss"] if state["history"] else float("nan"),
                   "tokens_per_s": tokens_seen * world / max(time.time() - t_start, 1e-6)}
        if eval_shard is not None:
            metrics["eval_loss"] = _evaluate(step_fn, eval_shard, cfg.micro_batch_size, state, rank)
        _save_and_report(engine, tokenizer, cfg, rank, state, metrics)

    while state["epoch"] < cfg.epochs and state["step"] < total_steps:
        skip = state["batches_done"]
        for b_idx, batch in enumerate(train_shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="numpy")):
            if b_idx < skip:
                continue  # already trained on before the resume
            if state["step"] >= total_steps:
                break
            record, n_tokens = step_fn.train_step(batch)
            tokens_seen += n_tokens
            state["step"] += 1
            state["batches_done"] = b_idx + 1
            record.update(step=state["step"], epoch=state["epoch"], lr=engine.lr_scheduler.get_last_lr()[0])
            state["history"].append(record)
            if rank == 0 and (state["step"] % cfg.log_every == 0 or state["step"] == 1):
                log.info("step %d/%d epoch %d loss %.4f acc %.3f lr %.2e", state["step"], total_steps, state["epoch"],
                         record["loss"], record["weighted_accuracy"], record["lr"])
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < total_steps:
                checkpoint()
            elif eval_shard is not None and cfg.eval_every and state["step"] % cfg.eval_every == 0:
                _evaluate(step_fn, eval_shard, cfg.micro_batch_size, state, rank)
        state["epoch"] += 1
        state["batches_done"] = 0
        checkpoint()


class _StepRunner:
    """One C-RLFT step / eval pass on a micro-batch, with Σw taken over the global batch."""

    def __init__(self, engine, pad_id: int, world: int):
        self.engine, self.pad_id, self.world = engine, pad_id, world

    def _sums(self, batch, train: bool):
        import torch
        import torch.distributed as dist

        from libs.training import collate, forward_weighted_ce

        tensors = {k: v.to(self.engine.device) for k, v in collate(batch["input_ids"], batch["weights"], self.pad_id).items()}
        with torch.set_grad_enabled(train):
            parts = forward_weighted_ce(self.engine, tensors)
        stats = torch.stack([parts.weight_sum, parts.loss_sum.detach(), parts.correct_weight]).float()
        if self.world > 1:
            dist.all_reduce(stats)
        return parts, stats.tolist(), int(tensors["attention_mask"].sum())

    def train_step(self, batch) -> tuple[dict, int]:
        from libs.loss import crlft_loss

        self.engine.train()
        parts, (w, loss_sum, correct), n_tokens = self._sums(batch, train=True)
        # Σw over the global batch, so loss = Σ w·CE / Σ w however rows split across ranks.
        self.engine.backward(crlft_loss(parts, w, self.world))
        self.engine.step()
        return {"loss": loss_sum / max(w, 1e-8), "weighted_accuracy": correct / max(w, 1e-8)}, n_tokens

    def eval_sums(self, batch) -> tuple[float, float]:
        self.engine.eval()
        _, (w, loss_sum, _), _ = self._sums(batch, train=False)
        return w, loss_sum


def _evaluate(step_fn: _StepRunner, shard, micro_batch_size: int, state: dict, rank: int) -> float:
    total_w = total_loss = 0.0
    for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy"):
        w, loss_sum = step_fn.eval_sums(batch)
        total_w += w
        total_loss += loss_sum
    eval_loss = total_loss / max(total_w, 1e-8)
    state["evals"].append({"step": state["step"], "eval_loss": eval_loss})
    if rank == 0:
        log.info("step %d eval loss %.4f", state["step"], eval_loss)
    return eval_loss


def _save_and_report(engine, tokenizer, cfg: TrainConfig, rank: int, state: dict, metrics: dict) -> None:
    """Every rank writes its DeepSpeed shard, rank 0 the HF model; Ray Train merges and uploads them."""
    import deepspeed
    from ray.train import CheckpointUploadMode

    tmp = tempfile.mkdtemp(prefix="raychat-ckpt-")  # Ray deletes it after the (async) upload
    engine.save_checkpoint(os.path.join(tmp, TRAINING_STATE_DIR), tag=DS_TAG)
    params = list(engine.module.parameters())
    # ZeRO-3 shards parameters; gather them (collectively) so rank 0 can write a full model.
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else contextlib.nullcontext()
    with gather:
        if rank == 0:
            engine.module.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump({"metrics": metrics, "state": state}, f)
    mode = CheckpointUploadMode.ASYNC if cfg.async_checkpoint else CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)


def _stage_base_model(cfg: TrainConfig, run_uri: str) -> str:
    """The base model's URI; the embedded tiny model is created and stored with the run."""
    if cfg.base_model:
        return cfg.base_model
    from libs.model import create_embedded_base_model

    uri = storage.join(run_uri, BASE_MODEL_DIR)
    if not storage.exists(storage.join(uri, "config.json")):
        with tempfile.TemporaryDirectory() as tmp:
            create_embedded_base_model(tmp, seed=cfg.seed)
            storage.upload_dir(tmp, uri)
    return uri


def check_data_matches_model(data_uri: str, base_uri: str) -> dict:
    """Refuses data tokenized with another tokenizer than the model's (vocabulary fingerprints differ)."""
    import pyarrow.parquet as pq

    from libs.pretokenize import METADATA_KEY
    from libs.tokenization import RustEncoder, tokenizer_fingerprint

    fs, _ = storage.resolve(data_uri)
    files = storage.list_files(data_uri, ".parquet")
    if not files:
        raise SystemExit(f"--data {data_uri}: no parquet files (run jobs.pretokenize first)")
    raw = (pq.read_schema(files[0], filesystem=fs).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SystemExit(f"--data {data_uri}: no raychat metadata in the parquet schema; re-run jobs.pretokenize")
    meta = json.loads(raw)
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_files(base_uri, tmp, ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
        model_fp = tokenizer_fingerprint(RustEncoder(tmp))
    if meta.get("tokenizer_fingerprint") != model_fp:
        raise SystemExit(
            f"--data {data_uri} was tokenized with tokenizer {meta.get('tokenizer')!r} "
            f"(fingerprint {meta.get('tokenizer_fingerprint')}), but the model {base_uri} has tokenizer fingerprint {model_fp}: "
            "re-run jobs.pretokenize with --tokenizer pointing at the model"
        )
    return meta


def _eval_flags(batch: dict, fraction: float) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") / 2**64 < fraction
                     for i in batch["id"]], dtype=bool)


def split_train_eval(ds, fraction: float):
    """Deterministic, streaming split by a stable hash of the row id (no materialisation, no shuffle)."""
    if fraction <= 0:
        return ds.select_columns(["input_ids", "weights"]), None
    flagged = ds.map_batches(lambda b: {**b, "is_eval": _eval_flags(b, fraction)}, batch_format="numpy")
    train = flagged.filter(expr="is_eval == False").select_columns(["input_ids", "weights"])
    held_out = flagged.filter(expr="is_eval == True").select_columns(["input_ids", "weights"])
    return train, held_out


def write_manifest(result, cfg: TrainConfig, run_uri: str) -> dict:
    """``manifest.json``: every kept checkpoint with step and eval loss, plus ``best`` and ``latest``."""
    entries = []
    for ckpt, metrics in result.best_checkpoints:
        entries.append({"uri": storage.display_uri(ckpt.filesystem, ckpt.path), "step": metrics.get("step"), "epoch": metrics.get("epoch"),
                        "loss": metrics.get("loss"), "eval_loss": metrics.get("eval_loss")})
    entries.sort(key=lambda e: e["step"])
    latest = entries[-1]["uri"] if entries else None
    scored = [e for e in entries if e["eval_loss"] is not None and math.isfinite(e["eval_loss"])]
    best = min(scored, key=lambda e: e["eval_loss"])["uri"] if scored else latest
    manifest = {"run": run_uri, "checkpoints": entries, "latest": latest, "best": best}
    storage.write_text(storage.join(run_uri, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def run(cfg: TrainConfig) -> dict:
    """Trains (or resumes) and returns a summary (checkpoint URIs, loss first → last, steps, wall time)."""
    init_ray()
    t0 = time.time()
    run_uri = storage.join(cfg.output, cfg.name)
    base_uri = _stage_base_model(cfg, run_uri)
    check_data_matches_model(cfg.data, base_uri)

    data_fs, data_path = storage.resolve(cfg.data)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # resumable data position
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, columns=["id", "input_ids", "weights"])
    train_ds, eval_ds = split_train_eval(ds, cfg.eval_fraction)
    rows = train_ds.count()
    eval_rows = eval_ds.count() if eval_ds is not None else 0
    if eval_ds is not None and eval_rows == 0:
        log.warning("--eval-fraction %s selected no rows of this small dataset: training without eval", cfg.eval_fraction)
        eval_ds = None
    rows_per_worker = rows // cfg.num_workers
    if rows_per_worker == 0:
        raise SystemExit(f"--data has {rows} training rows, fewer than --num-workers {cfg.num_workers}")
    steps_per_epoch = math.ceil(rows_per_worker / cfg.micro_batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    log.info("%d train + %d eval rows, %d worker(s), %d steps/epoch, %d steps", rows, eval_rows, cfg.num_workers, steps_per_epoch, total_steps)

    out_fs, out_path = storage.resolve(cfg.output)
    datasets = {"train": train_ds} | ({"eval": eval_ds} if eval_ds is not None else {})
    score = {"checkpoint_score_attribute": "eval_loss", "checkpoint_score_order": "min"} if eval_ds is not None else {}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "base_model_uri": base_uri, "total_steps": total_steps, "has_eval": eval_ds is not None},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=out_path,
            storage_filesystem=out_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, **score),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    manifest = write_manifest(result, cfg, run_uri)
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, TRAINER_STATE)) as f:
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
            ("steps", s["steps"]),
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
    cfg = parse_config(TrainConfig, argv, prog="python -m jobs.train")
    print(summary_table(run(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
