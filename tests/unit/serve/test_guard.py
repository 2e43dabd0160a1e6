"""raychat.serve.ingress.OpenAIGuard's admission limit (layout combined), driven as plain ASGI."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from raychat.serve.ingress import OpenAIGuard


def test_rejected_requests_get_openai_429_and_leave_the_in_flight_count_alone():
    state = SimpleNamespace(
        max_request_bytes=1 << 20, api_keys=None, max_generating=1, generating=0, retry_after_s=2, metrics=None
    )
    release = asyncio.Event()

    async def app(scope, receive, send):  # a generation that runs until released
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = OpenAIGuard(app)

    async def call(path: str) -> tuple[int, dict, bytes]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "root_path": "",
            "headers": [],
            "app": SimpleNamespace(state=state),
        }
        await guard(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    async def main():
        running = asyncio.ensure_future(call("/v1/completions"))
        await asyncio.sleep(0.05)
        # an admitted one would wait for the release: the bounded wait turns that into a failure
        rejected = [await asyncio.wait_for(call("/v1/chat/completions"), timeout=5) for _ in range(3)]
        in_flight = state.generating
        release.set()
        return await running, rejected, in_flight

    (ok, _, _), rejected, in_flight = asyncio.run(main())
    assert ok == 200
    for status, headers, body in rejected:
        assert status == 429 and headers[b"retry-after"] == b"2"
        assert json.loads(body)["error"]["code"] == "queue_full"
    assert in_flight == 1 and state.generating == 0  # rejections neither took nor gave back a slot
