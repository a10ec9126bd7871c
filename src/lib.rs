//! Bitbucket Cloud identity-governance connector: the library behind the
//! `bitbucket-operator` binary. One module per concern:
//!
//! - [`bitbucket`]: the Bitbucket Cloud REST client (auth, pagination, rate
//!   limits, typed errors).
//! - [`simulator`]: a Bitbucket Cloud API simulator on loopback, for tests,
//!   benchmarks and `sync --demo`; behind the `simulator` cargo feature (on
//!   by default). Without it, a stand-in makes `simulate` and `sync --demo`
//!   say how to get it.
//! - [`model`]: the access model (resources, entitlements, grants).
//! - [`store`]: the embedded SQLite store (generations of synced data, sync runs).
//! - [`access`]: effective access (who can reach a repository, what a user can reach).
//! - [`controller`]: the Kubernetes controller (`run`), sync loops and status.
//! - [`metrics`], [`http`], [`api`]: Prometheus metrics, the probe/metrics
//!   endpoints, and the authenticated read-only data API.
//! - [`settings`], [`sync`]: baton-format Secrets, and the sync engine.
//! - [`provision`]: grants and revokes (group membership, project and
//!   repository permissions), idempotent and precise, for the CLI and the
//!   access-grant controller.
//! - [`egress`]: the administrator's allow-list of base URLs the operator
//!   may send credentials to.
//! - [`conductorone`]: ConductorOne service mode and c1z files.
//! - [`crd`]: the custom resources (`BitbucketConnector`,
//!   `BitbucketAccessGrant`) and their condition helpers.

pub mod access;
pub mod api;
pub mod backoff;
pub mod bitbucket;
pub mod conductorone;
pub mod controller;
pub mod crd;
pub mod egress;
pub mod http;
pub mod metrics;
pub mod model;
pub mod provision;
pub mod settings;
#[cfg(feature = "simulator")]
pub mod simulator;
#[cfg(not(feature = "simulator"))]
#[path = "simulator/absent.rs"]
pub mod simulator;
pub mod store;
pub mod sync;
pub mod telemetry;
