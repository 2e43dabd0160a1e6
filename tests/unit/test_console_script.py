"""The ``raychat`` console script: one command per stage, each the same program as its ``python -m`` module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from raychat.__main__ import COMMANDS, module_of

ROOT = Path(__file__).parents[2]
RAYCHAT = Path(sys.executable).parent / "raychat"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_raychat_help_lists_every_command():
    out = run(str(RAYCHAT), "--help")
    assert out.returncode == 0, out.stderr
    for name in ("make-sample", "pretokenize", "train", "serve", "pipeline"):
        assert f"\n  {name} " in out.stdout, out.stdout
        assert f"python -m {module_of(name)}" in out.stdout


def test_every_command_help_is_its_modules_help():
    """``raychat train --help`` and ``python -m raychat.jobs.train --help`` are one program (same flags, same text)."""
    procs = {
        name: (
            subprocess.Popen([str(RAYCHAT), name, "--help"], stdout=subprocess.PIPE, text=True, cwd=ROOT),
            subprocess.Popen(
                [sys.executable, "-m", module_of(name), "--help"], stdout=subprocess.PIPE, text=True, cwd=ROOT
            ),
        )
        for name in COMMANDS
    }
    for name, (cli, module) in procs.items():
        cli_out, module_out = cli.communicate(timeout=120)[0], module.communicate(timeout=120)[0]
        assert cli.returncode == 0 and module.returncode == 0, name
        assert cli_out.startswith(f"usage: raychat {name} "), cli_out[:200]
        assert cli_out == module_out, name


def test_an_unknown_command_is_a_one_line_error_and_the_list():
    out = run(str(RAYCHAT), "trian")
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == "raychat: unknown command 'trian'"
    assert "Traceback" not in out.stderr and "pretokenize" in out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the sources (a build/ left in the checkout could carry stale modules)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = out.glob("raychat-*.whl")
    return path


def test_the_wheel_installs_only_the_raychat_package_and_its_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"raychat"}, tops
    assert "raychat = raychat.__main__:main" in scripts
    # Every stage is in the wheel, and no test, benchmark or build output is.
    for module in ("core/run_dir.py", "core/data/dataset.py", "jobs/train/driver.py", "serve/app.py"):
        assert f"raychat/{module}" in names, module
