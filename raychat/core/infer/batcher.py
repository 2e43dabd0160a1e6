"""Iteration-level (continuous) batching over an HF causal LM with a KV cache (Ray-free).

:class:`ContinuousBatcher` keeps one running batch: between two decode steps, waiting requests
are prefilled and join it, and finished requests leave it, so a request never waits for a
whole batch to finish. The running batch is a left-padded ``DynamicCache`` plus a 2-D attention
mask: every row's tokens are contiguous and end at the last column, so joining means padding
the narrower cache on the left and concatenating rows, and leaving means selecting rows (and
dropping columns that became padding everywhere).

The same code runs in the Serve replica (driven step by step by a loop thread), in-process for
benchmarks, and on a GPU machine without Ray. The text side of a request (detokenizing, stop
strings) is :mod:`raychat.core.infer.text`.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from raychat.core.model.attention import DEFAULT_KERNELS, KernelOptions, sdpa_backend_scope


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (OpenAI semantics).

    Attributes:
        max_tokens: most tokens to generate (the stop token is not counted).
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_p: nucleus sampling mass (1.0 disables).
        seed: per-request RNG seed for reproducible sampling.
        presence_penalty: subtracted once from the logit of every token already generated.
        frequency_penalty: subtracted from a token's logit once per time it was generated.
        stop: strings that end the completion; they are cut from the text (see
            :class:`raychat.core.infer.text.StopStringMatcher`).
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepToken:
    """One request's output for one decode step.

    ``token_id`` is None when the request stopped on a stop token (which is not returned);
    ``finish_reason`` is ``"stop"`` or ``"length"`` on the request's last step, else None.
    """

    token_id: int | None
    finish_reason: str | None = None


def apply_penalties(logits: torch.Tensor, counts: dict[int, int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI presence/frequency penalties over the tokens generated so far (``counts``: id → times)."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[ids] -= presence + frequency * n
    return logits


def greedy_tokens(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``logits.argmax(-1)`` for a 2-D ``[rows, vocab]`` tensor, exact (first maximum wins), faster on CPU.

    torch's CPU argmax over the last dimension is a scalar loop (about 0.4 ms for 16 rows of a
    32k vocabulary, a tenth of a tiny model's decode step), while ``amax`` is vectorised. So: the
    maximum of each ``block``-wide slice, the first slice holding the row's maximum, then argmax
    within that slice only. A slice before the first maximum cannot hold a value equal to it, so
    ties resolve to the first index as in ``argmax``. Few rows or a short vocabulary: plain argmax.
    """
    rows, vocab = logits.shape
    blocks = vocab // block
    if logits.device.type != "cpu" or rows < 4 or blocks < 2:
        return logits.argmax(dim=-1)
    cut = blocks * block
    sliced = logits[:, :cut].reshape(rows, blocks, block)
    block_max = sliced.amax(dim=-1)
    first = block_max.argmax(dim=-1)
    r = torch.arange(rows, device=logits.device)
    best = first * block + sliced[r, first].argmax(dim=-1)
    if cut < vocab:  # the tail after the last whole slice wins only when strictly greater
        tail_max, tail_idx = logits[:, cut:].max(dim=-1)
        best = torch.where(tail_max > block_max[r, first], cut + tail_idx, best)
    return best


def sample_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy (temperature 0) or temperature + nucleus sampling of one token from 1-D logits."""
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


def check_prompt(prompt: Sequence[int], max_context: int) -> None:
    """Raises ValueError for an empty prompt or one that leaves no room for a token in the context."""
    if len(prompt) >= max_context:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in a {max_context}-token context")
    if not prompt:
        raise ValueError("empty prompt")


@dataclass
class _Row:
    rid: Hashable
    prompt_len: int
    params: SamplingParams
    budget: int
    gen: torch.Generator | None
    counts: dict[int, int] = field(default_factory=dict)
    produced: int = 0
    last_token: int = 0


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


class ContinuousBatcher:
    """An iteration-level scheduler: requests join the running batch between decode steps.

    Thread safety: :meth:`submit` and :meth:`abort` may be called from any thread; :meth:`step`
    from one thread at a time (the loop that owns the model).

    Args:
        model: an HF causal LM with ``DynamicCache`` support (plain, non-sliding cache layers).
        stop_ids: token ids that end a request (e.g. ``<|end_of_turn|>`` and EOS).
        pad_id: id fed for padding columns (masked out).
        max_context: prompt + generated tokens never exceed this.
        max_batch_size: most requests in the running batch; the rest wait.
        max_prefill_tokens: most prompt tokens prefilled in one step (at least one request always is),
            so a burst of long prompts does not stall the running requests for long.
        kernels: the CUDA attention kernels of prefill and decode (its ``sdpa_backends``).
    """

    def __init__(
        self,
        model,
        stop_ids: Sequence[int],
        pad_id: int,
        max_context: int,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 8192,
        kernels: KernelOptions = DEFAULT_KERNELS,
    ):
        self.model = model.eval()
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_context = max_context
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.kernels = kernels
        self.device = next(model.parameters()).device
        # transformers 5.x renames the forward's cache argument `past_key_values` -> `cache` (the old
        # name warns now and goes in 5.40): use whichever this model's forward takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Hashable, list[int], SamplingParams]] = deque()
        self._aborted: set[Hashable] = set()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None

    # -- any thread --------------------------------------------------------------------------
    def submit(self, rid: Hashable, prompt: Sequence[int], params: SamplingParams) -> None:
        """Queues a request; its tokens come out of later :meth:`step` calls under ``rid``.

        Raises:
            ValueError: when the prompt alone fills the context window.
        """
        check_prompt(prompt, self.max_context)
        with self._lock:
            self._waiting.append((rid, list(prompt), params))

    def abort(self, rid: Hashable) -> None:
        """Removes a request (waiting or running) before its next step; it yields nothing more."""
        with self._lock:
            self._aborted.add(rid)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    # -- the model's thread --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, StepToken]]:
        """Admits waiting requests (prefill), then runs one decode step for the running batch.

        Returns every token produced in this step as ``(rid, StepToken)``; a request's last one
        carries its ``finish_reason``. Each running request gets at most one token per step: a newly
        admitted one its first (from the prefill), the others their next (from the decode).
        """
        self._drop_aborted()
        out: list[tuple[Hashable, StepToken]] = []
        # The training step's SDPA kernels by default (no cuDNN: it plans anew for every sequence
        # length, and a decode step's key length grows by one each time; docs/performance/serving.md).
        with sdpa_backend_scope(self.device, self.kernels):
            if self._rows:
                out += self._decode()
            out += self._admit()
        return out

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if aborted:
                self._waiting = deque(w for w in self._waiting if w[0] not in aborted)
        if aborted:
            self._keep([i for i, r in enumerate(self._rows) if r.rid not in aborted])

    def _take_waiting(self) -> list[tuple[Hashable, list[int], SamplingParams]]:
        taken, tokens = [], 0
        with self._lock:
            while self._waiting and len(self._rows) + len(taken) < self.max_batch_size:
                n = len(self._waiting[0][1])
                if taken and tokens + n > self.max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
                tokens += n
        return taken

    def _admit(self) -> list[tuple[Hashable, StepToken]]:
        from transformers import DynamicCache

        new = self._take_waiting()
        if not new:
            return []
        width = max(len(p) for _, p, _ in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, (_, p, _) in enumerate(new):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            **{self._cache_arg: cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        rows = []
        for rid, p, sp in new:
            gen = None
            if sp.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sp.seed)
            rows.append(
                _Row(
                    rid=rid, prompt_len=len(p), params=sp, gen=gen, budget=min(sp.max_tokens, self.max_context - len(p))
                )
            )
        out, keep = self._sample(rows, logits)
        if keep:
            self._merge(rows, cache, mask, keep)
        return out

    def _decode(self) -> list[tuple[Hashable, StepToken]]:
        n = len(self._rows)
        feed = torch.tensor([[r.last_token] for r in self._rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.prompt_len + r.produced - 1] for r in self._rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, torch.ones((n, 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        logits = self.model(
            input_ids=feed,
            attention_mask=self._mask,
            position_ids=pos,
            **{self._cache_arg: self._cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        out, keep = self._sample(self._rows, logits)
        if len(keep) < n:
            self._keep(keep)
        return out

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[tuple[Hashable, StepToken]], list[int]]:
        """Samples one token per row; returns the outputs and the indices of rows that go on."""
        out, keep = [], []
        greedy = greedy_tokens(logits).tolist()  # one op for every greedy row without penalties
        for i, r in enumerate(rows):
            if r.budget <= 0:
                out.append((r.rid, StepToken(None, "length")))
                continue
            p = r.params
            if p.temperature <= 0 and not (r.counts and (p.presence_penalty or p.frequency_penalty)):
                tok = greedy[i]
            else:
                row_logits = apply_penalties(logits[i], r.counts, p.presence_penalty, p.frequency_penalty)
                tok = sample_token(row_logits, p, r.gen)
            if tok in self.stop_ids:
                out.append((r.rid, StepToken(None, "stop")))
                continue
            r.produced += 1
            r.counts[tok] = r.counts.get(tok, 0) + 1
            r.last_token = tok
            if r.produced >= r.budget:
                out.append((r.rid, StepToken(tok, "length")))
            else:
                out.append((r.rid, StepToken(tok)))
                keep.append(i)
        return out, keep

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        new_rows = [rows[i] for i in keep]
        if len(keep) < len(rows):
            cache.batch_select_indices(idx)
            mask = mask[idx]
        if not self._rows:
            self._rows, self._cache, self._mask = new_rows, cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, add in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(add.keys, width, -2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(add.values, width, -2)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self._rows += new_rows

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(idx)
        self._mask = self._mask[idx]
        # Columns that are padding in every remaining row cost compute for nothing: drop them.
        first = int(self._mask.any(dim=0).int().argmax())
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[list[StepToken | None]]:
        """Convenience for a fixed set of prompts: yields per step one entry per prompt (None when
        that prompt produced nothing in the step). Runs on the calling thread.

        Raises:
            ValueError: when a prompt alone fills the context window.
        """
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self.submit(("generate", i), p, sp)
        while self.has_work():
            step: list[StepToken | None] = [None] * len(prompts)
            for (_, i), tok in self.step():
                step[i] = tok
            yield step
