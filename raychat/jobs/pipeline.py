"""The whole spine in one job: sample data → pretokenize → train → serve → ask with `openai`.

python -m raychat.jobs.pipeline                       # embedded default, a few minutes on 2 CPUs
python -m raychat.jobs.pipeline --workdir s3://bucket/raychat --keep-serving
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from raychat.core.common import storage
from raychat.core.common.cli import parse_config
from raychat.core.common.report import format_table
from raychat.core.config import PipelineConfig, PretokenizeConfig, ServeConfig, TrainConfig
from raychat.core.data.sample import SAMPLE_SOURCES, sample_jsonl
from raychat.jobs import pretokenize
from raychat.jobs._ray import init_ray, log, setup_logging
from raychat.jobs.train import driver as train


def ask(base_url: str, model: str, question: str, max_tokens: int) -> dict:
    """Asks the endpoint once without and once with streaming, through the official client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused-local-demo", max_retries=2, timeout=120)
    messages = [{"role": "user", "content": question}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    chunks = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
    return {
        "answer": resp.choices[0].message.content,
        "finish_reason": resp.choices[0].finish_reason,
        "usage": resp.usage.model_dump() if resp.usage else None,
        "streamed_answer": "".join(chunks),
        "stream_chunks": len(chunks),
    }


def run(cfg: PipelineConfig) -> dict:
    """Runs all stages; returns every stage's summary plus the answer."""
    from ray import serve

    from raychat.serve.app import build_app

    t0 = time.time()
    init_ray()
    run_uri = storage.join(cfg.workdir, cfg.run_id or time.strftime("pipeline-%Y%m%d-%H%M%S"))
    data_uri = cfg.input
    if data_uri is None:
        data_uri = storage.join(run_uri, "data", "sample.jsonl")
        storage.write_text(data_uri, sample_jsonl(cfg.sample_rows))
        log.info("wrote %d sample conversations (+ malformed rows) to %s", cfg.sample_rows, data_uri)

    stages: dict[str, float] = {}
    t = time.time()
    sources = SAMPLE_SOURCES if cfg.input is None else {}
    pre = pretokenize.run(PretokenizeConfig(input=data_uri, output=storage.join(run_uri, "tokenized"), sources=sources))
    stages["pretokenize"] = time.time() - t
    print(pretokenize.summary_table(pre), flush=True)

    t = time.time()
    tr = train.run(
        TrainConfig(
            data=pre["output"],
            output=run_uri,
            name="train",
            base_model=cfg.base_model,
            epochs=cfg.epochs,
            batch_max_len=cfg.batch_max_len,
            learning_rate=cfg.learning_rate,
            warmup_steps=5,
            num_workers=cfg.num_workers,
            zero_stage=cfg.zero_stage,
            eval_fraction=0.05,
        )
    )
    stages["train"] = time.time() - t
    print(train.summary_table(tr), flush=True)

    t = time.time()
    model_id = "raychat-" + run_uri.rstrip("/").rsplit("/", 1)[-1]
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    # The local demo serves without API keys, by explicit choice; production configs set keys.
    app = build_app(ServeConfig(checkpoint=tr["checkpoint"], model_id=model_id, allow_no_auth=True).model_dump())
    serve.run(app, name="raychat", route_prefix="/")
    base_url = f"http://{cfg.host}:{cfg.port}/v1"
    stages["serve (deploy)"] = time.time() - t

    t = time.time()
    answer = ask(base_url, model_id, cfg.question, cfg.max_tokens)
    stages["ask (2 requests)"] = time.time() - t
    summary = {
        "run": run_uri,
        "pretokenize": pre,
        "train": tr,
        "endpoint": base_url,
        "model": model_id,
        "question": cfg.question,
        **answer,
        "stages_s": stages,
        "wall_time_s": time.time() - t0,
    }
    if not cfg.keep_serving:
        serve.shutdown()
    return summary


def summary_table(s: dict) -> str:
    pre, tr = s["pretokenize"], s["train"]
    rows = [
        ("rows read → written", f"{pre['read']} → {pre['written']}"),
        ("rows quarantined / dropped", f"{pre['quarantined']} / {pre['dropped']}"),
        *[(f"rows of source {k}", v["rows"]) for k, v in pre["by_source"].items()],
        *[(f"rows of condition {k!r}", v["rows"]) for k, v in pre["by_condition"].items()],
        ("tokens (supervised)", f"{pre['tokens']:,} ({pre['supervised_tokens']:,})"),
        ("train steps", tr["steps"]),
        ("packing efficiency (epoch 1)", f"{tr['packing_efficiency'][0]:.4f}"),
        ("loss first → last", f"{tr['loss_first']:.3f} → {tr['loss_last']:.3f}"),
        (
            "eval loss (held-out rows)",
            "-" if tr["eval_loss"] is None else f"{tr['eval_loss']:.3f} ({tr['eval_rows']} rows)",
        ),
        ("checkpoint", tr["checkpoint"]),
        ("endpoint", s["endpoint"]),
        ("model", s["model"]),
        *[(f"time: {k} (s)", round(v, 1)) for k, v in s["stages_s"].items()],
        ("wall time (s)", round(s["wall_time_s"], 1)),
    ]
    return format_table("raychat pipeline", rows)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(PipelineConfig, argv, prog="raychat pipeline")
    s = run(cfg)
    print(f"\nQ: {s['question']}\nA: {s['answer']!r}  (finish_reason={s['finish_reason']}, usage={s['usage']})")
    print(f"A (streamed, {s['stream_chunks']} chunks): {s['streamed_answer']!r}")
    print("(the tiny random-init model answers gibberish; what matters is that the loss fell)\n")
    print(summary_table(s))
    if cfg.keep_serving:
        print(f"\nServing {s['model']} at {s['endpoint']} — Ctrl-C to stop.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            from ray import serve

            serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
