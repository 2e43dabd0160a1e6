"""Slow (RAYCHAT_SLOW=1): training on a two-node Ray cluster whose only shared storage is S3 (moto)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from raychat.core.common import node_cache, storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _kill_session(sid: int) -> None:
    """Kills every process of session ``sid`` (the cluster's raylets and workers regroup themselves)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (OSError, psutil.Error):
            pass


def test_two_workers_on_two_nodes_train_from_and_checkpoint_to_s3_only(s3_server, s3_bucket, tmp_path):
    # Own process: a ray.cluster_utils.Cluster cannot share a process with the session's local Ray.
    # The nodes get separate temp dirs and the run's paths are all s3://: nothing is shared on disk.
    # STRICT_SPREAD places the two training workers on different nodes (or the run cannot start).
    script = textwrap.dedent(f"""
        import json, ray
        from ray.cluster_utils import Cluster
        from raychat.core.common import storage
        from raychat.core.data.sample import sample_jsonl
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        storage.write_text("s3://{s3_bucket}/in.jsonl", sample_jsonl(80, include_bad_rows=False))
        from raychat.jobs.pretokenize import run as pretokenize
        from raychat.jobs.train.driver import run as train
        from raychat.core.config import PretokenizeConfig, TrainConfig
        pretokenize(PretokenizeConfig(input="s3://{s3_bucket}/in.jsonl", output="s3://{s3_bucket}/tok", num_actors=2))
        s = train(TrainConfig(data="s3://{s3_bucket}/tok", output="s3://{s3_bucket}/runs", name="two", num_workers=2,
                              placement_strategy="STRICT_SPREAD", batch_max_len=256, max_steps=4, checkpoint_every=2,
                              eval_fraction=0.1, learning_rate=1e-3))
        print("SUMMARY", json.dumps({{k: s[k] for k in ("steps", "checkpoint", "manifest", "packing_efficiency")}}))
        ray.shutdown(); cluster.shutdown()
    """)
    # A new session, so that on a timeout the whole cluster (raylets, workers) is killed with it.
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            _kill_session(proc.pid)
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    s = json.loads(stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert s["steps"] == 4 and s["checkpoint"].startswith(f"s3://{s3_bucket}/runs/two/checkpoint_")
    manifest = json.loads(storage.read_text(s["manifest"]))
    assert manifest["latest"] == s["checkpoint"] and [c["step"] for c in manifest["checkpoints"]][-1] == 4
    from transformers import AutoModelForCausalLM

    local = node_cache.local_or_download(s["checkpoint"], tmp_path / "cache")
    assert AutoModelForCausalLM.from_pretrained(local, use_safetensors=True).config.model_type == "mistral"
