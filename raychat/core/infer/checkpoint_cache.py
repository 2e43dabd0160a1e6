"""Which checkpoint to serve, and a verified node-local copy of it (Ray-free).

A URI is either a checkpoint directory (an HF model directory) or a training run directory
holding ``manifest.json`` (written by ``raychat.jobs.train``): ``{"run", "checkpoints": [{"uri", "step",
"epoch", "loss", "eval_loss"}...], "latest", "best"}``; for a run, ``select`` picks ``best``
(lowest eval loss) or ``latest``.

``s3://`` checkpoints are downloaded once per node into a cache directory under a file lock
(concurrent replicas on one node wait for the first download instead of repeating it); only
the files serving needs are fetched (never DeepSpeed's ``training_state/``), their sizes are
checked against the listing and every safetensors header is parsed before the copy is marked
complete. Weights are only ever loaded from safetensors, never from pickle files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs

from raychat.core.common import storage

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = ".raychat-complete.json"
# Not needed to serve (training state, optimizer shards) or never loaded (pickles).
_SKIP_DIRS = ("training_state/",)
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

Select = Literal["best", "latest"]


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
    manifest_uri = storage.join(uri, MANIFEST)
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_text(manifest_uri))
        chosen = manifest.get(select)
        if not chosen:
            raise CheckpointError(f"{manifest_uri}: names no {select!r} checkpoint (no checkpoint was kept yet?)")
        e = _entry_for(manifest, chosen)
        return CheckpointRef(
            uri=chosen, run=manifest.get("run", uri), selected=select, step=e.get("step"), eval_loss=e.get("eval_loss")
        )
    if not storage.exists(uri):
        raise CheckpointError(f"{uri}: no such checkpoint or run directory")
    # An explicit checkpoint: its step from trainer_state.json, its eval loss from the run's manifest.
    step, eval_loss, run = None, None, None
    state_uri = storage.join(uri, TRAINER_STATE)
    if storage.exists(state_uri):
        step = json.loads(storage.read_text(state_uri)).get("step")
    parent = uri.rsplit("/", 1)[0]
    if storage.exists(storage.join(parent, MANIFEST)):
        manifest = json.loads(storage.read_text(storage.join(parent, MANIFEST)))
        e = _entry_for(manifest, uri)
        if e:
            run, step, eval_loss = manifest.get("run", parent), e.get("step", step), e.get("eval_loss")
    return CheckpointRef(uri=uri, run=run, step=step, eval_loss=eval_loss)


def serving_files(uri: str) -> dict[str, int]:
    """Files under ``uri`` that serving needs: relative path → size (no training state, no pickles)."""
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        if rel.startswith(_SKIP_DIRS) or rel.endswith(_SKIP_SUFFIXES) or rel.startswith("."):
            continue
        out[rel] = info.size
    return out


def check_safetensors(path: Path) -> None:
    """Parses a safetensors header and checks the tensors' byte ranges fill the file exactly.

    Raises:
        CheckpointError: on a truncated or corrupt file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: {size} bytes, but its header describes {8 + n + end} (truncated or corrupt)")


def verify_checkpoint_dir(path: Path, expected: dict[str, int] | None = None) -> None:
    """Checks a local checkpoint: config present, safetensors weights that parse, expected sizes.

    Raises:
        CheckpointError: naming what is wrong.
    """
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no *.safetensors weights (pickle checkpoints are never loaded)")
    for rel, size in (expected or {}).items():
        got = (path / rel).stat().st_size if (path / rel).is_file() else None
        if got != size:
            raise CheckpointError(f"{path / rel}: {got} bytes, the source lists {size}")
    for w in weights:
        check_safetensors(w)


def fetch_checkpoint(uri: str, cache_root: str | os.PathLike) -> Path:
    """A verified local directory with the checkpoint at ``uri``.

    Local checkpoints are verified in place. ``s3://`` ones are downloaded once per node into
    ``cache_root/<hash of uri>`` under a file lock; a complete, verified copy is reused.

    Raises:
        CheckpointError: when the checkpoint is missing, has no safetensors weights or is corrupt.
    """
    from filelock import FileLock

    if not storage.is_s3(uri):
        _, path = storage.resolve(uri)
        if not Path(path).is_dir():
            raise CheckpointError(f"{uri}: no such directory")
        verify_checkpoint_dir(Path(path))
        return Path(path)
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = root / key
    with FileLock(str(root / f"{key}.lock")):
        marker = dest / COMPLETE_MARKER
        if marker.is_file():
            return dest
        files = serving_files(uri)
        if not files:
            raise CheckpointError(f"{uri}: no such checkpoint (nothing to download)")
        shutil.rmtree(dest, ignore_errors=True)  # a partial copy from a crashed download
        tmp = root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fs, src_root = storage.resolve(uri)
        for rel in files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{src_root}/{rel}") as src, open(target, "wb") as out:
                while chunk := src.read(16 << 20):
                    out.write(chunk)
        verify_checkpoint_dir(tmp, files)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"uri": uri, "files": files}))
        tmp.rename(dest)
    return dest
