"""The training job on real Ray: resume on re-run, a killed worker restarts from the last checkpoint,
mismatched data is refused, checkpoints carry a manifest with best/latest."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenized(ray_local, tmp_path_factory):
    from raychat.core.config import PretokenizeConfig
    from raychat.core.data.sample import sample_jsonl
    from raychat.jobs.pretokenize import run

    root = tmp_path_factory.mktemp("train-data")
    (root / "in.jsonl").write_text(sample_jsonl(96, include_bad_rows=False))
    run(PretokenizeConfig(input=str(root / "in.jsonl"), output=str(root / "tok")))
    return str(root / "tok")


def cfg(tokenized, out, **kw):
    from raychat.core.config import TrainConfig

    base = dict(
        data=tokenized,
        output=str(out),
        name="run",
        batch_max_len=256,
        learning_rate=1e-3,
        warmup_steps=2,
        eval_fraction=0.1,
        epochs=5,
    )
    return TrainConfig(**(base | kw))


def test_rerun_resumes_from_latest_checkpoint_with_same_history(tokenized, tmp_path):
    from raychat.jobs.train.driver import run

    first = run(cfg(tokenized, tmp_path, max_steps=6, checkpoint_every=3, eval_every=2))
    second = run(cfg(tokenized, tmp_path, max_steps=12, checkpoint_every=3, eval_every=2))
    assert first["steps"] == 6 and second["steps"] == 12
    # Evaluated every 2 steps and before each checkpoint (every 3); the resumed run keeps the first's evals.
    assert [e["step"] for e in first["evals"]] == [2, 3, 4, 6]
    assert [e["step"] for e in second["evals"]] == [2, 3, 4, 6, 8, 9, 10, 12]
    assert [h["step"] for h in second["history"]] == list(range(1, 13))
    # Steps 1-6 were not re-trained: the resumed run's history starts with the first run's.
    assert [h["loss"] for h in second["history"][:6]] == [h["loss"] for h in first["history"]]
    manifest = json.loads(Path(second["manifest"]).read_text())
    assert manifest["latest"] == second["checkpoint"] and manifest["checkpoints"][-1]["step"] == 12
    assert all(c["eval_loss"] is not None for c in manifest["checkpoints"])
    best = min(manifest["checkpoints"], key=lambda c: c["eval_loss"])
    assert manifest["best"] == best["uri"]


def _kill_first_train_worker_after_checkpoint(run_dir: Path, killed: list, deadline: float) -> None:
    import psutil

    while time.time() < deadline and not killed:
        if any(run_dir.glob("checkpoint_2*")):
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
        time.sleep(0.2)


def test_killed_worker_restarts_from_checkpoint_and_finishes(tokenized, tmp_path):
    from transformers import AutoModelForCausalLM

    from raychat.jobs.train.driver import run

    killed: list = []
    watcher = threading.Thread(
        target=_kill_first_train_worker_after_checkpoint,
        args=(tmp_path / "run", killed, time.time() + 300),
        daemon=True,
    )
    watcher.start()
    summary = run(cfg(tokenized, tmp_path, max_steps=16, checkpoint_every=2, max_failures=2, async_checkpoint=False))
    watcher.join(timeout=5)
    assert killed, "the watcher never found a training worker to kill"
    assert summary["steps"] == 16
    assert [h["step"] for h in summary["history"]] == list(range(1, 17))
    model = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    assert model.config.model_type == "mistral"


def test_data_from_another_tokenizer_is_refused(tokenized, tmp_path):
    import shutil

    from raychat.core.data.tokenizer import build_embedded_tokenizer
    from raychat.core.model.hf import create_embedded_base_model
    from raychat.jobs.train.driver import run

    base = create_embedded_base_model(tmp_path / "base")
    tok = build_embedded_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    shutil.rmtree(base / "tokenizer.json", ignore_errors=True)
    tok.save_pretrained(base)
    with pytest.raises(SystemExit, match="tokenized with tokenizer 'embedded'"):
        run(cfg(tokenized, tmp_path, base_model=str(base), max_steps=1))


@pytest.mark.slow
def test_two_workers_with_zero3_accumulation_and_checkpointing_train_on_packed_steps(tokenized, tmp_path):
    from transformers import AutoModelForCausalLM

    from raychat.jobs.train.driver import run

    s = run(
        cfg(
            tokenized,
            tmp_path,
            num_workers=2,
            cpus_per_worker=0.5,
            zero_stage=3,
            grad_accum=2,
            gradient_checkpointing=True,
            max_steps=3,
            epochs=1,
        )
    )
    assert s["steps"] == 3 and [h["step"] for h in s["history"]] == [1, 2, 3]
    budget = 2 * 2 * 256  # workers × accumulation packs × batch_max_len
    for h in s["history"]:
        assert 0 < h["tokens"] <= budget
        assert h["packing_efficiency"] == pytest.approx(h["tokens"] / budget)
        assert h["grad_norm"] > 0 and h["lr"] > 0
    assert s["packing_efficiency"][0] >= 0.9
    # Every step metric reaches Prometheus under a name the dashboards know (raychat/core/common/metric_specs.py).
    from raychat.core.common.metric_specs import TRAIN_METRICS
    from raychat.jobs.train.worker import GAUGE_OF

    assert set(GAUGE_OF.values()) == {m.name for m in TRAIN_METRICS}
    assert set(GAUGE_OF) - {"eval_loss"} <= set(s["history"][-1]) and s["eval_loss"] is not None
    model = AutoModelForCausalLM.from_pretrained(s["checkpoint"], use_safetensors=True)
    assert model.config.model_type == "mistral"


@pytest.mark.slow
def test_lora_run_saves_a_merged_model_that_differs_from_the_base_and_tensorboard_events(tokenized, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("tensorboard")
    import torch
    from transformers import AutoModelForCausalLM

    from raychat.jobs.train.driver import run

    s = run(
        cfg(
            tokenized,
            tmp_path,
            lora_r=4,
            learning_rate=5e-2,
            warmup_steps=0,
            max_steps=2,
            eval_fraction=0,
            tensorboard_dir=str(tmp_path / "tb"),
            log_every=1,
        )
    )
    trained = AutoModelForCausalLM.from_pretrained(s["checkpoint"], use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(s["base_model"], use_safetensors=True)
    assert not any("lora" in k for k in trained.state_dict())
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(
        any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        for k in changed
    ), changed
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
