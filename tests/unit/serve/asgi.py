"""Drives an ASGI app with one HTTP request, without a server or an HTTP client library."""

from __future__ import annotations

import json
from types import SimpleNamespace


async def call(
    app, path: str, *, method: str = "POST", body: bytes = b"{}", headers: dict | None = None, state=None
) -> tuple[int | None, dict, dict | None]:
    """Sends one request to ``app`` (``state`` as its ``app.state``); returns status, headers, JSON body
    (None, {}, None when it answered nothing)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "app": SimpleNamespace(state=state),
    }
    await app(scope, receive, send)
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:  # the app sent nothing
        return None, {}, None
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(raw) if raw else None
