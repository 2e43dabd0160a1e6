"""The model replica: loads the checkpoint and runs continuous batching for its requests.

A loop thread calls :meth:`raychat.core.infer.batcher.ContinuousBatcher.step` while there is work: requests
join the running batch between decode steps and leave when finished (or when a stop string
matched, or their caller went away). With ``engine_process`` (the default) the model and its
batcher live in a child process (:class:`raychat.core.infer.engine_process.ProcessBatcher`) and the loop thread
only receives each step's tokens, so the replica's request handling does not hold the GIL the
decode step needs; otherwise the batcher runs in the loop thread itself. Each request's tokens
are turned into text in the loop thread and handed to the request's asyncio queue;
:meth:`LLMEngine.generate` streams them (merging whatever arrived since the last chunk), or
sends one chunk at the end for non-streaming requests.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from raychat.core.config import ServeConfig
from raychat.core.infer.batcher import ContinuousBatcher, SamplingParams
from raychat.core.infer.checkpoint_cache import fetch_checkpoint
from raychat.core.infer.engine_process import BatcherSpec, EngineProcessDied, ProcessBatcher
from raychat.core.infer.text import CompletionText, TextDelta
from raychat.core.model.attention import KernelOptions
from raychat.core.model.hf import load_inference_model
from raychat.core.run_dir import CheckpointRef
from raychat.serve.engine_protocol import EngineChunk, EngineRequest, last_chunk
from raychat.serve.prompts import PromptEncoder, PromptError, unsupported

log = logging.getLogger("raychat.serve")


def _put_all(batch: list[tuple[_Stream, object]]) -> None:
    for st, item in batch:
        st.queue.put_nowait(item)
        if isinstance(item, Exception) or item.finish_reason is not None:
            st.wake()  # the end of a stream is sent at once, not after the rest of its interval


def stream_interval(base_s: float, streams: int, chunk_rate: float, max_s: float = 0.25) -> float:
    """Seconds a stream waits after sending text before it sends again.

    ``base_s`` (``stream_interval_s``), unless the replica's ``streams`` sending at that pace would
    send more than ``chunk_rate`` chunks per second: then ``streams / chunk_rate``, at most ``max_s``
    (never below ``base_s``). Each chunk costs the replica the same work however much text it holds
    (and in the ``split`` layout a handle hop), so under load fewer, larger chunks leave the CPU to
    the requests. ``chunk_rate`` 0 keeps ``base_s``.
    """
    if chunk_rate <= 0 or base_s <= 0:
        return base_s
    return max(base_s, min(max_s, streams / chunk_rate))


class Pacer:
    """A replica's streams that are sending text, and how long each waits after a send (:func:`stream_interval`).

    The first text of a stream goes out at once (tokens that decode to no text yet, e.g. part of a
    character, do not start the interval); later text is grouped, so a replica sends at most one
    message per stream per interval however fast it decodes, and with many streams at most about
    ``chunk_rate`` messages per second in all. Event loop only.
    """

    def __init__(self, base_s: float, chunk_rate: float):
        self.base_s, self.chunk_rate, self.sending = base_s, chunk_rate, 0

    def stream(self) -> StreamPace:
        return StreamPace(self)


class StreamPace:
    """One stream's share of a :class:`Pacer`: counted as sending from its first interval to :meth:`close`."""

    def __init__(self, pacer: Pacer):
        self.pacer, self.counted = pacer, False

    def interval(self, text: str, finished: bool) -> float:
        """Seconds to wait after sending ``text`` (0: send on at once)."""
        p = self.pacer
        if not text or finished or not p.base_s:
            return 0.0
        if not self.counted:
            self.counted = True
            p.sending += 1
        return stream_interval(p.base_s, p.sending, p.chunk_rate)

    def close(self) -> None:
        if self.counted:
            self.counted = False
            self.pacer.sending -= 1


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    text: CompletionText
    stream: bool = True
    started: float = field(default_factory=time.perf_counter)
    held: list[str] = field(default_factory=list)  # non-streamed: text kept in the loop thread until the end
    pause: asyncio.Future | None = None  # set while the stream waits out its interval (event loop only)

    async def wait(self, seconds: float) -> None:
        """Sleeps ``seconds``, or less when the stream's last item arrives meanwhile (:func:`_put_all`)."""
        self.pause = self.loop.create_future()
        timer = self.loop.call_later(seconds, self.wake)
        try:
            await self.pause
        finally:
            timer.cancel()
            self.pause = None

    def wake(self) -> None:
        if self.pause is not None and not self.pause.done():
            self.pause.set_result(None)


class LLMEngine:
    """Serve deployment class (wrapped in :func:`raychat.serve.app.build_app`)."""

    def __init__(self, cfg: dict, checkpoint: dict):
        from raychat.serve.metrics import ServeMetrics

        self.cfg = ServeConfig.model_validate(cfg)
        self.ref = CheckpointRef(**checkpoint)
        local = fetch_checkpoint(self.ref.uri, self.cfg.cache_dir)
        device = "cuda" if self.cfg.num_gpus > 0 else "cpu"
        if self.cfg.engine_process:  # the child process loads the weights; this one needs the tokenizer only
            from transformers import AutoConfig, AutoTokenizer

            model, model_config = None, AutoConfig.from_pretrained(str(local))
            self.tokenizer = AutoTokenizer.from_pretrained(str(local))
        else:
            model, self.tokenizer = load_inference_model(local, self._dtype(), device, self.cfg.cpu_packed_linears)
            model_config = model.config
        self.prompts = PromptEncoder.for_model(self.tokenizer, model_config, self.cfg)
        self.max_context = self.prompts.max_context
        stops = self.prompts.stop_ids
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        kernels = KernelOptions()  # the CUDA attention kernels of prefill and decode (no config field: defaults)
        if self.cfg.engine_process:
            import torch

            self.batcher = ProcessBatcher(
                BatcherSpec(
                    model_dir=str(local),
                    dtype=str(self._dtype()).removeprefix("torch."),
                    device=device,
                    stop_ids=tuple(stops),
                    pad_id=pad,
                    max_context=self.max_context,
                    max_batch_size=self.cfg.max_batch_size,
                    max_prefill_tokens=self.cfg.max_prefill_tokens,
                    torch_threads=torch.get_num_threads(),
                    pack_cpu_linears=self.cfg.cpu_packed_linears,
                    kernels=kernels,
                )
            )
        else:
            self.batcher = ContinuousBatcher(
                model,
                stop_ids=stops,
                pad_id=pad,
                max_context=self.max_context,
                max_batch_size=self.cfg.max_batch_size,
                max_prefill_tokens=self.cfg.max_prefill_tokens,
                kernels=kernels,
            )
        self._dead: str | None = None  # why the engine process is gone (engine_process only)
        self.metrics = ServeMetrics(self.cfg.model_id or "")
        self._streams: dict[str, _Stream] = {}
        self.pacer = Pacer(self.cfg.stream_interval_s, self.cfg.stream_chunk_rate)
        self._wake = threading.Event()
        self._stop = threading.Event()
        # The loop thread holds the GIL through each step's Python work; a short switch interval lets
        # the replica's event loop hand tokens on (and take new requests) without waiting 5 ms for it.
        sys.setswitchinterval(0.001)
        self._thread = threading.Thread(target=self._loop, name="raychat-batcher", daemon=True)
        self._thread.start()
        log.info("loaded %s (context %d, max batch %d)", self.ref.uri, self.max_context, self.cfg.max_batch_size)

    def _dtype(self):
        import torch

        if self.cfg.dtype == "auto":
            return torch.bfloat16 if self.cfg.num_gpus > 0 else torch.float32
        return getattr(torch, self.cfg.dtype)

    # -- the loop thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        last_step = None
        while not self._stop.is_set():
            if not self.batcher.has_work():
                last_step = None
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.batcher.step()
                now = time.perf_counter()
                self._record_step(events, None if last_step is None else now - last_step)
                last_step = now if self.batcher.num_running else None
                self._publish(events)
            except EngineProcessDied as e:  # nothing more will come: fail what is in flight, fail health checks
                log.error("%s", e)
                self._dead = str(e)
                for rid in list(self._streams):
                    self._deliver(rid, e)
                return
            except Exception as e:  # a bug or OOM: fail the requests in flight, keep serving
                log.exception("decode step failed")
                last_step = None
                for rid in list(self._streams):
                    self.batcher.abort(rid)
                    self._deliver(rid, e)

    def _record_step(self, events: list, step_s: float | None) -> None:
        # One observation per step: every request that got a token waited the same step time.
        if step_s is not None and events:
            self.metrics.inter_token_latency_seconds.observe(step_s)
        self.metrics.batch_size.observe(len(events))  # requests that got a token from this step
        tokens = sum(t.token_id is not None for _, t in events)
        if tokens:
            self.metrics.generated_tokens.inc(tokens)
        self.metrics.running_requests.set(self.batcher.num_running)
        self.metrics.queue_length.set(self.batcher.num_waiting)

    def _publish(self, events: list) -> None:
        """Turns each request's new token into text (stop strings applied) and hands it to its queue."""
        out = []
        for rid, tok in events:
            st = self._streams.get(rid)
            if st is None or st.text.finished:  # engine_process: steps the child ran before an abort reached it
                continue
            delta = st.text.push(tok)
            if delta.finish_reason and tok.finish_reason is None:
                self.batcher.abort(rid)  # a stop string matched: leave the batch now
            if not st.stream:
                # Nobody reads a non-streamed request's text before its end: keep it here rather than
                # wake its coroutine on every token (that took the GIL from this loop at each step).
                if not st.held and delta.completion_tokens:
                    self.metrics.time_to_first_token_seconds.observe(time.perf_counter() - st.started)
                st.held.append(delta.text)
                if delta.finish_reason is None:
                    continue
                delta = TextDelta("".join(st.held), delta.finish_reason, delta.completion_tokens)
            out.append((st, delta))
        self._hand_over(out)

    def _deliver(self, rid: str, item: TextDelta | Exception) -> None:
        st = self._streams.get(rid)
        if st is not None:
            self._hand_over([(st, item)])

    @staticmethod
    def _hand_over(items: list[tuple[_Stream, TextDelta | Exception]]) -> None:
        # One wake-up of each event loop per step, not one per request: every call_soon_threadsafe
        # writes to the loop's self-pipe and makes it contend for the GIL with this thread.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for st, item in items:
            by_loop.setdefault(st.loop, []).append((st, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine process died is replaced."""
        if self._dead is not None:
            raise RuntimeError(self._dead)

    def __del__(self):
        self._stop.set()
        if isinstance(getattr(self, "batcher", None), ProcessBatcher):
            self.batcher.close()

    # -- requests ----------------------------------------------------------------------------------
    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        """Streams :class:`EngineChunk` s for one request; user errors come back as an ``error`` chunk."""
        try:
            unsupported(req, "builtin")
            prompt = self.prompts.encode(req)
        except PromptError as e:
            yield EngineChunk(error=e.body)
            return
        max_tokens = self.prompts.max_tokens(req, len(prompt), self.cfg.default_max_tokens)
        params = SamplingParams(
            max_tokens=max_tokens,
            **req.sampling(),
            stop=tuple(req.stop),
        )
        rid = uuid.uuid4().hex
        text = CompletionText(self.tokenizer, req.stop, incremental=req.stream)  # non-streamed: decoded once at the end
        st = _Stream(asyncio.get_running_loop(), asyncio.Queue(), text, req.stream)
        self._streams[rid] = st
        self.batcher.submit(rid, prompt, params)
        self._wake.set()
        self.metrics.prompt_tokens.inc(len(prompt))
        finished, texts, produced, pace = False, [], 0, self.pacer.stream()
        try:
            while not finished:
                items = [await st.queue.get()]
                while not st.queue.empty():
                    items.append(st.queue.get_nowait())
                for it in items:
                    if isinstance(it, EngineProcessDied):
                        raise it
                    if isinstance(it, Exception):
                        raise RuntimeError(f"generation failed: {it}") from it
                last = items[-1]
                if req.stream and produced == 0 and last.completion_tokens > 0:  # non-streamed: in the loop thread
                    self.metrics.time_to_first_token_seconds.observe(time.perf_counter() - st.started)
                produced = last.completion_tokens
                finished = last.finish_reason is not None
                text = "".join(it.text for it in items)
                if not req.stream:
                    texts.append(text)
                    continue
                yield EngineChunk(
                    text=text, finish_reason=last.finish_reason, prompt_tokens=len(prompt), completion_tokens=produced
                )
                if wait := pace.interval(text, finished):
                    await st.wait(wait)
            if not req.stream:
                yield EngineChunk(
                    text="".join(texts),
                    finish_reason=last.finish_reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=produced,
                )
        finally:
            self._streams.pop(rid, None)
            pace.close()
            if not finished:  # the caller went away (disconnect, timeout): free the batch slot
                self.batcher.abort(rid)
                self._wake.set()

    async def complete(self, req: EngineRequest) -> EngineChunk:
        """A whole choice in one answer (non-streaming requests: a unary call is cheaper than a stream)."""
        return await last_chunk(self.generate(req.model_copy(update={"stream": False})))

    def info(self) -> dict:
        return {"checkpoint": self.ref.to_dict(), "max_context": self.max_context}
