//! Bitbucket Cloud simulator.
pub mod cli;
