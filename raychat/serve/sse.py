"""Streaming answers: a request's n engine streams merged into OpenAI's server-sent events (no Ray).

:func:`gather_or_cancel` opens every choice (or none: an error closes the ones that opened),
:func:`merge_streams` reads them together, and :func:`completion_events` frames what arrives as
``chat.completion.chunk`` / ``text_completion`` events, ending with the usage chunk and
``[DONE]``. Each string it yields is one HTTP write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

from raychat.serve.engine_protocol import EngineChunk, Opened
from raychat.serve.errors import request_timed_out, stream_failed
from raychat.serve.protocol import ChatCompletionChunk, Completion, Usage, chat_logprobs, completion_logprobs

log = logging.getLogger("raychat.serve")


async def gather_or_cancel(coros: list[Awaitable[Opened]]) -> list[Opened]:
    """All ``(first chunk, stream)`` results, or the first error with the other calls cancelled and
    the streams that had already opened closed (n > 1: every choice's batch slot is freed)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                await close_stream(t.result()[1], finished=False)
        raise


async def close_stream(stream, finished: bool) -> None:
    """Ends an engine stream; one the client stopped reading early is cancelled (frees its batch slot)."""
    if stream is None:
        return
    if hasattr(stream, "aclose"):  # a local async generator: its finally aborts an unfinished request
        with contextlib.suppress(Exception):
            await stream.aclose()
    elif not finished:  # a DeploymentResponseGenerator
        stream.cancel()


async def merge_streams(opened: list[Opened]) -> AsyncIterator[list[tuple[int, EngineChunk | Exception]]]:
    """Yields lists of ``(choice index, chunk or exception)``: everything that arrived since the last
    list, so one SSE write carries it all. One stream (n = 1) is read directly, with no task or queue."""
    if len(opened) == 1:
        first, stream = opened[0]
        yield [(0, first)]
        if first.finish_reason is None and stream is not None:
            try:
                async for chunk in stream:
                    yield [(0, chunk)]
                    if chunk.finish_reason:  # no need to wait for the end-of-stream message
                        break
            except Exception as e:  # a replica died mid-stream: tell the client cleanly
                yield [(0, e)]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: EngineChunk, stream) -> None:
        try:
            queue.put_nowait((index, first))
            if first.finish_reason is None:
                async for chunk in stream:
                    queue.put_nowait((index, chunk))
                    if chunk.finish_reason:
                        break
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, f, s)) for i, (f, s) in enumerate(opened)]
    try:
        open_streams = len(opened)
        while open_streams:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            done = [it for it in items if it[1] is None]
            open_streams -= len(done)
            items = [it for it in items if it[1] is not None]
            if items:
                yield items
    finally:
        for t in tasks:
            t.cancel()


async def completion_events(
    opened: list[Opened],
    *,
    chat: bool,
    model_id: str,
    n: int,
    include_usage: bool,
    deadline: float,
    request_timeout_s: float,
) -> AsyncIterator[str]:
    """The SSE body of a streamed request whose choices ``opened`` (``n`` per prompt, in order).

    Args:
        opened: every choice's first chunk and stream, as :func:`gather_or_cancel` returns them.
        chat: chat completion chunks (with a role chunk first) rather than text completions.
        model_id: the ``model`` of every chunk.
        n: choices per prompt (prompt tokens count once per prompt in the usage).
        include_usage: end with a usage chunk (``stream_options.include_usage``).
        deadline: the event loop time by which the engine must have sent everything; past it
            the stream ends with a timeout error event.
        request_timeout_s: the timeout the deadline came from (named in that error).

    Yields:
        One string per HTTP write: one or more ``data: ...`` events.
    """
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    # Chunks are built as dicts (the shape of ChatCompletionChunk / Completion dumps): a pydantic
    # model per streamed chunk costs more than the rest of the chunk's trip through this replica.
    head = {
        "id": cid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model_id,
    }
    if include_usage:
        head["usage"] = None

    sent_chars: dict[int, int] = {}  # text completions: characters of each choice sent so far (logprobs' text_offset)

    def event(index: int, text: str | None, finish: str | None, first: bool = False, logprobs=None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            lp = None if logprobs is None else chat_logprobs(logprobs)
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        else:
            lp = None if logprobs is None else completion_logprobs(logprobs, sent_chars.get(index, 0))
            sent_chars[index] = sent_chars.get(index, 0) + len(text or "")
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}
        return f"data: {json.dumps({**head, 'choices': [choice]}, separators=(',', ':'))}\n\n"

    last: dict[int, EngineChunk] = {}
    # Each yield is one HTTP write (a TCP send, a wake-up of HAProxy and of the client): the role
    # chunk goes out with the first text, and the usage chunk and [DONE] with the last one.
    pending = [event(i, None, None, first=True) for i in range(len(opened))] if chat else []
    merged = merge_streams(opened)
    try:
        while True:
            # The deadline covers each wait for the engine, never a `yield` (a timeout there would
            # cancel whoever is consuming this stream instead); no task per chunk.
            try:
                async with asyncio.timeout_at(deadline):
                    items = await merged.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                log.warning("stream hit request_timeout_s (%g s)", request_timeout_s)
                yield "".join(pending) + f"data: {json.dumps(request_timed_out(request_timeout_s).body)}\n\n"
                return
            out, pending = pending, []
            for index, item in items:
                if isinstance(item, Exception):
                    log.warning("stream %d failed: %s", index, type(item).__name__)
                    yield "".join(out) + f"data: {json.dumps(stream_failed())}\n\n"
                    return
                last[index] = item
                if item.text or item.logprobs:
                    out.append(event(index, item.text, None, logprobs=item.logprobs))
                if item.finish_reason:
                    out.append(event(index, "" if not chat else None, item.finish_reason))
            if len(last) == len(opened) and all(c.finish_reason for c in last.values()):
                pending = out  # the last text: sent with the end of the stream, below
                break
            if out:
                yield "".join(out)
        if include_usage:
            ordered = [last[i] for i in sorted(last)]
            usage = Usage.of(sum(c.prompt_tokens for c in ordered[::n]), sum(c.completion_tokens for c in ordered))
            cls = ChatCompletionChunk if chat else Completion
            done = cls(id=cid, created=created, model=model_id, choices=[], usage=usage)
            pending.append(f"data: {done.model_dump_json()}\n\n")
        yield "".join(pending) + "data: [DONE]\n\n"
    finally:
        await merged.aclose()
        for i, (_, stream) in enumerate(opened):
            await close_stream(stream, finished=i in last and last[i].finish_reason is not None)
