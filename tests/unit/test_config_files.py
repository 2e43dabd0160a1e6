"""Every example YAML under configs/<stage>/ validates against its job's config and starts with its command."""

from pathlib import Path

import pytest
import yaml

from raychat.core.config import PretokenizeConfig, TrainConfig

CONFIGS_DIR = Path(__file__).parents[2] / "configs"
JOB_CONFIGS = sorted([*CONFIGS_DIR.glob("data/*.yaml"), *CONFIGS_DIR.glob("train/*.yaml")])
MODELS = {"data": ("pretokenize", PretokenizeConfig), "train": ("train", TrainConfig)}


def test_there_are_example_configs_for_every_stage():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS_DIR.glob("*/*.yaml")}
    assert {"train/tiny-cpu.yaml", "train/mistral-7b-8xa100.yaml", "serve/local.yaml"} <= names
    assert any(n.startswith("data/pretokenize-") for n in names)


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_validates_and_names_its_command(path):
    job, model = MODELS[path.parent.name]
    first = path.read_text().splitlines()[0]
    rel = f"configs/{path.parent.name}/{path.name}"
    assert first.startswith("# ray job submit ") and f"python -m raychat.jobs.{job} --config {rel}" in first
    values = yaml.safe_load(path.read_text())
    # Required options the command line supplies (e.g. --data/--output after --config).
    for name, field in model.model_fields.items():
        if field.is_required() and name not in values:
            assert f"--{name.replace('_', '-')}" in first, (
                f"{path.name}: {name} is neither in the file nor on its command"
            )
            values[name] = "/tmp/placeholder"
    model.model_validate(values)


def test_serve_config_names_its_command():
    first = (CONFIGS_DIR / "serve" / "local.yaml").read_text().splitlines()[0]
    assert first.startswith("# serve deploy configs/serve/local.yaml")


def test_mistral_config_is_the_two_node_a100_setup():
    cfg = TrainConfig.model_validate(yaml.safe_load((CONFIGS_DIR / "train" / "mistral-7b-8xa100.yaml").read_text()))
    assert cfg.num_workers == 16 and cfg.use_gpu and cfg.bf16 and cfg.zero_stage == 2
    assert cfg.batch_max_len == 77824 and cfg.gradient_checkpointing
    assert cfg.output.startswith("s3://") and cfg.data.startswith("s3://") and cfg.base_model.startswith("s3://")
