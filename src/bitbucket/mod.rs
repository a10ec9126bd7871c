//! Bitbucket Cloud REST client for what an identity-governance connector
//! needs: reads for sync, permission writes for provisioning, built against
//! `shared/bitbucket/API-CONTRACT.md` and Atlassian's OpenAPI document.
//!
//! - [`Credentials`]: API token (Basic, email + token), access token (Bearer)
//!   or OAuth consumer (client credentials); secrets redacted in `Debug`.
//! - [`Limiter`]: a rolling-window limiter plus in-flight cap, shared by every
//!   client presenting the same whole credential (never just a username).
//! - [`Client`]: typed endpoints, paginated listings as streams of pages,
//!   retries, and one typed [`Error`].

mod client;
mod credentials;
mod error;
mod limiter;
pub mod models;

pub use client::{
    Client, ClientConfig, DEFAULT_API_URL, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PAGES, DEFAULT_TOKEN_URL, Holder,
    MembershipChange, PermissionScope, RequestObserver,
};
pub use credentials::Credentials;
pub use error::{EMAIL_HINT, EndpointClass, Error, ErrorKind};
pub use limiter::{
    Lane, Limiter, LimiterShare, Limits, Permit, ProvisioningReserve, default_provisioning_reserve,
    set_default_provisioning_reserve,
};
