"""libs/ is the Ray-free core: importing all of it must not import ray, jobs or serve."""

import pkgutil
import subprocess
import sys

import libs


def test_libs_never_imports_ray_jobs_or_serve():
    mods = [f"libs.{m.name}" for m in pkgutil.iter_modules(libs.__path__)]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'jobs', 'serve'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"libs imported: {proc.stdout} {proc.stderr[-2000:]}"
