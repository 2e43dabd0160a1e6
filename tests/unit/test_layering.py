"""The layers of ``raychat/``: ``core`` is Ray-free and never imports ``jobs`` or ``serve``.

Walks every module under ``raychat/core`` (so a new module is covered the day it is added),
imports them all in a fresh interpreter, and fails if ray, raychat.jobs or raychat.serve got imported.
"""

import pkgutil
import subprocess
import sys

import raychat.core

FORBIDDEN = ("ray", "raychat.jobs", "raychat.serve")


def core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(raychat.core.__path__, prefix="raychat.core."))


def test_core_covers_every_stage():
    subpackages = {m.split(".")[2] for m in core_modules()}
    assert {"common", "data", "model", "train", "infer", "config"} <= subpackages


def test_core_never_imports_ray_jobs_or_serve():
    code = (
        "import importlib, sys\n"
        f"for m in {core_modules()!r}: importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if any(k == f or k.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"raychat.core imported: {proc.stdout} {proc.stderr[-2000:]}"
