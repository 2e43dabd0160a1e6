"""Configs of every stage: pydantic models, one description per field.

These are the single source of truth for defaults — the CLIs (:mod:`libs.cli`), YAML files
and the README all derive from them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.storage import normalize
from libs.templates import TEMPLATES

# Fields that hold storage URIs: local ones are made absolute at validation time, because Ray
# workers do not share the driver's working directory.
_URI_FIELDS = ("input", "output", "tokenizer", "data", "base_model", "checkpoint", "workdir")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator(*_URI_FIELDS, mode="after", check_fields=False)
    @classmethod
    def _absolute_local_uris(cls, v: str | None) -> str | None:
        return normalize(v) if v else v


class PretokenizeConfig(_Config):
    """Pre-tokenize conversation JSONL into parquet rows with C-RLFT weights."""

    input: str = Field(description="Conversation JSONL: a file or directory; local path, file:// or s3:// URI.")
    output: str = Field(description="Output directory for parquet shards (local path, file:// or s3://).")
    tokenizer: str | None = Field(
        default=None,
        description="HF tokenizer/model directory (local or s3://); unset = embedded Mistral-7B v0.1 + OpenChat tokens.",
    )
    template: str = Field(default="openchat_3.5", description=f"Chat template, one of {sorted(TEMPLATES)}.")
    max_length: int = Field(default=2048, gt=8, description="Truncate conversations to this many tokens.")
    batch_size: int = Field(default=256, gt=0, description="Rows per tokenizer batch (Ray Data map_batches).")
    num_actors: int = Field(default=1, gt=0, description="Tokenizer actors (each holds one tokenizer).")

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        if v not in TEMPLATES:
            raise ValueError(f"unknown template {v!r}; known: {sorted(TEMPLATES)}")
        return v


class TrainConfig(_Config):
    """Train a causal LM with the C-RLFT loss on Ray Train + DeepSpeed."""

    data: str = Field(description="Parquet directory written by jobs.pretokenize (local path, file:// or s3://).")
    output: str = Field(description="Run storage root (local path or s3://); the run goes to <output>/<name>.")
    name: str = Field(default="crlft", description="Run name; checkpoints land in <output>/<name>/checkpoint_*.")
    base_model: str | None = Field(
        default=None, description="HF model directory (local or s3://); unset = a tiny random-init Mistral."
    )
    num_workers: int = Field(default=1, gt=0, description="Ray Train workers (one per GPU, or per CPU slot).")
    use_gpu: bool = Field(default=False, description="Give each worker one GPU (NCCL, bf16).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per training worker.")
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    epochs: int = Field(default=1, gt=0, description="Passes over the data.")
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps (unset = all epochs).")
    micro_batch_size: int = Field(default=8, gt=0, description="Conversations per worker per step.")
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine decay floor as a fraction of the peak LR.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping threshold.")
    bf16: bool | None = Field(default=None, description="bf16 training; unset = on with GPUs, off on CPU.")
    seed: int = Field(default=42, description="Seed for model init (embedded model) and data shuffling.")
    log_every: int = Field(default=5, gt=0, description="Log a metrics line every N steps.")
    num_to_keep: int = Field(default=2, gt=0, description="Checkpoints kept in storage (Ray Train CheckpointConfig).")


class ServeConfig(_Config):
    """Serve a checkpoint behind an OpenAI-compatible API on Ray Serve."""

    checkpoint: str = Field(description="HF model directory to serve: local path, file:// or s3:// URI.")
    model_id: str | None = Field(default=None, description="Model name in /v1/models; unset = the checkpoint's directory name.")
    template: str = Field(default="openchat_3.5", description=f"Chat template, one of {sorted(TEMPLATES)}.")
    default_condition: str | None = Field(default=None, description="C-RLFT condition for prompts; unset = the template's ('GPT4 Correct').")
    max_context: int | None = Field(default=None, gt=8, description="Prompt + completion token limit; unset = the model's max_position_embeddings.")
    default_max_tokens: int = Field(default=128, gt=0, description="max_tokens when a request names none.")
    max_batch_size: int = Field(default=8, gt=0, description="Most requests per batched forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, description="How long a batch waits to fill.")
    num_replicas: int = Field(default=1, gt=0, description="Engine replicas.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per engine replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per engine replica.")
    cache_dir: str = Field(default="/tmp/raychat/models", description="Local cache for checkpoints downloaded from s3://.")
    host: str = Field(default="127.0.0.1", description="HTTP host for `python -m serve` (serve run/deploy use their own).")
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port for `python -m serve`.")


class PipelineConfig(_Config):
    """Run the whole spine on the embedded default: sample data → pretokenize → train → serve → ask."""

    workdir: str = Field(default="runs", description="Where runs go (local path or s3://); each run gets <workdir>/<run-id>/.")
    run_id: str | None = Field(default=None, description="Run directory name; unset = pipeline-<timestamp>.")
    input: str | None = Field(default=None, description="Conversation JSONL to train on; unset = write the built-in sample data.")
    sample_rows: int = Field(default=200, gt=0, description="Rows of built-in sample data (plus 5 malformed rows to show quarantine).")
    base_model: str | None = Field(default=None, description="HF model directory (local or s3://); unset = tiny random-init Mistral.")
    epochs: int = Field(default=3, gt=0, description="Training epochs.")
    micro_batch_size: int = Field(default=8, gt=0, description="Conversations per worker per step.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak learning rate (high, for the tiny random-init model).")
    num_workers: int = Field(default=1, gt=0, description="Ray Train workers.")
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    question: str = Field(default="What is 2 + 3?", description="What to ask the served model at the end.")
    max_tokens: int = Field(default=32, gt=0, description="Answer length limit.")
    host: str = Field(default="127.0.0.1", description="HTTP host of the endpoint.")
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port of the endpoint.")
    keep_serving: bool = Field(default=False, description="Leave the endpoint up after the demo (Ctrl-C to stop).")
