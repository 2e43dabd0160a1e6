"""A verified node-local copy of a checkpoint to serve (Ray-free), on the one node cache.

Which checkpoint to serve (a run's ``best`` or ``latest``) is :mod:`raychat.core.run_dir`'s.
``s3://`` checkpoints are copied once per node by :mod:`raychat.core.common.node_cache` (one
lock, one completion marker, shared with training's base-model copies); only the files serving
needs are fetched (never DeepSpeed's ``training_state/``), their sizes are checked against the
listing and every safetensors header is parsed before the copy is marked complete and on every
reuse. Weights are only ever loaded from safetensors, never from pickle files.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from raychat.core.common import node_cache, storage
from raychat.core.run_dir import TRAINING_STATE_DIR, CheckpointError

# Not needed to serve (training state, optimizer shards) or never loaded (pickles).
_SKIP_DIRS = (f"{TRAINING_STATE_DIR}/",)
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_serving_file(rel: str) -> bool:
    """Whether serving needs the file at ``rel`` (relative to the checkpoint): no training state, no pickles."""
    return not (rel.startswith(_SKIP_DIRS) or rel.endswith(_SKIP_SUFFIXES) or rel.startswith("."))


def serving_files(uri: str) -> dict[str, int]:
    """Files under ``uri`` that serving needs: relative path → size (no training state, no pickles)."""
    return {rel: size for rel, size in node_cache.list_sizes(uri).items() if is_serving_file(rel)}


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

    Local checkpoints are verified in place. ``s3://`` ones are copied once per node into the node
    cache (``cache_root/<hash of uri>``, see :mod:`raychat.core.common.node_cache`); a complete copy
    is verified and reused, also when training copied the same URI as its base model.

    Raises:
        CheckpointError: when the checkpoint is missing, has no safetensors weights or is corrupt.
    """
    try:
        return node_cache.local_or_download(uri, cache_root, keep=is_serving_file, verify=verify_checkpoint_dir)
    except FileNotFoundError:
        detail = "no such checkpoint (nothing to download)" if storage.is_s3(uri) else "no such directory"
        raise CheckpointError(f"{uri}: {detail}") from None
    except node_cache.IncompleteCopy as e:
        raise CheckpointError(str(e)) from None
