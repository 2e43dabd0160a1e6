"""Storage URIs: local paths, ``file://`` and ``s3://`` behind one pyarrow filesystem layer.

Ray Data and Ray Train take the same ``(filesystem, path)`` pairs, so every stage reads and
writes object storage through one code path. S3 endpoints other than AWS (MinIO, moto) are
reached by setting ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``); credentials come from
the usual AWS environment / profile / instance-role chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8)}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Maps a URI to ``(filesystem, path)``.

    ``s3://bucket/key`` → ``(S3FileSystem, "bucket/key")``; ``file:///x`` and plain paths →
    ``(LocalFileSystem, absolute path)``.

    Raises:
        ValueError: for schemes other than s3 and file.
    """
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: an s3 URI needs a bucket (s3://bucket/prefix)")
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValueError(f"{uri!r}: unsupported storage scheme {parsed.scheme!r} (use a path, file:// or s3://)")
        uri = parsed.path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def normalize(uri: str) -> str:
    """Local paths and ``file://`` URIs become absolute paths (so every Ray worker, whatever its
    working directory, sees the same place); ``s3://`` URIs are returned unchanged."""
    if is_s3(uri):
        return str(uri)
    return resolve(uri)[1]


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI, keeping its scheme."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Paths (filesystem-relative) of files under ``uri`` ending with ``suffix``, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copies a local directory tree to ``uri`` (local or s3)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


DATA_EXTENSIONS = (".jsonl", ".json", ".ndjson")
_GLOB_CHARS = "*?["


def glob_regex(pattern: str):
    """Compiles a path glob: ``*`` and ``?`` stay within one path segment, ``**`` crosses segments."""
    import re

    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1 : j].replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def expand_inputs(uris: list[str], extensions: tuple[str, ...] = DATA_EXTENSIONS) -> tuple[pafs.FileSystem, list[str]]:
    """Expands files, directories (recursively, by extension) and globs into one filesystem's file paths.

    Raises:
        FileNotFoundError: for an input that does not exist or a glob / directory that matches no file.
        ValueError: when inputs mix local and s3 storage.
    """
    if len({is_s3(u) for u in uris}) > 1:
        raise ValueError(f"inputs mix local and s3:// storage: {uris}")
    fs, out = None, []
    for uri in uris:
        fs, path = resolve(uri)
        if any(c in path for c in _GLOB_CHARS):
            first = min(path.index(c) for c in _GLOB_CHARS if c in path)
            base = path[:first].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            rx = glob_regex(path)
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File and rx.fullmatch(i.path))
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"input {uri}: not found")
            if info.type == pafs.FileType.File:
                found = [path]
            else:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = sorted(
                    i.path
                    for i in infos
                    if i.type == pafs.FileType.File
                    and i.path.endswith(extensions)
                    and not any(part.startswith(("_", ".")) for part in i.path[len(path) :].split("/"))
                )
        if not found:
            raise FileNotFoundError(f"input {uri}: matched no {'/'.join(extensions)} files")
        out += found
    return fs, list(dict.fromkeys(out))


def display_uri(fs: pafs.FileSystem, path: str) -> str:
    """A path from ``fs`` written as the user would (``s3://`` prefix for S3)."""
    # type_name is "s3" for pyarrow's S3FileSystem, and contains it for wrapped S3 filesystems.
    return f"s3://{path}" if "s3" in fs.type_name else path


def download_files(uri: str, local_dir: str | os.PathLike, names: list[str]) -> list[str]:
    """Copies the named files that exist directly under ``uri`` into ``local_dir``; returns those copied."""
    fs, path = resolve(uri)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        src = f"{path}/{name}"
        if fs.get_file_info(src).type == pafs.FileType.File:
            with fs.open_input_stream(src) as f:
                (local / name).write_bytes(f.read())
            copied.append(name)
    return copied
