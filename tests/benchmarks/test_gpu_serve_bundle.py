"""benchmarks/gpu_serve_bundle.py: what goes into the Ray Serve bundle for a GPU machine without Ray."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from benchmarks import gpu_serve_bundle as b

ROOT = Path(__file__).resolve().parents[2]
KINDS_MD = Path("/work/.library/device/KINDS.md")  # the device tool's list; absent in CI


def test_every_bundled_distribution_is_pinned_to_the_version_tested_here():
    import importlib.metadata as md

    pins = b.pinned()
    assert len(pins) == len(b.DISTS) and all(p == f"{d}=={md.version(d)}" for p, d in zip(pins, b.DISTS))
    assert {"ray==", "fastapi==", "pydantic==", "openai=="} <= {p.split("==")[0] + "==" for p in pins}


def test_ray_parts_serving_never_imports_and_tests_are_left_out():
    for name in (
        "ray/jars/ray_dist.jar",
        "ray/rllib/algorithms/ppo.py",
        "ray/data/dataset.py",
        "ray/dashboard/client/build/index.html",
        "pydantic/tests/test_x.py",
        "tests/test_top_level.py",
        "ray/serve/__pycache__/api.cpython-312.pyc",
    ):
        assert b.skipped(name), name
    for name in (
        "ray/serve/api.py",
        "ray/_raylet.so",
        "ray/core/src/ray/raylet/raylet",
        "ray/dashboard/agent.py",
        "ray/train/__init__.py",
        "fastapi/routing.py",
    ):
        assert not b.skipped(name), name


def test_serve_side_imports_of_the_benchmark_are_in_the_bundle_or_on_the_gpu_machine():
    """What the bundled packages require (Ray with its `serve` extra) must be bundled or be one of the
    lent machine's own packages (MACHINE, from KINDS.md): a module missing there costs a device call."""
    needed = {
        canonicalize_name(req.name)
        for dist, (_, requires) in b.installed().items()
        for req in b.requirements(dist, requires, b.machine_env("3.12"))
    }
    optional = {"opencensus", "smart-open", "virtualenv", "py-spy", "watchfiles"}  # Serve runs without them
    missing = needed - {canonicalize_name(d) for d in b.DISTS} - set(b.MACHINE) - optional
    assert not missing, f"neither bundled nor on the GPU machine: {sorted(missing)}"


def test_the_bundled_packages_requirements_hold_with_the_gpu_machines_versions():
    """Each bundled package's Requires-Dist (for the machine: CPython 3.12 on Linux) on a package the
    bundle leaves out because the machine has it must accept the machine's version there (MACHINE,
    copied from KINDS.md), and one on a bundled package the bundled version. On the H200 (issue #23) its
    grpcio 1.84 was older than grpcio-reflection 1.85.1's grpcio>=1.85.1, whose generated stubs
    refuse it at import: `import ray.serve` failed there. The bundled versions are this venv's
    (``pinned``), so this venv's metadata is the bundled wheels' (the build checks those too)."""
    bad = b.conflicts(b.installed(), b.MACHINE, b.machine_env("3.12"))
    assert not bad, "\n".join(["bundled requirements the GPU machine's packages do not meet:", *bad])


def test_conflicts_reads_markers_extras_and_unknown_versions():
    env = b.machine_env("3.12")
    reflection = {"grpcio-reflection": ("1.85.1", ["grpcio>=1.85.1", "protobuf<8.0.0,>=7.35.1"])}
    machine = {"grpcio": "1.84", "protobuf": None}
    assert b.conflicts(reflection, machine, env) == [
        "grpcio-reflection 1.85.1 requires grpcio>=1.85.1, but the GPU machine's (the bundle leaves it out) is 1.84"
    ]
    assert b.conflicts({**reflection, "grpcio": ("1.85.4", ["typing-extensions~=4.12"])}, machine, env) == []
    ray = {
        "ray": (
            "2.60.0",
            [
                'grpcio>=1.42.0; extra == "serve"',
                'numpy>=9; extra == "data"',
                'aiohttp>=9; python_version < "3.10"',
                "msgpack<2.0.0,>=1.0.0",
            ],
        )
    }
    assert b.conflicts(ray, {"grpcio": "1.41", "numpy": "2.5.2", "aiohttp": "3.0", "msgpack": "2.0"}, env) == [
        "ray 2.60.0 requires grpcio>=1.42.0, but the GPU machine's (the bundle leaves it out) is 1.41",
        "ray 2.60.0 requires msgpack<2.0.0,>=1.0.0, but the GPU machine's (the bundle leaves it out) is 2.0",
    ]
    beta = {"opentelemetry-sdk": ("1.45.2", ["opentelemetry-semantic-conventions==0.66b2"])}
    assert b.conflicts({**beta, "opentelemetry-semantic-conventions": ("0.66b2", [])}, {}, env) == []


def test_grpcio_is_bundled_at_a_version_its_bundled_stubs_accept():
    pins = dict(p.split("==") for p in b.pinned())
    assert "grpcio" in pins
    for dist in (d for d in b.DISTS if d.startswith("grpcio-")):
        for req in b.requirements(dist, md.requires(dist) or [], b.machine_env("3.12")):
            if req.name == "grpcio":
                assert req.specifier.contains(pins["grpcio"]), f"{dist} requires {req}, bundled grpcio {pins['grpcio']}"


@pytest.mark.skipif(not KINDS_MD.is_file(), reason="the device tool's KINDS.md is not readable here (CI)")
def test_the_machine_record_matches_the_device_tools_package_list():
    text = KINDS_MD.read_text()
    there = re.search(r"## Python packages already there\n.*?Packages: (.*?)\.\n", text, re.S)
    assert there, "KINDS.md: no 'Python packages already there' list"
    names = {n.strip().lower() for n in there[1].split(",")}
    assert set(b.MACHINE) <= names, f"not in KINDS.md's list any more: {sorted(set(b.MACHINE) - names)}"
    versions = dict(
        re.findall(r"([A-Za-z0-9_.-]+) (\d[\w.+]*)(?:,|\s\|)", " ".join(re.findall(r"\| pip list.*", text)))
    )
    versions = {n.lower().replace("_", "-"): v for n, v in versions.items()}
    assert versions.get("numpy"), "KINDS.md's pip list row gives no numpy version any more"
    stale = {n: (v, versions[n]) for n, v in b.MACHINE.items() if v and n in versions and versions[n] != v}
    assert not stale, f"MACHINE vs KINDS.md's pip list: {stale}"


def _fake_wheel(path: Path, name: str, version: str, requires: list[str]) -> Path:
    whl = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/tests/test_it.py", "")
        meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(
            f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}"
        )
    return whl


def _unpack(tmp_path: Path, wheels: list[Path]) -> Path:
    metas = [b.wheel_metadata(w) for w in wheels]
    manifest = {"python": "3.12", "dists": {n: {"version": v, "requires_dist": r} for n, v, r in metas}}
    tmp_path.mkdir()
    out = tmp_path / "bundle.tar.xz"
    b.build(wheels, out, manifest)
    site = tmp_path / "site"
    with tarfile.open(out) as tar:
        tar.extractall(site, filter="tar")
    return site


def _check(site: Path) -> subprocess.CompletedProcess:
    # As gpu_session.sh runs it: the repository, then the bundle, ahead of site-packages.
    env = {"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "benchmarks.gpu_serve_bundle", "--check", str(site)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_tarball_carries_the_bundled_requirements_and_the_machine_side_check_reads_them(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    ok = _fake_wheel(wheels, "fakeserve", "1.0", ["packaging>=20", 'nosuchpkg; extra == "x"'])
    site = _unpack(tmp_path / "a", [ok])
    assert json.loads((site / b.MANIFEST).read_text())["dists"] == {
        "fakeserve": {"version": "1.0", "requires_dist": ["packaging>=20", 'nosuchpkg; extra == "x"']}
    }
    assert (site / "fakeserve/__init__.py").is_file() and not (site / "fakeserve/tests").exists()
    proc = _check(site)
    assert proc.returncode == 0 and "1 bundled packages, OK" in proc.stdout, proc.stdout + proc.stderr
    assert f"packaging {md.version('packaging')}" in proc.stdout

    # A requirement that the machine's own package misses; then a bundled package (by the manifest)
    # whose copy on sys.path is not the bundle's: this venv's packaging stands for the machine's.
    too_new = _fake_wheel(wheels, "fakeclient", "2.0", ["packaging>=999"])
    site = _unpack(tmp_path / "b", [ok, too_new])
    proc = _check(site)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "fakeclient 2.0 requires packaging>=999, but the GPU machine's (the bundle leaves it out) is "
        f"{md.version('packaging')}" in proc.stdout
    )
    manifest = json.loads((site / b.MANIFEST).read_text())
    manifest["dists"]["packaging"] = {"version": "0.1", "requires_dist": []}
    (site / b.MANIFEST).write_text(json.dumps(manifest))
    proc = _check(site)
    assert re.search(r"packaging: \S+ from .* comes before the bundle's 0\.1 on sys\.path", proc.stdout), proc.stdout
