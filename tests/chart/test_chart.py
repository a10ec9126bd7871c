"""Tests of the Helm chart, the plain manifests, the examples and the GitOps
health checks. Run with scripts/test (or .venv/bin/python -m pytest tests/chart)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

import chartlib
from chartlib import CHART, ROOT

K8S_VERSION = "1.33.0"
NS = "bitbucket-operator"

FULL = {
    "replicas": 2,
    "leaderElection": {"enabled": False},
    "watchNamespaces": ["team-a", "team-b", NS],
    "persistence": {"enabled": True, "size": "5Gi", "storageClass": "fast",
                    "accessModes": ["ReadWriteMany"]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "networkPolicy": {"enabled": True,
                      "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    "podDisruptionBudget": {"enabled": True},
    "connector": {"create": True, "name": "acme", "secretName": "bb-creds",
                  "workspaces": ["acme", "acme-labs"], "interval": "30m",
                  "provisioning": {"enabled": True, "maxDuration": "8h", "allowedPermissions": ["read"],
                                   "allowedTargets": {"repositories": ["acme/api-*"]},
                                   "grantNamespaces": ["team-a"]}},
    "image": {"tag": "1.2.3"},
    "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    "podAnnotations": {"example.com/a": "b"},
}

CRD_KINDS = {"BitbucketConnector", "BitbucketAccessGrant"}
# Objects whose schema is a CRD, not part of Kubernetes.
CUSTOM_KINDS = CRD_KINDS | {"ServiceMonitor"}


def render(values=None, **kw):
    return chartlib.render(values, **kw)


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name=None):
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs):
    dep = one(objs, "Deployment")
    cs = dep["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1
    return cs[0]


# ---------------------------------------------------------------- lint, render


@pytest.mark.parametrize("values", [{}, FULL], ids=["defaults", "all-features"])
def test_lint_strict_is_clean(values):
    report = helm.lint(str(CHART), values, strict=True, namespace=NS, kube_version="v1.33.0")
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_default_render_has_the_operator_objects():
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted([
        "CustomResourceDefinition", "CustomResourceDefinition",
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Role", "RoleBinding", "Role", "RoleBinding", "Service", "Deployment",
        "NetworkPolicy", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
    ])
    # Opt-in objects are off by default.
    for kind in ("ServiceMonitor", "PodDisruptionBudget",
                 "PersistentVolumeClaim", "BitbucketConnector"):
        assert not by_kind(objs, kind), kind
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == NS, o["metadata"]


CLUSTER_SCOPED = ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


def test_all_features_render():
    objs = render(FULL)
    for kind in ("ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget",
                 "PersistentVolumeClaim", "BitbucketConnector"):
        assert len(by_kind(objs, kind)) == 1, kind
    assert one(objs, "Deployment")["spec"]["replicas"] == 2


def _validate_kubernetes(objs):
    checked = 0
    for o in objs:
        if o["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        checked += 1
    return checked


@pytest.mark.parametrize("values", [{}, FULL, {"credentialRotation": {"enabled": True}, "crds": {"keep": False},
                                              "watchNamespaces": ["*"]}],
                         ids=["defaults", "all-features", "rotation-cluster-wide"])
def test_every_object_validates_against_kubernetes_schemas(values):
    objs = render(values)
    assert _validate_kubernetes(objs) >= 10


def test_kubernetes_validation_would_catch_a_broken_object():
    # Guard against a validator that accepts anything.
    dep = copy.deepcopy(one(render(), "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["port", "path"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            },
        },
    },
}


def test_custom_typed_objects_validate_against_their_own_schemas():
    objs = render(FULL)
    sm = one(objs, "ServiceMonitor")
    jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
    service = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "http"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "prometheus"

    connector = one(objs, "BitbucketConnector")
    jsonschema.validate(connector, chartlib.crd_json_schema("BitbucketConnector"))
    assert_cel_rules_hold("BitbucketConnector", connector)
    assert connector["metadata"]["namespace"] == NS
    assert connector["spec"] == {
        "secretRef": {"name": "bb-creds"}, "workspaces": ["acme", "acme-labs"],
        "interval": "30m", "provisioning": FULL["connector"]["provisioning"],
    }


def test_chart_connector_omits_provisioning_when_null():
    objs = render({"connector": {"create": True}})
    spec = one(objs, "BitbucketConnector")["spec"]
    assert "provisioning" not in spec and "workspaces" not in spec
    assert spec["secretRef"]["name"] == "bitbucket-credentials"
    spec = one(render({"connector": {"create": True, "provisioning": {"enabled": False}}}),
               "BitbucketConnector")["spec"]
    assert spec["provisioning"] == {"enabled": False}


def test_chart_connector_provisioning_is_an_object_not_the_old_boolean():
    with pytest.raises(helm.HelmError, match="provisioning"):
        render({"connector": {"create": True, "provisioning": True}})


def test_chart_connector_outside_watched_namespaces_is_refused():
    with pytest.raises(helm.HelmError, match="watchNamespaces"):
        render({"connector": {"create": True}, "watchNamespaces": ["team-a"]})


# ---------------------------------------------------------------- Deployment


def test_deployment_args_and_downward_api():
    c = container(render())
    assert c["args"] == [
        "run", "--http-addr", "0.0.0.0:8080", "--probe-addr", "0.0.0.0:8081",
        "--db", "/var/lib/bitbucket-operator/store.db",
        "--leader-election=true", "--lease-name", "bitbucket-connector-operator",
        "--log-format", "json", "--watch-namespaces", NS,
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["image"] == "ghcr.io/example/bitbucket-operator:" + helm.Chart.load(str(CHART)).metadata["appVersion"]


def test_watch_namespaces_and_leader_election_args():
    c = container(render({"watchNamespaces": ["a", "b"], "leaderElection": {"enabled": False}}))
    assert "--leader-election=false" in c["args"]
    i = c["args"].index("--watch-namespaces")
    assert c["args"][i + 1] == "a,b"
    # More than one replica forces leader election on.
    c = container(render({"replicas": 3, "leaderElection": {"enabled": False}, "watchNamespaces": ["*"]}))
    assert "--leader-election=true" in c["args"]
    assert "--watch-namespaces" not in c["args"]
    # The lease name follows the release's full name.
    c = container(render(name="ops"))
    assert c["args"][c["args"].index("--lease-name") + 1] == "ops-bitbucket-connector-operator"


def test_image_digest_wins_over_tag():
    digest = "sha256:" + "a" * 64
    assert container(render({"image": {"digest": digest}}))["image"] == f"ghcr.io/example/bitbucket-operator@{digest}"
    assert container(render({"image": {"tag": "9.9.9"}}))["image"].endswith(":9.9.9")
    both = {"image": {"repository": "registry.example.com/ops/bbo", "tag": "9.9.9", "digest": digest}}
    assert container(render(both))["image"] == f"registry.example.com/ops/bbo@{digest}"


def test_default_tag_is_the_version_scripts_build_image_tags():
    """The default tag follows appVersion, and appVersion is the crate's
    version, which scripts/build-image uses as the archive's tag."""
    app_version = helm.Chart.load(str(CHART)).metadata["appVersion"]
    crate = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert app_version == crate
    repo = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
    assert container(render())["image"] == f"{repo}:{crate}"
    assert container(render({"image": {"repository": "localhost/bbo"}}))["image"] == f"localhost/bbo:{crate}"


@pytest.mark.parametrize("values", [{}, FULL], ids=["defaults", "all-features"])
def test_security_context_is_hardened(values):
    objs = render(values)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532 and psc["runAsGroup"] == 65532
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container(objs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not sc.get("privileged")
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_probes_ports_and_resources():
    c = container(render())
    # The probes have a listener of their own (its own connection limit).
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "probes", "containerPort": 8081, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]


def _volumes(objs):
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    return mounts, vols


def test_store_is_an_empty_dir_by_default_with_writable_tmp():
    objs = render()
    mounts, vols = _volumes(objs)
    assert "emptyDir" in vols[mounts["/var/lib/bitbucket-operator"]]
    assert "emptyDir" in vols[mounts["/tmp"]]
    assert "strategy" not in one(objs, "Deployment")["spec"]


def test_persistence_creates_a_claim_or_uses_an_existing_one():
    objs = render({"persistence": {"enabled": True, "size": "5Gi", "storageClass": "fast"}})
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    mounts, vols = _volumes(objs)
    assert vols[mounts["/var/lib/bitbucket-operator"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # One replica on a ReadWriteOnce volume: no overlapping pods.
    assert one(objs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"

    objs = render({"persistence": {"enabled": True, "existingClaim": "my-store"}})
    assert not by_kind(objs, "PersistentVolumeClaim")
    mounts, vols = _volumes(objs)
    assert vols[mounts["/var/lib/bitbucket-operator"]]["persistentVolumeClaim"]["claimName"] == "my-store"


def test_shared_read_write_once_store_with_replicas_is_refused():
    with pytest.raises(helm.HelmError, match="ReadWriteMany"):
        render({"replicas": 2, "persistence": {"enabled": True}})


# ---------------------------------------------------------------- RBAC


def _rules(objs):
    for o in objs:
        if o["kind"] in ("ClusterRole", "Role"):
            for r in o["rules"]:
                yield o, r


@pytest.mark.parametrize("values", [{}, FULL], ids=["defaults", "all-features"])
def test_rbac_has_no_wildcards(values):
    for role, rule in _rules(render(values)):
        for field in ("verbs", "resources", "apiGroups"):
            assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
        assert all("*" not in r for r in rule["resources"]), rule


def _grants(objs, kind, resource, namespace=None):
    verbs = set()
    for role, rule in _rules(objs):
        if role["kind"] != kind:
            continue
        if namespace is not None and role["metadata"].get("namespace") != namespace:
            continue
        if resource in rule["resources"]:
            verbs |= set(rule["verbs"])
    return verbs


def test_cluster_wide_rbac_when_asked_for_explicitly():
    objs = render({"watchNamespaces": ["*"]})
    assert _grants(objs, "ClusterRole", "secrets") == {"get", "list", "watch"}
    for res in ("bitbucketconnectors", "bitbucketaccessgrants"):
        assert _grants(objs, "ClusterRole", res) == {"get", "list", "watch", "patch", "update"}
        assert {"patch", "update"} <= _grants(objs, "ClusterRole", f"{res}/status")
        assert {"update"} <= _grants(objs, "ClusterRole", f"{res}/finalizers")
    assert _grants(objs, "ClusterRole", "events") == {"create", "patch"}
    assert _grants(objs, "ClusterRole", "tokenreviews") == {"create"}
    assert _grants(objs, "ClusterRole", "subjectaccessreviews") == {"create"}
    # Leases only in the release namespace, never cluster-wide.
    assert _grants(objs, "ClusterRole", "leases") == set()
    assert _grants(objs, "Role", "leases", NS) == {"get", "create", "update", "patch"}
    for role in by_kind(objs, "Role"):
        assert role["metadata"]["namespace"] == NS
        assert all(r["resources"] == ["leases"] for r in role["rules"])
    _assert_bindings_point_at_the_service_account(objs)


def test_watch_namespaces_scopes_secrets_and_resources_to_those_namespaces():
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    for res in ("secrets", "bitbucketconnectors", "bitbucketaccessgrants", "events"):
        assert _grants(objs, "ClusterRole", res) == set(), f"{res} must not be cluster-wide"
    for ns in ("team-a", "team-b"):
        assert _grants(objs, "Role", "secrets", ns) == {"get", "list", "watch"}
        assert {"list", "watch"} <= _grants(objs, "Role", "bitbucketconnectors", ns)
        bindings = [b for b in by_kind(objs, "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert len(bindings) == 1
    assert _grants(objs, "Role", "secrets", "team-c") == set()
    assert _grants(objs, "Role", "secrets", NS) == set()
    # API authentication stays cluster-scoped (TokenReview is not namespaced).
    assert _grants(objs, "ClusterRole", "tokenreviews") == {"create"}
    _assert_bindings_point_at_the_service_account(objs)


def test_secret_write_only_with_credential_rotation():
    objs = render({"credentialRotation": {"enabled": True}, "watchNamespaces": ["*"]})
    assert _grants(objs, "ClusterRole", "secrets") == {"get", "list", "watch", "create", "update", "patch"}
    objs = render({"credentialRotation": {"enabled": True}, "watchNamespaces": ["team-a"]})
    assert _grants(objs, "Role", "secrets", "team-a") == {"get", "list", "watch", "create", "update", "patch"}


def _assert_bindings_point_at_the_service_account(objs):
    sa = one(objs, "ServiceAccount")["metadata"]["name"]
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in objs
             if r["kind"] in ("Role", "ClusterRole")}
    bindings = by_kind(objs, "RoleBinding") + by_kind(objs, "ClusterRoleBinding")
    assert bindings
    for b in bindings:
        ns = b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None
        assert (b["roleRef"]["kind"], ns, b["roleRef"]["name"]) in roles, b
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa


# ---------------------------------------------------------------- CRDs


def test_crds_are_installed_with_keep_policy_by_default():
    crds = by_kind(render(), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "bitbucketaccessgrants.connectors.dev", "bitbucketconnectors.connectors.dev"]
    for c in crds:
        assert c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        # The chart's CRDs are the generated ones (spec unchanged).
        generated = chartlib.crd_for(c["spec"]["names"]["kind"])
        assert c["spec"] == generated["spec"]


def test_crds_can_be_left_out_or_not_kept():
    assert not by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition")
    for c in by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in c["metadata"].get("annotations", {})


def _structural_problems(node, path="$"):
    """Kubernetes refuses non-structural CRD schemas: every node has a type
    (unless it preserves unknown fields or is int-or-string), objects declare
    properties or additionalProperties, and no oneOf/anyOf/allOf carry types."""
    problems = []
    if not (node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")):
        if "type" not in node:
            problems.append(f"{path}: no type")
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields") and path.count(".") > 1:
        problems.append(f"{path}: object without properties")
    for key in ("oneOf", "anyOf", "allOf", "not", "$ref"):
        if key in node:
            problems.append(f"{path}: {key}")
    for name, sub in node.get("properties", {}).items():
        problems += _structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_crd_schemas_are_structural(kind):
    crd = chartlib.crd_for(kind)
    version = crd["spec"]["versions"][0]
    assert _structural_problems(version["schema"]["openAPIV3Schema"]) == []
    # The rendered CRD is itself a valid CustomResourceDefinition object.
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_chart_crd_copy_matches_crds_dir():
    chart_copy = sorted((CHART / "files" / "crds").glob("*.yaml"))
    generated = sorted((ROOT / "crds").glob("*.yaml"))
    assert [p.name for p in chart_copy] == [p.name for p in generated]
    for a, b in zip(chart_copy, generated):
        assert a.read_text() == b.read_text(), f"{a} is stale: cargo run -- crd --write"


# ---------------------------------------------------------------- values schema


@pytest.mark.parametrize("bad", [
    {"replicas": "two"},
    {"replicas": 0},
    {"watchNamespaces": "team-a"},
    {"persistence": {"enabled": "yes"}},
    {"logFormat": "xml"},
    {"unknownKey": True},
    {"image": {"repository": "x", "tagg": "1"}},
    {"image": {"repository": "x", "digest": "sha256:abc"}},
    {"image": {"repository": "x", "tag": "1.0 beta"}},
    {"image": {"repository": "x", "tag": ":1.0"}},
    {"connector": {"interval": "1 hour"}},
    {"connector": {"workspaces": ["Bad Slug"]}},
], ids=lambda v: json.dumps(v))
def test_values_schema_refuses_bad_values(bad):
    chart = chartlib.load_chart()
    with pytest.raises(helm.HelmError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmError):
        render(bad)


def test_values_schema_accepts_defaults_and_all_features():
    chart = chartlib.load_chart()
    chart.validate_schema({})
    chart.validate_schema(FULL)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"]), set(defaults) - set(schema["properties"])


# ---------------------------------------------------------------- services, policies


def test_service_networkpolicy_and_pdb():
    objs = render(FULL)
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()

    np = one(objs, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert np["spec"]["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]
    assert np["spec"]["ingress"][0]["from"] == FULL["networkPolicy"]["ingressFrom"]
    egress_ports = {(p["port"], p["protocol"]) for r in np["spec"]["egress"] for p in r["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")} <= egress_ports

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


# ---------------------------------------------------------------- plain manifests


def test_deploy_manifest_is_a_fresh_render():
    assert chartlib.DEPLOY.read_text() == chartlib.deploy_manifest(), \
        "deploy/bitbucket-operator.yaml is stale: run scripts/render-deploy"


def test_deploy_manifest_starts_with_its_namespace_and_validates():
    docs = [d for d in yaml.safe_load_all(chartlib.DEPLOY.read_text()) if d]
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == NS
    kinds = [d["kind"] for d in docs]
    # CRDs before anything that could use them, the requester policy with
    # them (no grant is created unchecked), Deployment last.
    assert kinds.index("CustomResourceDefinition") < kinds.index("Deployment")
    assert kinds.index("ValidatingAdmissionPolicyBinding") < kinds.index("Deployment")
    assert kinds[-1] == "Deployment"
    for d in docs[1:]:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == NS
    assert _validate_kubernetes(docs) == len(docs)


# ---------------------------------------------------------------- examples vs CRD schemas


def _example(path):
    return yaml.safe_load((ROOT / "examples" / path).read_text())


def _to_cel(value, schema):
    """A JSON value as the API server hands it to CEL: strings of format
    date-time become timestamps (so they compare as times, not text)."""
    schema = schema or {}
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return celpy.celtypes.MapType({celpy.celtypes.StringType(k): _to_cel(v, props.get(k))
                                       for k, v in value.items()})
    if isinstance(value, list):
        return celpy.celtypes.ListType([_to_cel(v, schema.get("items")) for v in value])
    if isinstance(value, str) and schema.get("format") == "date-time":
        return celpy.celtypes.TimestampType(value)
    return celpy.json_to_cel(value)


def _cel_eval(rule, value, old=None, schema=None):
    """Evaluates a CRD rule with `self` (and `oldSelf` for a transition rule)."""
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    bindings = {"self": _to_cel(value, schema)}
    if old is not None:
        bindings["oldSelf"] = _to_cel(old, schema)
    return program.evaluate(bindings)


def _is_transition_rule(rule):
    return "oldSelf" in rule


def _at(obj, path):
    """Values at a dotted path like .spec.resources.accounts.interval (None if absent)."""
    cur = obj
    for part in [p for p in path.split(".") if p]:
        if part.endswith("[]"):
            raise NotImplementedError(path)
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _schema_at(schema, path):
    for part in [p for p in path.split(".") if p]:
        schema = schema.get("properties", {}).get(part, {})
    return schema


def cel_failures(kind, obj, old=None):
    """Messages of the CRD rules `obj` breaks; with `old`, as an update from
    `old` (transition rules, which bind oldSelf, run only then and only
    where the field is set on both sides, as on the API server)."""
    schema = chartlib.crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    failures = []
    for path, rule, message in chartlib.cel_rules(schema):
        value = _at(obj, path)
        if value is None:
            continue  # rules apply only to fields that are set
        if _is_transition_rule(rule):
            old_value = None if old is None else _at(old, path)
            if old_value is None:
                continue
            ok = _cel_eval(rule, value, old_value, _schema_at(schema, path))
        else:
            ok = _cel_eval(rule, value, schema=_schema_at(schema, path))
        if not bool(ok):
            failures.append(message or rule)
    return failures


def assert_cel_rules_hold(kind, obj):
    assert cel_failures(kind, obj) == []


@pytest.mark.parametrize("path,kind", [
    ("connector.yaml", "BitbucketConnector"),
    ("accessgrant.yaml", "BitbucketAccessGrant"),
])
def test_examples_validate_against_the_crd_schemas(path, kind):
    obj = _example(path)
    assert obj["kind"] == kind and obj["apiVersion"] == "connectors.dev/v1alpha1"
    jsonschema.validate(obj, chartlib.crd_json_schema(kind))
    assert_cel_rules_hold(kind, obj)


def test_check_jsonschema_accepts_the_examples(tmp_path):
    exe = Path(shutil.which("check-jsonschema", path=str(ROOT / ".venv" / "bin")) or "check-jsonschema")
    for path, kind in (("connector.yaml", "BitbucketConnector"), ("accessgrant.yaml", "BitbucketAccessGrant")):
        schema_file = tmp_path / f"{kind}.json"
        schema_file.write_text(json.dumps(chartlib.crd_json_schema(kind)))
        res = subprocess.run([str(exe), "--schemafile", str(schema_file), str(ROOT / "examples" / path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def _connector(**spec):
    return {"apiVersion": "connectors.dev/v1alpha1", "kind": "BitbucketConnector",
            "metadata": {"name": "c"}, "spec": {"secretRef": {"name": "s"}, **spec}}


@pytest.mark.parametrize("spec", [
    {"resources": {"pipelines": {"enabled": True}}},   # unknown resource type
    {"workspaces": ["Not A Slug"]},
    {"interval": "1 hour"},
    {"rateLimit": {"requestsPerHour": 0}},
    {"rateLimit": {"maxInFlight": 65}},
    {"apiUrl": "ftp://example.com"},
    {"suspend": "yes"},
])
def test_connector_schema_refuses(spec):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_connector(**spec), chartlib.crd_json_schema("BitbucketConnector"))


def test_connector_secret_ref_name_is_required_and_not_empty():
    schema = chartlib.crd_json_schema("BitbucketConnector")
    bad = _connector()
    bad["spec"]["secretRef"] = {"name": ""}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad["spec"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("spec,message", [
    ({"interval": "30s"}, "interval must be at least 1m"),
    ({"resources": {"accounts": {"interval": "10s"}}}, "interval must be at least 1m"),
    ({"credentialRotation": {"appId": "a", "connectorId": "c", "schedule": "30m"}}, "schedule must be at least 1h"),
])
def test_connector_cel_rules_refuse(spec, message):
    failures = cel_failures("BitbucketConnector", _connector(**spec))
    assert any(message in f for f in failures), failures


def _grant(**overrides):
    g = copy.deepcopy(_example("accessgrant.yaml"))
    g["spec"].update(overrides)
    return g


@pytest.mark.parametrize("overrides,message", [
    ({"principal": {"user": "alice", "group": "devs"}}, "exactly one of user or group"),
    ({"principal": {}}, "exactly one of user or group"),
    ({"target": {"workspace": "w", "project": "P", "repository": "r"}}, "exactly one of group, project or repository"),
    ({"target": {"workspace": "w"}}, "exactly one of group, project or repository"),
    ({"target": {"workspace": "w", "group": "devs"}, "permission": "read"}, "group target"),
    ({"target": {"workspace": "w", "group": "devs"}, "permission": "member", "principal": {"group": "x"}}, "group target"),
    ({"target": {"workspace": "w", "repository": "r"}, "permission": "create-repo"}, "repository target"),
    ({"target": {"workspace": "w", "project": "P"}, "permission": "member"}, "project target"),
    ({"expiresAt": "2030-01-01T00:00:00Z"}, "not both"),
    ({"duration": "30s"}, "at least 1m"),
])
def test_grant_cel_rules_refuse(overrides, message):
    failures = cel_failures("BitbucketAccessGrant", _grant(**overrides))
    assert any(message in f for f in failures), failures


@pytest.mark.parametrize("overrides", [
    {"target": {"workspace": "w", "group": "devs"}, "permission": "member"},
    {"target": {"workspace": "w", "project": "P"}, "permission": "create-repo", "principal": {"group": "devs"}},
    {"target": {"workspace": "w", "repository": "r"}, "permission": "admin"},
])
def test_grant_cel_rules_accept_valid_combinations(overrides):
    g = _grant(**overrides)
    jsonschema.validate(g, chartlib.crd_json_schema("BitbucketAccessGrant"))
    assert cel_failures("BitbucketAccessGrant", g) == []


def _connector_with_keys(secret_keys):
    return {
        "apiVersion": "connectors.dev/v1alpha1", "kind": "BitbucketConnector",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {"secretRef": {"name": "s"}, "secretKeys": secret_keys},
    }


DISTINCT_KEYS = "every key name in effect"


@pytest.mark.parametrize("secret_keys", [
    {"workspaces": "BATON_APP_PASSWORD"},  # the attack: read the password as a workspace list
    {"provisioning": "BATON_TOKEN"},
    {"clientId": "shared", "clientSecret": "shared"},
    {"username": "BATON_TOKEN", "token": ""},  # empty means the default name
])
def test_secret_keys_cel_refuses_a_field_reading_another_fields_key(secret_keys):
    failures = cel_failures("BitbucketConnector", _connector_with_keys(secret_keys))
    assert any(DISTINCT_KEYS in f for f in failures), failures


@pytest.mark.parametrize("secret_keys", [
    {},
    {"username": "login", "appPassword": "api-token"},
    {"token": "BATON_CONSUMER_SECRET", "consumerSecret": "oauth.secret"},  # a default given up is free
    {"token": ""},
])
def test_secret_keys_cel_accepts_distinct_names(secret_keys):
    obj = _connector_with_keys(secret_keys)
    jsonschema.validate(obj, chartlib.crd_json_schema("BitbucketConnector"))
    assert cel_failures("BitbucketConnector", obj) == []


@pytest.mark.parametrize("name", ["with space", "a/b", "k" * 254])
def test_secret_keys_schema_refuses_names_that_are_not_secret_keys(name):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_connector_with_keys({"token": name}), chartlib.crd_json_schema("BitbucketConnector"))


def test_grant_permission_enum():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_grant(permission="owner"), chartlib.crd_json_schema("BitbucketAccessGrant"))


# ---------------------------------------------------------------- immutable request (transition rules)


def _updated(old, **spec):
    new = copy.deepcopy(old)
    for k, v in spec.items():
        if v is None:
            new["spec"].pop(k, None)
        else:
            new["spec"][k] = v
    return new


def test_grant_crd_has_the_immutability_rules():
    schema = chartlib.crd_for("BitbucketAccessGrant")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    transition = [rule for _, rule, _ in chartlib.cel_rules(schema) if _is_transition_rule(rule)]
    for field in ("principal", "target", "permission", "connectorRef", "duration", "expiresAt"):
        assert any(f"oldSelf.{field}" in r for r in transition), (field, transition)


@pytest.mark.parametrize("change,message", [
    ({"principal": {"user": "mallory"}}, "spec.principal is immutable"),
    ({"principal": {"group": "admins"}}, "spec.principal is immutable"),
    ({"target": {"workspace": "example-workspace", "repository": "billing"}}, "spec.target is immutable"),
    ({"permission": "admin"}, "spec.permission is immutable"),
    ({"connectorRef": {"name": "other"}}, "spec.connectorRef is immutable"),
    ({"connectorRef": {"name": "example", "namespace": "bitbucket"}}, "spec.connectorRef is immutable"),
    ({"duration": "9h"}, "may only shrink"),
    ({"duration": None}, "may only shrink"),
    ({"duration": None, "expiresAt": "2030-01-01T00:00:00Z"}, "may only shrink"),
])
def test_an_edit_of_the_request_is_refused(change, message):
    old = _example("accessgrant.yaml")  # write, duration 8h
    failures = cel_failures("BitbucketAccessGrant", _updated(old, **change), old=old)
    assert any(message in f for f in failures), failures


@pytest.mark.parametrize("old_expiry,new_expiry,ok", [
    ("2030-01-01T10:00:00Z", "2030-01-01T09:00:00Z", True),
    ("2030-01-01T10:00:00Z", "2030-01-01T10:00:00+00:00", True),
    # Later in time although "smaller" as text: a timestamp, not a string, is compared.
    ("2030-01-01T10:00:00Z", "2030-01-01T09:30:00-01:00", False),
    ("2030-01-01T10:00:00Z", "2030-01-02T00:00:00Z", False),
    ("2030-01-01T10:00:00Z", None, False),
])
def test_expires_at_may_only_move_earlier(old_expiry, new_expiry, ok):
    old = _updated(_example("accessgrant.yaml"), duration=None, expiresAt=old_expiry)
    new = _updated(old, expiresAt=new_expiry)
    failures = cel_failures("BitbucketAccessGrant", new, old=old)
    assert (failures == []) == ok, failures


@pytest.mark.parametrize("change", [
    {"duration": "1h"},           # shorter
    {"duration": "8h"},           # unchanged
])
def test_shortening_the_duration_is_allowed(change):
    old = _example("accessgrant.yaml")
    assert cel_failures("BitbucketAccessGrant", _updated(old, **change), old=old) == []


def test_adding_an_end_where_there_was_none_is_allowed():
    old = _updated(_example("accessgrant.yaml"), duration=None)
    for change in ({"duration": "1h"}, {"expiresAt": "2030-01-01T00:00:00Z"}):
        assert cel_failures("BitbucketAccessGrant", _updated(old, **change), old=old) == [], change


def test_metadata_edits_are_not_spec_edits():
    old = _example("accessgrant.yaml")
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"team": "a"}
    assert cel_failures("BitbucketAccessGrant", new, old=old) == []


# ---------------------------------------------------------------- connector policy (spec.provisioning)


def test_connector_provisioning_boolean_form_is_refused_by_the_schema():
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'object'"):
        jsonschema.validate(_connector(provisioning=True), chartlib.crd_json_schema("BitbucketConnector"))


@pytest.mark.parametrize("provisioning", [
    {"allowedPermissions": ["owner"]},
    {"allowedTargets": {"repositories": ["no-slash"]}},
    {"allowedTargets": {"pipelines": ["a/b"]}},
    {"grantNamespaces": ["Not_A_Namespace"]},
    {"maxDuration": "1 week"},
])
def test_connector_policy_schema_refuses(provisioning):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_connector(provisioning=provisioning), chartlib.crd_json_schema("BitbucketConnector"))


def test_connector_policy_max_duration_is_at_least_a_minute():
    failures = cel_failures("BitbucketConnector", _connector(provisioning={"maxDuration": "30s"}))
    assert any("maxDuration must be at least 1m" in f for f in failures), failures
    assert cel_failures("BitbucketConnector", _connector(provisioning={"maxDuration": "8h"})) == []


def test_connector_policy_defaults_are_the_safe_side():
    props = (chartlib.crd_for("BitbucketConnector")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
             ["properties"]["spec"]["properties"]["provisioning"]["properties"])
    assert props["maxDuration"]["default"] == "168h"
    assert props["requireDuration"]["default"] is True
    assert props["allowedPermissions"]["default"] == ["read", "write"]
    assert "default" not in props["enabled"], "absent: the Secret decides"


# ---------------------------------------------------------------- ValidatingAdmissionPolicy (requested-by)


REQUESTED_BY = "connectors.dev/requested-by"


def _policy(values=None):
    return one(render(values), "ValidatingAdmissionPolicy")


def _grant_object(requested_by=None):
    g = copy.deepcopy(_example("accessgrant.yaml"))
    if requested_by is not None:
        g["metadata"]["annotations"] = {REQUESTED_BY: requested_by}
    return g


def admission(policy, operation, username, obj, old=None):
    """Evaluates the policy as the API server does for one request: its
    variables in order, then every validation. Returns the messages of the
    validations that fail (empty: admitted)."""
    env = celpy.Environment()
    request = {"operation": operation, "userInfo": {"username": username, "groups": ["system:authenticated"]}}
    bindings = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel(request),
    }
    variables = {}
    for var in policy["spec"].get("variables", []):
        bindings["variables"] = celpy.json_to_cel(variables)
        value = env.program(env.compile(var["expression"])).evaluate(bindings)
        variables[var["name"]] = str(value) if isinstance(value, celpy.celtypes.StringType) else value
    bindings["variables"] = celpy.json_to_cel(variables)
    failures = []
    for v in policy["spec"]["validations"]:
        result = env.program(env.compile(v["expression"])).evaluate(bindings)
        assert isinstance(result, celpy.celtypes.BoolType), (v["expression"], result)
        if not result:
            if "messageExpression" in v:
                failures.append(str(env.program(env.compile(v["messageExpression"])).evaluate(bindings)))
            else:
                failures.append(v["message"])
    return failures


def test_requested_by_policy_matches_grant_creates_and_updates_only():
    policy = _policy()
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": ["connectors.dev"], "apiVersions": ["*"],
                      "operations": ["CREATE", "UPDATE"], "resources": ["bitbucketaccessgrants"]}]
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = one(render(), "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]


def test_create_requires_the_requesters_own_name():
    policy = _policy()
    assert admission(policy, "CREATE", "alice", _grant_object("alice")) == []
    forged = admission(policy, "CREATE", "alice", _grant_object("bob"))
    assert forged == ['metadata.annotations["connectors.dev/requested-by"] must be your user name, "alice"'], forged
    assert admission(policy, "CREATE", "alice", _grant_object()) != [], "missing annotation"
    other = _grant_object()
    other["metadata"]["annotations"] = {"team": "a"}
    assert admission(policy, "CREATE", "alice", other) != [], "annotations without it"
    sa = "system:serviceaccount:flux-system:kustomize-controller"
    assert admission(policy, "CREATE", sa, _grant_object(sa)) == []


def test_update_cannot_change_or_remove_the_requester():
    policy = _policy()
    old = _grant_object("alice")
    assert admission(policy, "UPDATE", "operator", copy.deepcopy(old), old) == [], "finalizer or label edits pass"
    assert admission(policy, "UPDATE", "bob", _grant_object("bob"), old) != [], "rewritten"
    assert admission(policy, "UPDATE", "alice", _grant_object(), old) != [], "removed"
    legacy = _grant_object()
    assert admission(policy, "UPDATE", "bob", copy.deepcopy(legacy), legacy) == [], "grants made before the policy"
    assert admission(policy, "UPDATE", "bob", _grant_object("bob"), legacy) != [], "cannot be added later"


def test_requested_by_policy_can_be_turned_off_and_follows_watched_namespaces():
    off = render({"admissionPolicy": {"requestedBy": {"enabled": False}}})
    assert not by_kind(off, "ValidatingAdmissionPolicy") and not by_kind(off, "ValidatingAdmissionPolicyBinding")
    binding = one(render({"watchNamespaces": ["team-a", NS]}), "ValidatingAdmissionPolicyBinding")
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert selector == [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", NS]}]
    everywhere = one(render({"watchNamespaces": ["*"]}), "ValidatingAdmissionPolicyBinding")
    assert "matchResources" not in everywhere["spec"]


def test_requested_by_policy_validates_and_a_broken_one_would_not():
    for o in by_kind(render(), "ValidatingAdmissionPolicy") + by_kind(render(), "ValidatingAdmissionPolicyBinding"):
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    broken = copy.deepcopy(_policy())
    broken["spec"]["validations"][0]["expresion"] = broken["spec"]["validations"][0].pop("expression")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_requested_by_policy_is_in_the_plain_manifests():
    docs = [d for d in yaml.safe_load_all(chartlib.DEPLOY.read_text()) if d]
    assert one(docs, "ValidatingAdmissionPolicy")["spec"] == _policy()["spec"]


def test_secret_example_uses_the_baton_keys():
    secret = _example("secret.yaml")
    assert secret["kind"] == "Secret"
    # The operator reads only Secrets that opt in with this label.
    assert secret["metadata"]["labels"]["connectors.dev/bitbucket-credentials"] == "true"
    keys = set(secret["stringData"])
    assert {"BATON_USERNAME", "BATON_APP_PASSWORD", "BATON_WORKSPACES", "BATON_PROVISIONING"} <= keys
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    connector = _example("connector.yaml")
    assert connector["spec"]["secretRef"]["name"] == secret["metadata"]["name"]
    assert connector["metadata"]["namespace"] == secret["metadata"]["namespace"]
    grant = _example("accessgrant.yaml")
    assert grant["spec"]["connectorRef"]["name"] == connector["metadata"]["name"]
    assert "duration" in grant["spec"]


def test_flux_examples():
    docs = [d for d in yaml.safe_load_all((ROOT / "examples/flux/helmrelease.yaml").read_text()) if d]
    release = next(d for d in docs if d["kind"] == "HelmRelease")
    source = next(d for d in docs if d["kind"] in ("OCIRepository", "HelmRepository"))
    assert release["spec"]["chartRef"]["name"] == source["metadata"]["name"]
    assert source["spec"]["url"].endswith("/bitbucket-connector-operator")
    chartlib.load_chart().validate_schema(release["spec"]["values"])
    kustomization = yaml.safe_load((ROOT / "examples/flux/kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["spec"]["wait"] is True


# ---------------------------------------------------------------- Argo CD health (Lua)

LUA = shutil.which("lua5.4")
CONNECTOR_LUA = ROOT / "gitops/argocd/health.lua"
GRANT_LUA = ROOT / "gitops/argocd/health-accessgrant.lua"


def test_argocd_cm_contains_the_scripts_verbatim():
    cm = yaml.safe_load((ROOT / "examples/argocd/argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"]["resource.customizations.health.connectors.dev_BitbucketConnector"] == CONNECTOR_LUA.read_text()
    assert cm["data"]["resource.customizations.health.connectors.dev_BitbucketAccessGrant"] == GRANT_LUA.read_text()


def to_lua(value):
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {to_lua(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(value)


def run_health(script, obj, tmp_path):
    assert LUA, "lua5.4 is not installed (scripts/test installs it)"
    f = tmp_path / "obj.lua"
    f.write_text("return " + to_lua(obj) + "\n")
    res = subprocess.run([LUA, str(ROOT / "tests/chart/lua_harness.lua"), str(script), str(f)],
                         capture_output=True, text=True, check=True)
    status, _, message = res.stdout.rstrip("\n").partition("\t")
    return status, message


def cond(type_, status, reason="R", message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


def cr(kind="BitbucketConnector", generation=2, spec=None, status=None):
    obj = {"apiVersion": "connectors.dev/v1alpha1", "kind": kind,
           "metadata": {"name": "x", "namespace": "y", "generation": generation},
           "spec": spec if spec is not None else {"secretRef": {"name": "s"}}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("obj,expected,message", [
    (cr(status={"observedGeneration": 2, "state": "Connected",
                "conditions": [cond("Connected", "True"), cond("Ready", "True", message="All 5 resource types synced")]}),
     "Healthy", "All 5 resource types synced"),
    (cr(status={"observedGeneration": 2, "state": "Error",
                "conditions": [cond("Ready", "False"), cond("Stalled", "True", "InvalidCredentials", "Bitbucket refused the credentials")]}),
     "Degraded", "Bitbucket refused the credentials"),
    (cr(), "Progressing", None),
    (cr(status={"observedGeneration": 1, "conditions": [cond("Ready", "True")]}), "Progressing", "generation 2"),
    (cr(status={"observedGeneration": 2, "conditions": [cond("Ready", "False", message="Syncing repositories")]}),
     "Progressing", "Syncing repositories"),
    (cr(status={"observedGeneration": 2, "conditions": [cond("Reconciling", "True")]}), "Progressing", None),
    (cr(spec={"secretRef": {"name": "s"}, "suspend": True},
        status={"observedGeneration": 2, "conditions": [cond("Ready", "True")]}), "Suspended", "suspend"),
    (cr(spec={"secretRef": {"name": "s"}, "suspend": False},
        status={"observedGeneration": 2, "conditions": [cond("Ready", "True")]}), "Healthy", None),
], ids=["ready", "stalled", "no-status", "stale-generation", "ready-false", "reconciling", "suspended", "not-suspended"])
def test_connector_health(obj, expected, message, tmp_path):
    status, msg = run_health(CONNECTOR_LUA, obj, tmp_path)
    assert status == expected, msg
    if message:
        assert message in msg


def grant(status=None, spec=None):
    return cr("BitbucketAccessGrant", spec=spec or {"permission": "write"}, status=status)


@pytest.mark.parametrize("obj,expected", [
    (grant({"observedGeneration": 2, "state": "Granted", "conditions": [cond("Ready", "True")]}), "Healthy"),
    (grant({"observedGeneration": 2, "state": "Failed", "conditions": [cond("Ready", "False", message="user not found")]}), "Degraded"),
    (grant({"observedGeneration": 2, "state": "Pending", "conditions": [cond("Stalled", "True", message="provisioning disabled")]}), "Degraded"),
    (grant(), "Progressing"),
    (grant({"observedGeneration": 1, "state": "Granted", "conditions": [cond("Ready", "True")]}), "Progressing"),
    (grant({"observedGeneration": 2, "state": "Pending", "conditions": [cond("Ready", "False")]}), "Progressing"),
    (grant({"observedGeneration": 2, "state": "Expired", "conditions": [cond("Ready", "False")]}), "Healthy"),
    (grant({"observedGeneration": 2, "state": "Denied", "conditions": [cond("Ready", "False", "PermissionNotAllowed"),
                                                                   cond("Stalled", "True", "PermissionNotAllowed")]}),
     "Degraded"),
    (grant({"observedGeneration": 2, "state": "Revoked", "conditions": [cond("Ready", "False", "ConnectorDeleted")]}),
     "Degraded"),
    (grant({"observedGeneration": 2, "state": "Granted", "conditions": [cond("Ready", "True")]},
           spec={"permission": "write", "suspend": True}), "Healthy"),
], ids=["granted", "failed", "stalled", "no-status", "stale-generation", "pending", "expired", "denied", "revoked",
        "never-suspended"])
def test_access_grant_health(obj, expected, tmp_path):
    status, msg = run_health(GRANT_LUA, obj, tmp_path)
    assert status == expected, msg


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("podSecurityContext", "securityContext", "resources"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    missing = [k for k in keys(defaults) if f"`{k}`" not in readme]
    assert missing == [], f"README values table misses {missing}"


# ---------------------------------------------------------------- data API connection limits


def test_data_api_connection_limits_reach_the_container():
    env = {e["name"]: e.get("value") for e in container(render())["env"]}
    assert env["DATA_API_HEADER_READ_TIMEOUT"] == "10s"
    assert env["DATA_API_MAX_CONNECTIONS"] == "512"
    assert env["DATA_API_WRITE_TIMEOUT"] == "30s"
    limits = {"headerReadTimeout": "1m30s", "maxConnections": 65536, "writeTimeout": "45"}
    env = {e["name"]: e.get("value") for e in container(render({"dataApi": limits}))["env"]}
    assert env["DATA_API_HEADER_READ_TIMEOUT"] == "1m30s"
    assert env["DATA_API_MAX_CONNECTIONS"] == "65536"
    assert env["DATA_API_WRITE_TIMEOUT"] == "45"
    # The same limits apply with the data API on its own TLS port.
    tls = container(render({"dataApi": {**limits, "tls": {"secretName": "api-tls"}}}))
    assert {"name": "DATA_API_MAX_CONNECTIONS", "value": "65536"} in tls["env"]


@pytest.mark.parametrize("bad", [
    {"maxConnections": 0},
    {"maxConnections": 65537},
    {"maxConnections": "512"},
    {"maxConnections": 1.5},
    {"headerReadTimeout": "10 s"},
    {"headerReadTimeout": "0s"},
    {"headerReadTimeout": "500ms"},
    {"writeTimeout": "0"},
    {"writeTimeout": 30},
    {"writeTimeout": "1d"},
    {"writeTimeout": ""},
    {"tls": {"port": 8081}},
], ids=lambda v: json.dumps(v))
def test_values_schema_refuses_bad_data_api_limits(bad):
    chart = chartlib.load_chart()
    # Their neighbours within range pass: the refusal is the range, not the key.
    for good in ({"maxConnections": 1}, {"maxConnections": 65536}, {"headerReadTimeout": "1s"},
                 {"headerReadTimeout": "10"}, {"writeTimeout": "1h30m"}, {"writeTimeout": "01s"}):
        chart.validate_schema({"dataApi": good})
    with pytest.raises(helm.HelmError):
        chart.validate_schema({"dataApi": bad})
    with pytest.raises(helm.HelmError):
        render({"dataApi": bad})
