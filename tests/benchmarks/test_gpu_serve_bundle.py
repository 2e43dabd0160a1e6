"""benchmarks/gpu_serve_bundle.py: what goes into the Ray Serve bundle for a GPU machine without Ray."""

from __future__ import annotations

from benchmarks import gpu_serve_bundle as b


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
    """What serve_load.py's Serve run imports beyond torch/transformers must be bundled (or be one of
    the lent machine's own packages, KINDS.md): a module missing there costs a device call."""
    on_gpu_box = {
        "aiohttp",
        "grpcio",
        "protobuf",
        "msgpack",
        "click",
        "filelock",
        "pyyaml",
        "requests",
        "numpy",
        "packaging",
        "pyarrow",
        "psutil",
        "jinja2",
        "h11",
        "anyio",
        "idna",
        "certifi",
        "prometheus-client",
        "attrs",
        "uvloop",
        "annotated-doc",
        "pytest",
    }
    import importlib.metadata as md

    needed = set()
    for dist in ("ray", "fastapi", "openai", "uvicorn", "pydantic", "starlette"):
        for req in md.requires(dist) or []:
            if "extra ==" in req and not (dist == "ray" and 'extra == "serve"' in req):
                continue
            name = (
                req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()
            )
            needed.add(name.replace("_", "-"))
    optional = {"opencensus", "smart-open", "virtualenv", "py-spy", "watchfiles"}  # Serve runs without them
    missing = needed - {d.lower() for d in b.DISTS} - on_gpu_box - optional
    assert not missing, f"neither bundled nor on the GPU machine: {sorted(missing)}"
