//! Bitbucket Cloud identity-governance connector: the library behind the
//! `bitbucket-operator` binary. One module per concern:
//!
//! - [`bitbucket`]: the Bitbucket Cloud REST client (auth, pagination, rate
//!   limits, typed errors).
//! - [`simulator`]: a Bitbucket Cloud API simulator on loopback, for tests,
//!   benchmarks and `sync --demo`.
//! - [`model`]: the access model (resources, entitlements, grants).
//! - [`crd`]: the custom resources (`BitbucketConnector`,
//!   `BitbucketAccessGrant`) and their condition helpers.

pub mod bitbucket;
pub mod crd;
pub mod model;
pub mod simulator;
pub mod telemetry;
