"""Shared helpers for the chart tests and scripts/render-deploy: render the
Helm chart offline (helm-python-sdk embeds Helm's Go library, no helm binary)
and turn CRD openAPIV3Schemas into JSON Schemas."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "bitbucket-connector-operator"
DEPLOY = ROOT / "deploy" / "bitbucket-operator.yaml"
DEPLOY_NAMESPACE = "bitbucket-operator"
RELEASE = "bitbucket-connector-operator"

# Helm's install order (pkg/release/util/kind_sorter.go), for a stable,
# apply-able order in deploy/.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret",
    "SecretList", "ConfigMap", "StorageClass", "PersistentVolume",
    "PersistentVolumeClaim", "CustomResourceDefinition",
    # Not in Helm's list (Helm installs unknown kinds last): placed with the
    # CRDs, so no grant can be created before the requester policy holds.
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ClusterRole",
    "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role",
    "RoleList", "RoleBinding", "RoleBindingList", "Service", "DaemonSet", "Pod",
    "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass",
    "Ingress", "APIService", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
]

_DOC_SPLIT = re.compile(r"^---[ \t]*$", re.MULTILINE)


def load_chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render_raw(values: dict | None = None, *, name: str = RELEASE,
               namespace: str = DEPLOY_NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    return load_chart().render(values or {}, name=name, namespace=namespace)


def split_documents(rendered: dict[str, str]) -> list[tuple[str, str, dict]]:
    """(template path, document text, parsed object) for every non-empty
    document of every template except NOTES.txt."""
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for text in _DOC_SPLIT.split(rendered[path]):
            obj = yaml.safe_load(text)
            if obj:
                docs.append((path, text.strip("\n"), obj))
    return docs


def render(values: dict | None = None, **kw: Any) -> list[dict]:
    return [obj for _, _, obj in split_documents(render_raw(values, **kw))]


def _order(item: tuple[str, str, dict]) -> tuple:
    path, _, obj = item
    kind = obj.get("kind", "")
    rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
    meta = obj.get("metadata", {})
    return (rank, kind, meta.get("namespace", ""), meta.get("name", ""), path)


def deploy_manifest() -> str:
    """The plain manifests: the chart with default values, release
    "bitbucket-connector-operator" in namespace "bitbucket-operator", preceded
    by that Namespace, in Helm's install order."""
    header = (
        "# Generated from charts/bitbucket-connector-operator with default values\n"
        "# (release bitbucket-connector-operator, namespace bitbucket-operator).\n"
        "# Do not edit: regenerate with scripts/render-deploy.\n"
        "# Install: kubectl apply --server-side -f deploy/bitbucket-operator.yaml\n"
    )
    namespace = (
        "apiVersion: v1\n"
        "kind: Namespace\n"
        "metadata:\n"
        f"  name: {DEPLOY_NAMESPACE}\n"
        "  labels:\n"
        f"    app.kubernetes.io/name: {RELEASE}\n"
        "    pod-security.kubernetes.io/enforce: restricted\n"
    )
    parts = [header + "---\n" + namespace]
    for path, text, _ in sorted(split_documents(render_raw()), key=_order):
        source = path.split("/", 1)[1] if "/" in path else path
        parts.append(f"---\n# Source: {source}\n{text}\n")
    return "".join(parts)


def crd_documents() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]


def crd_for(kind: str) -> dict:
    for crd in crd_documents():
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise KeyError(kind)


def openapi_to_jsonschema(schema: Any) -> Any:
    """Structural openAPIV3Schema -> JSON Schema (draft 2020-12): `nullable`
    becomes a null type, and objects with properties refuse unknown fields
    (the API server prunes them; kubectl's strict field validation refuses
    them)."""
    if isinstance(schema, list):
        return [openapi_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties",):
            out[key] = {k: openapi_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not"):
            out[key] = openapi_to_jsonschema(value)
        elif key == "nullable":
            continue
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    if "properties" in out and "additionalProperties" not in out \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_json_schema(kind: str) -> dict:
    version = crd_for(kind)["spec"]["versions"][0]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    # apiVersion, kind and metadata are checked by the API server itself.
    group = crd_for(kind)["spec"]["group"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {"type": "object"}
    schema.setdefault("required", [])
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "spec"})
    return schema


def cel_rules(schema: dict, path: str = "") -> list[tuple[str, str, str]]:
    """(JSON path, rule, message) of every x-kubernetes-validations rule."""
    found = [(path, r["rule"], r.get("message", "")) for r in schema.get("x-kubernetes-validations", [])]
    for name, sub in schema.get("properties", {}).items():
        found += cel_rules(sub, f"{path}.{name}")
    if "items" in schema:
        found += cel_rules(schema["items"], f"{path}[]")
    return found
