"""Batched token generation with a KV cache, one decode step at a time (Ray-free).

The serving engine drives :meth:`BatchGenerator.generate` step by step so that every
request in a batch streams its tokens as they are produced; the same code runs in-process
for benchmarks and on a GPU machine without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    Attributes:
        max_tokens: most tokens to generate (the stop token is not counted).
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_p: nucleus sampling mass (1.0 disables).
        seed: per-request RNG seed for reproducible sampling.
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class StepToken:
    """One request's output for one decode step.

    ``token_id`` is None when the request stopped on a stop token (which is not returned);
    ``finish_reason`` is ``"stop"`` or ``"length"`` on the request's last step, else None.
    """

    token_id: int | None
    finish_reason: str | None = None


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, -1) - sorted_p < params.top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(idx[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


class BatchGenerator:
    """Generates for a batch of prompts together, sharing every forward pass.

    Args:
        model: an HF causal LM (``MistralForCausalLM`` or any with KV-cache support).
        stop_ids: token ids that end a request (e.g. ``<|end_of_turn|>`` and EOS).
        pad_id: id used for left padding.
        max_context: prompt + generated tokens never exceed this.
    """

    def __init__(self, model, stop_ids: Sequence[int], pad_id: int, max_context: int):
        self.model = model.eval()
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_context = max_context
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Iterator[list[StepToken | None]]:
        """Yields, per decode step, one entry per prompt: a :class:`StepToken`, or None once that prompt is done.

        Raises:
            ValueError: when a prompt alone fills the context window.
        """
        from transformers import DynamicCache

        n = len(prompts)
        for p in prompts:
            if len(p) >= self.max_context:
                raise ValueError(f"prompt of {len(p)} tokens leaves no room in a {self.max_context}-token context")
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        budgets = [min(sp.max_tokens, self.max_context - len(p)) for p, sp in zip(prompts, params)]
        gens = []
        for sp in params:
            g = None
            if sp.seed is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(sp.seed)
            gens.append(g)

        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :]
        next_pos = pos[:, -1:] + 1
        done = [b <= 0 for b in budgets]
        counts = [0] * n
        if all(done):
            yield [StepToken(None, "length") for _ in range(n)]
            return
        while True:
            step: list[StepToken | None] = []
            feed = []
            for i in range(n):
                if done[i]:
                    step.append(None)
                    feed.append(self.pad_id)
                    continue
                tok = _sample(logits[i], params[i], gens[i])
                feed.append(tok)
                if tok in self.stop_ids:
                    done[i] = True
                    step.append(StepToken(None, "stop"))
                    continue
                counts[i] += 1
                if counts[i] >= budgets[i]:
                    done[i] = True
                    step.append(StepToken(tok, "length"))
                else:
                    step.append(StepToken(tok))
            yield step
            if all(done):
                return
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
            feed_t = torch.tensor(feed, dtype=torch.long, device=self.device)[:, None]
            out = self.model(
                input_ids=feed_t, attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting characters.

    SentencePiece pieces can end mid-UTF-8-character (byte fallback); a delta is held back
    while the decoded text ends in the replacement character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int | None) -> str:
        """Adds a token (None adds nothing) and returns the newly completed text."""
        if token_id is not None:
            self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd") and token_id is not None:
            return ""
        delta, self.text = full[len(self.text):], full
        return delta

    def flush(self) -> str:
        """Whatever text remains at the end (including a trailing partial character)."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.text = full[len(self.text):], full
        return delta
