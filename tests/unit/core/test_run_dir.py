"""The train → serve contract: manifest and trainer state as training writes them, best/latest as serving reads them."""

import json
import math

import pytest

from raychat.core import run_dir
from raychat.core.run_dir import CheckpointEntry, CheckpointError, TrainerState, resolve_checkpoint


def test_run_uri_resolves_to_best_by_eval_loss_or_latest(s3_run):
    best = resolve_checkpoint(s3_run["run"], "best")
    latest = resolve_checkpoint(s3_run["run"], "latest")
    assert (best.uri, best.step, best.eval_loss, best.selected) == (s3_run["checkpoints"][0]["uri"], 10, 5.0, "best")
    assert (latest.uri, latest.step, latest.eval_loss) == (s3_run["checkpoints"][1]["uri"], 20, 6.0)
    assert best.run == latest.run == s3_run["run"]


def test_explicit_checkpoint_uri_finds_its_step_and_eval_loss_in_the_run(s3_run):
    ref = resolve_checkpoint(s3_run["checkpoints"][1]["uri"])
    assert (ref.step, ref.eval_loss, ref.run, ref.selected) == (20, 6.0, s3_run["run"], None)


def test_missing_uri_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(str(tmp_path / "nothing"))


def test_manifest_lists_checkpoints_by_step_best_by_lowest_finite_eval_loss(tmp_path):
    run = str(tmp_path / "run")
    entries = [
        CheckpointEntry(uri=f"{run}/c3", step=30, epoch=1, loss=0.5, eval_loss=math.nan),
        CheckpointEntry(uri=f"{run}/c1", step=10, epoch=0, loss=0.9, eval_loss=2.0),
        CheckpointEntry(uri=f"{run}/c2", step=20, epoch=1, loss=0.7, eval_loss=1.5),
    ]
    written = run_dir.write_manifest(run, entries)
    assert run_dir.read_manifest(run) == json.loads(json.dumps(written))
    assert [e["step"] for e in written["checkpoints"]] == [10, 20, 30]
    assert set(written["checkpoints"][0]) == {"uri", "step", "epoch", "loss", "eval_loss"}
    assert (written["run"], written["latest"], written["best"]) == (run, f"{run}/c3", f"{run}/c2")


def test_manifest_without_eval_loss_serves_latest_as_best(tmp_path):
    entries = [CheckpointEntry(uri="a", step=1), CheckpointEntry(uri="b", step=2)]
    manifest = run_dir.build_manifest(str(tmp_path), entries)
    assert manifest["best"] == manifest["latest"] == "b"
    assert run_dir.build_manifest(str(tmp_path), [])["latest"] is None
    assert run_dir.read_manifest(str(tmp_path / "none")) is None


def test_trainer_state_round_trips_and_reads_checkpoints_written_before_the_dataclass(tmp_path):
    # trainer_state.json exactly as the training job wrote it before TrainerState existed.
    old = {
        "metrics": {"step": 6, "epoch": 1, "loss": 1.25, "tokens_per_s": 10.0, "eval_loss": 1.5},
        "state": {
            "step": 6,
            "epoch": 1,
            "plan": {"rows": 86, "num_workers": 1, "batch_max_len": 256, "grad_accum": 1, "seed": 0},
            "history": [{"step": s, "loss": 2.0 - s / 10} for s in range(1, 7)],
            "evals": [{"step": 6, "eval_loss": 1.5}],
        },
    }
    (tmp_path / run_dir.TRAINER_STATE).write_text(json.dumps(old))
    state, metrics = run_dir.read_trainer_state(str(tmp_path))
    assert (state.step, state.epoch, state.plan, metrics) == (6, 1, old["state"]["plan"], old["metrics"])
    assert state.to_dict() == old["state"]  # same keys, same content: resuming old checkpoints keeps working
    again = tmp_path / "again"
    run_dir.write_trainer_state(str(again), state, metrics)
    assert json.loads((again / run_dir.TRAINER_STATE).read_text()) == old
    with pytest.raises(FileNotFoundError):
        run_dir.read_trainer_state(str(tmp_path / "missing"))


def test_trainer_state_counts_epochs_at_their_last_step():
    state = TrainerState()
    epochs = []
    for _ in range(7):
        state.advance(epoch_ends=[3, 5, 7])
        epochs.append(state.epoch)
    assert (state.step, epochs) == (7, [0, 0, 1, 1, 2, 2, 3])
    assert TrainerState.from_dict({}).to_dict() == {"step": 0, "epoch": 0, "plan": None, "history": [], "evals": []}


def test_explicit_checkpoint_outside_a_run_takes_its_step_from_the_trainer_state(tiny_model_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "checkpoint_000002"
    shutil.copytree(tiny_model_dir, ckpt)
    run_dir.write_trainer_state(str(ckpt), TrainerState(step=7, epoch=1), {"step": 7, "loss": 1.0})
    ref = resolve_checkpoint(str(ckpt))
    assert (ref.uri, ref.step, ref.run, ref.eval_loss) == (str(ckpt), 7, None, None)
