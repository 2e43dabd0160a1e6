"""raychat.serve.sse: opening n choices, merging their streams and framing them as SSE, without Ray or HTTP."""

from __future__ import annotations

import asyncio

import pytest

from raychat.serve.engine_protocol import EngineChunk
from raychat.serve.sse import completion_events, gather_or_cancel


class FakeStream:
    """A DeploymentResponseGenerator stand-in: generation goes on until cancelled."""

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def test_a_failing_choice_closes_the_streams_other_choices_had_opened():
    opened, pending = FakeStream(), asyncio.Event()

    async def opens():
        return ("first chunk", opened)

    async def never_opens():
        await pending.wait()  # cancelled below
        return ("never", FakeStream())

    async def fails():
        await asyncio.sleep(0.01)
        raise RuntimeError("replica died")

    async def main():
        tasks = [opens(), never_opens(), fails()]
        with pytest.raises(RuntimeError, match="replica died"):
            await gather_or_cancel(tasks)

    asyncio.run(main())
    assert opened.cancelled  # else its generation would run to max_tokens in a batch slot


def test_a_deadline_closes_opened_local_streams_too():
    closed = []

    async def local_stream():
        try:
            yield "more"
        finally:
            closed.append(True)

    async def main():
        gen = local_stream()
        await gen.__anext__()  # started, like an engine stream after its first chunk

        async def opens():
            return ("first chunk", gen)

        async def slow():
            await asyncio.sleep(10)

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await gather_or_cancel([opens(), slow()])
        assert closed == [True]  # closed by then, not later when the event loop shuts its generators down

    asyncio.run(main())


def test_all_results_in_order_when_every_choice_opens():
    async def opens(i):
        await asyncio.sleep(0.01 * (3 - i))
        return (i, None)

    assert asyncio.run(gather_or_cancel([opens(i) for i in range(3)])) == [(0, None), (1, None), (2, None)]


def _sse_writes(chat: bool, chunks: list) -> list[list[dict | str]]:
    """The SSE writes of one streamed choice whose engine stream gives ``chunks``, each parsed."""
    import json

    async def rest():
        for c in chunks[1:]:
            yield c

    async def main():
        deadline = asyncio.get_running_loop().time() + 30
        events = completion_events(
            [(chunks[0], rest())],
            chat=chat,
            model_id="m",
            n=1,
            include_usage=True,
            deadline=deadline,
            request_timeout_s=30.0,
        )
        return [w async for w in events]

    writes = asyncio.run(main())
    assert all(isinstance(c, EngineChunk) for c in chunks)
    return [
        [e if e == "[DONE]" else json.loads(e) for e in (x.removeprefix("data: ") for x in w.split("\n\n")) if e]
        for w in writes
    ]


@pytest.mark.parametrize("chat", [True, False])
def test_a_stream_sends_its_role_with_the_first_text_and_usage_and_done_with_the_last(chat):
    """One HTTP write per engine chunk: no write of its own for the role chunk, the usage or [DONE]."""
    chunks = [EngineChunk("Hel", None, 5, 1), EngineChunk("lo", None, 5, 2), EngineChunk("!", "stop", 5, 3)]
    writes = _sse_writes(chat, chunks)
    assert len(writes) == 3
    text = (lambda e: e["choices"][0]["delta"].get("content")) if chat else (lambda e: e["choices"][0]["text"])
    first = writes[0]
    if chat:
        assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and text(first[1]) == "Hel"
    else:
        assert [text(e) for e in first] == ["Hel"]
    assert [text(e) for e in writes[1]] == ["lo"]
    *texts, usage, done = writes[2]
    assert text(texts[0]) == "!" and texts[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert done == "[DONE]"


def test_an_engine_stream_that_fails_or_stalls_ends_the_sse_with_an_openai_error_event():
    """No [DONE] after the error: a client must not take the text so far for a whole answer."""
    import json

    async def fails():
        yield EngineChunk("more", None, 5, 2)
        raise RuntimeError("replica died")

    async def stalls():
        await asyncio.sleep(10)
        yield EngineChunk("late", "stop", 5, 3)

    async def events(rest, timeout_s: float) -> list[str]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        opened = [(EngineChunk("Hel", None, 5, 1), rest)]
        kw = dict(chat=False, model_id="m", n=1, include_usage=False, request_timeout_s=timeout_s)
        return [w async for w in completion_events(opened, deadline=deadline, **kw)]

    for rest, timeout_s, code in ((fails(), 30.0, "replica_unavailable"), (stalls(), 0.05, "timeout")):
        writes = asyncio.run(events(rest, timeout_s))
        last = writes[-1].split("\n\n")[-2].removeprefix("data: ")
        assert json.loads(last)["error"]["code"] == code and "[DONE]" not in "".join(writes)
