"""HTTP routing: the FastAPI ingress that speaks OpenAI and forwards to the engine deployment."""


import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from libs.config import ServeConfig
from serve.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    Delta,
    EngineChunk,
    EngineRequest,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)

app = FastAPI(title="raychat", description="OpenAI-compatible endpoint for C-RLFT checkpoints")


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return JSONResponse(status_code=400, content=error_body(f"{param}: {first['msg']}", param=param))


def to_engine_request(req: ChatCompletionRequest) -> EngineRequest:
    """Splits system messages out (joined into the system prompt) and maps sampling options."""
    system = "\n".join(m.content for m in req.messages if m.role == "system")
    turns = [(m.role, m.content) for m in req.messages if m.role != "system"]
    return EngineRequest(
        messages=turns,
        system=system,
        condition=req.condition,
        max_tokens=req.max_tokens or req.max_completion_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
    )


@serve.ingress(app)
class OpenAIRouter:
    """Serve ingress deployment class: OpenAI routes on :data:`app`, generation on the engine handle."""

    def __init__(self, engine: DeploymentHandle, cfg: dict):
        self.engine = engine
        self.cfg = ServeConfig.model_validate(cfg)
        self.model_id = self.cfg.model_id or self.cfg.checkpoint.rstrip("/").rsplit("/", 1)[-1]

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, root=self.cfg.checkpoint)])

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        if req.model != self.model_id:
            return JSONResponse(
                status_code=404,
                content=error_body(f"The model {req.model!r} does not exist; this endpoint serves {self.model_id!r}.",
                                   param="model", code="model_not_found"),
            )
        if not any(m.role != "system" for m in req.messages):
            return JSONResponse(status_code=400, content=error_body("messages: need at least one user message", param="messages"))
        stream = self.engine.options(stream=True).generate.remote(to_engine_request(req))
        first = await anext(aiter(stream), None)
        if first is not None and first.error:
            return JSONResponse(status_code=400, content=first.error)
        if req.stream:
            return StreamingResponse(self._sse(first, stream), media_type="text/event-stream")
        text, last = [], first
        if first is not None:
            text.append(first.text)
            async for chunk in stream:
                text.append(chunk.text)
                last = chunk
        return ChatCompletion(
            model=self.model_id,
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content="".join(text)),
                                finish_reason=last.finish_reason if last else "length")],
            usage=Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                        total_tokens=last.prompt_tokens + last.completion_tokens) if last else Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
        )

    async def _sse(self, first: "EngineChunk | None", rest) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(delta: Delta, finish: str | None = None) -> str:
            chunk = ChatCompletionChunk(id=cid, created=created, model=self.model_id,
                                        choices=[ChunkChoice(delta=delta, finish_reason=finish)])
            return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"

        yield event(Delta(role="assistant", content=""))
        chunks = [first] if first is not None else []

        async def all_chunks():
            for c in chunks:
                yield c
            async for c in rest:
                yield c

        async for c in all_chunks():
            if c.text:
                yield event(Delta(content=c.text))
            if c.finish_reason:
                yield event(Delta(), c.finish_reason)
        yield "data: [DONE]\n\n"
