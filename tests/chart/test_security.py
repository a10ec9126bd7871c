"""Least privilege by default (issue 12): what the chart grants the operator,
where it may connect, and how the data API is exposed."""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import pytest

import chartlib

NS = chartlib.DEPLOY_NAMESPACE


def render(values=None, **kw):
    return chartlib.render(values, **kw)


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def rules(objs, kind=None, namespace=None):
    for role in objs:
        if role["kind"] not in ("Role", "ClusterRole") or (kind and role["kind"] != kind):
            continue
        if namespace is not None and role["metadata"].get("namespace") != namespace:
            continue
        yield from role["rules"]


def secret_rules(objs, **kw):
    return [r for r in rules(objs, **kw) if "secrets" in r["resources"]]


def container(objs):
    return by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]


def test_default_is_the_release_namespace_only_and_read_only_secrets():
    objs = render()
    assert not secret_rules(objs, kind="ClusterRole"), "no cluster-wide Secret access by default"
    assert secret_rules(objs, kind="Role", namespace=NS) == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]
    cluster_resources = {res for r in rules(objs, kind="ClusterRole") for res in r["resources"]}
    assert cluster_resources == {"tokenreviews", "subjectaccessreviews"}
    args = container(objs)["args"]
    assert args[args.index("--watch-namespaces") + 1] == NS


def test_cluster_wide_only_when_asked_for_explicitly():
    objs = render({"watchNamespaces": ["*"]})
    assert secret_rules(objs, kind="ClusterRole") == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]
    assert "--watch-namespaces" not in container(objs)["args"]
    with pytest.raises(helm.HelmError, match="cannot be combined"):
        render({"watchNamespaces": ["*", "team-a"]})
    chart = chartlib.load_chart()
    for bad in (["Team"], ["**"], ["a*"]):
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"watchNamespaces": bad})


def test_secret_write_only_with_rotation_create_namespace_wide_and_never_delete():
    for values in ({}, {"watchNamespaces": ["team-a"]}, {"watchNamespaces": ["*"]}):
        verbs = {v for r in secret_rules(render(values)) for v in r["verbs"]}
        assert verbs == {"get", "list", "watch"}, values
    objs = render({"watchNamespaces": ["team-a"], "credentialRotation": {"enabled": True}})
    write = [r for r in secret_rules(objs, namespace="team-a") if set(r["verbs"]) & {"create", "update"}]
    assert write == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                     {"apiGroups": [""], "resources": ["secrets"], "verbs": ["update", "patch"]}]
    # RBAC cannot limit create by name: only update and patch carry resourceNames.
    objs = render({"watchNamespaces": ["team-a"],
                   "credentialRotation": {"enabled": True, "secretNames": ["acme-conductorone"]}})
    write = [r for r in secret_rules(objs, namespace="team-a") if set(r["verbs"]) & {"create", "update"}]
    assert write == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                     {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["acme-conductorone"],
                      "verbs": ["update", "patch"]}]
    for values in ({"credentialRotation": {"enabled": True}}, {"watchNamespaces": ["*"], "credentialRotation": {"enabled": True}}):
        verbs = {v for r in secret_rules(render(values)) for v in r["verbs"]}
        assert not verbs & {"delete", "deletecollection", "*"}, values


def test_network_policy_is_on_by_default_with_dns_https_and_api_server_only():
    objs = render()
    (np,) = by_kind(objs, "NetworkPolicy")
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress = np["spec"]["egress"]
    ports = {(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")}
    assert all("to" not in rule for rule in egress), "no extra destinations by default"
    assert np["spec"]["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]

    (np,) = by_kind(render({"networkPolicy": {"apiServerCIDRs": ["10.0.0.1/32"]}}), "NetworkPolicy")
    api_rule = [r for r in np["spec"]["egress"] if {"port": 6443, "protocol": "TCP"} in r["ports"]]
    assert api_rule[0]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert not by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_allowed_api_urls_and_audience_are_passed_only_when_set():
    args = container(render())["args"]
    for flag in ("--allowed-api-urls", "--data-api-audience", "--data-api-tls-cert"):
        assert flag not in args, flag
    args = container(render({"allowedApiUrls": ["https://api.bitbucket.org", "https://bb.example.com/proxy"],
                             "dataApi": {"audience": "inventory"}}))["args"]
    assert args[args.index("--allowed-api-urls") + 1] == "https://api.bitbucket.org,https://bb.example.com/proxy"
    assert args[args.index("--data-api-audience") + 1] == "inventory"
    with pytest.raises(helm.HelmError):
        chartlib.load_chart().validate_schema({"allowedApiUrls": ["ftp://x"]})


@pytest.mark.parametrize("tls", [{"secretName": "api-tls"},
                                 {"certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}],
                         ids=["secret", "cert-manager"])
def test_data_api_tls_from_a_secret_or_cert_manager(tls):
    objs = render({"dataApi": {"tls": tls}})
    c = container(objs)
    args = c["args"]
    assert args[args.index("--data-api-tls-cert") + 1] == "/etc/bitbucket-operator/data-api-tls/tls.crt"
    assert args[args.index("--data-api-tls-key") + 1] == "/etc/bitbucket-operator/data-api-tls/tls.key"
    assert args[args.index("--data-api-addr") + 1] == "0.0.0.0:8443"
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    secret = next(v for v in pod["volumes"] if v["name"] == "data-api-tls")["secret"]["secretName"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "data-api-tls")
    assert mount["readOnly"] is True
    assert {"name": "data-api", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
    svc = by_kind(objs, "Service")[0]
    assert {"name": "data-api", "port": 8443, "targetPort": "data-api", "protocol": "TCP"} in svc["spec"]["ports"]
    (np,) = by_kind(objs, "NetworkPolicy")
    assert {"port": 8443, "protocol": "TCP"} in np["spec"]["ingress"][0]["ports"]
    certs = by_kind(objs, "Certificate")
    if "certManager" in tls:
        assert len(certs) == 1 and certs[0]["spec"]["secretName"] == secret
        assert certs[0]["spec"]["issuerRef"] == {"name": "ca", "kind": "ClusterIssuer"}
        assert f"bitbucket-connector-operator.{NS}.svc" in certs[0]["spec"]["dnsNames"]
    else:
        assert not certs and secret == "api-tls"
    for o in objs:
        if o["kind"] not in ("BitbucketConnector", "BitbucketAccessGrant", "ServiceMonitor", "Certificate"):
            kubernetes_validate.validate(o, "1.33.0", strict=True)


def test_chart_readme_shows_the_effective_rbac():
    readme = (chartlib.CHART / "README.md").read_text()
    assert "## Effective RBAC" in readme
    for needle in ("`secrets`", "get, list, watch", "update, patch", "`credentialRotation.enabled`",
                   "`tokenreviews`", "`subjectaccessreviews`", "resourceNames"):
        assert needle in readme, needle
