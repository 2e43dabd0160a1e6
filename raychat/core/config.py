"""Configs of every stage: pydantic models, one description per field.

These are the single source of truth for defaults — the CLIs (:mod:`raychat.core.common.cli`), YAML files
and the README all derive from them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raychat.core.common.storage import normalize
from raychat.core.data.templates import TEMPLATES

# Fields that hold storage URIs: local ones are made absolute at validation time, because Ray
# workers do not share the driver's working directory.
_URI_FIELDS = ("output", "tokenizer", "data", "base_model", "checkpoint", "workdir")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator(*_URI_FIELDS, mode="after", check_fields=False)
    @classmethod
    def _absolute_local_uris(cls, v: str | None) -> str | None:
        return normalize(v) if v else v


class SourceConfig(_Config):
    """One C-RLFT data source."""

    condition: str = Field(description="Role-prefix condition of this source's rows, e.g. 'GPT4 Correct' or 'GPT3'.")
    weight: float = Field(
        ge=0, description="Reward weight of this source's assistant tokens, e.g. 1.0 (expert) or 0.1."
    )


class PretokenizeConfig(_Config):
    """Pre-tokenize conversations into parquet rows with C-RLFT weights."""

    input: str | list[str] = Field(
        description="Conversation files: paths, directories, globs (*.jsonl) or s3:// prefixes; JSONL or JSON arrays."
    )
    output: str = Field(
        description="Output directory for parquet shards (local path, file:// or s3://); must be new or empty."
    )
    tokenizer: str | None = Field(
        default=None,
        description="HF tokenizer/model directory (local or s3://); unset = embedded Mistral-7B v0.1 + OpenChat tokens.",
    )
    template: str = Field(default="openchat_3.5", description=f"Chat template, one of {sorted(TEMPLATES)}.")
    max_length: int | None = Field(
        default=None,
        gt=8,
        description="Truncate conversations to this many tokens; unset = the template's context (8192 for openchat_3.5).",
    )
    format: Literal["auto", "openchat", "openai", "sharegpt"] = Field(
        default="auto",
        description="Row format: auto-detect per row (items / messages / conversations key) or force one.",
    )
    sources: dict[str, SourceConfig] = Field(
        default_factory=dict,
        description="C-RLFT sources: name -> {condition, weight}, e.g. {gpt4: {condition: GPT4 Correct, weight: 1.0}}.",
    )
    source_field: str | None = Field(default="model", description="Row field that names a row's source (unset = none).")
    file_sources: dict[str, str] = Field(
        default_factory=dict,
        description="Glob pattern on the file path -> source name, for rows whose field names none.",
    )
    default_source: str | None = Field(
        default=None,
        description="Source of rows with no source field or file match; unset = the template's condition, weight 1.0.",
    )
    same_role: Literal["merge", "quarantine"] = Field(
        default="merge",
        description="Consecutive turns of one role: merge them (blank line between) or quarantine the row.",
    )
    dedupe: bool = Field(
        default=True, description="Drop exact duplicate conversations (same system, roles and contents)."
    )
    strict: bool = Field(
        default=False,
        description="Fail on the first bad row (naming file, record index and reason) instead of quarantining.",
    )
    batch_size: int = Field(default=512, gt=0, description="Rows per tokenizer batch (Ray Data map_batches).")
    num_actors: int | None = Field(
        default=None,
        gt=0,
        description="Tokenizer actors (one tokenizer each); unset = the cluster's CPUs / tokenizer_threads.",
    )
    tokenizer_threads: int = Field(
        default=1,
        gt=0,
        description="Threads of each actor's Rust tokenizer; each actor reserves about this many CPUs. 1 (one actor "
        "per CPU, so one actor's serial Python work overlaps another's encoding) was fastest measured.",
    )
    rows_per_file: int = Field(
        default=8192, gt=0, description="Target rows per parquet shard (shards are written as rows stream in)."
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        if v not in TEMPLATES:
            raise ValueError(f"unknown template {v!r}; known: {sorted(TEMPLATES)}")
        return v

    @field_validator("input", mode="after")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> list[str]:
        items = [v] if isinstance(v, str) else list(v)
        if not items:
            raise ValueError("at least one input is needed")
        # Globs are kept as written (made absolute when local); they are expanded by the job.
        return [normalize(x) for x in items]

    @model_validator(mode="after")
    def _sources_known(self):
        names = set(self.sources)
        for ref in [self.default_source, *self.file_sources.values()]:
            if ref is not None and names and ref not in names:
                raise ValueError(f"source {ref!r} is not one of sources {sorted(names)}")
        if self.default_source and not names:
            raise ValueError("default_source needs sources to be configured")
        return self


class TrainConfig(_Config):
    """Train a causal LM with the C-RLFT loss on Ray Train + DeepSpeed."""

    data: str = Field(
        description="Parquet directory written by raychat.jobs.pretokenize (local path, file:// or s3://)."
    )
    output: str = Field(description="Run storage root (local path or s3://); the run goes to <output>/<name>.")
    name: str = Field(default="crlft", description="Run name; checkpoints land in <output>/<name>/checkpoint_*.")
    base_model: str | None = Field(
        default=None, description="HF model directory (local or s3://); unset = a tiny random-init Mistral."
    )
    num_workers: int = Field(default=1, gt=0, description="Ray Train workers (one per GPU, or per CPU slot).")
    use_gpu: bool = Field(default=False, description="Give each worker one GPU (NCCL, bf16).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per training worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="Ray placement of the workers: PACK fills nodes first; STRICT_SPREAD puts each worker on its own node.",
    )
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    epochs: int = Field(default=1, gt=0, description="Passes over the data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (unset = all epochs)."
    )
    batch_max_len: int = Field(
        default=16384,
        gt=8,
        description="Token budget of one pack: whole conversations are bin-packed (no padding) into packs of at most this many tokens, one per worker per micro-step.",
    )
    grad_accum: int = Field(
        default=1,
        gt=0,
        description="Packs per worker per optimizer step (gradient accumulation); Σ w still spans the whole step.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory, ~30% more compute)."
    )
    compile_blocks: Literal["off", "norms-mlps", "layers"] = Field(
        default="off",
        description="torch.compile parts of the model for fused element-wise kernels: 'norms-mlps' (each RMSNorm and MLP) or 'layers' "
        "(whole decoder layers but the attention kernel). On an H200, 0.85B Mistral, 16k-token steps: norms-mlps 203 ms, layers "
        "182 ms (MFU 48.5%). Costs compile time at start; not with zero_stage 3.",
    )
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak AdamW learning rate (ignored with --auto-lr).")
    auto_lr: bool = Field(
        default=False,
        description="OpenChat's automatic LR: 3e-4 (÷6 for Mistral) × √(supervised tokens per step / 4M), from batch_max_len × workers × grad_accum and the data's supervised share.",
    )
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine decay floor as a fraction of the peak LR.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping threshold.")
    bf16: bool | None = Field(default=None, description="bf16 training; unset = on with GPUs, off on CPU.")
    seed: int = Field(default=42, description="Seed for model init (embedded model) and data shuffling.")
    log_every: int = Field(default=5, gt=0, description="Log a metrics line every N steps.")
    checkpoint_every: int | None = Field(
        default=None, gt=0, description="Also checkpoint every N steps (always at each epoch end)."
    )
    num_to_keep: int = Field(
        default=2, gt=0, description="Checkpoints kept in storage; the best by eval loss (else the latest) win."
    )
    async_checkpoint: bool = Field(
        default=True, description="Upload checkpoints in the background so the step loop does not wait."
    )
    eval_fraction: float = Field(
        default=0.02,
        ge=0,
        lt=1,
        description="Held-out share of rows (stable hash of the row id) for eval loss; 0 disables.",
    )
    eval_every: int | None = Field(
        default=None, gt=0, description="Also evaluate every N steps (always before each checkpoint)."
    )
    max_failures: int = Field(
        default=1,
        ge=0,
        description="Restarts of a failed worker group from the last checkpoint (Ray Train FailureConfig).",
    )
    lora_r: int | None = Field(
        default=None,
        gt=0,
        description="Train LoRA adapters of this rank (PEFT) instead of all weights; checkpoints hold the merged model. Needs the lora extra.",
    )
    lora_alpha: float = Field(
        default=16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r)."
    )
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA adapters.",
    )
    tensorboard_dir: str | None = Field(
        default=None, description="Also write TensorBoard event files here (local path; needs the tensorboard extra)."
    )

    @model_validator(mode="after")
    def _zero3_compatible(self):
        if self.lora_r is not None and self.zero_stage == 3:
            raise ValueError("lora_r with zero_stage 3 is not supported (merging needs full weights): use zero_stage 2")
        if self.compile_blocks != "off" and self.zero_stage == 3:
            raise ValueError(
                "compile_blocks with zero_stage 3 is not supported (ZeRO-3 gathers weights in module hooks): use zero_stage 2"
            )
        return self


class ServeConfig(_Config):
    """Serve a checkpoint behind an OpenAI-compatible API on Ray Serve."""

    checkpoint: str = Field(
        description="What to serve: an HF checkpoint directory, or a training run directory with manifest.json "
        "(then --checkpoint-select picks one); local path, file:// or s3:// URI."
    )
    checkpoint_select: Literal["best", "latest"] = Field(
        default="best",
        description="For a run directory: 'best' (lowest eval loss) or 'latest' checkpoint of its manifest.",
    )
    model_id: str | None = Field(
        default=None, description="Model name in /v1/models; unset = the checkpoint's directory name."
    )
    template: str = Field(default="openchat_3.5", description=f"Chat template, one of {sorted(TEMPLATES)}.")
    default_condition: str | None = Field(
        default=None, description="C-RLFT condition for prompts; unset = the template's ('GPT4 Correct')."
    )
    max_context: int | None = Field(
        default=None, gt=8, description="Prompt + completion token limit; unset = the model's max_position_embeddings."
    )
    default_max_tokens: int = Field(
        default=256, gt=0, description="max_tokens of a chat request that names none (completions: OpenAI's 16)."
    )
    max_batch_size: int = Field(
        default=16,
        gt=0,
        description="Most requests in an engine replica's running batch (continuous batching); more wait.",
    )
    stream_interval_s: float = Field(
        default=0.02,
        ge=0,
        description="Streaming: after the first token, send a stream's new text at most this often (0 = every step).",
    )
    stream_chunk_rate: float = Field(
        default=160,
        ge=0,
        description="Streaming under load: most chunks per second an engine replica sends across its streams; with more than "
        "stream_chunk_rate x stream_interval_s streams sending, each one's interval grows to streams / stream_chunk_rate "
        "seconds (at most 0.25 s). A stream's last text is never held back. 0 = stream_interval_s alone.",
    )
    max_prefill_tokens: int = Field(
        default=8192, gt=0, description="Most prompt tokens prefilled between two decode steps (one request always is)."
    )
    num_replicas: int | None = Field(
        default=None,
        gt=0,
        description="Fixed number of engine replicas; unset = autoscaling between min_replicas and max_replicas.",
    )
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling: fewest engine replicas.")
    max_replicas: int = Field(default=4, gt=0, description="Autoscaling: most engine replicas.")
    target_ongoing_requests: float = Field(
        default=12,
        gt=0,
        description="Autoscaling: ongoing requests per engine replica to aim for (about 3/4 of max_batch_size).",
    )
    autoscaling_overrides: dict = Field(
        default_factory=dict,
        description="Any other Ray Serve autoscaling_config keys, e.g. {upscale_delay_s: 5, downscale_delay_s: 300}.",
    )
    max_ongoing_requests: int = Field(
        default=32,
        gt=0,
        description="Requests one engine replica accepts at once (running + waiting for a batch slot).",
    )
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        description="Requests waiting beyond max_ongoing_requests: combined, each replica admits max_ongoing + this many; split, "
        "a router replica queues this many when every engine replica is full. Beyond it the answer is 429 (-1 = unbounded).",
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After (seconds) sent with 429/503 answers.")
    request_timeout_s: float = Field(
        default=600,
        gt=0,
        description="Most time a request may take end to end (queue, prefill, every token); then it is cancelled and "
        "answered with 504 (code timeout), or a stream ends with that error event.",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per engine replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per engine replica (> 0: the model runs on CUDA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights' dtype when serving; auto = bfloat16 on GPU, float32 on CPU."
    )
    cpu_packed_linears: bool = Field(
        default=True,
        description="On CPU, run every large float32 linear layer on a weight packed once for oneDNN "
        "(raychat.core.model.hf.pack_cpu_linears): decode batches of 16 rows run ~1.5-3x faster per layer than "
        "torch's MKL call on some CPUs; the packed layers' weights take twice their memory.",
    )
    layout: Literal["combined", "split"] = Field(
        default="combined",
        description="'combined': one deployment (LLMEngine) is both the HTTP ingress and the engine (no handle hop: "
        "lowest time to first token); 'split': an OpenAIRouter ingress calls LLMEngine replicas through a "
        "handle (retries requests of a dead engine replica itself, ends broken streams with an OpenAI error event).",
    )
    same_event_loop: bool = Field(
        default=True,
        description="Run each replica's request handling on its main event loop (Ray Serve's documented throughput "
        "flags RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0).",
    )
    health_check_period_s: float = Field(
        default=10.0,
        gt=0,
        description="How often Serve checks each engine replica's health (a replica whose engine process died fails "
        "it; Serve replaces a replica after 3 failed checks in a row).",
    )
    engine_process: bool = Field(
        default=True,
        description="Run the model and its batching loop in a child process of each engine replica, with a GIL of its "
        "own (the replica keeps HTTP, tokenization and text): request handling no longer delays decode "
        "steps; costs one more process (and its own CPU) per replica.",
    )
    router_replicas: int = Field(
        default=1, gt=0, description="Replicas of the HTTP router (OpenAI ingress; layout split)."
    )
    router_max_ongoing_requests: int = Field(
        default=1024, gt=0, description="Requests one router replica handles at once (they mostly wait on engines)."
    )
    max_request_bytes: int = Field(
        default=4 << 20, gt=0, description="Largest request body accepted; bigger ones get 413."
    )
    api_keys_env: str | None = Field(
        default="RAYCHAT_API_KEYS",
        description="Environment variable with comma-separated API keys (read by each ingress replica).",
    )
    api_keys_file: str | None = Field(
        default=None, description="File with one API key per line (e.g. a mounted Kubernetes secret)."
    )
    allow_no_auth: bool = Field(
        default=False,
        description="Serve without API keys (local demo only); otherwise starting with no key configured fails.",
    )
    cache_dir: str = Field(
        default="/tmp/raychat/models",
        description="Node-local cache for checkpoints downloaded from s3:// (one download per node, file-locked).",
    )
    host: str = Field(
        default="127.0.0.1", description="HTTP host for `python -m raychat.serve` (serve run/deploy use their own)."
    )
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port for `python -m raychat.serve`.")

    @model_validator(mode="after")
    def _replica_bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): batches could never fill"
            )
        return self

    def combined_admission_limit(self) -> int | None:
        """``layout: combined``: generation requests one replica admits at once — what the split layout's
        engine replica and router queue hold together (``max_ongoing_requests + max_queued_requests``);
        the next one gets 429. None when the queue is unbounded (-1)."""
        return None if self.max_queued_requests < 0 else self.max_ongoing_requests + self.max_queued_requests


class PipelineConfig(_Config):
    """Run the whole spine on the embedded default: sample data → pretokenize → train → serve → ask."""

    workdir: str = Field(
        default="runs", description="Where runs go (local path or s3://); each run gets <workdir>/<run-id>/."
    )
    run_id: str | None = Field(default=None, description="Run directory name; unset = pipeline-<timestamp>.")
    input: str | None = Field(
        default=None, description="Conversation JSONL to train on; unset = write the built-in sample data."
    )
    sample_rows: int = Field(
        default=200, gt=0, description="Rows of built-in sample data (plus 5 malformed rows to show quarantine)."
    )
    base_model: str | None = Field(
        default=None, description="HF model directory (local or s3://); unset = tiny random-init Mistral."
    )
    epochs: int = Field(default=3, gt=0, description="Training epochs.")
    batch_max_len: int = Field(
        default=512, gt=8, description="Token budget of one training pack (whole conversations, no padding)."
    )
    learning_rate: float = Field(
        default=1e-3, gt=0, description="Peak learning rate (high, for the tiny random-init model)."
    )
    num_workers: int = Field(default=1, gt=0, description="Ray Train workers.")
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    question: str = Field(default="What is 2 + 3?", description="What to ask the served model at the end.")
    max_tokens: int = Field(default=32, gt=0, description="Answer length limit.")
    host: str = Field(default="127.0.0.1", description="HTTP host of the endpoint.")
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port of the endpoint.")
    keep_serving: bool = Field(default=False, description="Leave the endpoint up after the demo (Ctrl-C to stop).")
