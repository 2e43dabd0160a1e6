"""The documented `ray job submit` path on a real head: `ray start --head` (token auth on, its own
ports and temp dir), docs/operations.md's pre-tokenize command word for word, SUCCEEDED, the output; and
the names Ray's Prometheus exporter gives raychat's metrics (what cluster/grafana plots).

The head is this module's own process group: it is stopped by signalling that group, never with
`ray stop` (which would stop every Ray on the machine, the session's `ray_local` included)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from raychat.core.common import storage
from raychat.core.common.metric_specs import get
from raychat.core.common.ray_env import local_ray_env
from tests.cluster.conftest import exported_series
from tests.conftest import free_port, serve_side_ports_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Head:
    dashboard: str
    gcs: str
    metrics_port: int
    temp_dir: str
    env: dict[str, str]

    def api(self, path: str) -> dict:
        request = urllib.request.Request(
            f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


def _stop(proc: subprocess.Popen, marks: tuple[str, ...]) -> None:
    """SIGTERM the head's process group and give it 10 s (a graceful raylet takes ~30 s after a
    job), then SIGKILL the group, any process still naming this head's temp dir or GCS address, and
    any process the head had started (Serve's HAProxy runs in a session of its own)."""
    descendants = []
    with contextlib.suppress(psutil.NoSuchProcess):
        descendants = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if any(m in a for a in (p.info["cmdline"] or []) for m in marks)
    ]
    leftovers += [p for p in descendants if p.is_running() and p not in leftovers]
    for p in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(leftovers, timeout=10)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's unix socket paths must stay under 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rcjs-", dir="/tmp")
    ports = {
        name: free_port()
        for name in ("gcs", "dashboard", "metrics", "client", "agent_http", "agent_grpc", "runtime_env")
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job = this venv, as after `source .venv/bin/activate`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # in the environment: the user's ~/.ray/auth_token is never touched
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_metrics_report_interval_ms": "1000",
    }
    env |= local_ray_env(env)  # what cluster/start-local.sh exports (the RayService pods set the same Serve runtime)
    env |= serve_side_ports_env()  # HAProxy's fixed ports stay free for the tests' own Ray instance
    port_flags = {
        "--port": "gcs",
        "--dashboard-port": "dashboard",
        "--metrics-export-port": "metrics",
        "--ray-client-server-port": "client",
        "--dashboard-agent-listen-port": "agent_http",
        "--dashboard-agent-grpc-port": "agent_grpc",
        "--runtime-env-agent-port": "runtime_env",
    }
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--num-cpus", "2", "--disable-usage-stats"]
    for flag, name in port_flags.items():
        cmd += [flag, str(ports[name])]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (open across the yield, closed below)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{ports['dashboard']}", f"127.0.0.1:{ports['gcs']}", ports["metrics"], temp_dir, env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"ray start exited {proc.returncode}:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}"
                )
            try:
                head.api("/api/jobs/")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the head's Jobs API did not come up within 120 s")
                time.sleep(1)
        yield head
    finally:
        _stop(proc, (temp_dir, head.gcs))
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


DOCS_PAGE = ROOT / "docs" / "operations.md"


def docs_command(module: str) -> str:
    """docs/operations.md's local `ray job submit ... python -m <module> ... $PWD/...` command, continuation lines
    joined."""
    text = DOCS_PAGE.read_text().replace("\\\n", " ")
    (line,) = [
        ln
        for ln in text.splitlines()
        if ln.startswith("ray job submit") and f"python -m {module} " in ln and "$PWD" in ln
    ]
    return line


def test_documented_ray_job_submit_runs_pretokenize_to_succeeded(ray_head, tmp_path):
    env = ray_head.env | {"RAY_API_SERVER_ADDRESS": ray_head.dashboard}
    subprocess.run(
        [str(BIN / "python"), "-m", "raychat.jobs.make_sample", "--output", f"{tmp_path}/runs/sample.jsonl"],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    command = docs_command("raychat.jobs.pretokenize").replace("$PWD", str(tmp_path))
    argv = shlex.split(command)
    argv[0] = str(BIN / "ray")
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' submitted successfully", result.stdout))

    deadline = time.monotonic() + 60  # `ray job submit` waits for the end; this only bounds a slow status update
    while (job := ray_head.api(f"/api/jobs/{job_id}"))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "SUCCEEDED", job.get("message")
    assert job["entrypoint"].startswith(
        "python -m raychat.jobs.pretokenize --config configs/data/pretokenize-sample.yaml"
    )
    assert job["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")

    out = tmp_path / "runs" / "jobs" / "tokenized"
    report = json.loads((out / "_report.json").read_text())
    assert report["read"] == 205 and report["written"] == 200
    assert report["read"] == report["written"] + report["quarantined"] + report["dropped"]
    assert pq.read_table(storage.list_files(str(out), ".parquet")).num_rows == 200
    quarantined = sum(len(p.read_text().splitlines()) for p in (out / "_quarantine").glob("*.jsonl"))
    assert quarantined == report["quarantined"] == 5


METRICS_SCRIPT = """
import json, sys, time, urllib.request
import ray
from ray.util.metrics import Counter, Gauge, Histogram
from raychat.core.common.metric_specs import get
ray.init(address=sys.argv[1], log_to_driver=False)
c, h, g = (get(n) for n in ("raychat_requests", "raychat_time_to_first_token_seconds", "raychat_queue_length"))
Counter(c.name, c.description, c.tag_keys).inc(3, tags={"model": "m", "route": "/v1/chat/completions", "status": "200"})
Histogram(h.name, h.description, list(h.boundaries), h.tag_keys).observe(0.02, tags={"model": "m"})
Gauge(g.name, g.description, g.tag_keys).set(4, tags={"model": "m"})
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/metrics", timeout=5).read().decode()
    names = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_raychat_")})
    if len(names) >= 5:
        break
    time.sleep(1)
print("NAMES " + json.dumps(names))
"""


def test_metrics_export_uses_the_names_the_dashboards_plot(ray_head):
    result = subprocess.run(
        [str(BIN / "python"), "-c", METRICS_SCRIPT, ray_head.gcs, str(ray_head.metrics_port)],
        env=ray_head.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = set(json.loads(result.stdout.split("NAMES ", 1)[1]))
    expected = set().union(
        *(
            exported_series(get(n))
            for n in ("raychat_requests", "raychat_time_to_first_token_seconds", "raychat_queue_length")
        )
    )
    assert names == expected


def _scrape(port: int) -> dict[str, list[tuple[str, float]]]:
    """The exporter's ``ray_raychat_*`` samples: name → [(labels, value)]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        m = re.match(r"(ray_raychat_\w+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out.setdefault(m[1], []).append((m[2] or "", float(m[3])))
    return out


def test_rayservice_serve_config_deploys_answers_and_exports_serve_metrics(ray_head, tiny_model_dir):
    """The cpu-dev RayService's serveConfigV2, deployed as KubeRay does (the dashboard's Serve REST
    API), with only the checkpoint (a tiny local model) and the HTTP port (a free one) swapped;
    after a few requests the head's Prometheus exporter shows raychat's serve metrics."""
    import yaml

    from cluster.kustomize import render

    (service,) = [d for d in render(ROOT / "k8s" / "overlays" / "cpu-dev") if d["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["checkpoint"] = str(tiny_model_dir)
    # On KubeRay the key comes from the raychat-api-keys Secret as RAYCHAT_API_KEYS in every pod.
    config["applications"][0]["runtime_env"] = {"env_vars": {"RAYCHAT_API_KEYS": "sk-test-rayservice"}}
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    headers = {"Authorization": f"Bearer {ray_head.env['RAY_AUTH_TOKEN']}", "Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{ray_head.dashboard}/api/serve/applications/", data=json.dumps(config).encode(), headers=headers, method="PUT"
    )
    urllib.request.urlopen(request, timeout=30).close()

    deadline = time.monotonic() + 240
    while (app := ray_head.api("/api/serve/applications/")["applications"].get("raychat", {})).get(
        "status"
    ) != "RUNNING":
        assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), app.get("message")
        assert time.monotonic() < deadline, app
        time.sleep(2)
    engine = app["deployments"]["LLMEngine"]["deployment_config"]
    assert engine["autoscaling_config"]["min_replicas"] == 1 and engine["autoscaling_config"]["max_replicas"] == 2
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert refused.value.code == 401
    keyed = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-test-rayservice"}
    )
    with urllib.request.urlopen(keyed, timeout=30) as response:
        assert [m["id"] for m in json.load(response)["data"]] == ["tiny"]
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    ).encode()
    chat = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Authorization": "Bearer sk-test-rayservice", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(chat, timeout=60) as response:
        assert response.read().decode().rstrip().endswith("data: [DONE]")

    def value(samples, name: str, *labels: str) -> float:
        return sum(v for lab, v in samples.get(name, []) if all(x in lab for x in labels))

    deadline = time.monotonic() + 60
    while True:  # Ray exports every RAY_metrics_report_interval_ms (1 s here)
        samples = _scrape(ray_head.metrics_port)
        # model="tiny": the metrics test above exported samples of its own (model "m") on this head
        got = (
            value(
                samples, "ray_raychat_requests_total", 'model="tiny"', 'route="/v1/chat/completions"', 'status="200"'
            ),
            value(samples, "ray_raychat_requests_total", 'model="tiny"', 'route="/v1/models"', 'status="401"'),
            value(samples, "ray_raychat_generated_tokens_total", 'model="tiny"'),
            value(samples, "ray_raychat_prompt_tokens_total", 'model="tiny"'),
            value(samples, "ray_raychat_time_to_first_token_seconds_count", 'model="tiny"'),
        )
        if all(got) or time.monotonic() > deadline:
            break
        time.sleep(1)
    chat_ok, refused_models, generated, prompt, ttft = got
    assert chat_ok == 1 and refused_models == 1 and ttft == 1
    assert 1 <= generated <= 4 and prompt > 0
