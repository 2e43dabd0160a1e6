"""A small kustomize renderer for the subset k8s/ uses, so manifests can be rendered and checked
where no ``kubectl`` / ``kustomize`` binary is installed.

Supported (anything else in a kustomization.yaml is an error, never silently ignored):
``resources`` (files and directories with a kustomization.yaml), ``namespace``, ``labels``
(``pairs`` on ``metadata.labels`` only), ``images`` (``name`` / ``newName`` / ``newTag`` on every
``containers`` / ``initContainers`` image, at any depth, as kustomize v5 does for custom resources),
and ``patches`` (``path`` or inline ``patch``, optional ``target`` by kind/name): a YAML list is a
JSON6902 patch (RFC 6902 add / replace / remove), a mapping a strategic-merge patch of mappings
only (kustomize replaces lists of custom resources whole, so lists are refused: use JSON6902).
Transformers run in kustomize's order: patches, namespace, labels, images.
``tests/cluster`` checks the output against ``kubectl kustomize`` where that binary exists.

    python -m cluster.kustomize k8s/overlays/cpu-dev
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

_KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or a patch does not apply."""


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The resources ``kubectl kustomize DIRECTORY`` would output, as dicts."""
    root = Path(directory)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - _KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported keys {sorted(unknown)}")

    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = root / entry
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kust.get("patches", []):
        _apply_patch(docs, patch, root)
    if "namespace" in kust:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for label in kust.get("labels", []):
        if set(label) - {"pairs"}:
            raise KustomizeError(f"{kfile}: labels support only 'pairs' (metadata.labels), got {sorted(label)}")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kust.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise KustomizeError(f"{kfile}: images support name/newName/newTag, got {sorted(image)}")
        for doc in docs:
            _set_images(doc, image)
    return docs


def _apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any], root: Path) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"patch keys must be path/patch/target, got {sorted(patch)}")
    body = yaml.safe_load((root / patch["path"]).read_text() if "path" in patch else patch["patch"])
    target = patch.get("target")
    if target is None:
        if not isinstance(body, dict):
            raise KustomizeError("a JSON6902 patch needs a target")
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
    if set(target) - {"kind", "name"}:
        raise KustomizeError(f"targets select by kind and name only, got {sorted(target)}")
    matched = [
        d
        for d in docs
        if d.get("kind") == target.get("kind", d.get("kind"))
        and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
    ]
    if not matched:
        raise KustomizeError(f"patch target {target} matches no resource")
    for doc in matched:
        if isinstance(body, list):
            for op in body:
                _json6902(doc, op)
        else:
            _merge(doc, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}, "")


def _merge(doc: dict[str, Any], patch: dict[str, Any], path: str) -> None:
    for key, value in patch.items():
        if isinstance(value, list):
            raise KustomizeError(f"strategic-merge patch sets the list {path}/{key}: use a JSON6902 patch")
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge(doc[key], value, f"{path}/{key}")
        else:
            doc[key] = copy.deepcopy(value)


def _json6902(doc: dict[str, Any], op: dict[str, Any]) -> None:
    kind, path = op.get("op"), op.get("path", "")
    if kind not in ("add", "replace", "remove"):
        raise KustomizeError(f"JSON6902 op {kind!r} is not supported (add, replace, remove)")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    if not tokens:
        raise KustomizeError(f"JSON6902 path {path!r} must point inside the resource")
    parent: Any = doc
    for token in tokens[:-1]:
        try:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        except (KeyError, IndexError, ValueError) as err:
            raise KustomizeError(f"JSON6902 path {path!r}: no {token!r}") from err
    last = tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
            return
        if not 0 <= index < len(parent):
            raise KustomizeError(f"JSON6902 {kind} {path!r}: index out of range")
        if kind == "remove":
            del parent[index]
        else:
            parent[index] = copy.deepcopy(op["value"])
        return
    if kind != "add" and last not in parent:
        raise KustomizeError(f"JSON6902 {kind} {path!r}: no {last!r}")
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, _, tag = container.get("image", "").partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
        else:
            _set_images(value, image)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cluster.kustomize <kustomization directory>", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(args[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
