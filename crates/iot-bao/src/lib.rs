//! A small OpenBao (Vault-compatible) HTTP client with just what the platform uses:
//! - devices and services log in with approle and fetch an identity token (a signed
//!   OIDC JWT) which they present to NATS;
//! - the auth callout reads enrollment records from KV v2;
//! - `iotctl` enrolls and revokes devices and sets up a fresh OpenBao.

mod client;
pub mod enroll;
pub mod setup;

pub use client::{Bao, BaoError, IdentityToken, Login};
