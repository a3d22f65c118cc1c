"""Strict validation of the manifests in k8s/, as ``kubectl apply --validate=strict`` judges them.

- Ray objects (RayCluster, RayJob, RayService) against the KubeRay v1 CRD schemas in ``crds/``
  (pruned copies, see README.md there): every object schema that has ``properties`` and no
  ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``, which is what the
  API server's strict field validation does with unknown fields; the Kubernetes core types inside
  them (PodSpec, ServiceSpec) and every object's ``metadata`` resolve to the strict Kubernetes OpenAPI
  definitions that the ``kubernetes-validate`` package ships.
- Core objects (ServiceAccount, Role, RoleBinding, Secret, NetworkPolicy) against those same strict
  Kubernetes schemas.
- YAML itself is loaded with duplicate keys as errors (strict validation rejects them too).

`build_kustomization` is a small kustomize for the features k8s/ uses (resources, namespace, labels,
images, JSON 6902 patches), so that what an overlay produces is validated as well.
"""

from __future__ import annotations

import copy
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
CRD_NAMES = {"rayclusters.ray.io": "RayCluster", "rayjobs.ray.io": "RayJob", "rayservices.ray.io": "RayService"}
# The k8s.io/api generation the KubeRay CRDs in crds/ were built from (see their headers).
K8S_VERSION = "1.28.0"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# Fields of a Kustomization (kustomize.config.k8s.io/v1beta1); any other top-level key is an error.
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "metadata",
    "resources",
    "components",
    "crds",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "labels",
    "commonLabels",
    "commonAnnotations",
    "images",
    "replicas",
    "patches",
    "patchesStrategicMerge",
    "patchesJson6902",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "generators",
    "transformers",
    "validators",
    "replacements",
    "vars",
    "buildMetadata",
    "openapi",
    "sortOptions",
    "helmCharts",
    "helmGlobals",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


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
    (doc,) = load_documents(CRD_DIR / CRD_FILES[kind])
    return doc


def _v1_schema(kind: str) -> dict:
    versions = {v["name"]: v for v in _crd(kind)["spec"]["versions"]}
    return versions["v1"]["schema"]["openAPIV3Schema"]


def _convert(node: Any) -> Any:
    """A CRD structural schema node -> JSON Schema 2020-12, strict about unknown fields."""
    if not isinstance(node, dict):
        return node
    if "x-medfusion-k8s" in node:
        return _k8s_ref(node["x-medfusion-k8s"])
    if "x-medfusion-same-as" in node:
        crd_name, _, field = node["x-medfusion-same-as"].partition("#")
        return _convert(_v1_schema(CRD_NAMES[crd_name])["properties"][field])
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


# ---------------------------------------------------------------------------- a small kustomize


def kustomization_errors(folder: Path) -> list[str]:
    """Structural errors of ``folder/kustomization.yaml``: unknown fields, missing resources."""
    (k,) = load_documents(folder / "kustomization.yaml")
    problems = [f"{key}: not a Kustomization field" for key in k if key not in KUSTOMIZATION_FIELDS]
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
        problems.append("apiVersion/kind: must be kustomize.config.k8s.io/v1beta1 Kustomization")
    root = folder.resolve()
    for entry in k.get("resources", []):
        target = folder / entry
        if not (target.is_file() or (target / "kustomization.yaml").is_file()):
            problems.append(f"resources: {entry} is neither a file nor a kustomization folder")
        elif target.is_file() and not target.resolve().is_relative_to(root):
            # kustomize's default load restrictor: files only in or below the kustomization's folder
            problems.append(
                f"resources: {entry} is a file outside {folder.name}/ "
                "(kustomize refuses it; list a kustomization folder)"
            )
        elif target.is_dir() and root.is_relative_to(target.resolve()):
            # "cycle detected: candidate root ... contains visited root ...": a base cannot hold its overlays
            problems.append(
                f"resources: {entry} contains {folder.name}/ itself (kustomize: cycle detected); "
                "move the base to its own folder"
            )
    for i, patch in enumerate(k.get("patches", [])):
        if set(patch) - {"target", "patch", "path", "options"}:
            problems.append(f"patches[{i}]: unknown keys {sorted(set(patch) - {'target', 'patch', 'path', 'options'})}")
    return problems


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _apply_json6902(obj: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "replace":
            if isinstance(node, dict) and key not in node:
                raise KeyError(f"replace {op['path']}: no such field")
            node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(node, list):
                node.append(copy.deepcopy(op["value"])) if key == "-" else node.insert(key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[key]
        else:
            raise ValueError(f"JSON patch op {op['op']!r} is not supported here")


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _set_images(node: Any, images: list[dict]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, _, tag = container["image"].partition(":")
                    for image in images:
                        if image["name"] == name:
                            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def build_kustomization(folder: Path) -> list[dict]:
    """The objects ``kustomize build folder`` produces, for the features k8s/ uses."""
    (k,) = load_documents(folder / "kustomization.yaml")
    objects: list[dict] = []
    for entry in k.get("resources", []):
        target = folder / entry
        objects.extend(build_kustomization(target) if target.is_dir() else load_documents(target))
    objects = copy.deepcopy(objects)
    for patch in k.get("patches", []):
        ops = load_yaml_documents(patch["patch"])[0]
        if not isinstance(ops, list):
            raise ValueError(f"{folder}: only JSON 6902 patches (a list of ops) are supported here")
        hits = [obj for obj in objects if _matches(obj, patch["target"])]
        if not hits:
            raise ValueError(f"{folder}: patch target {patch['target']} matches no resource")
        for obj in hits:
            _apply_json6902(obj, ops)
    for obj in objects:
        for labels in k.get("labels", []):
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])
        if "namespace" in k and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = k["namespace"]
            for subject in obj.get("subjects", []):
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (None, "default"):
                    subject["namespace"] = k["namespace"]  # kustomize's setRoleBindingSubjects=defaultOnly
        _set_images(obj, k.get("images", []))
    return objects
