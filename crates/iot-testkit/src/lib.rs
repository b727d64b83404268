//! Real servers for tests and for the local stack.
//!
//! Every fixture starts its own process on a free loopback port (or a private unix
//! socket), in its own temp directory, and kills it by PID when dropped, so tests run
//! in parallel and leave nothing behind even when they fail.

pub mod apiserver;
pub mod http;
pub mod nats;
pub mod netns;
pub mod paths;
pub mod podman;
pub mod process;

pub use apiserver::ApiServer;
pub use nats::NatsServer;
pub use netns::NetNs;
pub use podman::{DeviceContainers, PodmanService};
pub use process::{LoggedProcess, cargo_bin, free_port, unique_id, wait_until};
