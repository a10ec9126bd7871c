//! The one way the controllers read a Secret: from the object's own
//! namespace, and only when the Secret opts in with the label
//! [`OPT_IN_LABEL`](crate::settings::OPT_IN_LABEL). The label is checked on
//! the metadata first, so the data of a Secret that has not opted in never
//! reaches this process, and again on the full object, so a label removed
//! in between is honoured too.

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

use crate::settings::opted_in;

/// What reading a connector's Secret found.
#[derive(Debug)]
pub enum SecretRead {
    NotFound,
    /// It exists but does not carry the opt-in label: not read.
    NotOptedIn,
    Found(Box<Secret>),
}

/// Reads `namespace/name` if it opted in.
pub async fn read_opted_in(client: &Client, namespace: &str, name: &str) -> Result<SecretRead, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(meta) = secrets.get_metadata_opt(name).await? else {
        return Ok(SecretRead::NotFound);
    };
    if !opted_in(&meta.metadata) {
        return Ok(SecretRead::NotOptedIn);
    }
    Ok(match secrets.get_opt(name).await? {
        None => SecretRead::NotFound,
        Some(secret) if !opted_in(&secret.metadata) => SecretRead::NotOptedIn,
        Some(secret) => SecretRead::Found(Box::new(secret)),
    })
}
