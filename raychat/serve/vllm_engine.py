"""The vLLM engine replica: vLLM's V1 ``AsyncLLM`` generates, raychat decides what goes in.

The prompt is always the token ids raychat builds (:class:`raychat.serve.prompts.PromptEncoder`:
the exact OpenChat / C-RLFT template and the request's ``condition``), never vLLM's chat
template; vLLM adds paged KV cache, prefix caching, continuous batching, logprobs and structured
output (``response_format``). Everything around it is raychat's: admission, API keys, the
OpenAI surface, streaming pace, metrics. vLLM's own metrics go to Ray's metrics agent too
(vLLM's ``RayPrometheusStatLogger``, as Ray Serve LLM does).

The replica's deployment name stays ``LLMEngine`` whatever the engine (RayService configs
override it by that name).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator

from raychat.core.config import ServeConfig
from raychat.core.infer.checkpoint_cache import fetch_checkpoint
from raychat.core.infer.engine_process import EngineProcessDied
from raychat.core.run_dir import CheckpointRef
from raychat.serve.engine import Pacer
from raychat.serve.engine_protocol import EngineChunk, EngineRequest, TokenLogprob, last_chunk
from raychat.serve.errors import error_body
from raychat.serve.prompts import PromptEncoder, PromptError

log = logging.getLogger("raychat.serve")


def sampling_params(req: EngineRequest, max_tokens: int, stop_ids: list[int]):
    """vLLM's ``SamplingParams`` for one choice (one sequence: the router sends one request per choice)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if req.response_format is not None:
        kind = req.response_format["type"]
        structured = (
            StructuredOutputsParams(json=req.response_format["schema"])
            if kind == "json_schema"
            else StructuredOutputsParams(json_object=True)
        )
    return SamplingParams(
        n=1,
        max_tokens=max_tokens,
        **req.sampling(),
        stop=list(req.stop) or None,
        stop_token_ids=list(stop_ids),
        logprobs=req.logprobs,
        prompt_logprobs=(req.logprobs or 0) if req.echo and req.logprobs is not None else None,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
    )


def token_logprobs(ids, logprobs, k: int, tokenizer) -> list[TokenLogprob]:
    """raychat's ``(token, logprob, top k)`` entries from vLLM's per-position ``{token id: Logprob}`` dicts.

    Each dict holds the chosen token (whatever its rank) and the ``k`` most likely ones (ranks 1..k);
    a ``None`` dict (a prompt's first token) gives a ``None`` logprob.
    """
    out: list[TokenLogprob] = []
    for tid, pos in zip(ids, logprobs):
        if pos is None:
            out.append((_decoded(tokenizer, tid, None), None, []))
            continue
        chosen = pos[tid]
        top = sorted((lp for t, lp in pos.items() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        out.append(
            (
                _decoded(tokenizer, tid, chosen),
                float(chosen.logprob),
                [(lp.decoded_token or "", float(lp.logprob)) for lp in top[:k]],
            )
        )
    return out


def refused(req: EngineRequest, e: Exception) -> dict:
    """The 400 body of a request vLLM refused, naming the parameter (a schema it cannot compile: response_format)."""
    param = getattr(e, "parameter", None)
    if req.response_format is not None and (param in (None, "structured_outputs") or "rammar" in str(e)):
        param = "response_format"
    return error_body(f"{param or 'request'}: {e}", param=param)


def _decoded(tokenizer, tid: int, lp) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([tid])


class VLLMEngine:
    """Serve deployment class of the ``vllm`` engine (wrapped in :func:`raychat.serve.app.build_app`)."""

    def __init__(self, cfg: dict, checkpoint: dict):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        from raychat.serve.metrics import ServeMetrics

        self.cfg = ServeConfig.model_validate(cfg)
        self.ref = CheckpointRef(**checkpoint)
        local = fetch_checkpoint(self.ref.uri, self.cfg.cache_dir)
        model_config = AutoConfig.from_pretrained(str(local))
        self.tokenizer = AutoTokenizer.from_pretrained(str(local))
        self.prompts = PromptEncoder.for_model(self.tokenizer, model_config, self.cfg)
        self.max_context = self.prompts.max_context
        self.stop_ids = self.prompts.stop_ids
        args = AsyncEngineArgs(
            model=str(local),
            tokenizer=str(local),
            # As the builtin engine: auto = bfloat16 on GPU, float32 on CPU (vLLM's own auto halves float32 weights).
            dtype=self.cfg.dtype if self.cfg.dtype != "auto" else "bfloat16" if self.cfg.num_gpus > 0 else "float32",
            max_model_len=self.max_context,
            max_num_seqs=self.cfg.max_batch_size,
            max_num_batched_tokens=max(self.cfg.max_prefill_tokens, self.max_context),
            seed=0,
            enforce_eager=self.cfg.vllm_enforce_eager,
            enable_prefix_caching=True,
            # Compact JSON for response_format (a per-request setting is ignored by vLLM 0.29).
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            max_logprobs=20,
            logprobs_mode="raw_logprobs",  # logprobs of the model's distribution, as lm-eval-harness expects
            kv_cache_memory_bytes=None if self.cfg.vllm_kv_cache_gb is None else int(self.cfg.vllm_kv_cache_gb * 2**30),
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            disable_log_stats=False,
        )
        t0 = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=_ray_stat_loggers())
        self.metrics = ServeMetrics(self.cfg.model_id or "")
        self.pacer = Pacer(self.cfg.stream_interval_s, self.cfg.stream_chunk_rate)
        log.info(
            "vLLM engine for %s up in %.1f s (context %d, max batch %d)",
            self.ref.uri,
            time.perf_counter() - t0,
            self.max_context,
            self.cfg.max_batch_size,
        )

    async def check_health(self) -> None:
        """Serve's health check: a replica whose vLLM engine core died is replaced."""
        if self.llm.errored:
            raise RuntimeError(f"vLLM's engine core died: {self.llm.dead_error}")

    def __del__(self):
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        """Streams :class:`EngineChunk` s for one request; user errors come back as an ``error`` chunk."""
        try:
            prompt = self.prompts.encode(req)
            params = sampling_params(
                req, self.prompts.max_tokens(req, len(prompt), self.cfg.default_max_tokens), self.stop_ids
            )
        except PromptError as e:
            yield EngineChunk(error=e.body)
            return
        except ValueError as e:  # vLLM's own checks of the parameters
            yield EngineChunk(error=refused(req, e))
            return
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = uuid.uuid4().hex
        started = time.perf_counter()
        self.metrics.prompt_tokens.inc(len(prompt))
        produced, finished, first, pace = 0, False, True, self.pacer.stream()
        texts: list[str] = []
        logprobs: list[TokenLogprob] | None = [] if req.logprobs is not None else None
        stream = self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id=rid)
        try:
            try:
                async for out in stream:
                    c = out.outputs[0]
                    text, new = c.text, list(c.token_ids)
                    lps = None
                    if logprobs is not None:
                        lps = []
                        if first and req.echo:
                            lps += token_logprobs(prompt, out.prompt_logprobs, req.logprobs, self.tokenizer)
                        lps += token_logprobs(new, c.logprobs or [], req.logprobs, self.tokenizer)
                    if first and req.echo:
                        text = self.tokenizer.decode(prompt, skip_special_tokens=True) + text
                    if produced == 0 and new:
                        self.metrics.time_to_first_token_seconds.observe(time.perf_counter() - started)
                    first = False
                    produced += len(new)
                    self.metrics.generated_tokens.inc(len(new))
                    finished = c.finish_reason is not None
                    if c.finish_reason == "abort":
                        raise RuntimeError("generation aborted by the engine")
                    reason = c.finish_reason if finished else None
                    if not req.stream:
                        texts.append(text)
                        if lps is not None:
                            logprobs.extend(lps)
                        continue
                    yield EngineChunk(
                        text=text,
                        finish_reason=reason,
                        prompt_tokens=len(prompt),
                        completion_tokens=produced,
                        logprobs=lps,
                    )
                    # As the builtin engine's streams (vLLM merges the deltas of a request nobody reads yet).
                    if wait := pace.interval(text, finished):
                        await asyncio.sleep(wait)
            except (ValueError, VLLMClientError) as e:  # vLLM refused the request (e.g. a schema it cannot compile)
                yield EngineChunk(error=refused(req, e))
                finished = True
                return
            except EngineDeadError as e:  # as the builtin engine's dead child: 503, health check fails, replaced
                finished = True  # nothing left to abort
                raise EngineProcessDied(f"vLLM's engine core died: {e}") from None
            if not req.stream:
                yield EngineChunk(
                    text="".join(texts),
                    finish_reason=reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=produced,
                    logprobs=logprobs,
                )
        finally:
            pace.close()
            if not finished:  # the caller went away (disconnect, timeout): free the sequence's KV blocks
                await stream.aclose()
                await self.llm.abort(rid)

    async def complete(self, req: EngineRequest) -> EngineChunk:
        """A whole choice in one answer (non-streaming requests)."""
        return await last_chunk(self.generate(req.model_copy(update={"stream": False})))

    def info(self) -> dict:
        return {"checkpoint": self.ref.to_dict(), "max_context": self.max_context, "engine": "vllm"}


def _ray_stat_loggers() -> list | None:
    """vLLM's metrics through Ray's metrics agent (what Ray Serve LLM does), when Ray is running."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:
        return None
    return [RayPrometheusStatLogger]
