"""cluster/runtime_env.yaml: what `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`
uploads, packaged by Ray's own packager with the file's excludes alone (no .gitignore help)."""

from __future__ import annotations

import zipfile

import yaml

from tests.cluster.conftest import ROOT


def test_upload_leaves_out_venv_runs_and_git_and_stays_small(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    runs = ROOT / "runs"
    made_runs = not runs.exists()
    runs.mkdir(exist_ok=True)
    big = runs / "_upload_probe.bin"  # run outputs can be GBs: they must never be uploaded
    big.write_bytes(b"\0" * 2**20)
    try:
        excludes = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["excludes"]
        create_package(str(ROOT), tmp_path / "pkg.zip", include_gitignore=False, excludes=excludes)
    finally:
        big.unlink()
        if made_runs:
            runs.rmdir()
    with zipfile.ZipFile(tmp_path / "pkg.zip") as pkg:
        names = pkg.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"raychat", "configs", "cluster", "pyproject.toml"} <= tops
    assert not tops & {".venv", "runs", ".git", ".pytest_cache"}, tops
    assert not [n for n in names if "__pycache__" in n]
    assert (tmp_path / "pkg.zip").stat().st_size < 5 * 2**20
