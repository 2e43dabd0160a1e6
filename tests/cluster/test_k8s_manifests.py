"""k8s/: every overlay, rendered as kustomize would, is valid against the KubeRay v1.7 CRDs and
does what docs/operations.md and k8s/README.md promise (GPU layout, autoscaling, no exposed Ray ports, token auth, secrets by
reference, the real Serve builder, job commands that parse, one Ray version everywhere)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess

import boto3
import pytest
import yaml

from cluster.k8s_validate import DEFAULT_CRDS, validate_manifest
from cluster.kustomize import KustomizeError, render
from raychat.core.common import storage
from raychat.core.common.cli import parse_config
from raychat.core.config import PretokenizeConfig, ServeConfig, TrainConfig
from tests.cluster.conftest import OVERLAYS, ROOT, cluster_specs, find, pod_templates

RAY_PORTS = {6379, 8265, 10001}
IMAGE_HOME = "/home/ray/raychat/"  # where cluster/Dockerfile puts the project
JOB_CONFIGS = {"raychat.jobs.pretokenize": PretokenizeConfig, "raychat.jobs.train": TrainConfig}
# Ids "overlay-gpu", not "gpu": a bare "gpu" keyword reads as the gpu marker (skipped without CUDA).
each_overlay = pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlay-{o}")


def test_overlays_render_every_resource_labelled_with_the_stage_that_applies_it(rendered):
    assert set(OVERLAYS) >= {"gpu", "cpu-dev"}
    expected = {
        ("ServiceAccount", "raychat"): "cluster",
        ("NetworkPolicy", "raychat-head"): "cluster",
        ("NetworkPolicy", "raychat-worker"): "cluster",
        ("RayCluster", "raychat"): "cluster",
        ("RayJob", "raychat-pretokenize"): "pretokenize",
        ("RayJob", "raychat-train"): "train",
        ("RayService", "raychat-serve"): "serve",
    }
    for name, docs in rendered.items():
        # `kubectl apply -k <overlay> -l raychat.io/stage=<stage>` applies one stage (docs/operations.md).
        assert {
            (d["kind"], d["metadata"]["name"]): d["metadata"]["labels"]["raychat.io/stage"] for d in docs
        } == expected, name
        assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "raychat" for d in docs)
        assert {d["metadata"]["namespace"] for d in docs} == {{"gpu": "raychat", "cpu-dev": "raychat-dev"}[name]}


@each_overlay
def test_every_rendered_manifest_validates_against_the_kuberay_crds(rendered, overlay):
    assert DEFAULT_CRDS.is_dir(), (
        f"KubeRay CRDs missing at {DEFAULT_CRDS} (set RAYCHAT_KUBERAY_CRDS for a checkout cloned elsewhere)"
    )
    errors = {f"{d['kind']}/{d['metadata']['name']}": validate_manifest(d) for d in rendered[overlay]}
    assert {k: v for k, v in errors.items() if v} == {}


def test_validator_rejects_a_misspelled_field_and_a_wrong_type_naming_their_paths(rendered):
    job = copy.deepcopy(find(rendered["gpu"], "RayJob", "raychat-train")[0])
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    container["resurces"] = container.pop("resources")  # typo inside the embedded pod template
    group["maxReplicas"] = "two"  # string where the CRD says integer
    group["rayStartParams"]["num-gpus"] = 8  # rayStartParams values must be strings
    job["spec"]["shutdownAfterJobFinishes"] = "true"  # a quoted boolean
    errors = validate_manifest(job)
    prefix = "spec.rayClusterSpec.workerGroupSpecs[0]"
    assert any(e.startswith(f"{prefix}.template.spec.containers[0].resurces: unknown field") for e in errors), errors
    assert f"{prefix}.maxReplicas: expected integer, got string 'two'" in errors
    assert f"{prefix}.rayStartParams.num-gpus: expected string, got integer 8" in errors
    assert "spec.shutdownAfterJobFinishes: expected boolean, got string 'true'" in errors
    assert len(errors) == 4, errors


def test_validator_rejects_bad_enums_missing_required_fields_and_duplicate_ports(rendered):
    service = copy.deepcopy(find(rendered["gpu"], "RayService")[0])
    del service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"]
    service["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"].append({"containerPort": 8265, "name": "dashboard-again"})
    head["resources"]["limits"]["memory"] = "32 GiB"
    errors = validate_manifest(service)
    assert "spec.upgradeStrategy.clusterUpgradeOptions.gatewayClassName: required field is missing" in errors
    assert "spec.rayClusterConfig.authOptions.mode: 'tokens' is not one of ['disabled', 'token']" in errors
    ports = "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports"
    assert any(
        e.startswith(f"{ports}[5]: duplicate entry {{'containerPort': 8265, 'protocol': 'TCP'}}") for e in errors
    ), errors
    assert any(
        e.startswith(
            "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits.memory: '32 GiB' does not match"
        )
        for e in errors
    ), errors


def test_core_objects_are_checked_too(rendered):
    policy = copy.deepcopy(find(rendered["gpu"], "NetworkPolicy", "raychat-head")[0])
    policy["spec"]["ingress"][0]["form"] = policy["spec"]["ingress"][0].pop("from")
    policy["metadata"]["name"] = "Raychat_Head"
    errors = validate_manifest(policy)
    assert any(e.startswith("spec.ingress[0].form: unknown field") for e in errors), errors
    assert "metadata.name: 'Raychat_Head' is not a DNS-1123 subdomain" in errors
    assert validate_manifest({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})[0].startswith(
        "<root>: no schema"
    )


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="no kubectl: the Python renderer is checked against the real kustomize only where it exists",
)
@each_overlay
def test_python_renderer_matches_kubectl_kustomize(rendered, overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    real = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    assert {(d["kind"], d["metadata"]["name"]): d for d in rendered[overlay]} == real


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [sa.yaml]\nnamePrefix: dev-\n")
    (tmp_path / "sa.yaml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n")
    with pytest.raises(KustomizeError, match="unsupported keys \\['namePrefix'\\]"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [sa.yaml]\npatches:\n  - target: {kind: ServiceAccount, name: a}\n"
        "    patch: '[{op: replace, path: /metadata/labels, value: {}}]'\n"
    )
    with pytest.raises(KustomizeError, match="no 'labels'"):
        render(tmp_path)


def test_head_takes_no_gpu_work_and_gpu_workers_are_whole_8_gpu_nodes_that_autoscale(rendered):
    docs = rendered["gpu"]
    for where, spec in cluster_specs(docs).items():
        assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", where
    raycluster = find(docs, "RayCluster", "raychat")[0]["spec"]
    assert raycluster["enableInTreeAutoscaling"] is True
    gpu_groups = {k: t for k, t in pod_templates(docs).items() if k.endswith("/gpu")}
    assert set(gpu_groups) == {"RayCluster/raychat/gpu", "RayJob/raychat-train/gpu", "RayService/raychat-serve/gpu"}
    assert [g["minReplicas"] for g in raycluster["workerGroupSpecs"]] == [0, 0]
    for where, template in gpu_groups.items():
        pod = template["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8", where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], where
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, where
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"], where
    for where, template in pod_templates(rendered["cpu-dev"]).items():
        assert "nvidia.com/gpu" not in template["spec"]["containers"][0]["resources"]["limits"], where
    for overlay, docs in rendered.items():
        for where, template in pod_templates(docs).items():
            res = template["spec"]["containers"][0]["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], (overlay, where)


def test_ray_ports_stay_inside_the_cluster_and_token_auth_is_on(rendered):
    for overlay, docs in rendered.items():
        for where, spec in cluster_specs(docs).items():
            assert spec["authOptions"] == {"mode": "token"}, (overlay, where)
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), (
                overlay,
                where,
            )
        for doc in find(docs, "RayService"):
            assert doc["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        for where, template in pod_templates(docs).items():
            assert not template["spec"].get("hostNetwork")
            assert all("hostPort" not in p for c in template["spec"]["containers"] for p in c.get("ports", [])), where
        # Every Ray pod is covered by a NetworkPolicy, and no rule opens a Ray port to every namespace.
        policies = find(docs, "NetworkPolicy")
        for where, template in pod_templates(docs).items():
            labels = template["metadata"]["labels"]
            assert any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for p in policies), (
                overlay,
                where,
            )
        for policy in policies:
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule.get("ports", [])}
                cluster_wide = any(
                    peer.get("namespaceSelector") == {} and "podSelector" not in peer for peer in rule["from"]
                )
                assert not (cluster_wide and (not ports or ports & RAY_PORTS)), (
                    overlay,
                    policy["metadata"]["name"],
                    rule,
                )


def test_secrets_are_referenced_never_inlined(rendered):
    secretish = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
    for overlay, docs in rendered.items():
        assert not find(docs, "Secret"), overlay
        for where, template in pod_templates(docs).items():
            container = template["spec"]["containers"][0]
            assert {"secretRef": {"name": "raychat-s3", "optional": True}} in container["envFrom"], (overlay, where)
            for env in container.get("env", []):
                assert not (secretish.search(env["name"]) and "value" in env), (overlay, where, env["name"])
            if where.startswith("RayService"):
                keys = [e for e in container["env"] if e["name"] == "RAYCHAT_API_KEYS"]
                assert keys == [
                    {
                        "name": "RAYCHAT_API_KEYS",
                        "valueFrom": {"secretKeyRef": {"name": "raychat-api-keys", "key": "keys"}},
                    }
                ]
            assert template["spec"]["serviceAccountName"] == "raychat"
    sa = find(rendered["gpu"], "ServiceAccount", "raychat")[0]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


@each_overlay
def test_serve_config_runs_the_real_builder_with_valid_args(rendered, overlay, s3_server, tiny_model_dir):
    from ray.serve.schema import ServeDeploySchema

    service = find(rendered[overlay], "RayService", "raychat-serve")[0]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is importlib.import_module("raychat.serve.app").build_app
    cfg = ServeConfig.model_validate(app.args)
    assert cfg.checkpoint.startswith("s3://")
    # The builder resolves the checkpoint (and a run's best/latest): give it one on the moto S3 server.
    bucket = cfg.checkpoint.removeprefix("s3://").split("/", 1)[0]
    with contextlib.suppress(Exception):  # the other overlay's run may have made it already
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    storage.upload_dir(tiny_model_dir, cfg.checkpoint)
    built = builder(app.args)
    names = {built._bound_deployment.name} | {
        a._bound_deployment.name for a in built._bound_deployment.init_args if hasattr(a, "_bound_deployment")
    }
    assert {d.name for d in app.deployments} <= names, names
    (engine,) = app.deployments
    assert engine.num_replicas == "auto" and engine.autoscaling_config["min_replicas"] >= 1
    if overlay == "gpu":
        assert cfg.num_gpus == 1
        assert service["spec"]["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
        assert service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["maxSurgePercent"] < 100
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert (
        service["spec"]["deploymentUnhealthySecondThreshold"] > 0
        and service["spec"]["serviceUnhealthySecondThreshold"] > 0
    )


@each_overlay
def test_rayjob_commands_parse_with_the_jobs_own_configs(rendered, overlay):
    jobs = find(rendered[overlay], "RayJob")
    assert {j["metadata"]["name"] for j in jobs} == {"raychat-pretokenize", "raychat-train"}
    for job in jobs:
        argv = [a.replace(IMAGE_HOME, f"{ROOT}/") for a in shlex.split(job["spec"]["entrypoint"])]
        assert argv[:2] == ["python", "-m"] and argv[2] in JOB_CONFIGS, argv
        assert importlib.util.find_spec(argv[2]) is not None, f"{argv[2]}: no such module in the image's package"
        cfg = parse_config(JOB_CONFIGS[argv[2]], argv[3:])  # SystemExit on an unknown flag or a bad value
        assert all(str(getattr(cfg, f)).startswith("s3://") for f in ("output",)), job["metadata"]["name"]
        assert job["spec"]["activeDeadlineSeconds"] > 0
    train = find(rendered[overlay], "RayJob", "raychat-train")[0]["spec"]
    assert train["shutdownAfterJobFinishes"] is True and train["ttlSecondsAfterFinished"] > 0
    assert train["submissionMode"] == "K8sJobMode" and train["backoffLimit"] == 0
    pretok = find(rendered[overlay], "RayJob", "raychat-pretokenize")[0]["spec"]
    assert pretok["clusterSelector"] == {"ray.io/cluster": find(rendered[overlay], "RayCluster")[0]["metadata"]["name"]}
    assert "rayClusterSpec" not in pretok


def test_the_image_copies_the_package_and_configs_and_imports_every_entry_point():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY --chown=\S+ (\S+) \1$", dockerfile, re.M))
    assert {"raychat", "configs", "cluster"} <= copied, copied
    (imports,) = re.findall(r'python -c "import ([^;]+);', dockerfile)
    modules = [m.strip() for m in imports.split(",")]
    assert {"raychat.jobs.pretokenize", "raychat.jobs.train", "raychat.serve.app"} <= set(modules)
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    allowed = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert {"!raychat/", "!configs/", "!cluster/"} <= set(allowed)


def test_one_ray_version_in_pyproject_venv_dockerfile_and_manifests(rendered):
    import ray

    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}\$\{RAY_VARIANT\}$", dockerfile, re.M)
    assert ray.__version__ == version
    (ray_dep,) = re.findall(r'^\s*"(ray\[[^"]*)",$', (ROOT / "pyproject.toml").read_text(), re.M)
    major, minor, _ = version.split(".")
    assert ray_dep.endswith(f">={major}.{minor},<{major}.{int(minor) + 1}"), ray_dep
    images = {"gpu": f"ray{version}-py311-gpu", "cpu-dev": f"ray{version}-py311"}
    for overlay, docs in rendered.items():
        for where, spec in cluster_specs(docs).items():
            assert spec["rayVersion"] == version, (overlay, where)
        for where, template in pod_templates(docs).items():
            for container in template["spec"]["containers"]:
                assert container["image"].rpartition(":")[2] == images[overlay], (overlay, where, container["image"])


def test_every_serve_node_runs_the_serve_runtime_and_haproxy_reaches_replica_ports(rendered):
    from raychat.core.common.ray_env import SERVE_RUNTIME_ENV

    for overlay, docs in rendered.items():
        for where, template in pod_templates(docs).items():
            if not where.startswith("RayService"):
                continue
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
            # Ray reads these at process start on each node: one node without them runs Serve's old proxy.
            assert {k: env.get(k) for k in SERVE_RUNTIME_ENV} == SERVE_RUNTIME_ENV, (overlay, where)
        # HAProxy on any node forwards to ingress replicas' own HTTP ports (30000-31000 by default) on
        # every other node: raychat pods must accept all ports from each other.
        for policy in find(docs, "NetworkPolicy"):
            peers = [r for r in policy["spec"]["ingress"] if "ports" not in r]
            assert any(
                p.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "raychat"}
                for r in peers
                for p in r["from"]
            ), (overlay, policy["metadata"]["name"])
