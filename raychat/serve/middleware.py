"""The ASGI guard in front of every route: one small middleware per concern (no Ray).

:class:`OpenAIGuard` stacks them in the order the checks happen, outermost first:

1. :class:`RequestMetrics`: counts every ``/v1`` request by route and final status, the guard's
   own refusals included (499: the client left before an answer; 500: a server bug).
2. :class:`BodySizeLimit`: 413 for a ``Content-Length`` over ``max_request_bytes``, or for a body
   that grows past it while it is read (on every route).
3. :class:`ApiKeyAuth`: 401 for a missing or wrong Bearer key, on every route but ``/health``.
4. :class:`GenerationAdmission`: 429 with ``Retry-After`` for a generation request beyond
   ``max_generating`` at once in this replica (``layout: combined``, where no router queue stands
   in front of the engine).

Each reads its settings from ``app.state`` (set by the router replica): ``metrics`` (None: not
counted), ``max_request_bytes``, ``api_keys`` (None: auth off), ``max_generating`` (None: no limit
here) with ``generating`` and ``retry_after_s``. Every refusal is an OpenAI-format error from
:mod:`raychat.serve.errors`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raychat.serve.auth import bearer_token, key_matches
from raychat.serve.errors import body_too_large, invalid_api_key, queue_full

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


def route_path(scope: Scope) -> str:
    """The request's path within the app (without the Serve ``route_prefix`` it is mounted under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    return dict(scope.get("headers") or []).get(name)


class _HTTPLayer:
    """One guard layer: :meth:`handle` sees every HTTP request; anything else (lifespan) passes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serves one HTTP request: this layer's check, then (unless it answered) ``self.app``."""
        raise NotImplementedError


class RequestMetrics(_HTTPLayer):
    """Counts ``/v1`` requests by route (``other`` for unknown ones) and the status of their answer."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        path = route_path(scope)
        status_seen: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            status_seen.append(500)
            raise
        finally:
            metrics = getattr(state, "metrics", None)
            if metrics is not None and path.startswith("/v1"):
                route = path if path == "/v1/models" or path in GENERATION_ROUTES else "other"
                metrics.requests.inc(tags={"route": route, "status": str(status_seen[0] if status_seen else 499)})


class _TooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions met while reading a body (its
    handler then answers 413)."""

    def __init__(self, limit: int):
        super().__init__(413, str(body_too_large(limit)))


class BodySizeLimit(_HTTPLayer):
    """413 for a request body over ``max_request_bytes``: declared (before the app runs) or read."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = scope["app"].state.max_request_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await body_too_large(limit, int(length)).response()(scope, receive, send)
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_tracked)
        except _TooLarge:
            if not started:  # the app let it through unanswered
                await body_too_large(limit).response()(scope, receive, send)


class ApiKeyAuth(_HTTPLayer):
    """401 unless the request carries ``Authorization: Bearer <key>`` with a configured key
    (``/health``, the probe, needs none; ``api_keys`` None turns auth off)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if route_path(scope) != "/health":
            keys = scope["app"].state.api_keys
            if keys is not None:
                token = bearer_token((_header(scope, b"authorization") or b"").decode("latin-1"))
                if not key_matches(token, keys):
                    return await invalid_api_key(token).response()(scope, receive, send)
        await self.app(scope, receive, send)


class GenerationAdmission(_HTTPLayer):
    """429 with ``Retry-After`` for a generation ``POST`` while ``max_generating`` are running here;
    an admitted one holds its slot (``state.generating``) until its answer is sent or abandoned."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST" or route_path(scope) not in GENERATION_ROUTES:
            return await self.app(scope, receive, send)
        state = scope["app"].state
        if getattr(state, "max_generating", None) is None:
            return await self.app(scope, receive, send)
        if state.generating >= state.max_generating:
            return await queue_full(state.retry_after_s).response()(scope, receive, send)
        state.generating += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.generating -= 1


GUARD_LAYERS: tuple[Callable[[ASGIApp], ASGIApp], ...] = (
    RequestMetrics,
    BodySizeLimit,
    ApiKeyAuth,
    GenerationAdmission,
)
"""The guard's middlewares, outermost (first to see a request) first."""


class OpenAIGuard:
    """:data:`GUARD_LAYERS` around ``app``, as the one middleware the FastAPI app installs."""

    def __init__(self, app: ASGIApp):
        for layer in reversed(GUARD_LAYERS):
            app = layer(app)
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
