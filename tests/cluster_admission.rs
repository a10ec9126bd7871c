//! The chart's ValidatingAdmissionPolicy on a real API server (ignored by
//! default; needs a cluster of Kubernetes 1.30+ in `KUBECONFIG` where you may
//! create CRDs, admission policies, namespaces, Roles and impersonate users,
//! for example kind as its admin):
//!
//! ```text
//! cargo test --test cluster_admission -- --ignored --nocapture
//! ```
//!
//! The policy and its binding are taken from `deploy/bitbucket-operator.yaml`
//! (the chart rendered with default values), renamed for this run and bound
//! to a fresh namespace, which is deleted at the end, also when a step fails.
//! A user made up for the test (impersonated, with a Role that lets it create
//! grants there) may create a grant that names itself as requester and no
//! other; the test's own user cannot forge one either, nor change the
//! requester of an existing grant. The CEL expressions themselves are also
//! evaluated without a cluster in `tests/chart` (celpy).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const MANAGER: &str = "bitbucket-operator-admission-e2e";
const ANNOTATION: &str = bitbucket_operator::crd::REQUESTED_BY_ANNOTATION;

/// The policy and binding of the plain manifests, renamed with `suffix` and
/// bound to `namespace` only.
fn policy_objects(suffix: &str, namespace: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/bitbucket-operator.yaml"))
        .expect("deploy/bitbucket-operator.yaml");
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let Ok(mut obj) = <Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        if kind != "ValidatingAdmissionPolicy" && kind != "ValidatingAdmissionPolicyBinding" {
            continue;
        }
        let name = format!("{}-{suffix}", obj["metadata"]["name"].as_str().unwrap());
        obj["metadata"]["name"] = json!(name);
        if kind == "ValidatingAdmissionPolicyBinding" {
            let policy = format!("{}-{suffix}", obj["spec"]["policyName"].as_str().unwrap());
            obj["spec"]["policyName"] = json!(policy);
            obj["spec"]["matchResources"] = json!({"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]}]}});
        }
        found.push(obj);
    }
    assert_eq!(found.len(), 2, "the policy and its binding are in the plain manifests");
    found
}

fn admission_api(client: &Client, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
    let plural = if kind == "ValidatingAdmissionPolicy" {
        "validatingadmissionpolicies"
    } else {
        "validatingadmissionpolicybindings"
    };
    Api::all_with(client.clone(), &ApiResource::from_gvk_with_plural(&gvk, plural))
}

fn grant(name: &str, requested_by: Option<&str>) -> bitbucket_operator::crd::BitbucketAccessGrant {
    let mut obj = json!({
        "apiVersion": "connectors.dev/v1alpha1", "kind": "BitbucketAccessGrant",
        "metadata": {"name": name},
        "spec": {"connectorRef": {"name": "bb"}, "principal": {"user": "alice"},
                 "target": {"workspace": "acme", "repository": "api"}, "permission": "read", "duration": "1h"},
    });
    if let Some(who) = requested_by {
        obj["metadata"]["annotations"] = json!({ANNOTATION: who});
    }
    serde_json::from_value(obj).unwrap()
}

/// Whether `err` is the policy's refusal.
fn refused_by_policy(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.message.contains(ANNOTATION))
}

#[tokio::test]
#[ignore = "needs a Kubernetes 1.30+ cluster in KUBECONFIG"]
async fn the_requester_annotation_cannot_be_forged_on_a_real_cluster() {
    let client = Client::try_default().await.expect("a cluster in KUBECONFIG");
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in bitbucket_operator::crd::crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
    }
    let suffix = format!("e2e-{}", std::process::id());
    let namespace = format!("bbo-vap-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .expect("create namespace");
    let objects = policy_objects(&suffix, &namespace);
    for obj in &objects {
        let api = admission_api(&client, obj["kind"].as_str().unwrap());
        api.patch(
            obj["metadata"]["name"].as_str().unwrap(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .expect("apply the admission policy (Kubernetes 1.30+)");
    }

    let outcome = AssertUnwindSafe(steps(client.clone(), namespace.clone()))
        .catch_unwind()
        .await;
    for obj in objects.iter().rev() {
        let api = admission_api(&client, obj["kind"].as_str().unwrap());
        let _ = api
            .delete(obj["metadata"]["name"].as_str().unwrap(), &DeleteParams::default())
            .await;
    }
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .expect("delete namespace");
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure);
    }
}

async fn steps(client: Client, namespace: String) {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview (Kubernetes 1.28+)");
    let me = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("the API server names the test's user");
    let grants: Api<bitbucket_operator::crd::BitbucketAccessGrant> = Api::namespaced(client.clone(), &namespace);

    // The binding takes a moment to be enforced: wait until a forgery is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let probe = format!("probe-{n}");
        match grants
            .create(&PostParams::default(), &grant(&probe, Some("someone-else")))
            .await
        {
            Err(err) if refused_by_policy(&err) => break,
            Ok(_) => {
                let _ = grants.delete(&probe, &DeleteParams::default()).await;
            }
            Err(err) => panic!("unexpected error: {err}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "the policy was never enforced");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The test's own user: its own name is accepted, a missing or forged one is not.
    let err = grants
        .create(&PostParams::default(), &grant("no-annotation", None))
        .await
        .unwrap_err();
    assert!(refused_by_policy(&err), "{err}");
    grants
        .create(&PostParams::default(), &grant("mine", Some(&me)))
        .await
        .expect("a grant naming its creator is admitted");
    // The requester of an existing grant cannot be changed.
    let err = grants
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION: "someone-else"}}})),
        )
        .await
        .unwrap_err();
    assert!(refused_by_policy(&err), "{err}");
    // Other metadata edits pass.
    grants
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .expect("a label edit is admitted");

    // Another user (impersonated, allowed to create grants here).
    let alice = format!("bbo-test-alice-{}", std::process::id());
    let roles: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "Role"),
            "roles",
        ),
    );
    let bindings: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "RoleBinding"),
            "rolebindings",
        ),
    );
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "grant-requester"},
        "rules": [{"apiGroups": ["connectors.dev"], "resources": ["bitbucketaccessgrants"], "verbs": ["create", "get"]}]});
    roles
        .patch("grant-requester", &PatchParams::apply(MANAGER), &Patch::Apply(&role))
        .await
        .expect("Role");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "grant-requester"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "grant-requester"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": alice}]});
    bindings
        .patch("grant-requester", &PatchParams::apply(MANAGER), &Patch::Apply(&binding))
        .await
        .expect("RoleBinding");
    let mut config = kube::Config::infer().await.expect("KUBECONFIG");
    config.auth_info.impersonate = Some(alice.clone());
    let as_alice: Api<bitbucket_operator::crd::BitbucketAccessGrant> =
        Api::namespaced(Client::try_from(config).expect("client"), &namespace);
    let err = as_alice
        .create(&PostParams::default(), &grant("alice-forged", Some(&me)))
        .await
        .unwrap_err();
    assert!(refused_by_policy(&err), "alice cannot name the test's user: {err}");
    let created = as_alice
        .create(&PostParams::default(), &grant("alice-own", Some(&alice)))
        .await
        .expect("alice may create a grant naming herself");
    assert_eq!(
        created.annotations().get(ANNOTATION).map(String::as_str),
        Some(alice.as_str())
    );
}

/// What the real-cluster test applies: the plain manifests' policy, bound to
/// the test's namespace only.
#[test]
fn the_test_applies_the_shipped_policy_bound_to_its_namespace() {
    let objects = policy_objects("x", "ns-1");
    let policy = &objects[0];
    assert_eq!(policy["kind"], "ValidatingAdmissionPolicy");
    let expressions: Vec<&str> = policy["spec"]["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["expression"].as_str().unwrap())
        .collect();
    assert!(
        expressions.iter().any(|e| e.contains("request.userInfo.username")),
        "{expressions:?}"
    );
    let binding = &objects[1];
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["ns-1"])
    );
}
