//! Test doubles shared by the integration tests.
//!
//! Declare this module as `pub mod support;` in each test crate: its items are then an API of
//! the crate, so one crate not using a helper another uses is no dead code, while private code
//! nobody uses still is (no `allow(dead_code)`).

pub mod fake_kube;
