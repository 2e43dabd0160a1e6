"""raychat.core.infer.engine_process: the batcher in a child process gives what the in-process one gives."""

from __future__ import annotations

import os
import signal

import pytest

from raychat.core.infer.batcher import ContinuousBatcher, SamplingParams
from raychat.core.infer.engine_process import BatcherSpec, EngineProcessDied, ProcessBatcher
from raychat.core.model.hf import load_causal_lm

PROMPTS = [[1, 420, 6316, 28781], [1, 22557, 28747, 5, 6, 7, 8, 9, 10], [1, 99]]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


def spec(model_dir, **kw) -> BatcherSpec:
    base = dict(
        model_dir=str(model_dir),
        dtype="float32",
        device="cpu",
        stop_ids=(32000,),
        pad_id=32001,
        max_context=256,
        max_batch_size=8,
        max_prefill_tokens=8192,
        torch_threads=1,
    )
    return BatcherSpec(**{**base, **kw})


def drain(b, want: int) -> tuple[dict, dict]:
    """Steps until ``want`` requests finished; tokens and finish reasons by request id."""
    outs, finish = {}, {}
    for _ in range(1000):  # bounded: each request finishes within max_tokens steps
        for rid, s in b.step():
            if s.token_id is not None:
                outs.setdefault(rid, []).append(s.token_id)
            if s.finish_reason:
                finish[rid] = s.finish_reason
        if len(finish) == want:
            return outs, finish
    raise AssertionError(f"only {len(finish)} of {want} requests finished")


@pytest.fixture(scope="module")
def child(tiny_model_dir):
    b = ProcessBatcher(spec(tiny_model_dir))
    yield b
    b.close()


def test_child_process_generates_what_the_in_process_batcher_does(child, tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir)
    local = ContinuousBatcher(model, stop_ids=[32000], pad_id=32001, max_context=256, max_batch_size=8)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    for i, p in enumerate(PROMPTS):
        local.submit(i, p, GREEDY)
        child.submit(i, p, GREEDY)
    local.submit("s", PROMPTS[0], seeded)
    child.submit("s", PROMPTS[0], seeded)
    expected = drain(local, 4)
    assert drain(child, 4) == expected
    assert child.num_running == 0 and child.num_waiting == 0


def test_aborted_request_stops_and_others_go_on(child):
    child.submit("a", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0))
    child.submit("b", PROMPTS[1], GREEDY)
    for _ in range(3):
        child.step()
    child.abort("a")  # the child may be a few steps ahead: those still carry tokens of "a"
    outs, finish = drain(child, 1)
    assert finish == {"b": "length"}  # "a" never finishes: it left the batch
    assert len(outs.get("a", [])) < 150 and child.num_running == 0  # else "a" would run on to 200 tokens


def test_prompt_that_does_not_fit_is_refused_in_the_parent(child):
    with pytest.raises(ValueError, match="no room"):
        child.submit("x", list(range(256)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        child.submit("x", [], GREEDY)


def test_a_model_that_does_not_load_fails_the_constructor_with_the_childs_error(tmp_path):
    with pytest.raises(EngineProcessDied, match=r"failed to start: .*"):
        ProcessBatcher(spec(tmp_path / "missing"))


def test_a_killed_child_surfaces_as_engine_process_died_and_close_reaps_it(tiny_model_dir):
    b = ProcessBatcher(spec(tiny_model_dir))
    os.kill(b._proc.pid, signal.SIGKILL)
    with pytest.raises(EngineProcessDied, match="exited"):
        b.step()
    assert not b.alive()
    b.abort("anything")  # a no-op on a dead child
    with pytest.raises(EngineProcessDied):
        b.submit("x", PROMPTS[0], GREEDY)
    b.close()


def test_closing_the_parent_side_ends_the_child(tiny_model_dir):
    b = ProcessBatcher(spec(tiny_model_dir))
    b.close()
    assert b._proc.returncode == 0  # it exited on its own when its command pipe closed


def test_the_child_exits_when_its_parent_is_killed(tiny_model_dir):
    import subprocess
    import sys
    import time

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import os, sys, time\n"
                "from raychat.core.infer.engine_process import ProcessBatcher\n"
                "from tests.unit.core.infer.test_engine_process import spec\n"
                f"b = ProcessBatcher(spec({str(tiny_model_dir)!r}))\n"
                "print(b._proc.pid, flush=True)\n"
                "time.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no cleanup code runs in the parent
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(child):
        time.sleep(0.2)
    assert not _running(child)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.gpu
def test_child_process_on_cuda_generates_what_the_cpu_batcher_does(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir)
    local = ContinuousBatcher(model, stop_ids=[32000], pad_id=32001, max_context=256, max_batch_size=8)
    b = ProcessBatcher(spec(tiny_model_dir, device="cuda"))
    try:
        for i, p in enumerate(PROMPTS):
            local.submit(i, p, GREEDY)
            b.submit(i, p, GREEDY)
        assert drain(b, 3) == drain(local, 3)
    finally:
        b.close()
