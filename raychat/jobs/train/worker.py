"""What every Ray Train worker runs: DeepSpeed engine, packed feed, C-RLFT steps, eval, checkpoints.

:func:`train_loop_per_worker` is the ``TorchTrainer`` entry point; it builds a :class:`TrainLoop`
from the :class:`WorkerArgs` the driver hands over and runs it. The loop's state (step, epoch, data
plan, history, evals) is a :class:`raychat.core.run_dir.TrainerState`, saved in every checkpoint
and restored on resume.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import ray
import ray.train

from raychat.core.common import node_cache
from raychat.core.config import TrainConfig
from raychat.core.data.tokenizer import EOT_TOKEN
from raychat.core.run_dir import DS_TAG, TRAINING_STATE_DIR, TrainerState, read_trainer_state, write_trainer_state
from raychat.jobs._ray import log, setup_logging


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (through ``train_loop_config``, as a dict).

    Attributes:
        cfg: the job's config, dumped.
        base_model_uri: the model to start from (local or ``s3://``).
        total_steps: optimizer steps of the whole run.
        epoch_ends: cumulative optimizer steps at each epoch's end.
        has_eval: whether ``eval_<rank>`` datasets exist.
        learning_rate: the peak learning rate (possibly computed by ``--auto-lr``).
        plan_signature: what the data plan depends on; a resumed checkpoint must have the same.
    """

    cfg: dict
    base_model_uri: str
    total_steps: int
    epoch_ends: list[int]
    has_eval: bool
    learning_rate: float
    plan_signature: dict

    def to_dict(self) -> dict:
        return asdict(self)


def train_loop_per_worker(loop_config: dict) -> None:
    """The ``TorchTrainer`` entry point: one :class:`TrainLoop`, run to the end."""
    setup_logging()
    TrainLoop(WorkerArgs(**loop_config)).run()


class TrainLoop:
    """One worker's training: set up from :class:`WorkerArgs` (resuming when Ray Train has a checkpoint), then :meth:`run`."""

    def __init__(self, args: WorkerArgs):
        import deepspeed
        import torch

        from raychat.core.model.attention import KernelOptions, use_packed_attention
        from raychat.core.model.hf import add_missing_eot, load_causal_lm, lora_model, set_generation_stop
        from raychat.core.train.step import deepspeed_config, lr_multiplier

        self.args = args
        self.cfg = cfg = TrainConfig.model_validate(args.cfg)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(cfg.seed)

        base = node_cache.local_or_download(args.base_model_uri, node_cache.MODEL_CACHE)
        model, self.tokenizer = load_causal_lm(base)
        if add_missing_eot(model, self.tokenizer) and self.rank == 0:
            log.info("added %s to the base model (embedding = mean of the others)", EOT_TOKEN)
        set_generation_stop(model, self.tokenizer)
        # Per-row attention over packs (no T² mask) unless the model already runs a varlen kernel.
        use_packed_attention(model)
        self.kernels = KernelOptions()  # the CUDA kernels of the packed step (defaults; no config field)
        if cfg.compile_blocks != "off":
            from raychat.core.model.compile import compile_blocks

            n = compile_blocks(model, cfg.compile_blocks)
            if self.rank == 0:
                log.info("compiling %d modules (%s; torch.compile, dynamic shapes)", n, cfg.compile_blocks)
        if cfg.gradient_checkpointing:
            from raychat.core.model.compile import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        if cfg.lora_r is not None:
            model = lora_model(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        use_bf16 = cfg.bf16 if cfg.bf16 is not None else cfg.use_gpu
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, args.total_steps, cfg.min_lr_ratio)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_bf16)
        )
        self.state = TrainerState(plan=args.plan_signature)
        self._resume()
        self.feed = ray.train.get_dataset_shard(f"train_{self.rank}")
        self.eval_shard = ray.train.get_dataset_shard(f"eval_{self.rank}") if args.has_eval else None
        self.metrics = _MetricsSink(cfg, self.rank)
        self.t_start, self.tokens_seen, self.last_loss = time.time(), 0, float("nan")

    def _resume(self) -> None:
        """Loads DeepSpeed's state and the trainer state of Ray Train's latest checkpoint, if any."""
        resumed = ray.train.get_checkpoint()
        if resumed is None:
            return
        with resumed.as_directory() as d:
            self.engine.load_checkpoint(os.path.join(d, TRAINING_STATE_DIR), tag=DS_TAG)
            state, _ = read_trainer_state(d)
        if state.plan != self.args.plan_signature:
            raise RuntimeError(
                f"cannot resume: the checkpoint's data plan {state.plan} differs from this run's "
                f"{self.args.plan_signature} (same data, workers, batch_max_len, grad_accum and seed are needed)"
            )
        self.state = state
        if self.rank == 0:
            log.info("resumed from step %d (epoch %d)", state.step, state.epoch)

    def all_reduce(self, t):
        """Sums ``t`` over the ranks, in place (nothing to do for one worker)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def run(self) -> None:
        """Trains to ``total_steps``, skipping the packs of steps done before a resume; checkpoints at the end."""
        from raychat.core.train.pack import pack
        from raychat.core.train.plan import group_packs

        cfg, state, accum = self.cfg, self.state, self.cfg.grad_accum
        packs: list[dict] = []
        checkpointed_at = state.step
        for micro, rows_ids, rows_w in group_packs(self.feed.iter_batches(batch_size=256, batch_format="numpy")):
            if state.step >= self.args.total_steps:
                break
            if micro < state.step * accum:
                continue  # trained on before the resume: the data position is exact, to the pack
            packs.append(pack(rows_ids, rows_w))
            if len(packs) < accum:
                continue
            self.step(packs)
            packs = []
            if self._checkpoint_due():
                self.checkpoint()
                checkpointed_at = state.step
            elif self.eval_shard is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                self.metrics.gauges({"eval_loss": self.evaluate()})
        if checkpointed_at != state.step:
            self.checkpoint()
        self.metrics.close()

    def step(self, packs: list[dict]) -> dict:
        """One optimizer step over ``grad_accum`` packs; records, logs and reports it."""
        from raychat.core.train.step import train_step

        cfg, state = self.cfg, self.state
        t_step = time.time()
        result = train_step(self.engine, packs, self.world, self.all_reduce, kernels=self.kernels)
        self.tokens_seen += result.tokens
        state.advance(self.args.epoch_ends)
        record = {
            "step": state.step,
            "epoch": state.epoch,
            **result.as_dict(),
            "lr": self.engine.lr_scheduler.get_last_lr()[0],
            "grad_norm": _grad_norm(self.engine),
            "tokens": result.tokens,
            "packing_efficiency": result.tokens / (self.world * cfg.grad_accum * cfg.batch_max_len),
            "tokens_per_s": result.tokens / max(time.time() - t_step, 1e-6),
        }
        state.history.append(record)
        self.last_loss = record["loss"]
        if state.step % cfg.log_every == 0 or state.step == 1:
            if self.rank == 0:
                log.info(
                    "step %d/%d epoch %d loss %.4f acc %.3f lr %.2e grad norm %.3f packing %.4f tokens/s %.0f",
                    state.step,
                    self.args.total_steps,
                    state.epoch,
                    record["loss"],
                    record["weighted_accuracy"],
                    record["lr"],
                    record["grad_norm"],
                    record["packing_efficiency"],
                    record["tokens_per_s"],
                )
            self.metrics.step(record)
        return record

    def _checkpoint_due(self) -> bool:
        step, every = self.state.step, self.cfg.checkpoint_every
        return step in self.args.epoch_ends or step == self.args.total_steps or bool(every and step % every == 0)

    def checkpoint(self) -> None:
        """Evaluates (with eval data), then saves and reports a checkpoint with the step's metrics."""
        metrics = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": self.last_loss,
            "tokens_per_s": self.tokens_seen / max(time.time() - self.t_start, 1e-6),
        }
        if self.eval_shard is not None:
            metrics["eval_loss"] = self.evaluate()
            self.metrics.gauges({"eval_loss": metrics["eval_loss"]})
        self.save_and_report(metrics)

    def evaluate(self) -> float:
        """Weighted held-out loss: Σ w·CE / Σ w over every rank's eval rows, packed like training.

        Ranks may pack their rows into different numbers of packs; under ZeRO-3 every forward is a
        collective, so ranks with fewer packs run zero-weight dummy packs until all have done as many.
        """
        import torch

        from raychat.core.train.pack import pack
        from raychat.core.train.step import eval_sums

        engine, budget = self.engine, self.cfg.batch_max_len
        engine.eval()
        sums = [0.0, 0.0]
        forwards = 0
        rows_ids, rows_w, tokens = [], [], 0

        def flush() -> None:
            nonlocal rows_ids, rows_w, tokens, forwards
            loss_sum, w = eval_sums(engine, pack(rows_ids, rows_w), self.kernels)
            sums[0] += loss_sum
            sums[1] += w
            forwards += 1
            rows_ids, rows_w, tokens = [], [], 0

        for batch in self.eval_shard.iter_batches(batch_size=256, batch_format="numpy"):
            for ids, w in zip(batch["input_ids"], batch["weights"]):
                if rows_ids and tokens + len(ids) > budget:
                    flush()
                rows_ids.append(ids)
                rows_w.append(w)
                tokens += len(ids)
        if rows_ids:
            flush()
        most = self.all_reduce(torch.tensor([forwards], dtype=torch.float64, device=engine.device))
        for _ in range(int(most[0]) - forwards):
            eval_sums(engine, pack([[0]], [[0.0]]), self.kernels)
        total = self.all_reduce(torch.tensor(sums, dtype=torch.float64, device=engine.device))
        engine.train()
        eval_loss = float(total[0]) / max(float(total[1]), 1e-8)
        self.state.evals.append({"step": self.state.step, "eval_loss": eval_loss})
        if self.rank == 0:
            log.info("step %d eval loss %.4f", self.state.step, eval_loss)
        return eval_loss

    def save_and_report(self, metrics: dict) -> None:
        """Every rank writes its DeepSpeed shard, rank 0 the HF model; Ray Train merges and uploads them."""
        import deepspeed
        from ray.train import CheckpointUploadMode

        from raychat.core.model.hf import save_hf_model

        engine = self.engine
        tmp = tempfile.mkdtemp(prefix="raychat-ckpt-")  # Ray deletes it after the (async) upload
        engine.save_checkpoint(os.path.join(tmp, TRAINING_STATE_DIR), tag=DS_TAG)
        params = list(engine.module.parameters())
        # ZeRO-3 shards parameters; gather them (collectively) so rank 0 can write a full model.
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.cfg.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if self.rank == 0:
                save_hf_model(engine.module, self.tokenizer, tmp)
                write_trainer_state(tmp, self.state, metrics)
        mode = CheckpointUploadMode.ASYNC if self.cfg.async_checkpoint else CheckpointUploadMode.SYNC
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )


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
            gauge = self._gauges.get(GAUGE_OF.get(key, ""))
            if gauge is not None and value is not None and math.isfinite(value):
                gauge.set(value, tags=self.tags)
        if self._tb is not None and "step" in values:
            for key, value in values.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, values["step"])

    def step(self, record: dict) -> None:
        self.gauges(record)
        ray.train.report(dict(record))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


#: Record keys → TRAIN_METRICS names (raychat/core/common/metric_specs.py, the one list the dashboards read).
GAUGE_OF = {
    "loss": "raychat_train_loss",
    "eval_loss": "raychat_train_eval_loss",
    "lr": "raychat_train_learning_rate",
    "grad_norm": "raychat_train_grad_norm",
    "tokens_per_s": "raychat_train_tokens_per_second",
    "packing_efficiency": "raychat_train_packing_efficiency",
    "step": "raychat_train_step",
}
