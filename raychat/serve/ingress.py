"""The FastAPI app and its OpenAI routes, served by the ``OpenAIRouter`` deployment.

``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and ``/health``. A request becomes
one :class:`~raychat.serve.engine_protocol.EngineRequest` per choice, sent through
:mod:`raychat.serve.engine_client`; a streamed answer is framed by :mod:`raychat.serve.sse`. In
front of every route runs :class:`raychat.serve.middleware.OpenAIGuard` (body size, API key,
admission, metrics), and every error leaves in OpenAI's format (:mod:`raychat.serve.errors`).
"""

import asyncio
import logging

from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from raychat.core.config import ServeConfig
from raychat.serve.auth import NoApiKeysError, load_api_keys
from raychat.serve.engine_client import EngineClient, LocalEngine, RemoteEngine, engine_class, open_choice
from raychat.serve.engine_protocol import EngineRequest
from raychat.serve.errors import install_handlers, model_not_found, request_timed_out
from raychat.serve.middleware import OpenAIGuard
from raychat.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    chat_logprobs,
    completion_logprobs,
)
from raychat.serve.sse import completion_events, gather_or_cancel

log = logging.getLogger("raychat.serve")

app = FastAPI(title="raychat", description="OpenAI-compatible endpoint for C-RLFT checkpoints")
app.add_middleware(OpenAIGuard)
install_handlers(app)


def to_engine_request(req: ChatCompletionRequest) -> EngineRequest:
    """Splits system messages out (joined into the system prompt) and maps sampling options."""
    system = "\n".join(m.text for m in req.messages if m.role in ("system", "developer"))
    turns = [(m.role, m.text) for m in req.messages if m.role not in ("system", "developer")]
    return EngineRequest(
        messages=turns,
        system=system,
        condition=req.condition,
        max_tokens=req.max_tokens or req.max_completion_tokens,
        logprobs=req.engine_logprobs(),
        response_format=req.response_format.for_engine() if req.response_format else None,
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


# Helpers the ingress class calls are defined above it: Serve pickles the class when it is
# decorated, with the module globals that exist at that point.
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
            self.engine: EngineClient = LocalEngine(engine_class(self.cfg.engine_name())(cfg, checkpoint))
        else:
            self.engine = RemoteEngine(engine)
        app.state.api_keys = keys or None
        app.state.max_request_bytes = self.cfg.max_request_bytes
        # combined: this replica is the engine and admits what split's engine + router queue would hold
        app.state.max_generating = self.cfg.combined_admission_limit() if engine is None else None
        app.state.generating, app.state.retry_after_s = 0, self.cfg.retry_after_s
        app.state.metrics = self.metrics = ServeMetrics(self.model_id)
        log.info("router for %s: %d API key(s), auth %s", self.model_id, len(keys), "on" if keys else "OFF")

    async def check_health(self) -> None:
        """Serve's health check: combined, a replica whose engine (process) died is replaced."""
        if isinstance(self.engine, LocalEngine):
            await self.engine.check_health()

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
            raise model_not_found(model, self.model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        self._check_model(req.model)
        return await self._respond(req, choice_requests([to_engine_request(req)], req.n), chat=True)

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        self._check_model(req.model)
        bases = [
            EngineRequest(prompt=p, max_tokens=req.max_tokens, logprobs=req.logprobs, echo=req.echo, **_sampling(req))
            for p in req.prompts()
        ]
        return await self._respond(req, choice_requests(bases, req.n), chat=False)

    async def _respond(self, req: ChatCompletionRequest | CompletionRequest, ereqs: list[EngineRequest], chat: bool):
        """Every choice of ``req`` from the engine, as one JSON answer or a server-sent event stream."""
        n = req.n
        # One deadline for the whole request: waiting for a batch slot, prefill and every token.
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):  # cancelling the engine calls frees their batch slots
                opened = await gather_or_cancel([open_choice(self.engine, e, self.cfg.retry_after_s) for e in ereqs])
        except TimeoutError:
            raise request_timed_out(self.cfg.request_timeout_s) from None
        if req.stream:
            events = completion_events(
                opened,
                chat=chat,
                model_id=self.model_id,
                n=n,
                include_usage=req.include_usage,
                deadline=deadline,
                request_timeout_s=self.cfg.request_timeout_s,
            )
            return StreamingResponse(events, media_type="text/event-stream")
        results = [r for r, _ in opened]
        # Prompt tokens count once per prompt (its n choices share it), completion tokens per choice.
        usage = Usage.of(sum(r.prompt_tokens for r in results[::n]), sum(r.completion_tokens for r in results))
        if chat:
            choices = [
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=r.text),
                    finish_reason=r.finish_reason,
                    logprobs=None if r.logprobs is None else chat_logprobs(r.logprobs),
                )
                for i, r in enumerate(results)
            ]
            body = ChatCompletion(model=self.model_id, choices=choices, usage=usage)
        else:
            choices = [
                CompletionChoice(
                    index=i,
                    text=r.text,
                    finish_reason=r.finish_reason,
                    logprobs=None if r.logprobs is None else completion_logprobs(r.logprobs),
                )
                for i, r in enumerate(results)
            ]
            body = Completion(model=self.model_id, choices=choices, usage=usage)
        # pydantic's own JSON: FastAPI's generic path (jsonable_encoder, then json.dumps) costs more per response.
        return Response(body.model_dump_json(), media_type="application/json")
