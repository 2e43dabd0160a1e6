"""libs.raycfg: the Serve runtime a local instance gets, and the shell lines start-local.sh evaluates."""

from __future__ import annotations

import subprocess
import sys

from libs.raycfg import LOCAL_RAY_ENV, SERVE_RUNTIME_ENV, apply_local_ray_env, export_lines


def test_local_runtime_fills_only_what_the_user_did_not_set():
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "OTHER": "x"}
    effective = apply_local_ray_env(env)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and effective["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["OTHER"] == "x"
    assert set(effective) == set(LOCAL_RAY_ENV) >= set(SERVE_RUNTIME_ENV)


def test_export_lines_set_defaults_in_a_real_shell_and_keep_user_values():
    script = export_lines({"RAYCHAT_T_A": "1", "RAYCHAT_T_B": "2"}) + 'echo "$RAYCHAT_T_A $RAYCHAT_T_B"'
    out = subprocess.run(["bash", "-c", script], env={"RAYCHAT_T_B": "0", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1 0"


def test_module_prints_the_cluster_runtime_and_the_local_one_with_short_draining():
    run = lambda *a: subprocess.run([sys.executable, "-m", "libs.raycfg", *a], capture_output=True, text=True, check=True).stdout
    assert run() == export_lines(SERVE_RUNTIME_ENV)
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" in run("--local")
