"""raychat.serve.errors: the OpenAI error shape, and FastAPI's own errors answered in it (plain ASGI)."""

import asyncio
import json

from raychat.serve.errors import error_body


def test_error_body_is_openai_shaped():
    assert error_body("x", param="p", code="c") == {
        "error": {"message": "x", "type": "invalid_request_error", "param": "p", "code": "c"}
    }


def test_installed_handlers_answer_fastapis_own_errors_in_openai_format():
    from fastapi import FastAPI

    from raychat.serve.errors import install_handlers, model_not_found
    from raychat.serve.protocol import ChatCompletionRequest
    from tests.unit.serve.asgi import call

    app = FastAPI()
    install_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict:
        raise model_not_found(req.model, "tiny")

    def answer(path: str, body: dict) -> tuple[int, dict]:
        status, _, payload = asyncio.run(
            call(app, path, body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        )
        return status, payload["error"]

    msgs = [{"role": "user", "content": "hi"}]
    status, error = answer("/v1/chat/completions", {"model": "m", "messages": msgs, "temperature": 7})
    assert status == 400 and error["param"] == "temperature" and error["type"] == "invalid_request_error"
    status, error = answer("/v1/chat/completions", {"model": "gpt-9", "messages": msgs})
    assert status == 404 and (error["code"], error["param"]) == ("model_not_found", "model")
    status, error = answer("/v1/embeddings", {})
    assert status == 404 and error["code"] == "not_found"
