"""Helpers for the Serve tests (the ``serve_port`` fixture, one Serve instance per module, is in conftest.py)."""

from __future__ import annotations

import os
import time
import urllib.request

PROMPT = "Once upon a time"


def deploy(port: int, name: str, **cfg) -> str:
    """Runs one raychat app (``cfg``: ServeConfig fields) under ``/<name>``; returns its OpenAI base URL
    once the HTTP ingress routes to every ingress replica."""
    from ray import serve

    from raychat.core.config import ServeConfig
    from raychat.serve.app import build_app

    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    c = ServeConfig.model_validate(cfg)
    wait_for_ingress(name, (c.num_replicas or c.min_replicas) if c.layout == "combined" else c.router_replicas)
    return f"http://127.0.0.1:{port}/{name}/v1"


def delete_app(name: str, timeout_s: float = 300.0) -> None:
    """``serve.delete`` with a longer bound than its own 60 s: replicas stop only after the requests
    they hold end (graceful shutdown), and on a slow machine that took 72 s once for requests the
    client had abandoned (behind HAProxy, an abandoned non-streamed request is not always cancelled;
    see docs/serving.md, "Known problems")."""
    from ray import serve

    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while name in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"app {name!r} not deleted after {timeout_s} s")
        time.sleep(0.5)


def wait_for_ingress(app: str, replicas: int, timeout_s: float = 30.0) -> None:
    """Where HAProxy is the ingress: waits until it has ``replicas`` ingress replicas of ``app`` UP.

    ``serve.run`` returns once the replicas run; HAProxy hears of them a moment later, and until then
    sends the app's requests to Serve's fallback proxy (its own routing and queue limits) or to fewer
    replicas than the test means to load.
    """
    stats = os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT")
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not stats:
        return
    deadline = time.monotonic() + timeout_s
    up: list = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats}/stats;csv", timeout=5) as r:
            rows = [line.split(",") for line in r.read().decode().splitlines() if line and not line.startswith("#")]
        # columns: pxname, svname, ..., status (18th)
        up = [
            row[1] for row in rows if row[0] == f"http-{app}" and row[1].startswith("SERVE_REPLICA") and row[17] == "UP"
        ]
        if len(up) >= replicas:
            return
        time.sleep(0.2)
    raise TimeoutError(f"HAProxy has {len(up)} of {replicas} ingress replicas of {app!r} up after {timeout_s} s")


def local_greedy(model_dir, max_tokens: int = 8) -> str:
    """What the checkpoint's weights generate in-process for PROMPT (greedy), without Ray or HTTP."""
    from raychat.core.infer.batcher import ContinuousBatcher, SamplingParams
    from raychat.core.model.hf import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    b = ContinuousBatcher(model, stop_ids=[32000, tok.eos_token_id], pad_id=32001, max_context=2048)
    ids = [
        s.token_id
        for step in b.generate([tok(PROMPT)["input_ids"]], [SamplingParams(max_tokens=max_tokens, temperature=0)])
        for s in step
        if s is not None and s.token_id is not None
    ]
    return tok.decode(ids, skip_special_tokens=True)


def serve_run(port: int, run_uri: str, select: str, cache_dir, **cfg) -> tuple[dict, str]:
    """Deploys a run's ``best`` or ``latest`` checkpoint; returns its /v1/models checkpoint card and
    the greedy completion of PROMPT."""
    import openai

    url = deploy(
        port,
        "ckpt",
        checkpoint=run_uri,
        checkpoint_select=select,
        model_id="crlft",
        allow_no_auth=True,
        num_replicas=1,
        num_cpus=0.5,
        cache_dir=str(cache_dir),
        **cfg,
    )
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    card = c.models.list().data[0].model_extra["checkpoint"]
    text = c.completions.create(model="crlft", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    return card, text
