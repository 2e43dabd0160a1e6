"""Ray Train job: C-RLFT fine-tuning with DeepSpeed on a ``TorchTrainer``.

    python -m jobs.train --data runs/demo/tokenized --output runs/demo/train

Each epoch ends with an HF-format checkpoint (safetensors, config, tokenizer, generation
config stopping at ``<|end_of_turn|>``) reported through ``ray.train.report`` into
``<output>/<name>/``; the final one is what ``serve`` loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Sequence

import ray
import ray.train
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs._ray import init_ray, log, setup_logging
from libs import storage
from libs.cli import parse_config
from libs.config import TrainConfig
from libs.report import format_table

BASE_MODEL_DIR = "base_model"
TRAINER_STATE = "trainer_state.json"


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed engine, data shard, C-RLFT steps, checkpoints."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from libs.loss import crlft_loss
    from libs.model import load_causal_lm, set_generation_stop
    from libs.training import collate, deepspeed_config, forward_weighted_ce, lr_multiplier

    setup_logging()
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    total_steps: int = loop_config["total_steps"]
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    base = storage.local_or_download(loop_config["base_model_uri"], "/tmp/raychat/models")
    model, tokenizer = load_causal_lm(base)
    set_generation_stop(model, tokenizer)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else cfg.use_gpu
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_bf16)
    )
    device = engine.device
    shard = ray.train.get_dataset_shard("train")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    history: list[dict] = []
    step = 0
    t_start = time.time()
    tokens_seen = 0
    for epoch in range(cfg.epochs):
        for batch in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="numpy", drop_last=False):
            if step >= total_steps:
                break
            tensors = {k: v.to(device) for k, v in collate(batch["input_ids"], batch["weights"], pad_id).items()}
            parts = forward_weighted_ce(engine, tensors)
            # Σw over the global batch, so loss = Σ w·CE / Σ w regardless of how rows split across ranks.
            stats = torch.stack([parts.weight_sum, parts.loss_sum.detach(), parts.correct_weight]).float()
            if world > 1:
                dist.all_reduce(stats)
            global_w, global_loss_sum, global_correct = stats.tolist()
            loss = crlft_loss(parts, global_w, world)
            engine.backward(loss)
            engine.step()
            step += 1
            tokens_seen += int(tensors["attention_mask"].sum())
            record = {
                "step": step,
                "epoch": epoch,
                "loss": global_loss_sum / max(global_w, 1e-8),
                "weighted_accuracy": global_correct / max(global_w, 1e-8),
                "lr": scheduler.get_last_lr()[0],
            }
            history.append(record)
            if rank == 0 and (step % cfg.log_every == 0 or step == 1):
                log.info("step %d/%d epoch %d loss %.4f acc %.3f lr %.2e", step, total_steps, epoch, record["loss"], record["weighted_accuracy"], record["lr"])
        last_epoch = epoch == cfg.epochs - 1 or step >= total_steps
        elapsed = time.time() - t_start
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": history[-1]["loss"] if history else float("nan"),
            "loss_first": history[0]["loss"] if history else float("nan"),
            "tokens_per_s": tokens_seen * world / max(elapsed, 1e-6),
        }
        _report_checkpoint(engine, tokenizer, cfg, rank, metrics, history)
        if last_epoch:
            break


def _report_checkpoint(engine, tokenizer, cfg: TrainConfig, rank: int, metrics: dict, history: list[dict]) -> None:
    """Saves an HF-format model (rank 0) and reports it; every rank calls report (it is a barrier)."""
    import deepspeed

    with tempfile.TemporaryDirectory() as tmp:
        params = list(engine.module.parameters())
        # ZeRO-3 shards parameters; gather them (collectively) so rank 0 can write a full model.
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            if rank == 0:
                engine.module.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                    json.dump({"metrics": metrics, "history": history}, f)
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


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


def checkpoint_uri(storage_uri: str, checkpoint_path: str) -> str:
    return f"s3://{checkpoint_path}" if storage.is_s3(storage_uri) else checkpoint_path


def run(cfg: TrainConfig) -> dict:
    """Trains and returns a summary (checkpoint URI, loss first → last, steps, wall time)."""
    init_ray()
    t0 = time.time()
    run_uri = storage.join(cfg.output, cfg.name)
    base_uri = _stage_base_model(cfg, run_uri)

    data_fs, data_path = storage.resolve(cfg.data)
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, columns=["input_ids", "weights"])
    rows = ds.count()
    if rows == 0:
        raise SystemExit(f"--data {cfg.data}: no rows")
    rows_per_worker = rows // cfg.num_workers
    if rows_per_worker == 0:
        raise SystemExit(f"--data has {rows} rows, fewer than --num-workers {cfg.num_workers}")
    steps_per_epoch = math.ceil(rows_per_worker / cfg.micro_batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    log.info("%d rows, %d worker(s), %d steps/epoch, %d steps", rows, cfg.num_workers, steps_per_epoch, total_steps)

    out_fs, out_path = storage.resolve(cfg.output)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "base_model_uri": base_uri,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=out_path,
            storage_filesystem=out_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    ckpt = checkpoint_uri(cfg.output, result.checkpoint.path)
    with result.checkpoint.as_directory() as d:
        state = json.load(open(os.path.join(d, TRAINER_STATE)))
    history = state["history"]
    return {
        "checkpoint": ckpt,
        "run": run_uri,
        "base_model": base_uri,
        "rows": rows,
        "steps": history[-1]["step"],
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "history": history,
        "tokens_per_s": state["metrics"]["tokens_per_s"],
        "wall_time_s": round(time.time() - t0, 2),
    }


def summary_table(s: dict) -> str:
    return format_table(
        "train summary",
        [
            ("rows", s["rows"]),
            ("steps", s["steps"]),
            ("loss first → last", f"{s['loss_first']:.3f} → {s['loss_last']:.3f}"),
            ("tokens/s", round(s["tokens_per_s"], 1)),
            ("wall time (s)", s["wall_time_s"]),
            ("checkpoint", s["checkpoint"]),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(TrainConfig, argv, prog="python -m jobs.train")
    print(summary_table(run(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
