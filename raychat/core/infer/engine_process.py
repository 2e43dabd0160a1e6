"""A :class:`~raychat.core.infer.batcher.ContinuousBatcher` in a child process, so the model has a GIL of its own.

In one process, a Serve replica's event loop (HTTP, SSE, JSON) and the batcher's loop thread take
turns on one GIL: every streamed chunk the event loop writes delays the next decode step. Here the
child owns the model and steps while it has work; the parent sends ``submit``/``abort`` commands
and reads each step's tokens back, through two pipes. :class:`ProcessBatcher` has the batcher's
interface (``submit``, ``abort``, ``step``, ``num_running``, ``num_waiting``, ``has_work``), except
that :meth:`ProcessBatcher.step` blocks until the child's next step.

Frames: a 4-byte length and a pickle (a parent and its own child only). The child exits when its
command pipe closes (the parent exited or closed it). Ray-free: runs the same on a GPU machine.

    python -m raychat.core.infer.engine_process CMD_FD EVENT_FD     # started by ProcessBatcher, never by hand
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from raychat.core.infer.batcher import SamplingParams, StepToken, check_prompt
from raychat.core.model.attention import DEFAULT_KERNELS, KernelOptions

_HEADER = struct.Struct(">I")


def write_frame(f: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)) + data)
    f.flush()


def read_frame(f: BinaryIO):
    """The next object, or EOFError when the other side closed its end."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


@dataclass(frozen=True)
class BatcherSpec:
    """What the child needs to build the model and its batcher (the ContinuousBatcher arguments)."""

    model_dir: str
    dtype: str  # a torch dtype name: "float32", "bfloat16"
    device: str
    stop_ids: tuple[int, ...]
    pad_id: int
    max_context: int
    max_batch_size: int
    max_prefill_tokens: int
    torch_threads: int
    pack_cpu_linears: bool = True  # raychat.core.model.cpu_linears.pack_cpu_linears on a CPU model
    kernels: KernelOptions = DEFAULT_KERNELS  # the CUDA attention kernels of the child's batcher


class EngineProcessDied(RuntimeError):
    """The child process exited; no further step will come."""


class StepFailed(RuntimeError):
    """A step raised in the child (its requests were dropped there); ``rids`` lists them."""

    def __init__(self, message: str, rids: list):
        super().__init__(message)
        self.rids = rids


class ProcessBatcher:
    """The parent side. ``submit``/``abort`` from any thread; ``step`` from one thread.

    Raises (constructor):
        EngineProcessDied: when the child could not load the model (its error in the message).
    """

    def __init__(self, spec: BatcherSpec):
        self.max_context = spec.max_context
        self.max_batch_size = spec.max_batch_size
        cmd_r, cmd_w = os.pipe()
        ev_r, ev_w = os.pipe()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the directory holding libs/
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "raychat.core.infer.engine_process", str(cmd_r), str(ev_w)],
            pass_fds=(cmd_r, ev_w),
            env=env,
        )
        os.close(cmd_r)
        os.close(ev_w)
        self._cmd = os.fdopen(cmd_w, "wb")
        self._events = os.fdopen(ev_r, "rb")
        self._lock = threading.Lock()
        self._running = self._waiting = 0
        self._send(spec)
        kind, detail = self._read()
        if kind != "ready":
            self.close()
            raise EngineProcessDied(f"engine process failed to start: {detail}")

    def _send(self, obj) -> None:
        with self._lock:
            try:
                write_frame(self._cmd, obj)
            except (BrokenPipeError, ValueError) as e:  # ValueError: closed
                raise EngineProcessDied(f"engine process is gone (exit code {self._proc.poll()})") from e

    def _read(self):
        try:
            return read_frame(self._events)
        except EOFError:
            raise EngineProcessDied(f"engine process exited (code {self._proc.wait()})") from None

    def submit(self, rid: Hashable, prompt: Sequence[int], params: SamplingParams) -> None:
        """As :meth:`ContinuousBatcher.submit` (same ValueError for a prompt that does not fit)."""
        check_prompt(prompt, self.max_context)
        self._send(("submit", rid, list(prompt), params))

    def abort(self, rid: Hashable) -> None:
        with contextlib.suppress(EngineProcessDied):  # a dead child runs nothing to abort
            self._send(("abort", rid))

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return self._waiting

    def has_work(self) -> bool:
        """Always True: :meth:`step` itself waits for the child's next step."""
        return True

    def step(self) -> list[tuple[Hashable, StepToken]]:
        """The tokens of the child's next step (blocks until it comes).

        Raises:
            StepFailed: the step raised in the child; its requests are gone there.
            EngineProcessDied: the child exited.
        """
        kind, *rest = self._read()
        if kind == "error":
            message, rids = rest
            self._running = self._waiting = 0
            raise StepFailed(message, rids)
        events, self._running, self._waiting = rest
        return events

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        """Ends the child (closing its command pipe makes it exit; killed if it does not)."""
        with self._lock, contextlib.suppress(OSError):  # a dead child: the pending bytes go nowhere
            self._cmd.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._events.close()


def _child(cmd_fd: int, ev_fd: int) -> int:
    import torch

    from raychat.core.infer.batcher import ContinuousBatcher
    from raychat.core.model.hf import load_inference_model

    cmd = os.fdopen(cmd_fd, "rb")
    events = os.fdopen(ev_fd, "wb")
    spec: BatcherSpec = read_frame(cmd)
    try:
        torch.set_num_threads(spec.torch_threads)
        model, _ = load_inference_model(spec.model_dir, getattr(torch, spec.dtype), spec.device, spec.pack_cpu_linears)
        batcher = ContinuousBatcher(
            model,
            stop_ids=list(spec.stop_ids),
            pad_id=spec.pad_id,
            max_context=spec.max_context,
            max_batch_size=spec.max_batch_size,
            max_prefill_tokens=spec.max_prefill_tokens,
            kernels=spec.kernels,
        )
    except Exception as e:
        write_frame(events, ("failed", f"{type(e).__name__}: {e}"))
        return 1
    write_frame(events, ("ready", None))
    wake = threading.Event()
    known: set = set()  # requests submitted and not yet finished, to name them if a step fails

    def commands() -> None:
        try:
            while True:
                op, *args = read_frame(cmd)
                if op == "submit":
                    known.add(args[0])
                    batcher.submit(*args)
                elif op == "abort":
                    batcher.abort(args[0])
                wake.set()
        except EOFError:  # the parent closed the pipe or exited: nothing more to do
            os._exit(0)

    threading.Thread(target=commands, name="raychat-engine-commands", daemon=True).start()
    while True:
        if not batcher.has_work():
            wake.wait(0.5)
            wake.clear()
            continue
        try:
            out = batcher.step()
            for rid, tok in out:
                if tok.finish_reason:
                    known.discard(rid)
            frame = ("step", out, batcher.num_running, batcher.num_waiting)
        except Exception as e:  # a bug or OOM: drop every request (at the next step), tell the parent, keep serving
            rids = list(known)
            known.clear()
            for rid in rids:
                batcher.abort(rid)
            frame = ("error", f"{type(e).__name__}: {e}", rids)
        write_frame(events, frame)


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), int(sys.argv[2])))
