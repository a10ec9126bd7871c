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
//! - [`cli`]: the `export` command.

pub mod c1z;
pub mod cli;
pub mod connect;
pub mod credentials;
pub mod inventory;
pub mod ksuid;
pub mod metrics;
pub mod proto;
pub mod provisioning;
pub mod rpc;
pub mod session;
pub mod snapshot;
pub mod status;
pub mod token;

use std::path::Path;

use serde::Serialize;

pub use c1z::WriteSummary;
pub use credentials::{ClientCredentials, CredentialError};
pub use inventory::{Inventory, InventoryError, TypeAge};
pub use metrics::C1Metrics;
pub use session::{Backend, OnRejected, ServiceSession, ServiceSettings, SessionError, Timing, default_host_id};
pub use status::{ConnectionReason, SessionStatus};
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
