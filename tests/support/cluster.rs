//! Steps of the real-cluster tests (`#[ignore]`, a cluster in `KUBECONFIG`) that also run
//! against the fake API server: polling the API, applying the CRDs, a namespace of one's
//! own that is deleted also when the test fails.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

/// How often [`poll`] asks again.
const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// Runs `steps` on the cluster of `KUBECONFIG`: applies the CRDs (as `manager`), then runs
/// them in a new namespace `{prefix}-{pid}` that is deleted afterwards, also on failure.
pub async fn on_real_cluster<F>(manager: &str, prefix: &str, steps: impl FnOnce(Client, String) -> F)
where
    F: Future<Output = ()>,
{
    let client = Client::try_default().await.expect("a cluster in KUBECONFIG");
    apply_crds(&client, manager).await;
    let namespace = format!("{prefix}-{}", std::process::id());
    in_new_namespace(client, namespace, steps).await;
}

/// Calls `probe` until it returns a value; fails the test after `timeout`, naming `what`.
pub async fn poll<T>(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Applies the project's CRDs (server-side, as `manager`) and waits until the API server
/// serves each (Established), however long a slow cluster takes up to a minute.
async fn apply_crds(client: &Client, manager: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in bitbucket_operator::crd::crds() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&crd))
            .await
            .expect("apply CRD");
        poll(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            async || {
                let crd = crds.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
}

/// Creates the namespace `namespace`, runs `steps` in it, and deletes it again, also when a
/// step fails (the failure is then passed on), so a real cluster is left as it was.
async fn in_new_namespace<F>(client: Client, namespace: String, steps: impl FnOnce(Client, String) -> F)
where
    F: Future<Output = ()>,
{
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .expect("create namespace");
    let outcome = AssertUnwindSafe(steps(client, namespace.clone())).catch_unwind().await;
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .expect("delete namespace");
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure);
    }
}

/// Waits until `name` is gone from `api` (its finalizers ran), for up to `timeout`.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    poll(&format!("{name} gone"), timeout, async || {
        api.get_opt(name).await.ok().and_then(|o| o.is_none().then_some(()))
    })
    .await;
}
