"""serve.router's request fan-out helpers (n choices), without Ray or HTTP."""

from __future__ import annotations

import asyncio

import pytest

from serve.router import _gather_or_cancel


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
            await _gather_or_cancel(tasks)

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
                await _gather_or_cancel([opens(), slow()])
        assert closed == [True]  # closed by then, not later when the event loop shuts its generators down

    asyncio.run(main())


def test_all_results_in_order_when_every_choice_opens():
    async def opens(i):
        await asyncio.sleep(0.01 * (3 - i))
        return (i, None)

    assert asyncio.run(_gather_or_cancel([opens(i) for i in range(3)])) == [(0, None), (1, None), (2, None)]
