"""Validate manifests the way the Kubernetes API server would, without a cluster.

KubeRay objects: against the CRD's openAPIV3Schema from ../shared/kuberay, defaults applied first,
and unknown fields as errors (kubectl's strict field validation). Core objects and the pod templates
inside RayJob / RayCluster: against the Kubernetes schema of `kubernetes-validate`, strict.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from conftest import REPO

KUBERAY = REPO.parent / "shared" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUBERNETES_VERSION = "1.31.0"


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are megabytes
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def strict_jsonschema(node: Any) -> Any:
    """The CRD schema as JSON Schema: int-or-string, and no unknown fields unless preserved."""
    if isinstance(node, list):
        return [strict_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_jsonschema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {key: strict_jsonschema(value) for key, value in node["properties"].items()}
    return out


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Fill in `default`s the way the API server does before validating (structural schemas)."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict_jsonschema(crd_schema(kind)))


def crd_errors(document: dict[str, Any]) -> list[str]:
    schema = crd_schema(document["kind"])
    defaulted = apply_defaults(copy.deepcopy(document), schema)
    validator = crd_validator(document["kind"])
    return [f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
            for error in validator.iter_errors(defaulted)]


def pod_templates(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document["spec"]
    cluster = spec.get("rayClusterSpec", spec) if document["kind"] == "RayJob" else spec
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    return templates


def core_errors(document: dict[str, Any]) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except ValidationError as exc:
        return [str(exc)[:500]]
    return []


def manifest_errors(document: dict[str, Any]) -> list[str]:
    """Everything wrong with one document: the CRD (KubeRay kinds) or core schema, and pod templates."""
    if document.get("kind") in CRD_FILES:
        problems = crd_errors(document)
        for index, template in enumerate(pod_templates(document)):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"template-{index}"},
                   "spec": template["spec"]}
            problems += [f"pod template {index}: {p}" for p in core_errors(pod)]
        return problems
    return core_errors(document)


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
