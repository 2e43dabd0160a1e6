"""The GPU-side scripts run where a lent GPU machine has torch and transformers but none of Ray,
DeepSpeed, pydantic, boto3 or mistral-common (see benchmarks/gpu_session.sh).

Each script runs on the CPU in a child Python that does not see those packages: ``python -S`` with
a copy of this venv's site-packages made of links, minus them (their import names and their
metadata, so transformers' availability checks see them missing too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Distributions missing on the lent GPU machine (device tool's package list), by normalised name.
MISSING = {
    "ray",
    "deepspeed",
    "pydantic",
    "pydantic_core",
    "boto3",
    "botocore",
    "s3transfer",
    "mistral_common",
    "openai",
    "fastapi",
    "starlette",
    "uvicorn",
    "moto",
}


def _normalised(entry: str) -> str:
    name = re.split(r"[-.]", entry, maxsplit=1)[0] if entry.endswith((".dist-info", ".egg-info")) else entry
    return re.sub(r"[-.]+", "_", name.removesuffix(".py")).lower()


@pytest.fixture(scope="module")
def gpu_box_env(tmp_path_factory):
    from raychat.core.data.tokenizer import embedded_tokenizer_file

    site = Path(sysconfig.get_paths()["purelib"])
    shadow = tmp_path_factory.mktemp("site")
    for entry in site.iterdir():
        if _normalised(entry.name) not in MISSING and not entry.name.endswith(".pth"):
            (shadow / entry.name).symlink_to(entry)
    bundle = tmp_path_factory.mktemp("gpu-bundle") / "tokenizer.model.v1"
    bundle.write_bytes(embedded_tokenizer_file().read_bytes())  # what `make gpu-bundle` carries there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(shadow)]),
        RAYCHAT_TOKENIZER_MODEL=str(bundle),
        RAYCHAT_CACHE=str(tmp_path_factory.mktemp("cache")),
    )
    return env


def run(env, *args: str, cmd: tuple[str, ...] = (sys.executable, "-S"), timeout: float = 240) -> str:
    """``cmd + args`` in the emulated box (default: its Python); the exit code must be 0."""
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_emulated_gpu_box_lacks_those_packages(gpu_box_env):
    out = run(
        gpu_box_env,
        "-c",
        "import importlib.util as u, torch, transformers; "
        f"print(sorted(m for m in {sorted(MISSING)!r} if u.find_spec(m)))",
    )
    assert out.strip() == "[]"


def test_training_step_benchmark_runs_without_ray_deepspeed_or_pydantic(gpu_box_env):
    out = run(
        gpu_box_env,
        "-m",
        "benchmarks.train_throughput",
        "--synthetic",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--rows",
        "60",
        "--repeats",
        "1",
        "--max-steps",
        "2",
        "--no-baseline",
    )
    assert "raychat packed" in out and "packing efficiency" in out


def test_checkpoint_upload_benchmark_runs_without_ray_or_boto3(gpu_box_env, tmp_path):
    out = run(
        gpu_box_env,
        "-m",
        "benchmarks.checkpoint_upload",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--dest",
        str(tmp_path / "sink"),
        "--blocks",
        "1",
        "--warmup-steps",
        "1",
        "--rows",
        "60",
    )
    assert "step time during upload / without" in out


def test_engine_benchmark_runs_without_ray(gpu_box_env):
    out = run(
        gpu_box_env,
        "-m",
        "benchmarks.serve_load",
        "--engine-only",
        "--model",
        "tiny",
        "--concurrency",
        "1,4",
        "--repeats",
        "1",
        "--max-tokens",
        "8",
    )
    assert "in-process, batch of 4" in out


def test_session_script_runs_the_gpu_marked_tests_and_their_model_fixture_builds(gpu_box_env, tmp_path):
    # On the GPU box they run; here they are skipped (no CUDA), so also build the fixture they use
    # (the embedded tokenizer from the carried file, then the tiny model), as the box would.
    run(
        gpu_box_env,
        "-c",
        "import tempfile; from raychat.core.model.hf import create_embedded_base_model; "
        "create_embedded_base_model(tempfile.mkdtemp(), seed=0)",
    )
    run(
        dict(gpu_box_env, PYTHON=f"{sys.executable} -S", OUT=str(tmp_path)),
        "benchmarks/gpu_session.sh",
        "tests",
        cmd=("bash",),
    )
    log = (tmp_path / "tests.log").read_text()
    skipped = re.search(r"(\d+) skipped", log)
    assert skipped and int(skipped[1]) >= 6 and "needs CUDA" in log and "error" not in log.lower(), log[-2000:]
