//! Bitbucket Cloud identity-governance connector: the library behind the
//! `bitbucket-operator` binary. One module per concern:
//!
//! - [`bitbucket`]: the Bitbucket Cloud REST client (auth, pagination, rate
//!   limits, typed errors).
//! - [`simulator`]: a Bitbucket Cloud API simulator on loopback, for tests,
//!   benchmarks and `sync --demo`.
//! - [`model`]: the access model (resources, entitlements, grants).
//! - [`store`]: the embedded SQLite store (generations of synced data, sync runs).
//! - [`access`]: effective access (who can reach a repository, what a user can reach).
//! - [`crd`]: the custom resources (`BitbucketConnector`,
//!   `BitbucketAccessGrant`) and their condition helpers.

pub mod access;
pub mod bitbucket;
pub mod crd;
pub mod model;
pub mod settings;
pub mod simulator;
pub mod store;
pub mod sync;
pub mod telemetry;
