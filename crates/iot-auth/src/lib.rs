//! The NATS auth callout: who may connect to the platform's NATS, as whom, with
//! which permissions.
//!
//! A client presents an OIDC identity token (from OpenBao here, Zitadel or any
//! issuer in production) as its NATS connect token. nats-server hands the connect
//! to this service ([`callout`]), which:
//! 1. verifies the token against the issuer's published keys ([`oidc`]);
//! 2. maps its claims to a device or a platform service ([`identity`]);
//! 3. checks the identity is enrolled and not revoked, in OpenBao ([`enrollment`]);
//! 4. answers with a NATS user JWT, signed by the IOT account's issuer key, whose
//!    permissions cover only what that identity may touch ([`permissions`]) and
//!    which expires no later than the presented token ([`nats_jwt`]).

pub mod callout;
pub mod claims;
pub mod enrollment;
pub mod nats_jwt;
pub mod oidc;
pub mod permissions;
