"""The model replica: loads a checkpoint and generates for batched requests.

Requests that arrive within ``batch_wait_timeout_s`` of each other share every forward
pass (``@serve.batch`` over an async generator: one yield per decode step), and each
request streams its own text as it is decoded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncGenerator

from ray import serve

from libs import storage
from libs.config import ServeConfig
from libs.generation import BatchGenerator, IncrementalDetokenizer, SamplingParams, StepToken
from libs.model import load_causal_lm
from libs.templates import get_template
from libs.tokenization import ConversationTokenizer
from serve.protocol import EngineChunk, EngineRequest, error_body

log = logging.getLogger("raychat.serve")


class LLMEngine:
    """Serve deployment class (wrapped in :func:`serve.app.build_app`)."""

    def __init__(self, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        local = storage.local_or_download(self.cfg.checkpoint, self.cfg.cache_dir)
        model, self.tokenizer = load_causal_lm(local)
        template = get_template(self.cfg.template)
        self.condition = self.cfg.default_condition
        self.max_context = self.cfg.max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.ct = ConversationTokenizer(self.tokenizer, template, self.max_context)
        stops = [self.ct.eot_id] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.generator = BatchGenerator(model, stop_ids=stops, pad_id=pad, max_context=self.max_context)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        log.info("loaded %s (context %d)", self.cfg.checkpoint, self.max_context)

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        """Streams :class:`EngineChunk` s for one request; user errors come back as an ``error`` chunk."""
        condition = req.condition if req.condition is not None else self.condition
        prompt = self.ct.encode_prompt(req.messages, condition=condition, system=req.system)
        max_tokens = req.max_tokens or self.cfg.default_max_tokens
        if len(prompt) >= self.max_context:
            msg = f"This model's maximum context length is {self.max_context} tokens; the prompt has {len(prompt)}."
            yield EngineChunk(error=error_body(msg, param="messages", code="context_length_exceeded"))
            return
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        detok = IncrementalDetokenizer(self.tokenizer)
        produced = 0
        async for step in self._batched((prompt, params)):
            if step.token_id is not None:
                produced += 1
            text = detok.push(step.token_id)
            if step.finish_reason:
                text += detok.flush()
            yield EngineChunk(
                text=text, finish_reason=step.finish_reason, prompt_tokens=len(prompt), completion_tokens=produced
            )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[list[int], SamplingParams]]) -> AsyncGenerator[list, None]:
        steps = self.generator.generate([p for p, _ in items], [sp for _, sp in items])
        while True:
            # Decode steps run in a worker thread so the replica keeps accepting requests.
            step: list[StepToken | None] | None = await asyncio.to_thread(next, steps, None)
            if step is None:
                return
            yield [StopIteration if s is None else s for s in step]

    def info(self) -> dict:
        return {"checkpoint": self.cfg.checkpoint, "max_context": self.max_context}
