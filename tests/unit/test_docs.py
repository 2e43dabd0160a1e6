"""The docs stay true: the generated config reference is current, README.md stays a front page, and
every relative link in README.md and docs/ points at a file that exists."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from raychat import __main__ as cli
from raychat.core import config, config_reference

ROOT = Path(__file__).parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# [text](target) — not images' alt text, not inline code; the target up to a space or ")".
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def test_config_reference_is_current():
    committed = (ROOT / config_reference.DEFAULT_OUTPUT).read_text()
    assert committed == config_reference.render(), (
        "docs/reference/config.md is stale: run make docs (python -m raychat.core.config_reference)"
    )


def test_config_reference_covers_every_config_model_and_command():
    models = {
        obj
        for obj in vars(config).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == config.__name__
    }
    documented = set(config_reference.COMMANDS) | set(config_reference.NESTED)
    assert {m for m in models if not m.__name__.startswith("_")} == documented
    assert {c.name for c in config_reference.COMMANDS.values()} == set(cli.COMMANDS)
    for cmd in config_reference.COMMANDS.values():
        assert cli.module_of(cmd.name) == cmd.module


def test_config_reference_lists_every_field_with_its_flag():
    text = config_reference.render()
    for model in config_reference.COMMANDS:
        section = text.split(f"## {model.__name__}\n", 1)[1].split("\n## ", 1)[0]
        for name in model.model_fields:
            assert f"| `{name}` | `--{name.replace('_', '-')}" in section, f"{model.__name__}.{name}"


def test_type_names_read_like_the_annotations():
    assert config_reference.type_name(str | list[str]) == "str | list[str]"
    assert config_reference.type_name(int | None) == "int | None"
    assert config_reference.type_name(config.ServeConfig.model_fields["layout"].annotation) == '"combined" | "split"'


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page):
    text = CODE.sub("", page.read_text())
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, in-page anchors
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files {missing}"


def test_docs_have_the_pages_the_readme_promises():
    for rel in (
        "architecture.md",
        "data.md",
        "training.md",
        "serving.md",
        "operations.md",
        "testing.md",
        "performance/README.md",
        "reference/config.md",
    ):
        assert (ROOT / "docs" / rel).is_file(), rel
    assert list((ROOT / "docs" / "performance" / "log").glob("????-??-??-*.md")), "no dated performance logs"
