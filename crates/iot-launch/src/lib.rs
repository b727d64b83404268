//! Real servers and processes, started and stopped by PID: what the local launcher
//! (`iot-up`) and the tests both need.
//!
//! Every server gets its own process on a free loopback port (or a private unix
//! socket), in its own directory, and is killed when dropped. Test-only helpers
//! (container cleanup, cut links, binaries built for tests) live in `iot-testkit`.

pub mod apiserver;
pub mod auth;
pub mod bao;
pub mod guest;
pub mod helm;
pub mod http;
pub mod in_cluster;
pub mod kube_apiserver;
pub mod kube_node;
pub mod nats;
pub mod nats_cluster;
pub mod oidc;
pub mod operator;
pub mod paths;
pub mod podman;
pub mod process;
pub mod registry;
pub mod tls;
pub mod vm;
pub mod vm_seed;

pub use apiserver::ApiServer;
pub use bao::OpenBao;
pub use kube_apiserver::KubeApiServer;
pub use kube_node::{KubeNode, NodeOptions};
pub use nats::NatsServer;
pub use nats_cluster::{ClusterOptions, NatsCluster};
pub use oidc::{OidcOptions, OidcStandIn};
pub use podman::IsolatedPodman;
pub use podman::PodmanService;
pub use process::{LoggedProcess, free_port, run_captured, wait_until};
pub use registry::{Registry, RegistryKeys, RegistryOptions, RegistryToken, RegistryTokenOptions};
pub use tls::{Ca, TlsMode};
