//! ConductorOne: this connector as a service-mode baton connector,
//! interchangeable with the vendor's `baton-bitbucket` from ConductorOne's
//! point of view (wire facts: `shared/conductorone/PROTOCOL.md`).
//!
//! - [`inventory`]: the store's data as ConductorOne resource types,
//!   resources, entitlements and grants (baton-bitbucket's ids and slugs).
//! - [`c1z`]: the c1z v1 file (writer, and a reader that verifies it).
//! - [`export`]: store → c1z in one call (`sync --c1z`, `export`, `sync_full`).
//! - [`ksuid`]: sync run ids.
//! - [`proto`]: generated protobuf/gRPC code (`build.rs`, `proto/`).
//! - [`cli`]: the `export` command; [`connect`]: the `connect` command.
//! - [`credentials`], [`token`]: client id/secret, EdDSA assertion, token cache.
//! - [`rpc`]: the authenticated `BatonService` client over rustls.
//! - [`session`]: the service loop ([`ServiceSession`]); [`snapshot`]: the
//!   budget-aware refresh before an upload; [`provisioning`]: grant/revoke
//!   tasks → [`crate::provision::Provisioner`]; [`status`], [`metrics`]: what
//!   the operator shows.
//! - [`credential_api`]: the credential REST calls (Rotate, Get, Revoke);
//!   [`rotation`]: the crash-safe rotation state machine; [`rotation_file`]:
//!   its state in a file; [`rotate_cli`]: the `rotate-credentials` command.
//!
//! # For the operator (one session per connector, on the leader)
//!
//! ```text
//! // once, where the registry is built (crate::metrics):
//! let c1 = C1Metrics::register(&mut registry);
//! // per connector whose Secret has BATON_CLIENT_ID / BATON_CLIENT_SECRET:
//! let credentials = ClientCredentials::parse(id, secret)?;        // Err: ConductorOneConnected=False,
//!                                                                 //      reason InvalidClientCredentials
//! let settings = ServiceSettings {
//!     connector: <store connector key>, host_id: <stable id, e.g. BATON_HOST_ID or ns/name>,
//!     endpoint: C1Endpoint { tenant_host: credentials.client_id().host.clone(),
//!                            api_host_override: spec.conductorOne.apiHost, extra_ca_pem: spec caBundle },
//!     max_snapshot_age: spec.conductorOne.maxSnapshotAge (default 1h), work_dir: <dir of the store>,
//!     on_rejected: OnRejected::Retry, timing: Timing::default() };
//! let backend = Backend { store, engine: SyncEngine::new(<the connector's Client>, workspaces),
//!                         provisioner: <the connector's Provisioner> };
//! let session = ServiceSession::new(settings, credentials, backend, Some(c1.clone()))?;
//! let status = session.status();                 // watch::Receiver<SessionStatus>
//! tokio::spawn(session.run(cancel.clone()));     // cancel on leadership loss, deletion, Secret change
//! // on status.changed(): status.borrow().condition() → ConductorOneConnected;
//! //                      status.conductorOne ← host_id, last_task, last_upload, task_counts (serde camelCase)
//! ```

pub mod c1z;
pub mod cli;
pub mod connect;
pub mod credential_api;
pub mod credentials;
pub mod inventory;
pub mod ksuid;
pub mod metrics;
pub mod proto;
pub mod provisioning;
pub mod rotate_cli;
pub mod rotation;
pub mod rotation_file;
pub mod rpc;
pub mod session;
pub mod snapshot;
pub mod status;
pub mod token;

use std::path::Path;

use serde::Serialize;

pub use c1z::WriteSummary;
pub use connect::parse_age;
pub use credentials::{ClientCredentials, CredentialError};
pub use inventory::{Inventory, InventoryError, TypeAge};
pub use metrics::C1Metrics;
pub use session::{Backend, OnRejected, ServiceSession, ServiceSettings, SessionError, Timing, default_host_id};
pub use status::{ConditionView, ConnectionReason, SessionStatus};
pub use token::C1Endpoint;

use crate::store::Store;

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    #[serde(flatten)]
    pub file: WriteSummary,
    /// Users synthesised for explicit permissions of non-members.
    pub non_member_users: usize,
    /// Grants to groups not in the store, left out.
    pub dropped_grants: usize,
    /// Per resource type, how old its data is (seconds).
    pub data_age_seconds: std::collections::BTreeMap<String, i64>,
}

/// Errors of [`export`].
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    C1z(#[from] c1z::C1zError),
}

/// Writes `connector`'s current complete data from `store` as a c1z at
/// `out`. Blocking (SQLite and zstd); async callers use `spawn_blocking`.
pub fn export(store: &Store, connector: &str, out: &Path) -> Result<ExportReport, ExportError> {
    let inventory = inventory::build(store, connector)?;
    let now = jiff::Timestamp::now().as_millisecond();
    let file = c1z::write(&inventory, out, now)?;
    Ok(ExportReport {
        file,
        non_member_users: inventory.non_member_users,
        dropped_grants: inventory.dropped_grants,
        data_age_seconds: inventory
            .ages
            .iter()
            .map(|a| {
                (
                    a.kind.resource_type().as_str().to_owned(),
                    (now - a.committed_at).max(0) / 1000,
                )
            })
            .collect(),
    })
}
