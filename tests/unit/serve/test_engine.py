"""Stream pacing of the engine replica (raychat/serve/engine.py), without Ray or a model."""

import asyncio
import time

import pytest

from raychat.core.infer.text import TextDelta
from raychat.serve.engine import _put_all, _Stream, stream_interval


@pytest.mark.parametrize("streams, expected", [(1, 0.02), (3, 0.02), (4, 0.025), (16, 0.1), (40, 0.25), (200, 0.25)])
def test_the_interval_grows_with_the_streams_past_the_chunk_rate(streams, expected):
    assert stream_interval(0.02, streams, 160) == pytest.approx(expected)


def test_no_chunk_rate_or_no_interval_keeps_the_configured_interval():
    assert stream_interval(0.02, 500, 0) == 0.02
    assert stream_interval(0, 500, 160) == 0
    assert stream_interval(0.5, 16, 160) == 0.5  # never below stream_interval_s, even past the cap


def _stream(loop) -> _Stream:
    return _Stream(loop, asyncio.Queue(), text=None)


def test_a_stream_waits_out_its_interval_when_only_more_text_comes():
    async def main():
        st = _stream(asyncio.get_running_loop())
        t0 = time.perf_counter()
        waiting = asyncio.ensure_future(st.wait(0.3))
        await asyncio.sleep(0.05)
        _put_all([(st, TextDelta("more", None, 2))])
        await waiting
        return time.perf_counter() - t0, st

    took, st = asyncio.run(main())
    assert took >= 0.29
    assert st.queue.qsize() == 1 and st.pause is None


@pytest.mark.parametrize("last", [TextDelta("end", "stop", 3), RuntimeError("engine died")])
def test_the_end_of_a_stream_cuts_its_interval_short(last):
    async def main():
        st = _stream(asyncio.get_running_loop())
        t0 = time.perf_counter()
        waiting = asyncio.ensure_future(st.wait(5.0))
        await asyncio.sleep(0.05)
        # From another thread, as the batching loop hands text over.
        st.loop.call_soon_threadsafe(_put_all, [(st, last)])
        await asyncio.wait_for(waiting, 2.0)
        return time.perf_counter() - t0, st

    took, st = asyncio.run(main())
    assert took < 1.0
    assert st.queue.get_nowait() is last and st.pause is None
