"""A training run's layout without training: HF checkpoints, trainer state and the manifest, written by run_dir."""

from __future__ import annotations

from pathlib import Path

from raychat.core import run_dir
from raychat.core.common import storage


def write_run(run_uri: str, checkpoints: list[tuple[Path, int, float]]) -> dict:
    """Uploads ``(model_dir, step, eval_loss)`` checkpoints under ``run_uri`` (with a DeepSpeed-like
    ``training_state/`` and ``trainer_state.json``) and writes the manifest; returns it."""
    entries = []
    for model_dir, step, eval_loss in checkpoints:
        uri = storage.join(run_uri, f"checkpoint_step{step:05d}")
        storage.upload_dir(model_dir, uri)
        entry = run_dir.CheckpointEntry(uri=uri, step=step, epoch=0, loss=eval_loss + 0.1, eval_loss=eval_loss)
        run_dir.write_trainer_state(uri, run_dir.TrainerState(step=step), {"step": step, "eval_loss": eval_loss})
        storage.write_text(storage.join(uri, run_dir.TRAINING_STATE_DIR, "zero_pp_rank_0_optim_states.pt"), "x" * 4096)
        entries.append(entry)
    return run_dir.write_manifest(run_uri, entries)
