"""raychat.serve.middleware: each guard layer on its own, and OpenAIGuard's order of checks, driven as plain ASGI."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from raychat.serve.middleware import ApiKeyAuth, BodySizeLimit, OpenAIGuard, RequestMetrics
from tests.unit.serve.asgi import call


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


async def ok(scope, receive, send):
    """A route that reads its body and answers 200."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class Counter:
    def __init__(self):
        self.seen: list[dict] = []

    def inc(self, tags: dict) -> None:
        self.seen.append(tags)


def test_body_size_limit_refuses_a_declared_or_a_read_body_over_the_limit():
    state = SimpleNamespace(max_request_bytes=10)
    limited = BodySizeLimit(ok)
    status, _, body = asyncio.run(
        call(limited, "/v1/completions", body=b"x" * 11, headers={"content-length": "11"}, state=state)
    )
    assert status == 413 and body["error"] == {
        "message": "Request body of 11 bytes exceeds the limit of 10.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
    status, _, body = asyncio.run(call(limited, "/v1/completions", body=b"x" * 11, state=state))  # no Content-Length
    assert status == 413 and body["error"]["message"] == "Request body exceeds the limit of 10 bytes."
    assert asyncio.run(call(limited, "/v1/completions", body=b"x" * 10, state=state))[0] == 200


def test_api_key_auth_needs_a_configured_key_everywhere_but_health():
    state = SimpleNamespace(api_keys=["sk-right"])
    auth = ApiKeyAuth(ok)
    for headers, message in (
        ({}, "No API key provided"),
        ({"authorization": "Bearer sk-no"}, "Incorrect API key provided"),
    ):
        status, _, body = asyncio.run(call(auth, "/v1/models", method="GET", headers=headers, state=state))
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert body["error"]["message"] == f"{message}. Send 'Authorization: Bearer <key>'."
    assert asyncio.run(call(auth, "/v1/models", headers={"authorization": "Bearer sk-right"}, state=state))[0] == 200
    assert asyncio.run(call(auth, "/health", method="GET", state=state))[0] == 200
    assert asyncio.run(call(auth, "/v1/models", state=SimpleNamespace(api_keys=None)))[0] == 200  # auth off


def test_request_metrics_count_v1_routes_by_final_status():
    requests = Counter()
    state = SimpleNamespace(metrics=SimpleNamespace(requests=requests))

    async def fails(scope, receive, send):
        raise RuntimeError("bug")

    async def leaves(scope, receive, send):  # the client went away before any answer
        return None

    asyncio.run(call(RequestMetrics(ok), "/v1/models", method="GET", state=state))
    asyncio.run(call(RequestMetrics(ok), "/v1/embeddings", state=state))
    asyncio.run(call(RequestMetrics(ok), "/health", method="GET", state=state))  # not an API route: not counted
    with pytest.raises(RuntimeError):
        asyncio.run(call(RequestMetrics(fails), "/v1/completions", state=state))
    assert asyncio.run(call(RequestMetrics(leaves), "/v1/chat/completions", state=state))[0] is None
    assert requests.seen == [
        {"route": "/v1/models", "status": "200"},
        {"route": "other", "status": "200"},
        {"route": "/v1/completions", "status": "500"},
        {"route": "/v1/chat/completions", "status": "499"},
    ]


def test_guard_checks_body_size_then_key_then_admission_and_counts_each_refusal():
    requests = Counter()
    state = SimpleNamespace(
        max_request_bytes=10,
        api_keys=["sk-right"],
        max_generating=0,  # the queue is full
        generating=0,
        retry_after_s=3,
        metrics=SimpleNamespace(requests=requests),
    )
    guard = OpenAIGuard(ok)
    key = {"authorization": "Bearer sk-right"}

    def status(headers: dict, body: bytes = b"{}") -> int:
        return asyncio.run(call(guard, "/v1/completions", body=body, headers=headers, state=state))[0]

    assert status({"content-length": "11"}, b"x" * 11) == 413  # too large, though without a key
    assert status({}) == 401  # no key, though the queue is full
    assert status(key) == 429
    state.max_generating = 1
    assert status(key) == 200 and state.generating == 0
    assert [t["status"] for t in requests.seen] == ["413", "401", "429", "200"]
