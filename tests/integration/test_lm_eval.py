"""lm-eval-harness's ``local-completions`` model scores a multiple-choice task against the OpenAI endpoint (vLLM engine).

lm-eval asks ``/v1/completions`` for each (context, continuation) pair's loglikelihood the way it asks any
OpenAI-compatible server: the pair's token ids as the prompt, ``echo=True``, ``logprobs=1``, ``max_tokens=1``;
it sums the echoed ``token_logprobs`` of the continuation's tokens. The task (``lm_eval_task/``) is offline:
a local JSONL, the tokenizer is the tiny model's directory, nothing comes from the Hugging Face hub.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.integration.serving import delete_app, deploy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TASK = "raychat_tiny_mc"
MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def vllm_api(serve_port, tiny_model_dir):
    name = "lm-eval"
    url = deploy(
        serve_port,
        name,
        checkpoint=str(tiny_model_dir),
        model_id="tiny",
        allow_no_auth=True,
        num_replicas=1,
        num_cpus=0.5,
        max_context=MAX_CONTEXT,
        engine="vllm",
        vllm_enforce_eager=True,
        vllm_kv_cache_gb=0.25,
    )
    yield url
    delete_app(name)


def lm_eval_pair_ids(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The (context, continuation) token ids as lm-eval's ``TemplateLM._encode_pair`` makes them for a causal
    model with ``add_bos_token=True``: trailing spaces move from the context to the continuation, the whole text
    is encoded once and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=True).input_ids
    ctx = tok(context, add_special_tokens=True).input_ids
    return ctx, whole[len(ctx) :]


def transformers_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """Σ log p(continuation token | everything before it), recomputed in float32 with transformers."""
    import torch

    ids = ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))


def test_lm_eval_local_completions_scores_a_multiple_choice_task(vllm_api, tiny_model_dir, tmp_path, monkeypatch):
    # Offline: the task's data is a local JSONL (its path relative to the repo root), the tokenizer a local dir.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.chdir(REPO)
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{vllm_api}/completions",
            "model": "tiny",
            "tokenizer": str(tiny_model_dir),
            "tokenizer_backend": "huggingface",
            "add_bos_token": True,
            "max_length": MAX_CONTEXT,
            "num_concurrent": 1,
            "max_retries": 1,
            "timeout": 60,
        },
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )

    acc = out["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"][TASK]
    docs = [line for line in (TASK_DIR / "questions.jsonl").read_text().splitlines() if line.strip()]
    assert len(samples) == len(docs)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    correct = 0
    for s in samples:
        choices = s["doc"]["choices"]
        # one loglikelihood request per choice, each answered with a finite loglikelihood
        assert len(s["arguments"]) == len(s["filtered_resps"]) == len(choices)
        got = [float(ll) for ll, _is_greedy in s["filtered_resps"]]
        assert all(math.isfinite(ll) and ll < 0 for ll in got), got
        # ...equal to transformers' float32 recomputation on the same tokens
        want = []
        for (context, continuation), choice in zip(s["arguments"], choices):
            assert continuation == " " + choice
            ctx, cont = lm_eval_pair_ids(tok, context, continuation)
            assert cont and len(ctx) + len(cont) < MAX_CONTEXT
            want.append(transformers_loglikelihood(model, ctx, cont))
        assert got == pytest.approx(want, abs=1e-3)
        # acc: the target choice has the highest loglikelihood
        assert s["acc"] == float(max(range(len(got)), key=got.__getitem__) == s["target"])
        correct += max(range(len(want)), key=want.__getitem__) == s["target"]
    assert acc == pytest.approx(correct / len(samples))
