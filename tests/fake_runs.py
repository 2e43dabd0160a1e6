"""A training run's layout without training: HF checkpoints + manifest.json as raychat.jobs.train writes them."""

from __future__ import annotations

import json
from pathlib import Path

from raychat.core.common import storage


def write_run(run_uri: str, checkpoints: list[tuple[Path, int, float]]) -> dict:
    """Uploads ``(model_dir, step, eval_loss)`` checkpoints under ``run_uri`` (with a DeepSpeed-like
    ``training_state/`` and ``trainer_state.json``) and writes the manifest; returns it."""
    entries = []
    for model_dir, step, eval_loss in checkpoints:
        uri = storage.join(run_uri, f"checkpoint_step{step:05d}")
        storage.upload_dir(model_dir, uri)
        storage.write_text(storage.join(uri, "trainer_state.json"), json.dumps({"step": step, "epoch": 0}))
        storage.write_text(storage.join(uri, "training_state", "zero_pp_rank_0_optim_states.pt"), "x" * 4096)
        entries.append({"uri": uri, "step": step, "epoch": 0, "loss": eval_loss + 0.1, "eval_loss": eval_loss})
    best = min(entries, key=lambda e: e["eval_loss"])["uri"]
    manifest = {"run": run_uri, "checkpoints": entries, "latest": entries[-1]["uri"], "best": best}
    storage.write_text(storage.join(run_uri, "manifest.json"), json.dumps(manifest))
    return manifest
