"""The node cache: one local copy per ``s3://`` directory and node, shared by training and serving.

A URI is copied once into ``<cache_root>/<sha256(uri)[:16]>``, under a file lock
(``<key>.lock``: concurrent processes on one node wait for the first download instead of
repeating it), into a temporary directory renamed into place once complete, and is then marked
complete by ``.raychat-complete.json``. The marker records the source listing at download time:
the files copied (relative path → size) and those a caller's ``keep`` filter left out. So a
later caller that wants more (training wants a served model's every file) downloads only what
is missing, never deletes a complete copy another process may be reading, and a caller that
wants less (serving a cached base model) reuses the copy without touching the source.

Callers may pass ``keep`` (which relative paths to copy) and ``verify`` (checks a local copy,
e.g. safetensors headers; run before a copy is marked complete and on every reuse).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

from raychat.core.common import storage

#: The default cache folder on a node (base models for training, checkpoints for serving).
MODEL_CACHE = "/tmp/raychat/models"
COMPLETE_MARKER = ".raychat-complete.json"

#: ``keep(relative_path) -> bool``: which files of the source to copy.
Keep = Callable[[str], bool]
#: ``verify(local_dir, expected_sizes)``: raises when the copy is unusable.
Verify = Callable[[Path, dict[str, int]], None]


class IncompleteCopy(OSError):
    """A downloaded file's size differs from the source listing (the source changed while copying?)."""


_CHUNK = 16 << 20
_PARALLEL_FILES = 8


def cache_key(uri: str) -> str:
    """The cache entry name of ``uri``."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def list_sizes(uri: str) -> dict[str, int]:
    """Every file under ``uri``: relative path → size (empty when there is no such directory)."""
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) :].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def local_or_download(
    uri: str, cache_root: str | os.PathLike, keep: Keep | None = None, verify: Verify | None = None
) -> Path:
    """A local directory holding ``uri``: the path itself when local, else this node's cached copy.

    Args:
        uri: a local path, ``file://`` or ``s3://`` directory.
        cache_root: the node's cache folder.
        keep: which relative paths to copy (default: all).
        verify: checks the directory (local: in place; s3: the copy, before it is marked
            complete and on every reuse) and raises when it is unusable.

    Raises:
        FileNotFoundError: when there is no such directory, or ``keep`` leaves nothing to copy.
        IncompleteCopy: when a downloaded file's size differs from the listing.
    """
    if not storage.is_s3(uri):
        _, path = storage.resolve(uri)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        if verify is not None:
            verify(Path(path), {})
        return Path(path)
    from filelock import FileLock

    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(uri)
    dest = root / key
    with FileLock(str(root / f"{key}.lock")):
        entry = _read_marker(dest, uri)
        if entry is None:
            _download_fresh(uri, root, key, keep, verify)
        else:
            _top_up(uri, root, key, entry, keep, verify)
    return dest


def _read_marker(dest: Path, uri: str) -> dict | None:
    try:
        entry = json.loads((dest / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return entry if entry.get("uri") == uri else None


def _write_marker(directory: Path, uri: str, files: dict[str, int], skipped: dict[str, int]) -> None:
    tmp = directory / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"uri": uri, "files": files, "skipped": skipped}))
    os.replace(tmp, directory / COMPLETE_MARKER)


def _split(listing: dict[str, int], keep: Keep | None) -> tuple[dict[str, int], dict[str, int]]:
    listing = {r: s for r, s in listing.items() if r != COMPLETE_MARKER}
    wanted = {r: s for r, s in listing.items() if keep is None or keep(r)}
    return wanted, {r: s for r, s in listing.items() if r not in wanted}


def _download_fresh(uri: str, root: Path, key: str, keep: Keep | None, verify: Verify | None) -> None:
    """No complete copy yet: download into a temporary directory, check it, rename it into place."""
    wanted, skipped = _split(list_sizes(uri), keep)
    if not wanted:
        raise FileNotFoundError(f"{uri}: no such directory (nothing to download)")
    dest, tmp = root / key, root / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _download(uri, wanted, tmp)
        if verify is not None:
            verify(tmp, wanted)
        _write_marker(tmp, uri, wanted, skipped)
        # Only a crashed download's partial copy (no marker) can be here: a complete one is never replaced.
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _top_up(uri: str, root: Path, key: str, entry: dict, keep: Keep | None, verify: Verify | None) -> None:
    """A complete copy exists: fetch only the files this caller wants that it lacks, in place."""
    dest = root / key
    have: dict[str, int] = entry["files"]
    wanted, _ = _split({**entry.get("skipped", {}), **have}, keep)
    missing = {r: s for r, s in wanted.items() if r not in have}
    if missing:
        tmp = root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _download(uri, missing, tmp)
            for rel in missing:  # new files only: nothing a reader of the copy uses changes
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, dest / rel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        have = {**have, **missing}
        _write_marker(dest, uri, have, {r: s for r, s in entry.get("skipped", {}).items() if r not in have})
    if verify is not None:
        verify(dest, wanted)


def _download(uri: str, files: dict[str, int], into: Path) -> None:
    fs, src_root = storage.resolve(uri)

    def fetch(rel: str) -> None:
        if rel.startswith("/") or ".." in rel.split("/"):  # object keys are not to be trusted
            raise ValueError(f"{uri}: refusing {rel!r}, which resolves outside the copy")
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{src_root}/{rel}") as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        if target.stat().st_size != files[rel]:
            raise IncompleteCopy(
                f"{uri}/{rel}: downloaded {target.stat().st_size} bytes, the listing says {files[rel]}"
            )

    with ThreadPoolExecutor(max_workers=min(_PARALLEL_FILES, len(files))) as pool:
        list(pool.map(fetch, files))
