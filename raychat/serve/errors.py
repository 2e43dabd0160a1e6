"""Every error the endpoint sends, built here in OpenAI's format (no Ray).

400 invalid parameter (named) or ``context_length_exceeded``, 401 missing/wrong key, 404 unknown
model or route, 413 body too large, 429 queue full (with ``Retry-After``), 503 no engine replica
could take the request, 504 the request ran past ``request_timeout_s``, 500 only for server bugs.
Routes raise an :class:`APIError`, the middleware sends :meth:`APIError.response`, the engine puts
an :func:`error_body` in its error chunk, and :func:`install_handlers` gives FastAPI's own errors
(validation, unknown route, a bug) the same shape. This module imports nothing else of the
endpoint, so the middleware, the SSE framing and the routes all build their errors from it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("raychat.serve")
QUEUE_FULL = "The server is busy (request queue full); retry later."


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """An OpenAI-format error object (wrapped as ``{"error": ...}`` in responses)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    """The HTTP answer carrying an :func:`error_body`."""
    return JSONResponse(status_code=status, content=body, headers=headers)


class APIError(Exception):
    """An OpenAI-format error answer: raised by routes, sent as is by the middleware."""

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

    def response(self) -> JSONResponse:
        """This error as an HTTP answer."""
        return error_response(self.status, self.body, self.headers)


# -- the errors, by cause ------------------------------------------------------------------------
def body_too_large(limit: int, length: int | None = None) -> APIError:
    """413: the declared ``length`` (or, while reading, the body) exceeds ``limit`` bytes."""
    if length is None:
        return APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
    return APIError(413, f"Request body of {length} bytes exceeds the limit of {limit}.", code="request_too_large")


def invalid_api_key(token: str | None) -> APIError:
    """401: no Bearer key (``token`` None) or one that matches no configured key."""
    what = "No API key provided" if token is None else "Incorrect API key provided"
    return APIError(401, f"{what}. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def queue_full(retry_after_s: int) -> APIError:
    """429 with ``Retry-After``: no room for one more generation request."""
    return APIError(
        429, QUEUE_FULL, type_="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after_s)}
    )


def model_not_found(model: str, served: str) -> APIError:
    """404: ``model`` is not the one this endpoint serves."""
    return APIError(
        404,
        f"The model {model!r} does not exist; this endpoint serves {served!r}.",
        param="model",
        code="model_not_found",
    )


def replica_unavailable(retry_after_s: int) -> APIError:
    """503 with ``Retry-After``: every attempt found its engine replica gone."""
    return APIError(
        503,
        "No model replica could serve the request; retry later.",
        type_="server_error",
        code="replica_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def request_timed_out(request_timeout_s: float) -> APIError:
    """504: the request did not finish within ``request_timeout_s``."""
    # The client would retry a 5xx (the official one twice): the same request would time out again.
    return APIError(
        504,
        f"The request did not finish within request_timeout_s ({request_timeout_s:g} s); "
        "ask for fewer tokens or retry later.",
        type_="server_error",
        code="timeout",
        headers={"x-should-retry": "false"},
    )


def engine_error(body: dict) -> APIError:
    """400 for a user error the engine found (its error chunk's body), e.g. ``context_length_exceeded``."""
    return APIError(400, body["error"]["message"], param=body["error"]["param"], code=body["error"]["code"])


def stream_failed() -> dict:
    """The error event that ends a stream whose engine replica failed after the answer began."""
    return error_body(
        "The model replica failed mid-stream; retry the request.", type_="server_error", code="replica_unavailable"
    )


# -- FastAPI's own errors ------------------------------------------------------------------------
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    # loc is ("body", field, index/sub-field...); the union members pydantic tried are not parameters.
    parts = [p for p in first["loc"][1:] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier())]
    param = parts[0] if parts and isinstance(parts[0], str) else None
    where = ".".join(str(p) for p in parts) or "body"
    msg = first["msg"].removeprefix("Value error, ")
    named, sep, _ = msg.partition(": ")
    if param is None and sep and named.isidentifier():  # a check across fields names its parameter first
        return error_response(400, error_body(msg, param=named))
    return error_response(400, error_body(f"{where}: {msg}", param=param))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return error_response(exc.status_code, error_body(str(exc.detail), code=code))


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error_response(500, error_body(f"Internal server error ({type(exc).__name__}).", type_="server_error"))


def install_handlers(app: FastAPI) -> None:
    """Makes ``app`` answer every error in OpenAI's format: :class:`APIError` as raised, an invalid
    body as 400 naming the parameter, an unknown route or method (and a body found too large while
    read) with its status, and anything else as 500 (logged)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
