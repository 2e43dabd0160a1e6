import pytest

from raychat.core.common.cli import build_parser, parse_config
from raychat.core.config import PipelineConfig, PretokenizeConfig, ServeConfig, TrainConfig


@pytest.mark.parametrize("model", [PretokenizeConfig, TrainConfig, ServeConfig, PipelineConfig])
def test_every_config_field_has_a_description_and_a_flag(model):
    parser = build_parser(model)
    flags = {a.dest for a in parser._actions}
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"
        assert name in flags


@pytest.mark.parametrize("model", [PretokenizeConfig, TrainConfig, ServeConfig, PipelineConfig])
def test_help_prints_every_flag(model, capsys):
    """argparse %-formats help text: a description with '%' (e.g. '~30% more compute') must not break --help."""
    with pytest.raises(SystemExit) as e:
        parse_config(model, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in model.model_fields:
        assert "--" + name.replace("_", "-") in out
    if model is TrainConfig:
        assert "~30% more compute" in out


def test_yaml_config_then_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: /d\noutput: /o\nepochs: 4\nuse_gpu: true\n")
    cfg = parse_config(TrainConfig, ["--config", str(y), "--epochs", "2", "--no-use-gpu"])
    assert (cfg.data, cfg.epochs, cfg.use_gpu, cfg.zero_stage) == ("/d", 2, False, 2)


def test_invalid_value_exits_2_naming_flag_and_value(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--data", "d", "--output", "o", "--zero-stage", "7"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--zero-stage" in err and "'7'" in err


def test_unknown_yaml_key_is_rejected(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: /d\noutput: /o\nepoch: 4\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(y)])


def test_ray_address_local_by_default_and_auto_for_a_dashboard_url():
    from raychat.core.common.ray_env import ray_address

    assert ray_address({}) is None
    assert ray_address({"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    env = {"RAY_ADDRESS": "http://127.0.0.1:8265"}
    assert ray_address(env) == "auto" and "RAY_ADDRESS" not in env
