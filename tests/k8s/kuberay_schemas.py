"""Strict validation of the manifests in k8s/, as ``kubectl apply --validate=strict`` judges them.

- Ray objects (RayCluster, RayJob, RayService) against the full CRDs of KubeRay v1.7.0 in ``crds/``
  (verbatim, see README.md there): every object schema that has ``properties`` and no
  ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``, which is what the
  API server's strict field validation does with unknown fields; every object's ``metadata`` resolves
  to the strict Kubernetes ObjectMeta that the ``kubernetes-validate`` package ships.
- Core objects (ServiceAccount, Role, RoleBinding, Secret, NetworkPolicy, PodDisruptionBudget) against
  those same strict Kubernetes schemas.
- YAML itself is loaded with duplicate keys as errors (strict validation rejects them too).

What an overlay produces is rendered by ``kubectl kustomize`` itself (render.py), not re-implemented.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

CRD_DIR = Path(__file__).parent / "crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# The k8s.io/api generation the KubeRay v1.7.0 CRDs were built from (k8s.io/api v0.36.0).
K8S_VERSION = "1.36.0"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


# ----------------------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml_documents(text: str) -> list[Any]:
    """All documents of a YAML stream (empty ones dropped); duplicate keys raise."""
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]


def load_documents(path: Path) -> list[dict]:
    return load_yaml_documents(path.read_text())


# --------------------------------------------------------------------------------- the schemas


@functools.cache
def k8s_schema_dir() -> Path:
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("kubernetes-validate is not installed (it is in the dev extra: pip install -e '.[dev]')")
    folder = (
        Path(next(iter(spec.submodule_search_locations))) / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    )
    if not folder.is_dir():
        raise RuntimeError(f"kubernetes-validate has no strict schemas for Kubernetes {K8S_VERSION} ({folder})")
    return folder


@functools.cache
def _registry() -> Registry:
    import json

    definitions = json.loads((k8s_schema_dir() / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


def _k8s_ref(name: str) -> dict:
    return {"$ref": f"{K8S_DEFS_ID}#/$defs/{name}"}


@functools.cache
def _crd(kind: str) -> dict:
    # The vendored upstream files are 1 to 1.4 MB: libyaml's loader, when there, reads them in a blink.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    (doc,) = [d for d in yaml.load_all((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader) if d]
    return doc


def _v1_schema(kind: str) -> dict:
    versions = {v["name"]: v for v in _crd(kind)["spec"]["versions"]}
    return versions["v1"]["schema"]["openAPIV3Schema"]


def _convert(node: Any) -> Any:
    """A CRD structural schema node -> JSON Schema 2020-12, strict about unknown fields."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _convert(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_convert(sub) for sub in value]
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # strict field validation: unknown fields are errors
    return out


@functools.cache
def crd_json_schema(kind: str) -> dict:
    """The strict JSON Schema of a Ray kind's v1 version (metadata validated as ObjectMeta)."""
    schema = _convert(_v1_schema(kind))
    schema["properties"]["metadata"] = _k8s_ref(OBJECT_META)
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _format(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "<root>"
    return f"{path}: {error.message}"


def crd_errors(obj: dict) -> list[str]:
    """Every strict-validation error of a Ray object (empty when valid)."""
    validator = jsonschema.Draft202012Validator(crd_json_schema(obj.get("kind", "")), registry=_registry())
    return sorted(_format(e) for e in validator.iter_errors(obj))


def core_errors(obj: dict) -> list[str]:
    """Every strict-validation error of a core Kubernetes object (empty when valid)."""
    api = obj["apiVersion"]
    group_version = api.split("/")
    name = (
        f"{obj['kind'].lower()}-{group_version[0].split('.')[0]}-{group_version[1]}"
        if len(group_version) == 2
        else f"{obj['kind'].lower()}-{api}"
    )
    path = k8s_schema_dir() / f"{name}.json"
    if not path.is_file():
        return [f"<root>: no Kubernetes {K8S_VERSION} schema for {obj['kind']} {api}"]
    import json

    validator = jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=_registry())
    return sorted(_format(e) for e in validator.iter_errors(obj))


def errors(obj: dict) -> list[str]:
    """Strict-validation errors of any manifest in k8s/ (Ray kinds, core kinds)."""
    if obj.get("kind") in CRD_FILES:
        return crd_errors(obj)
    return core_errors(obj)
