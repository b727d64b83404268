//! Images from a private registry: who may pull what, and which bits a tag means.
//!
//! The flow (README "Images and registries"):
//! 1. A Deployment names `registry/repo:tag`. The operator resolves the tag to a
//!    digest once per revision ([`resolve`]) and writes `registry/repo@digest` into
//!    desired state, so every device runs the same bits.
//! 2. Before a pull, the agent asks the operator for a pull grant over NATS. The
//!    subject proves which device asks; the operator signs a short-lived registry
//!    token ([`token`]) for that device, listing the repositories its deployments
//!    name and nothing else.
//! 3. The agent hands the grant to podman as the password. The registry sends
//!    podman to the token service (`iot-registry-token`, [`realm`]), which checks the
//!    grant and issues the registry token for what podman asked, within the grant.
//!    People and CI push through the same service with their own credentials.

pub mod realm;
pub mod reference;
pub mod resolve;
pub mod server;
pub mod token;

pub use reference::ImageRef;
pub use token::{Access, Claims, SigningKey};
