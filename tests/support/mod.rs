//! Test doubles and set-up shared by the integration tests.
//!
//! Declare this module as `pub mod support;` in each test crate: its items are then an API of
//! the crate, so one crate not using a helper another uses is no dead code, while private code
//! nobody uses still is (no `allow(dead_code)`). Modules that need the Bitbucket simulator
//! exist only with the `simulator` feature, like the test binaries that use them.

#[cfg(feature = "simulator")]
pub mod c1_operator;
pub mod cluster;
#[cfg(feature = "simulator")]
pub mod data_api;
pub mod fake_c1;
pub mod fake_kube;
#[cfg(feature = "simulator")]
pub mod grant_env;
pub mod running_operator;
pub mod status;
