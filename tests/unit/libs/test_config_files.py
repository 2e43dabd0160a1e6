"""Every example YAML under jobs/configs validates against its job's config and starts with its command."""

from pathlib import Path

import pytest
import yaml

from libs.config import PretokenizeConfig, TrainConfig

CONFIGS = sorted((Path(__file__).parents[3] / "jobs" / "configs").glob("*.yaml"))
MODELS = {"pretokenize": PretokenizeConfig, "train": TrainConfig}


def test_there_are_example_configs_for_both_jobs():
    names = [p.name for p in CONFIGS]
    assert "train-tiny-cpu.yaml" in names and "train-mistral-7b-8xa100.yaml" in names
    assert any(n.startswith("pretokenize-") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates_and_names_its_command(path):
    job = path.name.split("-", 1)[0]
    model = MODELS[job]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ray job submit ") and f"python -m jobs.{job} --config jobs/configs/{path.name}" in first
    values = yaml.safe_load(path.read_text())
    # Required options the command line supplies (e.g. --data/--output after --config).
    for name, field in model.model_fields.items():
        if field.is_required() and name not in values:
            assert f"--{name.replace('_', '-')}" in first, f"{path.name}: {name} is neither in the file nor on its command"
            values[name] = "/tmp/placeholder"
    model.model_validate(values)


def test_mistral_config_is_the_two_node_a100_setup():
    cfg = TrainConfig.model_validate(yaml.safe_load((CONFIGS[0].parent / "train-mistral-7b-8xa100.yaml").read_text()))
    assert cfg.num_workers == 16 and cfg.use_gpu and cfg.bf16 and cfg.zero_stage == 2
    assert cfg.batch_max_len == 77824 and cfg.gradient_checkpointing
    assert cfg.output.startswith("s3://") and cfg.data.startswith("s3://") and cfg.base_model.startswith("s3://")
