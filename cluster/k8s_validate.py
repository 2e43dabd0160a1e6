"""Strict validation of rendered Kubernetes manifests against the KubeRay CRDs' ``openAPIV3Schema``.

Follows what the API server enforces for a structural schema, plus what it would otherwise prune
silently: an unknown field is an error wherever the schema lists ``properties`` (unless
``x-kubernetes-preserve-unknown-fields``); ``type``, ``enum``, ``required``, ``items``,
``additionalProperties``, ``x-kubernetes-int-or-string``, ``pattern``, ``minLength`` /
``maxLength``, ``minimum`` / ``maximum``, ``int32`` / ``int64`` ranges, ``nullable`` and the
uniqueness of ``x-kubernetes-list-type: map`` / ``set`` lists are checked. CEL rules
(``x-kubernetes-validations``) are not evaluated. Every error names its path, e.g.
``spec.workerGroupSpecs[0].template.spec.containers[0].resurces: unknown field``.

Core objects are not CRDs: ObjectMeta is checked on every object, and NetworkPolicy /
ServiceAccount specs against small schemas built from the same CRD pieces (the KubeRay CRD embeds
Kubernetes' own NetworkPolicy rule and label-selector schemas).

    python -m cluster.k8s_validate k8s/overlays/gpu [--crds ../shared/kuberay/crds]
"""

from __future__ import annotations

import argparse
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

# The KubeRay v1.7 CRDs: ../shared/kuberay/crds beside the checkout, or wherever RAYCHAT_KUBERAY_CRDS points
# (a checkout cloned elsewhere).
DEFAULT_CRDS = Path(
    os.environ.get("RAYCHAT_KUBERAY_CRDS") or Path(__file__).resolve().parents[1].parent / "shared" / "kuberay" / "crds"
)
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations", "finalizers", "generateName"}
_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def load_crd_schemas(crd_dir: str | Path = DEFAULT_CRDS, version: str = "v1") -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): openAPIV3Schema}`` for every CRD file in ``crd_dir``."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        for ver in spec["versions"]:
            if ver["name"] == version:
                schemas[(f"{spec['group']}/{version}", spec["names"]["kind"])] = ver["schema"]["openAPIV3Schema"]
    if not schemas:
        raise FileNotFoundError(f"no {version} CRD schemas in {crd_dir}")
    return schemas


def validate_schema(value: Any, schema: dict, path: str = "") -> list[str]:
    """Every way ``value`` breaks ``schema``, each as ``"<path>: <what>"`` (empty = valid)."""
    errors: list[str] = []
    _check(value, schema, path, errors)
    return errors


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _check(value: Any, schema: dict, path: str, errors: list[str]) -> None:
    where = path or "<root>"
    if value is None:
        if not schema.get("nullable"):
            errors.append(f"{where}: null is not allowed")
        return
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.append(f"{where}: expected integer or string, got {_type_name(value)} {value!r}")
        elif isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        return
    if "anyOf" in schema:
        base = _without(schema, "anyOf")
        if all(validate_schema(value, base | option, path) for option in schema["anyOf"]):
            errors.append(f"{where}: matches none of {[o.get('type') for o in schema['anyOf']]}")
            return
    kind = schema.get("type")
    if kind is None:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return
    elif not _TYPE_CHECKS[kind](value):
        errors.append(f"{where}: expected {kind}, got {_type_name(value)} {value!r}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(
                f"{where}: length {len(value)} outside [{schema.get('minLength', 0)}, {schema.get('maxLength')}]"
            )
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = _INT_RANGES.get(schema.get("format", ""), (None, None))
        low, high = schema.get("minimum", low), schema.get("maximum", high)
        if (low is not None and value < low) or (high is not None and value > high):
            errors.append(f"{where}: {value} outside [{low}, {high}]")
    elif isinstance(value, dict):
        _check_object(value, schema, path, errors)
    elif isinstance(value, list):
        _check_array(value, schema, path, errors)


def _without(schema: dict, key: str) -> dict:
    return {k: v for k, v in schema.items() if k != key}


def _check_object(value: dict, schema: dict, path: str, errors: list[str]) -> None:
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    for key in schema.get("required", []):
        if key not in value:
            errors.append(f"{_join(path, key)}: required field is missing")
    for key, item in value.items():
        sub = _join(path, key)
        if props is not None and key in props:
            _check(item, props[key], sub, errors)
        elif isinstance(extra, dict):
            _check(item, extra, sub, errors)
        elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields") and extra is not True:
            errors.append(f"{sub}: unknown field (known: {', '.join(sorted(props))})")


def _check_array(value: list, schema: dict, path: str, errors: list[str]) -> None:
    if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
        errors.append(f"{path}: {len(value)} items outside [{schema.get('minItems', 0)}, {schema.get('maxItems')}]")
    items = schema.get("items", {})
    for i, item in enumerate(value):
        _check(item, items, f"{path}[{i}]", errors)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in keys}
        seen: dict[tuple, int] = {}
        for i, item in enumerate(value):
            if isinstance(item, dict):
                key = tuple(item.get(k, defaults[k]) for k in keys)
                if key in seen:
                    errors.append(f"{path}[{i}]: duplicate entry {dict(zip(keys, key))} (also at [{seen[key]}])")
                seen.setdefault(key, i)
    elif list_type == "set":
        for i, item in enumerate(value):
            if item in value[:i]:
                errors.append(f"{path}[{i}]: duplicate set entry {item!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate_object_meta(meta: Any, path: str = "metadata") -> list[str]:
    """ObjectMeta as the API server checks it on create: a DNS-1123 name, label syntax, known keys."""
    if not isinstance(meta, dict):
        return [f"{path}: expected object"]
    errors = [f"{path}.{k}: unknown field" for k in sorted(set(meta) - _OBJECT_META_KEYS)]
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(f"{path}.name: {name!r} is not a DNS-1123 subdomain")
    if "namespace" in meta and not (isinstance(meta["namespace"], str) and _DNS_LABEL.match(meta["namespace"])):
        errors.append(f"{path}.namespace: {meta['namespace']!r} is not a DNS-1123 label")
    for field in ("labels", "annotations"):
        entries = meta.get(field, {})
        if not isinstance(entries, dict):
            errors.append(f"{path}.{field}: expected object")
            continue
        for key, val in entries.items():
            prefix, _, label = str(key).rpartition("/")
            if (prefix and not _DNS_SUBDOMAIN.match(prefix)) or not _LABEL_NAME.match(label) or len(label) > 63:
                errors.append(f"{path}.{field}.{key}: invalid key")
            if not isinstance(val, str):
                errors.append(f"{path}.{field}.{key}: value must be a string, got {_type_name(val)} {val!r}")
            elif field == "labels" and val and (len(val) > 63 or not _LABEL_NAME.match(val)):
                errors.append(f"{path}.labels.{key}: invalid label value {val!r}")
    return errors


@lru_cache(maxsize=4)
def _schemas(crd_dir: str) -> dict[tuple[str, str], dict]:
    schemas = load_crd_schemas(crd_dir)
    cluster_spec = schemas[("ray.io/v1", "RayCluster")]["properties"]["spec"]["properties"]
    rules = cluster_spec["networkPolicy"]["properties"]["head"]["properties"]
    ingress, egress = rules["ingressRules"]["items"], rules["egressRules"]["items"]
    selector = ingress["properties"]["from"]["items"]["properties"]["podSelector"]
    envelope = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    schemas[("networking.k8s.io/v1", "NetworkPolicy")] = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            **envelope,
            "spec": {
                "type": "object",
                "required": ["podSelector"],
                "properties": {
                    "podSelector": selector,
                    "policyTypes": {"type": "array", "items": {"type": "string", "enum": ["Ingress", "Egress"]}},
                    "ingress": {"type": "array", "items": ingress},
                    "egress": {"type": "array", "items": egress},
                },
            },
        },
    }
    pod_spec = cluster_spec["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]
    schemas[("v1", "ServiceAccount")] = {
        "type": "object",
        "properties": {
            **envelope,
            "automountServiceAccountToken": {"type": "boolean"},
            "imagePullSecrets": pod_spec["imagePullSecrets"],
        },
    }
    return schemas


def validate_manifest(doc: dict, crd_dir: str | Path = DEFAULT_CRDS) -> list[str]:
    """Every error of one rendered object: its kind's schema (CRD or core) and its ObjectMeta."""
    schemas = _schemas(str(crd_dir))
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"<root>: no schema for apiVersion {key[0]!r} kind {key[1]!r} (known: {sorted(schemas)})"]
    return validate_schema(doc, schemas[key]) + validate_object_meta(doc.get("metadata"))


def main(argv: list[str] | None = None) -> int:
    from cluster.kustomize import render

    parser = argparse.ArgumentParser(description="Render a kustomization and validate it against the KubeRay CRDs.")
    parser.add_argument("directory", nargs="+", help="kustomization directories, e.g. k8s/overlays/gpu")
    parser.add_argument("--crds", default=str(DEFAULT_CRDS), help="directory of the KubeRay CRD YAML files")
    args = parser.parse_args(argv)
    failed = 0
    for directory in args.directory:
        for doc in render(directory):
            errors = validate_manifest(doc, args.crds)
            name = f"{directory}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            print(f"{'FAIL' if errors else 'ok  '} {name}")
            for err in errors:
                print(f"       {err}")
            failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
