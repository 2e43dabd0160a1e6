"""HTTP routing: the FastAPI ingress that speaks OpenAI and forwards to the engine deployment.

Every error leaves through one place (:func:`_error_response`) in OpenAI's format:
400 invalid parameter (named) or ``context_length_exceeded``, 401 missing/wrong key, 404 unknown
model or route, 413 body too large, 429 queue full (with ``Retry-After``), 503 no engine
replica could take the request, 500 only for server bugs. The body-size limit and API-key
check run as ASGI middleware in front of every route (``/health`` needs no key).
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from raychat.core.config import ServeConfig
from raychat.core.infer.engine_process import EngineProcessDied
from raychat.serve.auth import NoApiKeysError, bearer_token, key_matches, load_api_keys
from raychat.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EngineChunk,
    EngineRequest,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)

log = logging.getLogger("raychat.serve")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
QUEUE_FULL = "The server is busy (request queue full); retry later."
# Engine calls that failed because a replica died before answering are retried this often.
REPLICA_RETRIES = 2
# EngineProcessDied: the replica is up but its engine process is gone (its health check fails, so
# Serve replaces it); in `split` another replica may take the request.
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, EngineProcessDied)


class APIError(Exception):
    """An OpenAI-format error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = error_body(message, type_=type_, param=param, code=code)


def _error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


class OpenAIGuard:
    """ASGI middleware: request body size limit (413) and Bearer API keys (401) on every route but ``/health``.

    Settings come from ``app.state`` (set by the router replica): ``max_request_bytes``,
    ``api_keys`` (None = auth off) and ``max_generating`` (None = no limit here): generation
    requests beyond that many at once in this replica get an OpenAI-format 429 with
    ``Retry-After`` (``layout: combined``, where no router queue stands in front of the engine).
    Also counts requests by route and status.
    """

    class _TooLarge(HTTPException):
        """Raised from ``receive``: FastAPI re-raises HTTPExceptions met while reading a body."""

        def __init__(self, limit: int):
            super().__init__(413, f"Request body exceeds the limit of {limit} bytes.")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # under a Serve route_prefix
            path = path[len(root) :]
        status_seen: list[int] = []
        generating = False

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        async def reply(status: int, body: dict, headers: dict | None = None):
            await _error_response(status, body, headers)(scope, receive, send_counted)

        try:
            limit = state.max_request_bytes
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await reply(
                    413,
                    error_body(
                        f"Request body of {int(length)} bytes exceeds the limit of {limit}.", code="request_too_large"
                    ),
                )
            if path != "/health" and state.api_keys is not None:  # every route but the probe needs a key
                token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
                if not key_matches(token, state.api_keys):
                    what = "No API key provided" if token is None else "Incorrect API key provided"
                    return await reply(
                        401, error_body(f"{what}. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")
                    )
            if (
                path in GENERATION_ROUTES
                and scope.get("method") == "POST"
                and getattr(state, "max_generating", None) is not None
            ):
                if state.generating >= state.max_generating:
                    return await reply(
                        429,
                        error_body(QUEUE_FULL, type_="rate_limit_error", code="queue_full"),
                        {"Retry-After": str(state.retry_after_s)},
                    )
                state.generating += 1
                generating = True  # from here on, `finally` gives the slot back
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise OpenAIGuard._TooLarge(limit)
                return message

            try:
                await self.app(scope, limited_receive, send_counted)
            except OpenAIGuard._TooLarge:
                if not status_seen:
                    await reply(
                        413, error_body(f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
                    )
        except Exception:
            status_seen.append(500)
            raise
        finally:
            if generating:
                state.generating -= 1
            metrics = getattr(state, "metrics", None)
            if metrics is not None and path.startswith("/v1"):
                route = path if path == "/v1/models" or path in GENERATION_ROUTES else "other"
                metrics.requests.inc(tags={"route": route, "status": str(status_seen[0] if status_seen else 499)})


app = FastAPI(title="raychat", description="OpenAI-compatible endpoint for C-RLFT checkpoints")
app.add_middleware(OpenAIGuard)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc.status, exc.body, exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    # loc is ("body", field, index/sub-field...); the union members pydantic tried are not parameters.
    parts = [p for p in first["loc"][1:] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier())]
    param = parts[0] if parts and isinstance(parts[0], str) else None
    where = ".".join(str(p) for p in parts) or "body"
    msg = first["msg"].removeprefix("Value error, ")
    named, sep, _ = msg.partition(": ")
    if param is None and sep and named.isidentifier():  # a check across fields names its parameter first
        return _error_response(400, error_body(msg, param=named))
    return _error_response(400, error_body(f"{where}: {msg}", param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return _error_response(exc.status_code, error_body(str(exc.detail), code=code))


@app.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error_response(500, error_body(f"Internal server error ({type(exc).__name__}).", type_="server_error"))


def to_engine_request(req: ChatCompletionRequest) -> EngineRequest:
    """Splits system messages out (joined into the system prompt) and maps sampling options."""
    system = "\n".join(m.text for m in req.messages if m.role in ("system", "developer"))
    turns = [(m.role, m.text) for m in req.messages if m.role not in ("system", "developer")]
    return EngineRequest(
        messages=turns,
        system=system,
        condition=req.condition,
        max_tokens=req.max_tokens or req.max_completion_tokens,
        **_sampling(req),
    )


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> dict:
    return dict(
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=req.stop,
        stream=req.stream,
    )


def choice_requests(bases: list[EngineRequest], n: int) -> list[EngineRequest]:
    """One engine request per choice: choice ``p * n + j`` is prompt ``p``'s j-th sample (seed + j)."""
    out = []
    for base in bases:
        for j in range(n):
            out.append(base if j == 0 or base.seed is None else base.model_copy(update={"seed": base.seed + j}))
    return out


async def _gather_or_cancel(coros: list) -> list:
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
                await _close(t.result()[1], finished=False)
        raise


# Helpers the ingress class calls are defined above it: Serve pickles the class when it is
# decorated, with the module globals that exist at that point.
async def _close(stream, finished: bool) -> None:
    """Ends an engine stream; one the client stopped reading early is cancelled (frees its batch slot)."""
    if stream is None:
        return
    if hasattr(stream, "aclose"):  # a local async generator: its finally aborts an unfinished request
        with contextlib.suppress(Exception):
            await stream.aclose()
    elif not finished:  # a DeploymentResponseGenerator
        stream.cancel()


async def _merged(opened: list[tuple[EngineChunk, AsyncIterator[EngineChunk] | None]]):
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


class EngineClient(Protocol):
    """How the router reaches an engine: the first chunk of a choice, and the stream of the rest."""

    async def open(self, ereq: EngineRequest) -> "tuple[EngineChunk, AsyncIterator[EngineChunk] | None]": ...


class RemoteEngine:
    """The engine deployment behind a ``DeploymentHandle`` (``layout: split``)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def open(self, ereq: EngineRequest) -> "tuple[EngineChunk, AsyncIterator[EngineChunk] | None]":
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

    def __init__(self, engine):
        self.engine = engine

    async def open(self, ereq: EngineRequest) -> "tuple[EngineChunk, AsyncIterator[EngineChunk] | None]":
        if ereq.stream:
            stream = self.engine.generate(ereq)
            return await stream.__anext__(), stream
        return await self.engine.complete(ereq), None


@serve.ingress(app)
class OpenAIRouter:
    """Serve ingress deployment class: OpenAI routes on :data:`app`, generation on the engine.

    ``engine`` is the engine deployment's handle (``layout: split``), or None: then this replica
    loads the model itself (``layout: combined``) and is the deployment that autoscales.
    """

    def __init__(self, engine: DeploymentHandle | None, cfg: dict, checkpoint: dict):
        from raychat.serve.metrics import ServeMetrics

        self.cfg = ServeConfig.model_validate(cfg)
        self.checkpoint = checkpoint
        self.model_id = self.cfg.model_id
        keys = load_api_keys(self.cfg.api_keys_env, self.cfg.api_keys_file)
        if not keys and not self.cfg.allow_no_auth:
            raise NoApiKeysError(
                f"no API key configured: set ${self.cfg.api_keys_env} or api_keys_file, "
                "or pass allow_no_auth=true (local demo only)"
            )
        if engine is None:
            from raychat.serve.engine import LLMEngine

            self.engine: EngineClient = LocalEngine(LLMEngine(cfg, checkpoint))
        else:
            self.engine = RemoteEngine(engine)
        app.state.api_keys = keys or None
        app.state.max_request_bytes = self.cfg.max_request_bytes
        # combined: this replica is the engine and admits what split's engine + router queue would hold
        app.state.max_generating = self.cfg.combined_admission_limit() if engine is None else None
        app.state.generating, app.state.retry_after_s = 0, self.cfg.retry_after_s
        app.state.metrics = self.metrics = ServeMetrics(self.model_id)
        log.info("router for %s: %d API key(s), auth %s", self.model_id, len(keys), "on" if keys else "OFF")

    def check_health(self) -> None:
        """Serve's health check: combined, a replica whose engine process died is replaced."""
        if isinstance(self.engine, LocalEngine):
            self.engine.engine.check_health()

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_id, root=self.checkpoint["uri"], checkpoint=self.checkpoint)

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[self._card()])

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return self._card()

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(
                404,
                f"The model {model!r} does not exist; this endpoint serves {self.model_id!r}.",
                param="model",
                code="model_not_found",
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        self._check_model(req.model)
        return await self._respond(req, choice_requests([to_engine_request(req)], req.n), chat=True)

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        self._check_model(req.model)
        bases = [EngineRequest(prompt=p, max_tokens=req.max_tokens, **_sampling(req)) for p in req.prompts()]
        return await self._respond(req, choice_requests(bases, req.n), chat=False)

    # -- engine calls ------------------------------------------------------------------------------
    async def _call(self, ereq: EngineRequest) -> "tuple[EngineChunk, AsyncIterator[EngineChunk] | None]":
        """Sends one choice to the engine: the whole result for non-streaming requests, else a
        stream whose first chunk is awaited; returns ``(chunk, stream or None)``.

        A replica that dies before answering is retried on another (nothing was sent to the
        client yet, so no text is lost or repeated); a full queue is 429.
        """
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                first, stream = await self.engine.open(ereq)
            except BackPressureError:
                raise APIError(
                    429,
                    QUEUE_FULL,
                    type_="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self.cfg.retry_after_s)},
                ) from None
            except _REPLICA_GONE as e:
                log.warning("engine replica unavailable (attempt %d): %s", attempt + 1, type(e).__name__)
                if attempt == REPLICA_RETRIES:
                    raise APIError(
                        503,
                        "No model replica could serve the request; retry later.",
                        type_="server_error",
                        code="replica_unavailable",
                        headers={"Retry-After": str(self.cfg.retry_after_s)},
                    ) from None
                continue
            if first.error:
                raise APIError(
                    400,
                    first.error["error"]["message"],
                    param=first.error["error"]["param"],
                    code=first.error["error"]["code"],
                )
            return first, stream
        raise AssertionError("unreachable")

    def _timed_out(self) -> APIError:
        # The client would retry a 5xx (the official one twice): the same request would time out again.
        return APIError(
            504,
            f"The request did not finish within request_timeout_s ({self.cfg.request_timeout_s:g} s); "
            "ask for fewer tokens or retry later.",
            type_="server_error",
            code="timeout",
            headers={"x-should-retry": "false"},
        )

    async def _respond(self, req, ereqs: list[EngineRequest], chat: bool):
        n = req.n
        # One deadline for the whole request: waiting for a batch slot, prefill and every token.
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):  # cancelling the engine calls frees their batch slots
                opened = await _gather_or_cancel([self._call(e) for e in ereqs])
        except TimeoutError:
            raise self._timed_out() from None
        if req.stream:
            return StreamingResponse(self._sse(req, opened, chat, deadline), media_type="text/event-stream")
        results = [r for r, _ in opened]
        # Prompt tokens count once per prompt (its n choices share it), completion tokens per choice.
        usage = Usage.of(sum(r.prompt_tokens for r in results[::n]), sum(r.completion_tokens for r in results))
        if chat:
            choices = [
                ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
                for i, r in enumerate(results)
            ]
            body = ChatCompletion(model=self.model_id, choices=choices, usage=usage)
        else:
            choices = [
                CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)
            ]
            body = Completion(model=self.model_id, choices=choices, usage=usage)
        # pydantic's own JSON: FastAPI's generic path (jsonable_encoder, then json.dumps) costs more per response.
        return Response(body.model_dump_json(), media_type="application/json")

    async def _sse(
        self, req, opened: list[tuple[EngineChunk, AsyncIterator[EngineChunk] | None]], chat: bool, deadline: float
    ) -> AsyncIterator[str]:
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, n = int(time.time()), req.n
        # Chunks are built as dicts (the shape of ChatCompletionChunk / Completion dumps): a pydantic
        # model per streamed chunk costs more than the rest of the chunk's trip through this replica.
        head = {
            "id": cid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": self.model_id,
        }
        if req.include_usage:
            head["usage"] = None

        def event(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [choice]}, separators=(',', ':'))}\n\n"

        last: dict[int, EngineChunk] = {}
        # Each yield is one HTTP write (a TCP send, a wake-up of HAProxy and of the client): the role
        # chunk goes out with the first text, and the usage chunk and [DONE] with the last one.
        pending = [event(i, None, None, first=True) for i in range(len(opened))] if chat else []
        merged = _merged(opened)
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
                    log.warning("stream hit request_timeout_s (%g s)", self.cfg.request_timeout_s)
                    yield "".join(pending) + f"data: {json.dumps(self._timed_out().body)}\n\n"
                    return
                out, pending = pending, []
                for index, item in items:
                    if isinstance(item, Exception):
                        log.warning("stream %d failed: %s", index, type(item).__name__)
                        body = error_body(
                            "The model replica failed mid-stream; retry the request.",
                            type_="server_error",
                            code="replica_unavailable",
                        )
                        yield "".join(out) + f"data: {json.dumps(body)}\n\n"
                        return
                    last[index] = item
                    if item.text:
                        out.append(event(index, item.text, None))
                    if item.finish_reason:
                        out.append(event(index, "" if not chat else None, item.finish_reason))
                if len(last) == len(opened) and all(c.finish_reason for c in last.values()):
                    pending = out  # the last text: sent with the end of the stream, below
                    break
                if out:
                    yield "".join(out)
            if req.include_usage:
                ordered = [last[i] for i in sorted(last)]
                usage = Usage.of(sum(c.prompt_tokens for c in ordered[::n]), sum(c.completion_tokens for c in ordered))
                cls = ChatCompletionChunk if chat else Completion
                pending.append(
                    f"data: {cls(id=cid, created=created, model=self.model_id, choices=[], usage=usage).model_dump_json()}\n\n"
                )
            yield "".join(pending) + "data: [DONE]\n\n"
        finally:
            await merged.aclose()
            for i, (_, stream) in enumerate(opened):
                await _close(stream, finished=i in last and last[i].finish_reason is not None)
