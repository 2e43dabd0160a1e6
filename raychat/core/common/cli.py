"""Command lines generated from pydantic configs: the model is the one source of truth.

Every field becomes ``--field-name`` (help text = the field's description, default = the
model's); ``--config FILE.yaml`` supplies values first and flags override them. Validation
errors name the field and the bad value and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def _is_bool(annotation) -> bool:
    if annotation is bool:
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and bool in args


def _is_structured(annotation) -> bool:
    """True for dict-typed fields (and list-only ones); ``str | list[str]`` stays a plain string."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {typing.get_origin(a) or a for a in (typing.get_args(annotation) if union else (annotation,))}
    return dict in kinds or (list in kinds and str not in kinds)


def build_parser(
    model: type[BaseModel], prog: str | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    """An argparse parser whose flags mirror ``model``'s fields."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (model.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", metavar="YAML", help="YAML file with any of the options below; flags override it.")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
        help_text = f"{field.description} ({default})".replace("%", "%%")  # argparse %-formats help
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"invalid {model.__name__}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        flag = "--" + loc.replace("_", "-") if e["loc"] and e["loc"][0] in model.model_fields else loc
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  {flag}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_config(model: type[M], argv: Sequence[str] | None = None, prog: str | None = None) -> M:
    """Parses ``argv`` (default ``sys.argv[1:]``) into a validated ``model`` instance."""
    parser = build_parser(model, prog=prog)
    ns = parser.parse_args(argv)
    values: dict = {}
    if ns.config:
        loaded = yaml.safe_load(Path(ns.config).read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{ns.config}: expected a mapping of option: value")
        unknown = sorted(set(loaded) - set(model.model_fields))
        if unknown:
            parser.error(f"{ns.config}: unknown option(s) {unknown}; known: {sorted(model.model_fields)}")
        values.update(loaded)
    for k, v in vars(ns).items():
        if k == "config" or v is None:
            continue
        if _is_structured(model.model_fields[k].annotation):
            # Mappings and lists on the command line are YAML (so JSON works too): --sources '{a: {...}}'
            v = yaml.safe_load(v)
        values[k] = v
    try:
        return model.model_validate(values)
    except ValidationError as e:
        print(format_validation_error(e, model), file=sys.stderr)
        raise SystemExit(2) from None
