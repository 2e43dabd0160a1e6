"""The train → serve contract: a training run directory, as training writes it and serving reads it (Ray-free).

::

    <output>/<name>/                 the run (``run_uri``)
        manifest.json                MANIFEST: every kept checkpoint, plus "best" and "latest"
        base_model/                  BASE_MODEL_DIR: the embedded tiny base model, when no --base-model
        checkpoint_<n>/              one per kept checkpoint (named by Ray Train)
            *.safetensors, config.json, tokenizer files, generation_config.json   an HF model directory
            trainer_state.json       TRAINER_STATE: {"metrics": {...}, "state": TrainerState}
            training_state/state/    TRAINING_STATE_DIR / DS_TAG: DeepSpeed's optimizer/scheduler shards

``manifest.json`` is ``{"run", "checkpoints": [{"uri", "step", "epoch", "loss", "eval_loss"}...],
"latest", "best"}``: ``latest`` is the highest step, ``best`` the lowest finite eval loss (``latest``
when no checkpoint has one). :func:`resolve_checkpoint` maps a run or checkpoint URI to the one to serve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from raychat.core.common import storage

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
DS_TAG = "state"
BASE_MODEL_DIR = "base_model"

Select = Literal["best", "latest"]


@dataclass(frozen=True)
class CheckpointEntry:
    """One kept checkpoint of a run, as listed in the manifest.

    Attributes:
        uri: the checkpoint directory.
        step: optimizer step it was saved at.
        epoch: epochs completed at that step.
        loss: training loss of the last step before it.
        eval_loss: weighted held-out loss at that step, or None without eval.
    """

    uri: str
    step: int
    epoch: int | None = None
    loss: float | None = None
    eval_loss: float | None = None


def build_manifest(run_uri: str, checkpoints: list[CheckpointEntry]) -> dict:
    """The manifest of a run: its checkpoints by step, ``latest`` (highest step) and ``best`` (lowest eval loss)."""
    entries = [asdict(c) for c in sorted(checkpoints, key=lambda c: c.step)]
    latest = entries[-1]["uri"] if entries else None
    scored = [e for e in entries if e["eval_loss"] is not None and math.isfinite(e["eval_loss"])]
    best = min(scored, key=lambda e: e["eval_loss"])["uri"] if scored else latest
    return {"run": run_uri, "checkpoints": entries, "latest": latest, "best": best}


def write_manifest(run_uri: str, checkpoints: list[CheckpointEntry]) -> dict:
    """Writes ``<run_uri>/manifest.json`` (local or ``s3://``) and returns it."""
    manifest = build_manifest(run_uri, checkpoints)
    storage.write_text(storage.join(run_uri, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def read_manifest(run_uri: str) -> dict | None:
    """The run's manifest, or None when ``run_uri`` holds none."""
    uri = storage.join(run_uri, MANIFEST)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


@dataclass
class TrainerState:
    """What a checkpoint records of the training loop, besides DeepSpeed's own state.

    Attributes:
        step: optimizer steps done (the data position: resuming skips the packs of earlier steps).
        epoch: epochs completed.
        plan: the data plan's signature; resuming needs the same (rows, workers, lengths, seed).
        history: one record per optimizer step (loss, lr, grad norm, tokens, ...).
        evals: ``{"step", "eval_loss"}`` per evaluation.
    """

    step: int = 0
    epoch: int = 0
    plan: dict | None = None
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def advance(self, epoch_ends: list[int]) -> None:
        """Counts one optimizer step, and the epochs it completes (``epoch_ends``: cumulative steps)."""
        self.step += 1
        while self.epoch < len(epoch_ends) and self.step >= epoch_ends[self.epoch]:
            self.epoch += 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        return cls(
            step=d.get("step", 0),
            epoch=d.get("epoch", 0),
            plan=d.get("plan"),
            history=list(d.get("history", [])),
            evals=list(d.get("evals", [])),
        )


def write_trainer_state(checkpoint_uri: str | os.PathLike, state: TrainerState, metrics: dict) -> None:
    """Writes ``trainer_state.json`` (the state and the metrics reported with it) into a checkpoint directory."""
    text = json.dumps({"metrics": metrics, "state": state.to_dict()})
    storage.write_text(storage.join(str(checkpoint_uri), TRAINER_STATE), text)


def read_trainer_state(checkpoint_uri: str | os.PathLike) -> tuple[TrainerState, dict]:
    """The state and the metrics reported with a checkpoint (local or ``s3://``).

    Raises:
        FileNotFoundError: when the checkpoint has no ``trainer_state.json``.
    """
    uri = storage.join(str(checkpoint_uri), TRAINER_STATE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no such file")
    raw = json.loads(storage.read_text(uri))
    return TrainerState.from_dict(raw.get("state", {})), raw.get("metrics", {})


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint and where it came from (shown in ``/v1/models``).

    Attributes:
        uri: the checkpoint directory.
        run: the training run's directory, when known.
        selected: ``best``/``latest`` when picked from a run manifest, else None (explicit URI).
        step: optimizer step of the checkpoint, when known.
        eval_loss: weighted held-out loss at that step, when known.
    """

    uri: str
    run: str | None = None
    selected: str | None = None
    step: int | None = None
    eval_loss: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class CheckpointError(ValueError):
    """The URI does not name a servable checkpoint (missing, no safetensors, corrupt)."""


def _entry_for(manifest: dict, uri: str) -> dict:
    for e in manifest.get("checkpoints", []):
        if e.get("uri", "").rstrip("/") == uri.rstrip("/"):
            return e
    return {}


def resolve_checkpoint(uri: str, select: Select = "best") -> CheckpointRef:
    """Maps a checkpoint or run URI to the checkpoint to serve.

    Args:
        uri: a checkpoint directory or a run directory with ``manifest.json`` (local or ``s3://``).
        select: for a run, ``best`` (lowest eval loss) or ``latest``.

    Raises:
        CheckpointError: when the run's manifest names no checkpoint, or the URI is neither.
    """
    uri = storage.normalize(uri).rstrip("/")
    manifest = read_manifest(uri)
    if manifest is not None:
        chosen = manifest.get(select)
        if not chosen:
            raise CheckpointError(
                f"{storage.join(uri, MANIFEST)}: names no {select!r} checkpoint (no checkpoint was kept yet?)"
            )
        e = _entry_for(manifest, chosen)
        return CheckpointRef(
            uri=chosen, run=manifest.get("run", uri), selected=select, step=e.get("step"), eval_loss=e.get("eval_loss")
        )
    if not storage.exists(uri):
        raise CheckpointError(f"{uri}: no such checkpoint or run directory")
    # An explicit checkpoint: its step from trainer_state.json, its eval loss from the run's manifest.
    step, eval_loss, run = None, None, None
    with contextlib.suppress(FileNotFoundError):
        step = read_trainer_state(uri)[0].step
    parent = uri.rsplit("/", 1)[0]
    parent_manifest = read_manifest(parent)
    if parent_manifest is not None:
        e = _entry_for(parent_manifest, uri)
        if e:
            run, step, eval_loss = parent_manifest.get("run", parent), e.get("step", step), e.get("eval_loss")
    return CheckpointRef(uri=uri, run=run, step=step, eval_loss=eval_loss)
