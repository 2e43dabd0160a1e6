"""Ray Train job: C-RLFT fine-tuning with DeepSpeed on a ``TorchTrainer``.

    python -m raychat.jobs.train --data runs/demo/tokenized --output runs/demo/train

Checkpoints (every ``--checkpoint-every`` steps and at each epoch end) hold an HF model directory
(safetensors, config, tokenizer, generation config stopping at ``<|end_of_turn|>``) plus the
training state (DeepSpeed optimizer/scheduler shards, step, epoch, data position) under
``training_state/``. They go to ``<output>/<name>/`` through Ray Train (uploaded asynchronously);
``<output>/<name>/manifest.json`` lists them with step and eval loss for serving to pick
``best`` or ``latest``. Re-running the same command resumes from the latest checkpoint, and a
failed worker group is restarted from it (``--max-failures``).

The driver plans the packed data feed (:mod:`raychat.jobs.train.feed`: one Ray Data dataset per
rank, in training order) and starts one :class:`raychat.jobs.train.worker.TrainLoop` per Ray Train
worker; the run directory's format (manifest, trainer state) is :mod:`raychat.core.run_dir`'s.
"""

from __future__ import annotations

import json
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

from raychat.core import run_dir
from raychat.core.common import storage
from raychat.core.common.cli import parse_config
from raychat.core.common.report import format_table
from raychat.core.config import TrainConfig
from raychat.core.data.dataset import check_data_matches_model
from raychat.jobs._ray import init_ray, log, setup_logging
from raychat.jobs.train.feed import TRAIN_COLUMNS, collect_row_meta, per_rank_eval, per_rank_feeds, split_train_eval
from raychat.jobs.train.worker import WorkerArgs, train_loop_per_worker


def _stage_base_model(cfg: TrainConfig, run_uri: str) -> str:
    """The base model's URI; the embedded tiny model is created and stored with the run."""
    if cfg.base_model:
        return cfg.base_model
    from raychat.core.model.hf import create_embedded_base_model

    uri = storage.join(run_uri, run_dir.BASE_MODEL_DIR)
    if not storage.exists(storage.join(uri, "config.json")):
        with tempfile.TemporaryDirectory() as tmp:
            create_embedded_base_model(tmp, seed=cfg.seed)
            storage.upload_dir(tmp, uri)
    return uri


def kept_checkpoints(result) -> list[run_dir.CheckpointEntry]:
    """The checkpoints Ray Train kept, with the metrics each was reported with (for the run's manifest)."""
    return [
        run_dir.CheckpointEntry(
            uri=storage.display_uri(ckpt.filesystem, ckpt.path),
            step=metrics.get("step"),
            epoch=metrics.get("epoch"),
            loss=metrics.get("loss"),
            eval_loss=metrics.get("eval_loss"),
        )
        for ckpt, metrics in result.best_checkpoints
    ]


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
    worker_args = WorkerArgs(
        cfg=cfg.model_dump(),
        base_model_uri=base_uri,
        total_steps=total_steps,
        epoch_ends=epoch_ends,
        has_eval=eval_ds is not None,
        learning_rate=lr,
        plan_signature=signature,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_args.to_dict(),
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
    manifest = run_dir.write_manifest(run_uri, kept_checkpoints(result))
    with result.checkpoint.as_directory() as d:
        final, final_metrics = run_dir.read_trainer_state(d)
    history = final.history
    return {
        "checkpoint": manifest["latest"],
        "best_checkpoint": manifest["best"],
        "manifest": storage.join(run_uri, run_dir.MANIFEST),
        "run": run_uri,
        "base_model": base_uri,
        "rows": rows,
        "eval_rows": eval_rows,
        "steps": final.step,
        "steps_per_epoch": plan.steps_per_epoch,
        "packing_efficiency": plan.efficiency,
        "rows_left_out": plan.left_out,
        "rows_too_long": plan.too_long,
        "learning_rate": lr,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "eval_loss": final_metrics.get("eval_loss"),
        "history": history,
        "evals": final.evals,
        "tokens_per_s": final_metrics["tokens_per_s"],
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
